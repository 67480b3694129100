"""Expert down-projections and router nudges, for the super-weight detector (``uspx.superweights``).

The detector needs, per (layer, expert), the down-projection's input (the activated intermediate
``a = act(gate) * up``, [n, I]) and its output ([n, H]) on the tokens routed to that expert, and one
scalar of ``W_down`` to read, zero and restore. Those depend on each family's tensor layout, which
nothing outside ``uspx.models`` may know, so they live here.

Index convention: every function takes ``(row, col)`` in the **Linear weight convention**
``W_down[e][row, col]``, ``row`` = output channel (hidden / d_model), ``col`` = input channel
(intermediate / d_ff), so that ``out[:, row] = sum_col a[:, col] * W_down[e][row, col]`` (+ bias).
The detector's co-spike pair ``(r*, c*)`` is (ff index, model index) and its scalar is
``W_down[c*, r*]``: ``row = c*`` (catalogue field ``col_model``), ``col = r*`` (``row_ff``).

Storage, checked against transformers 5.23:

- gpt_oss: ``down_proj [E, I, H]`` and ``down_proj_bias [E, H]``, ``out = a @ W[e] + b[e]``, so
  ``W_down[e][row, col]`` is stored at ``down_proj[e, col, row]``; the activation is the clamped
  SwiGLU of the interleaved ``gate_up_proj [E, H, 2I]`` (the module's own ``_apply_gate``).
- mixtral layout (mixtral, qwen2_moe, qwen3_moe, olmoe, granitemoe, phimoe, jamba, deepseek_v3):
  ``gate_up_proj [E, 2I, H]`` (gate rows first), ``down_proj [E, H, I]``, no bias,
  ``out = W[e] @ a``, so ``W_down[e][row, col]`` is stored at ``down_proj[e, row, col]``.
- dbrx (flattened ``[E*F, H]`` experts) and anything else: :class:`UspxError`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from uspx.io import UspxError
from uspx.models.base import MoEAdapter, MoELayer

GPT_OSS_LAYOUT = ("gpt_oss",)
MIXTRAL_LAYOUT = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "phimoe", "jamba", "deepseek_v3")


def _layout(adapter: MoEAdapter) -> str:
    if adapter.family in GPT_OSS_LAYOUT:
        return "gpt_oss"
    if adapter.family in MIXTRAL_LAYOUT:
        return "mixtral"
    raise UspxError(
        f"super-weight detection does not support the {adapter.family!r} expert layout yet "
        f"(supported: {', '.join(GPT_OSS_LAYOUT + MIXTRAL_LAYOUT)})"
    )


def intermediate_size(adapter: MoEAdapter, layer: MoELayer) -> int:
    """Width I of one expert's intermediate (d_ff)."""
    w = layer.experts.down_proj
    return int(w.shape[1] if _layout(adapter) == "gpt_oss" else w.shape[2])


def down_weight_dtype(adapter: MoEAdapter, layer: MoELayer) -> torch.dtype:
    """The dtype ``W_down`` is stored in: what a catalogued value rounds to when written back."""
    _layout(adapter)
    return layer.experts.down_proj.dtype


def down_proj_io(
    adapter: MoEAdapter, layer: MoELayer, expert: int, hidden: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(act_in [n, I], out [n, H]) of ``expert``'s down-projection for the rows of ``hidden`` [n, H].

    ``hidden`` are the inputs of the experts module (after the block's norm), restricted by the
    caller to the tokens routed to ``expert``. ``out`` is the expert's ungated output f_e(x), equal
    to what the family's own forward computes (tested against ``adapter.expert_outputs``).
    """
    ex = layer.experts
    e = int(expert)
    gpt_oss = _layout(adapter) == "gpt_oss"
    with torch.no_grad():
        # the module's own activation (gpt_oss: its clamped SwiGLU, alpha and limit included)
        act = adapter.expert_intermediate(layer, hidden.to(ex.down_proj.dtype), e)
        if gpt_oss:
            out = act @ ex.down_proj[e] + ex.down_proj_bias[e]
        else:
            out = torch.nn.functional.linear(act, ex.down_proj[e])
    return act, out


def down_matrix(adapter: MoEAdapter, layer: MoELayer, expert: int) -> torch.Tensor:
    """``W_down[e]`` as a [H, I] view in the Linear convention (read-only use)."""
    w = layer.experts.down_proj.detach()[int(expert)]
    return w.t() if _layout(adapter) == "gpt_oss" else w


def down_weight_index(
    adapter: MoEAdapter, layer: MoELayer, expert: int, row: int, col: int
) -> tuple[str, tuple[int, int, int]]:
    """(state-dict name, index in storage) of ``W_down[expert][row, col]`` (Linear convention:
    row = hidden output channel, col = intermediate input channel)."""
    e, row, col = int(expert), int(row), int(col)
    gpt_oss = _layout(adapter) == "gpt_oss"
    _, a, b = (int(d) for d in layer.experts.down_proj.shape)
    ff, h = (a, b) if gpt_oss else (b, a)
    if not (0 <= e < layer.num_experts and 0 <= row < h and 0 <= col < ff):
        raise UspxError(
            f"W_down[{e}][{row}, {col}] is outside layer {layer.index}'s experts "
            f"({layer.num_experts} experts, hidden {h}, intermediate {ff})"
        )
    index = (e, col, row) if gpt_oss else (e, row, col)
    return f"{layer.name}.experts.down_proj", index


def get_down_weight(adapter: MoEAdapter, layer: MoELayer, expert: int, row: int, col: int) -> float:
    _, index = down_weight_index(adapter, layer, expert, row, col)
    return float(layer.experts.down_proj.data[index])


def set_down_weight(adapter: MoEAdapter, layer: MoELayer, expert: int, row: int, col: int, value: float) -> float:
    """Write one scalar in place (no autograd); returns the old value."""
    _, index = down_weight_index(adapter, layer, expert, row, col)
    data = layer.experts.down_proj.data
    old = float(data[index])
    data[index] = value
    return old


@contextlib.contextmanager
def down_weight_zeroed(adapter: MoEAdapter, layer: MoELayer, expert: int, row: int, col: int) -> Iterator[float]:
    """Zero one scalar for the duration of the block; yields the original value."""
    old = set_down_weight(adapter, layer, expert, row, col, 0.0)
    try:
        yield old
    finally:
        set_down_weight(adapter, layer, expert, row, col, old)


@contextlib.contextmanager
def router_biased(adapter: MoEAdapter, layer: MoELayer, expert: int, beta: float) -> Iterator[None]:
    """Add ``beta`` to ``expert``'s router logit before top-k (the interventional importance routes
    tokens to the expert this way).

    gpt_oss: ``router.bias[e] += beta`` (exactly a logit shift, restored afterwards). Families
    without a router bias: a router forward hook, prepended so transformers' recorders and uspx's
    tracer see the biased routing, that adds beta to ``logits[:, e]`` and re-routes with the
    family's own rule (``adapter.route``).
    """
    e = int(expert)
    bias = getattr(layer.router, "bias", None)
    if adapter.family in GPT_OSS_LAYOUT and isinstance(bias, torch.Tensor):
        old = float(bias.data[e])
        bias.data[e] = old + beta
        try:
            yield
        finally:
            bias.data[e] = old
        return
    if not adapter.router_returns_tuple:
        raise UspxError(f"{adapter.family}: its router returns logits only; interventional routing is not supported")

    def hook(module: torch.nn.Module, args: tuple, output: object) -> object:
        logits = adapter.router_logits(output).clone()
        logits[..., e] += beta
        weights, index = adapter.route(layer, logits)
        return (logits, weights, index)

    handle = layer.router.register_forward_hook(hook, prepend=True)
    try:
        yield
    finally:
        handle.remove()
