"""Forward passes over a slice of the workload, with the measurements the detector needs.

One pass gives, for the real (non-pad) tokens of every sequence: the next-token loss per
sequence, the stopword probability mass at every position, the post-block hidden state of chosen
decoder layers (for the channel-energy proxy) and the routing of every MoE layer. Tokens are kept
in one flat order (batch by batch, row-major, pads dropped) so that every measurement lines up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from uspx.engine.batches import Batch, make_batches
from uspx.engine.forward import forward, generate
from uspx.engine.losses import log_probs, masked_token_nll, real_pair_mask
from uspx.engine.hooks import decoder_layer, forward_hook, hooked, pre_hook
from uspx.models import MoEAdapter, MoELayer
from uspx.trace.capture import RoutingRecorder
from uspx.workload import EncodedItem


@dataclass
class Slice:
    """A fixed set of workload items cut into right-padded batches, in the items' order."""

    name: str
    items: list[EncodedItem]
    batches: list[Batch]
    sample: torch.Tensor  # [N] row in ``items`` of every real token
    position: torch.Tensor  # [N] absolute position of every real token

    @property
    def n_tokens(self) -> int:
        return int(self.sample.numel())


def make_slice(name: str, items: list[EncodedItem], batch_size: int, pad_id: int) -> Slice:
    bs = make_batches(items, batch_size, pad_id, by_length=False)
    sample = [torch.tensor(b.rows).repeat_interleave(b.input_ids.shape[1])[b.real] for b in bs]
    position = [torch.arange(b.input_ids.shape[1]).repeat(len(b.rows))[b.real] for b in bs]
    return Slice(name, items, bs, torch.cat(sample), torch.cat(position))


@dataclass
class PassResult:
    seq_loss: torch.Tensor  # [S] summed next-token NLL per sequence (nats)
    seq_count: torch.Tensor  # [S] scored targets per sequence
    stop_mass: torch.Tensor | None = None  # [N] stopword probability mass predicted at each token
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # decoder layer -> [N, H] post-block
    routing: dict[int, torch.Tensor] = field(default_factory=dict)  # MoE layer -> [N, k] expert ids
    inputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # MoE layer -> (experts' input hidden [N, H], expert ids [N, k], gate weights [N, k])

    @property
    def loss(self) -> float:
        """Mean next-token loss over all scored tokens of the slice (nats/token)."""
        return float(self.seq_loss.sum() / self.seq_count.sum().clamp(min=1))

    def seq_mean(self) -> torch.Tensor:
        return self.seq_loss / self.seq_count.clamp(min=1)


class _Stop(Exception):
    """Raised from a hook to end a forward pass early (nothing after it is needed)."""


def run_pass(
    model: nn.Module,
    adapter: MoEAdapter,
    sl: Slice,
    *,
    stop_ids: torch.Tensor | None = None,
    capture: tuple[int, ...] = (),
    routing: bool = False,
    inputs: bool = False,
) -> PassResult:
    """One full forward over ``sl``; what is measured besides the loss is opt-in.

    ``inputs`` keeps what every MoE layer's experts received, which is enough to compute exactly
    how zeroing one W_down scalar changes that layer's post-block hidden state without a forward.
    """
    n_seq = len(sl.items)
    seq_loss = torch.zeros(n_seq, dtype=torch.float64)
    seq_count = torch.zeros(n_seq, dtype=torch.float64)
    stop_parts: list[torch.Tensor] = []
    hidden: dict[int, list[torch.Tensor]] = {i: [] for i in capture}
    routes: dict[int, list[torch.Tensor]] = {l.index: [] for l in adapter.layers} if routing else {}
    state: dict[str, torch.Tensor] = {}
    hooks = []
    for idx in capture:
        mod = decoder_layer(adapter, idx)  # its output is the post-block hidden H^(l+1)

        def hook(module, args, output, idx=idx):
            h = output[0] if isinstance(output, tuple) else output
            hidden[idx].append(h.detach().reshape(-1, h.shape[-1])[state["real"]].float())

        hooks.append(forward_hook(mod, hook))
    ins: dict[int, list[tuple]] = {l.index: [] for l in adapter.layers} if inputs else {}
    for layer in adapter.layers if inputs else []:

        def keep_inputs(module, args, idx=layer.index):
            flat = args[0].reshape(-1, args[0].shape[-1])
            real = state["real"]
            ins[idx].append((flat.detach()[real].float().clone(), args[1].reshape(flat.shape[0], -1)[real].clone(),
                             args[2].reshape(flat.shape[0], -1)[real].float().clone()))

        hooks.append(pre_hook(layer.experts, keep_inputs))
    # the hooks are attached before the recorder's, so they see the batch first, as always
    with torch.no_grad(), hooked(hooks), RoutingRecorder(adapter) as rec:
        for b in sl.batches:
            real = state["real"] = b.real
            rec.clear()
            logits = forward(model, b.input_ids, b.attention_mask).logits
            # next-token loss where both the position and its target are real tokens
            valid = real_pair_mask(b.attention_mask)
            nll = masked_token_nll(logits, b.input_ids, valid)
            for r, row in enumerate(b.rows):
                seq_loss[row] += float(nll[r].sum())
                seq_count[row] += float(valid[r].sum())
            if stop_ids is not None:
                stop_parts.append(log_probs(logits)[..., stop_ids].exp().sum(-1).reshape(-1)[real])
            for layer_idx in routes:
                routes[layer_idx].append(rec.layers[layer_idx].index[real].clone())
            del logits
    return PassResult(
        seq_loss,
        seq_count,
        torch.cat(stop_parts) if stop_parts else None,
        {i: torch.cat(v) for i, v in hidden.items()},
        {i: torch.cat(v) for i, v in routes.items()},
        {i: tuple(torch.cat(part) for part in zip(*v)) for i, v in ins.items()},
    )


def layer_inputs(model: nn.Module, adapter: MoEAdapter, sl: Slice, layer: MoELayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [N, H], expert ids [N, k]) entering ``layer``'s experts, real tokens only.

    The forward stops right after this layer's router: later layers are not needed, which makes
    the re-runs of iterative suppression cheap for early layers.
    """
    hs, ix = [], []
    state: dict[str, torch.Tensor] = {}

    def hook(module, args):
        h = args[0].reshape(-1, args[0].shape[-1])
        hs.append(h.detach()[state["real"]].float().clone())
        ix.append(args[1].reshape(h.shape[0], -1)[state["real"]].clone())
        raise _Stop

    with torch.no_grad(), hooked([pre_hook(layer.experts, hook)]):
        for b in sl.batches:
            state["real"] = b.real
            try:
                forward(model, b.input_ids, b.attention_mask, head=False)
            except _Stop:
                pass
    return torch.cat(hs), torch.cat(ix)


def repetition_rate(model: nn.Module, prompts: list[list[int]], new_tokens: int, pad_id: int, n: int = 3) -> float:
    """Share of greedily generated tokens that close an n-gram already generated (degeneration).

    A broken model loops; a healthy one rarely repeats a 3-gram within a few dozen tokens.
    """
    repeats, total = 0, 0
    for p in prompts:
        ids = torch.tensor([p])
        out = generate(model, ids, torch.ones_like(ids), max_new_tokens=new_tokens, pad_token_id=pad_id)
        gen = out[0, len(p):].tolist()
        seen: set[tuple[int, ...]] = set()
        for i in range(n - 1, len(gen)):
            gram = tuple(gen[i - n + 1 : i + 1])
            repeats += gram in seen
            total += 1
            seen.add(gram)
    return repeats / max(total, 1)
