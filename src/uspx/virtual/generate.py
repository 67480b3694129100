"""Generation with virtual experts: transformers' own ``generate``, stopped where the probe says a
computation follows, the tool's exact result spliced in, and generation resumed.

A forward hook on decoder layer ``probe.layer`` keeps the hidden state of the last input position
of every forward; a stopping criterion runs the probe on it. When the probe fires at position ``t``
(the model has just read, say, ``654 + 30937 =``), the token the model sampled after ``t`` is
dropped, the expression on the current line before ``=`` goes to the tool (``calc``), and its
result is appended as text; then ``generate`` continues from there. A tool that refuses its input
leaves the model's own continuation in place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from uspx.io import UspxError
from uspx.virtual.probe import TRIGGER, Probe
from uspx.virtual.tools import ToolRefusal, calc


@dataclass
class ToolCall:
    position: int  # characters of output before the splice
    expression: str
    result: str | None
    refused: str | None = None


@dataclass
class Generated:
    text: str  # the continuation only
    calls: list[ToolCall] = field(default_factory=list)


class _ProbeStop:
    """Stopping criterion: the probe fired on the last input position of the latest forward."""

    def __init__(self, model, probe: Probe, skip_positions: set[int]):
        from uspx.engine.hooks import decoder_layer, forward_hook, register
        from uspx.models import adapter_for

        self.probe, self.skip = probe, skip_positions
        self.hidden: torch.Tensor | None = None
        self.fired_at: int | None = None
        self.handle = register(forward_hook(decoder_layer(adapter_for(model), probe.layer), self._keep))

    def _keep(self, module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        self.hidden = h[0, -1].detach().cpu()  # the probe's weights live on the CPU

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        position = input_ids.shape[1] - 2  # the position whose hidden state produced the newest token
        fire = self.hidden is not None and position not in self.skip and bool(self.probe.fires(self.hidden[None])[0])
        if fire:
            self.fired_at = position
        return torch.tensor([fire], dtype=torch.bool, device=input_ids.device)

    def remove(self) -> None:
        self.handle.remove()


def generate_with_tools(model, tokenizer, prompt: str, probe: Probe, *, max_new_tokens: int = 64,
                        max_calls: int = 32) -> Generated:
    """Greedy continuation of ``prompt`` (``max_new_tokens`` model tokens at most), with the
    calculator called wherever ``probe`` fires."""
    from uspx.engine.forward import generate

    if probe.tool != "calc":
        raise UspxError(f"no generation hook for tool {probe.tool!r}; the calculator is the one wired to a probe")
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    if ids.shape[1] == 0:
        raise UspxError("the prompt is empty")
    start, budget, calls, skip = ids.shape[1], max_new_tokens, [], set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    while budget > 0:
        stop = _ProbeStop(model, probe, skip)
        try:
            out = generate(model, ids, torch.ones_like(ids), max_new_tokens=budget, stopping_criteria=[stop],
                           pad_token_id=eos if isinstance(eos, int) else 0)
        finally:
            stop.remove()
        budget -= out.shape[1] - ids.shape[1]
        if stop.fired_at is None or len(calls) >= max_calls:
            ids = out
            break
        kept = out[:, : stop.fired_at + 1]  # drop what the model sampled after the trigger
        text_so_far = tokenizer.decode(kept[0, start:]) if kept.shape[1] > start else ""
        context = tokenizer.decode(kept[0])
        match = TRIGGER.search(context)
        call = ToolCall(len(text_so_far), match.group(1).strip() if match else "", None)
        calls.append(call)
        try:
            if not match:
                raise ToolRefusal("no arithmetic expression before '='")
            call.result = calc(call.expression).text
        except ToolRefusal as exc:
            call.refused = str(exc)
            skip.add(stop.fired_at)  # let the model continue on its own there
            ids = out
            continue
        spliced = tokenizer.encode(" " + call.result, add_special_tokens=False)
        ids = torch.cat([kept, torch.tensor([spliced])], dim=1)
        budget += 1  # the dropped token did not count
    text = tokenizer.decode(ids[0, start:])
    return Generated(re.sub(r"\s+$", "", text) if text.strip() else text, calls)
