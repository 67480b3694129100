"""Joint selection: experts, expert channels and attention heads under one budget of weights plus KV
cache.

Runtimes hold one expert count, one expert width and one head layout for the whole model, so an
exportable choice is a shape: ``n`` experts per MoE layer, ``W`` channels per expert, ``G`` KV
groups per layer and ``r`` query heads per group; within a shape every layer keeps its own best
units. The value a shape keeps is the sum of its kept units' values, assuming removals add: a layer
loses its dropped experts' values, the dropped channels' values of the experts it keeps, its
dropped KV groups' values and the dropped query heads' values of the groups it keeps. Its cost is
the memory planner's exact size of the model with that shape (weights at the export precision plus
the KV cache for ``context`` tokens). With the shape the only free choice, enumerating every shape
solves the grouped knapsack exactly (at least top-k experts per layer, uniform counts per unit type),
so no relaxation is needed; the plan records the value kept per unit type and the runner-up shapes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from uspx.io import UspxError
from uspx.plan import memory as mem
from uspx.score.units import UnitScores, parse_units


@dataclass(frozen=True)
class Shape:
    experts: int  # per MoE layer
    width: int  # channels per expert
    kv_groups: int  # per decoder layer
    heads_per_group: int


def shaped_config(config: Any, shape: Shape) -> Any:
    """``config`` with ``shape``'s expert count, expert width and head counts (head_dim kept)."""
    from uspx.models import adapter_class
    from uspx.models.base import _set_field

    cfg = copy.deepcopy(mem.load_config(config))
    cls = adapter_class(cfg.model_type)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    _set_field(cfg, cls.expert_count_field, shape.experts)
    _set_field(cfg, cls.expert_width_field, shape.width)
    cfg.num_key_value_heads = shape.kv_groups
    cfg.num_attention_heads = shape.kv_groups * shape.heads_per_group
    cfg.head_dim = head_dim
    return cfg


def _top(values: np.ndarray, n: int) -> np.ndarray:
    """Ids of the ``n`` largest values (ties to the lower id), sorted."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return np.array(sorted(order[:n]), dtype=np.int64)


def _kept_sum_table(values: np.ndarray) -> np.ndarray:
    """[..., n + 1]: the sum of the k largest of each row, for k = 0..n."""
    ranked = -np.sort(-values, axis=-1)
    return np.concatenate([np.zeros((*values.shape[:-1], 1)), np.cumsum(ranked, axis=-1)], axis=-1)


@dataclass
class _Layers:
    """Per-layer values of the unit types being chosen."""

    experts: dict[int, np.ndarray]  # MoE layer -> [E]
    channels: dict[int, np.ndarray] | None  # MoE layer -> [E, I]
    groups: dict[int, np.ndarray] | None  # decoder layer -> [G]
    heads: dict[int, np.ndarray] | None  # decoder layer -> [H]


def _kept_values(v: _Layers, s: Shape, rep: int) -> dict[str, float]:
    """The value ``s`` keeps per unit type (each layer its best units within the shape)."""
    out = {"experts": 0.0, "channels": 0.0, "heads": 0.0}
    for layer, ev in v.experts.items():
        kept = _top(ev, s.experts)
        out["experts"] += float(ev[kept].sum())
        if v.channels is not None:
            out["channels"] += float(_kept_sum_table(v.channels[layer][kept])[:, s.width].sum())
    if v.groups is not None:
        for layer, gv in v.groups.items():
            groups = _top(gv, s.kv_groups)
            out["heads"] += float(gv[groups].sum())
            hv = v.heads[layer].reshape(len(gv), rep)[groups]
            out["heads"] += float(_kept_sum_table(hv)[:, s.heads_per_group].sum())
    return out


def _kept_layout(v: _Layers, s: Shape, rep: int) -> tuple[dict, dict | None, dict | None]:
    experts = {l: _top(ev, s.experts).tolist() for l, ev in v.experts.items()}
    channels = None
    if v.channels is not None:
        channels = {l: [_top(v.channels[l][e], s.width).tolist() for e in experts[l]] for l in experts}
    heads = None
    if v.groups is not None:
        heads = {}
        for l, gv in v.groups.items():
            groups = _top(gv, s.kv_groups)
            hv = v.heads[l].reshape(len(gv), rep)
            heads[l] = [int(g) * rep + int(h) for g in groups for h in _top(hv[g], s.heads_per_group)]
    return experts, channels, heads


def select_units(
    expert_values: dict[int, np.ndarray],
    units_table: UnitScores | None,
    config: Any,
    *,
    units: Sequence[str] | str = ("experts", "channels", "heads"),
    budget: int | str,
    method: str = "reconstruction",
    unit_method: str | None = None,
    dtype: str = "bf16",
    context: int = 4096,
    kv_dtype: str = "bf16",
    batch: int = 1,
    reserve_bytes: int = 0,
    channel_step: int | None = None,
    scores_fingerprint: str | None = None,
    model_fingerprint: str | None = None,
):
    """The shape (and every layer's units within it) keeping the most value under ``budget``.

    ``expert_values`` are the expert scores of ``method`` per MoE layer; ``units_table`` holds the
    channel and head scores (``unit_method``, default the same name). Unit types not in ``units``
    stay whole. ``channel_step`` is the width granularity (default 8 up to 256 channels, else 32: fused expert
    kernels need rows of a multiple of 16 bytes).
    """
    from uspx.models import adapter_class
    from uspx.plan.select import Plan

    units = parse_units(units)
    unit_method = unit_method or method
    cfg = mem.load_config(config)
    cls = adapter_class(cfg.model_type)
    params = mem.count_params(cfg)
    n_exp, top_k = params.num_experts, params.top_k
    width = cls.config_expert_width(cfg)
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    rep = heads // kv
    if sorted(expert_values) != sorted(params.moe_layers):
        raise UspxError(f"expert scores cover layers {sorted(expert_values)}, the model's MoE layers are "
                        f"{sorted(params.moe_layers)}")
    need = [u for u in units if u != "experts"]
    if need and units_table is None:
        raise UspxError(f"choosing {', '.join(need)} needs their scores: run `uspx score ... --units {','.join(units)}`")

    def unit_values(kind: str, layers: list[int]) -> dict[int, np.ndarray]:
        have = units_table.layers(kind)
        if sorted(have) != sorted(layers):
            raise UspxError(f"the unit table has {kind} scores for layers {have}; the model needs {layers}")
        return {l: units_table.matrix(kind, unit_method, l) for l in layers}

    values = _Layers(
        experts={l: np.asarray(v, np.float64) for l, v in expert_values.items()},
        channels=unit_values("channel", list(params.moe_layers)) if "channels" in units else None,
        groups=unit_values("kv_group", list(range(params.num_layers))) if "heads" in units else None,
        heads=unit_values("query_head", list(range(params.num_layers))) if "heads" in units else None,
    )
    if values.channels is not None:
        bad = [l for l, m in values.channels.items() if m.shape != (n_exp, width)]
        if bad:
            raise UspxError(f"channel scores of layers {bad} are not {n_exp} experts x {width} channels: "
                            "they were made for another model")
    if values.groups is not None:
        bad = [l for l in values.groups if values.groups[l].shape != (kv,) or values.heads[l].shape != (heads,)]
        if bad:
            raise UspxError(f"head scores of layers {bad} are not {kv} KV groups / {heads} query heads: "
                            "they were made for another model")

    step = channel_step or (8 if width <= 256 else 32)  # fused expert kernels (grouped_mm) need 16-byte strides
    widths = sorted({w for w in range(step, width + 1, step)} | {width}) if "channels" in units else [width]
    counts = list(range(top_k, n_exp + 1)) if "experts" in units else [n_exp]
    layouts = ([(g, r) for g in range(1, kv + 1) for r in range(1, rep + 1)] if "heads" in units else [(kv, rep)])
    budget_bytes = mem.parse_size(budget)

    sizes: dict[tuple[int, int, int], mem.MemoryEstimate] = {}
    for w in widths:
        for g, r in layouts:
            shaped = mem.count_params(shaped_config(cfg, Shape(n_exp, w, g, r)))
            sizes[w, g, r] = mem.estimate(shaped, dtype, context=context, kv_dtype=kv_dtype, batch=batch,
                                          experts_per_layer=0, reserve_bytes=reserve_bytes)

    def total(s: Shape) -> int:
        e = sizes[s.width, s.kv_groups, s.heads_per_group]
        return e.fixed_bytes + e.kv_bytes + reserve_bytes + s.experts * params.num_moe_layers * e.expert_bytes

    # value is monotone in every count, so only the largest fitting width per (n, g, r) can win
    candidates: list[tuple[float, Shape, int, dict]] = []
    for n in counts:
        for g, r in layouts:
            fit = [w for w in widths if total(Shape(n, w, g, r)) <= budget_bytes]
            if fit:
                s = Shape(n, fit[-1], g, r)
                kept = _kept_values(values, s, rep)
                candidates.append((sum(kept.values()), s, total(s), kept))
    if not candidates:
        smallest = min(total(Shape(counts[0], widths[0], g, r)) for g, r in layouts)
        raise UspxError(f"a budget of {mem.format_bytes(budget_bytes)} fits no shape of {', '.join(units)}: the "
                        f"smallest ({counts[0]} experts of {widths[0]} channels, "
                        f"{layouts[0][0]} KV group(s) of {layouts[0][1]} head(s)) takes "
                        f"{mem.format_bytes(smallest)} ({smallest} bytes)")
    candidates.sort(key=lambda c: (-c[0], c[2]))
    best_value, best, best_bytes, kept_by_type = candidates[0]
    experts, channels, head_ids = _kept_layout(values, best, rep)
    full = _kept_values(values, Shape(n_exp, width, kv, rep), rep)
    est = sizes[best.width, best.kv_groups, best.heads_per_group]
    plan = Plan(
        kept=experts, method=method, uniform=True, top_k=top_k, num_experts=n_exp,
        predicted_bytes=int(best_bytes), budget_bytes=budget_bytes, model_type=cfg.model_type,
        sizes={"fixed_weights": est.fixed_bytes, "kv_cache": est.kv_bytes, "reserve": reserve_bytes,
               "kept_experts": best.experts * params.num_moe_layers * est.expert_bytes,
               "kv_per_token": mem.kv_cache_bytes(mem.count_params(shaped_config(cfg, best)), 1, kv_dtype),
               "kv_per_token_original": mem.kv_cache_bytes(params, 1, kv_dtype)},
        settings={"dtype": est.dtype, "kv_dtype": kv_dtype, "context": context, "batch": batch,
                  "cost_source": f"memory planner ({est.dtype})", "units": list(units),
                  "unit_method": unit_method, "channel_step": step, "shape": vars(best)},
        value=best_value, value_total=sum(full.values()),
        solver={"name": "shape enumeration", "shapes_fitting": len(candidates),
                "value_by_unit": kept_by_type, "value_total_by_unit": full,
                "runner_up": [dict(shape=vars(c[1]), value=c[0], bytes=c[2]) for c in candidates[1:4]]},
        scores_fingerprint=scores_fingerprint, model_fingerprint=model_fingerprint,
        channels=None if channels is None else {"width": best.width, "original_width": width, "kept": channels},
        heads=None if head_ids is None else {
            "kv_groups": best.kv_groups, "heads_per_group": best.heads_per_group,
            "original_kv_groups": kv, "original_heads_per_group": rep, "kept": head_ids},
    )
    return plan
