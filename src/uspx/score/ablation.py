"""Causal scores: the loss change when one expert is removed.

Two removals, both shape-preserving:

- *natural*: the expert's output is zeroed and the router is untouched. A forward pre-hook on the
  layer's ``experts`` module sets the gate weight of the expert's slots to 0, so every other routed
  expert keeps its weight (no renormalisation) and the block output loses exactly ``g * f_e(x)``.
- *interventional*: the expert is banned in the router (``adapter.restrict`` with every other
  expert kept), so the next expert takes its slot and the weights are recomputed by the family's
  own routing; this is what physical pruning does.

Exact savings, no approximation: routing at layer l depends only on earlier layers, which neither
removal touches, so a batch in which no real token was routed to (l, e) is provably unchanged and is
not run (its deltas are 0). Experts are run one at a time: two experts ablated in one forward would
interact, and replicating the batch per expert costs the same compute. For the same reason, the
decoder layers before l are not re-run: their output is captured once per batch (a forward stopped
right after it) and replayed, so an ablation at layer l costs only layers l.. plus the LM head.
"""

from __future__ import annotations

import contextlib
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn

from uspx.dist import Dist
from uspx.engine.forward import forward
from uspx.engine.hooks import forward_hook, hooked, pre_hook
from uspx.io import UspxError
from uspx.models import MoEAdapter, MoELayer
from uspx.score.baseline import Baseline
from uspx.score.loss import token_losses

KINDS = ("natural", "interventional")


@dataclass
class AblationResult:
    kind: str
    delta_sum: np.ndarray  # [P, L, E] summed loss change over each prompt's target tokens
    routed_delta_sum: np.ndarray  # [P, L, E] the same, only at target positions routed to (l, e)
    forwards: int  # forward passes actually run
    skipped: int  # batches skipped because (l, e) served no token in them


@contextmanager
def ablate(adapter: MoEAdapter, layer: MoELayer, expert: int, kind: str) -> Iterator[None]:
    """Inside the block, ``layer``'s expert ``expert`` is removed in the given way."""
    if kind == "natural":
        def zero_weight(module, args):
            if len(args) < 3:
                raise UspxError(f"{layer.name}.experts was called without (hidden, index, weights)")
            hidden, index, weights = args[0], args[1], args[2]
            weights = weights.masked_fill(index == expert, 0)
            return (hidden, index, weights, *args[3:])

        with hooked([pre_hook(layer.experts, zero_weight)]):
            yield
    elif kind == "interventional":
        kept = [e for e in range(layer.num_experts) if e != expert]
        with adapter.restrict({layer.index: kept}):
            yield
    else:
        raise ValueError(f"unknown ablation kind {kind!r}; use one of {KINDS}")


class _Stop(Exception):
    """Raised by a capture hook to end a forward once the wanted output exists."""


class _Replay(nn.Module):
    """Stands in for a decoder layer before the ablated one: returns the recorded output of the layer
    just before it, whatever it is given. Attribute reads (``attention_type``...) go to the layer it
    replaces, so the model's layer loop sees nothing different."""

    def __init__(self, original: nn.Module, output: object):
        super().__init__()
        object.__setattr__(self, "_original", original)  # not registered: keeps the state dict clean
        self._output = output

    def forward(self, *args: object, **kwargs: object) -> object:
        return self._output

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)


def _decoder_stack(adapter: MoEAdapter, layer: MoELayer) -> tuple[nn.ModuleList, int] | None:
    """The ModuleList of decoder layers holding ``layer`` and its position there (None if not found)."""
    name = layer.name + "."
    m = re.search(adapter.layer_pattern, name)
    if m is None:
        return None
    try:
        stack = adapter.model.get_submodule(name[: m.start(1) - 1])
    except AttributeError:
        return None
    pos = int(m.group(1))
    if not isinstance(stack, nn.ModuleList) or pos >= len(stack):
        return None
    return stack, pos


def _capture_prefix(model: nn.Module, stack: nn.ModuleList, pos: int, batch) -> object:
    """Output of decoder layer ``pos - 1`` for the batch, without running the layers after it."""
    box: list[object] = []

    def hook(module, args, output):
        box.append(output)
        raise _Stop

    with hooked([forward_hook(stack[pos - 1], hook)]):
        try:
            forward(model, batch.input_ids, batch.attention_mask, head=False)
        except _Stop:
            pass
    if not box:
        raise UspxError("could not capture the decoder layer output for prefix replay")
    return box[0]


@contextmanager
def _replay_prefix(stack: nn.ModuleList, pos: int, output: object) -> Iterator[None]:
    originals = [stack[i] for i in range(pos)]
    try:
        for i in range(pos):
            stack[i] = _Replay(originals[i], output)
        yield
    finally:
        for i in range(pos):
            stack[i] = originals[i]


def run_ablation(
    model: torch.nn.Module, adapter: MoEAdapter, base: Baseline, kind: str, bar, *, replay: bool = True,
    dist: Dist = Dist(),
) -> AblationResult:
    """Every (layer, expert) removed in turn. Under several processes each takes the (layer,
    expert) units ``dist.mine`` gives it and the per-prompt sums are added across processes (each
    unit's sums come from exactly one process, so the result is the single-process one)."""
    layers = adapter.layers
    e_count = adapter.num_experts
    shape = (base.n_prompts, len(layers), e_count)
    delta = np.zeros(shape)
    routed_delta = np.zeros(shape)
    forwards = skipped = 0
    with torch.no_grad():
        for pos, layer in enumerate(layers):
            found = _decoder_stack(adapter, layer) if replay else None
            prefix: dict[int, object] = {}
            if found is not None and found[1] > 0:
                stack, depth = found
                for bi, batch in enumerate(base.batches):
                    if base.routed[bi][pos].any():
                        prefix[bi] = _capture_prefix(model, stack, depth, batch)
            for expert in range(e_count):
                if not dist.mine(pos * e_count + expert):
                    bar.advance(len(base.batches))
                    continue
                bar.describe(f"ablation ({kind}) layer {layer.index} expert {expert}")
                for bi, batch in enumerate(base.batches):
                    if not base.hit(bi, pos, expert):
                        skipped += 1
                        bar.advance()
                        continue
                    replayed = _replay_prefix(*found, prefix[bi]) if bi in prefix else contextlib.nullcontext()
                    with ablate(adapter, layer, expert, kind), replayed:
                        losses = token_losses(model, batch)
                    forwards += 1
                    d = (losses - base.losses[bi]).double() * batch.loss_mask  # [B, T]
                    delta[batch.rows, pos, expert] = d.sum(1).numpy()
                    served = base.routed[bi][pos, :, :, expert]
                    routed_delta[batch.rows, pos, expert] = (d * served).sum(1).numpy()
                    bar.advance()
    counts = dist.sum(np.array([forwards, skipped], dtype=np.int64))
    return AblationResult(kind, dist.sum(delta), dist.sum(routed_delta), int(counts[0]), int(counts[1]))
