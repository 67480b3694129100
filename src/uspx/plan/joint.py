"""Joint selection: experts, expert channels and attention heads under one budget of weights plus KV
cache.

Runtimes hold one expert count, one expert width and one head layout for the whole model, so an
exportable choice is a shape: ``n`` experts per MoE layer, ``W`` channels per expert, one width per
kind of dense MLP (shared experts, dense layers), ``G`` KV groups per layer and ``r`` query heads
per group; within a shape every layer keeps its own best units. The value a shape keeps is the sum
of its kept units' values, assuming removals add: a layer loses its dropped experts' values, the
dropped channels' values of the experts it keeps and of its dense MLPs, its dropped KV groups'
values and the dropped query heads' values of the groups it keeps. Its cost is
the memory planner's exact size of the model with that shape (weights at the export precision plus
the KV cache for ``context`` tokens). With the shape the only free choice, enumerating every shape
solves the grouped knapsack exactly (at least top-k experts per layer, uniform counts per unit type),
so no relaxation is needed. Dense MLP bytes add to the rest, so for every combination of the other
counts the best dense widths that fit come off a frontier of (bytes, value) choices computed once.
The plan records the value kept per unit type and the runner-up shapes.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow.compute as pc

from uspx.io import UspxError, sha256_json
from uspx.models import adapter_class
from uspx.models.base import get_field, set_field
from uspx.plan import memory as mem
from uspx.plan.select import Plan, select_experts
from uspx.score.units import UnitScores, load_units, parse_units


@dataclass(frozen=True)
class Shape:
    experts: int  # per MoE layer
    width: int  # channels per expert
    kv_groups: int  # per decoder layer
    heads_per_group: int
    dense: tuple[tuple[str, int], ...] = ()  # (config width field, width) of each dense MLP kind


def shaped_config(config: Any, shape: Shape) -> Any:
    """``config`` with ``shape``'s expert count, expert width, dense MLP widths and head counts
    (head_dim kept)."""
    cfg = copy.deepcopy(mem.load_config(config))
    cls = adapter_class(cfg.model_type)
    set_field(cfg, cls.expert_count_field, shape.experts)
    set_field(cfg, cls.expert_width_field, shape.width)
    for field_name, width in shape.dense:
        set_field(cfg, field_name, width)
    if cls.heads_prunable:
        _, _, head_dim = cls.config_head_shape(cfg)
        cls.set_head_shape(cfg, shape.kv_groups * shape.heads_per_group, shape.kv_groups, head_dim)
    return cfg


def _ranked(values: np.ndarray) -> np.ndarray:
    """Ids by decreasing value (ties to the lower id)."""
    return np.argsort(-np.asarray(values), kind="stable")


def _top(values: np.ndarray, n: int) -> np.ndarray:
    """Ids of the ``n`` largest values (ties to the lower id), sorted."""
    return np.sort(_ranked(values)[:n])


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
    dense: list[dict[int, np.ndarray]]  # per dense MLP kind: decoder layer -> [I_k]
    group: int = 1  # channels kept or dropped together: ``channels`` holds [E, I / group] group sums


@dataclass
class _Tables:
    """Value kept as a function of each count, summed over layers (each layer its best units)."""

    experts: np.ndarray  # [E + 1]: by experts kept
    channels: np.ndarray | None  # [E + 1, I + 1]: by experts kept and width
    heads: np.ndarray | None  # [G + 1, r + 1]: by groups kept and heads per group
    dense: list[np.ndarray]  # per kind [I_k + 1]: by width
    group: int = 1  # ``channels`` is indexed by width in groups of this many channels


def _tables(v: _Layers, rep: int) -> _Tables:
    n_exp = len(next(iter(v.experts.values())))
    experts = np.zeros(n_exp + 1)
    channels = None if v.channels is None else np.zeros((n_exp + 1, next(iter(v.channels.values())).shape[1] + 1))
    for layer, ev in v.experts.items():
        order = _ranked(ev)
        experts[1:] += np.cumsum(ev[order])
        if channels is not None:  # the kept experts' best channels: experts in rank order, cumulated
            channels[1:] += np.cumsum(_kept_sum_table(v.channels[layer][order]), axis=0)
    heads = None
    if v.groups is not None:
        n_groups = len(next(iter(v.groups.values())))
        heads = np.zeros((n_groups + 1, rep + 1))
        for layer, gv in v.groups.items():
            order = _ranked(gv)
            within = _kept_sum_table(v.heads[layer].reshape(n_groups, rep)[order])  # [G, r + 1]
            heads[1:] += np.cumsum(gv[order])[:, None] + np.cumsum(within, axis=0)
    dense = [sum(_kept_sum_table(x) for x in kind.values()) for kind in v.dense]
    return _Tables(experts, channels, heads, dense, v.group)


def _value(t: _Tables, s: Shape) -> dict[str, float]:
    """The value ``s`` keeps per unit type."""
    return {"experts": float(t.experts[s.experts]),
            "channels": (float(t.channels[s.experts, s.width // t.group]) if t.channels is not None else 0.0)
            + sum(float(d[w]) for d, (_, w) in zip(t.dense, s.dense)),
            "heads": float(t.heads[s.kv_groups, s.heads_per_group]) if t.heads is not None else 0.0}


def _kept_layout(v: _Layers, s: Shape, rep: int) -> tuple[dict, dict | None, dict | None, list[dict]]:
    experts = {l: _top(ev, s.experts).tolist() for l, ev in v.experts.items()}
    channels = None
    if v.channels is not None:
        g = v.group
        channels = {l: [(_top(v.channels[l][e], s.width // g)[:, None] * g + np.arange(g)).reshape(-1).tolist()
                        for e in experts[l]] for l in experts}
    heads = None
    if v.groups is not None:
        heads = {}
        for l, gv in v.groups.items():
            groups = _top(gv, s.kv_groups)
            hv = v.heads[l].reshape(len(gv), rep)
            heads[l] = [int(g) * rep + int(h) for g in groups for h in _top(hv[g], s.heads_per_group)]
    dense = [{l: _top(x, w).tolist() for l, x in kind.items()} for kind, (_, w) in zip(v.dense, s.dense)]
    return experts, channels, heads, dense


def _frontier(options: list[list[tuple[float, float, int]]]) -> list[tuple[float, float, tuple[int, ...]]]:
    """(cost, value, choice per kind) of the combinations of per-kind options (cost, value, width)
    that no cheaper combination beats, by increasing cost."""
    combos = [(0.0, 0.0, ())]
    for kind in options:
        combos = [(c + oc, v + ov, ch + (w,)) for c, v, ch in combos for oc, ov, w in kind]
        combos.sort(key=lambda x: (x[0], -x[1]))
        best, kept = -np.inf, []
        for c in combos:
            if c[1] > best:
                kept.append(c)
                best = c[1]
        combos = kept
    return combos


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
    channel_group: int | None = None,
    scores_fingerprint: str | None = None,
    model_fingerprint: str | None = None,
):
    """The shape (and every layer's units within it) keeping the most value under ``budget``.

    ``expert_values`` are the expert scores of ``method`` per MoE layer; ``units_table`` holds the
    channel and head scores (``unit_method``, default the same name). Unit types not in ``units``
    stay whole. ``channel_step`` is the width granularity (default 8 up to 256 channels, else 32: fused expert
    kernels need rows of a multiple of 16 bytes). With ``dtype="mxfp4"`` the unit is a block of 32
    channels (scored as the sum of its channels; see ``channel_group`` of the family's adapter): the
    MXFP4 down projection packs them into one block, so only whole blocks are cut exactly.
    ``channel_group`` sets that unit for any precision (what the block constraint costs).
    """
    units = parse_units(units)
    unit_method = unit_method or method
    geo = _Geometry.of(config)
    values, dense_kinds = _unit_values(expert_values, units_table, units, unit_method, geo)
    group = channel_group or geo.cls.channel_group(dtype == "mxfp4")
    if group > 1 and values.channels is not None:
        if geo.width % group:
            raise UspxError(f"experts of {geo.width} channels do not split into blocks of {group}")
        values.channels = {l: m.reshape(m.shape[0], -1, group).sum(-1) for l, m in values.channels.items()}
        values.group = channel_step = group

    def size(s: Shape) -> mem.MemoryEstimate:
        return mem.estimate(mem.count_params(shaped_config(geo.cfg, s)), dtype, context=context, kv_dtype=kv_dtype,
                            batch=batch, experts_per_layer=0, reserve_bytes=reserve_bytes)

    budget_bytes = mem.parse_size(budget)
    tables = _tables(values, geo.rep)
    candidates = _fitting_shapes(geo, units, tables, dense_kinds, size, budget_bytes, channel_step)
    est = size(candidates[0][1])
    settings = {"dtype": est.dtype, "kv_dtype": kv_dtype, "context": context, "batch": batch,
                "cost_source": f"memory planner ({est.dtype})", "units": list(units), "unit_method": unit_method,
                "channel_step": channel_step}
    return _joint_plan(geo, values, tables, dense_kinds, candidates, est, settings, method=method,
                       budget_bytes=budget_bytes, scores_fingerprint=scores_fingerprint,
                       model_fingerprint=model_fingerprint)


@dataclass
class _Geometry:
    """The whole model's shape, as its config says: what a joint plan cuts down from."""

    cfg: Any
    cls: Any  # the family's adapter class
    params: Any  # uspx.models.params.ModelParams
    width: int  # channels per expert
    heads: int  # query heads per layer
    kv: int  # KV groups per layer

    @classmethod
    def of(cls, config: Any) -> "_Geometry":
        cfg = mem.load_config(config)
        family = adapter_class(cfg.model_type)
        heads, kv, _ = family.config_head_shape(cfg)
        return cls(cfg, family, mem.count_params(cfg), family.config_expert_width(cfg), heads, kv)

    @property
    def rep(self) -> int:
        return self.heads // self.kv


def _unit_values(expert_values: dict[int, np.ndarray], units_table: UnitScores | None, units: list[str],
                 unit_method: str, geo: _Geometry) -> tuple[_Layers, list[tuple[int, str, int]]]:
    """The per-layer values of every unit type chosen, checked against the model, and the dense MLP
    kinds it has: (kind id, config width field, original width)."""
    params, cls = geo.params, geo.cls
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

    if "heads" in units and not cls.heads_prunable:
        raise UspxError(f"{cls.family}: its attention heads share one compressed key/value (latent attention); "
                        "uspx cuts heads of grouped-query attention only: choose experts and channels")
    routed_channels = "channels" in units and not cls.expert_width_also_sizes
    dense_kinds = []
    if "channels" in units:
        have = set(units_table.table.filter(pc.equal(units_table.table.column("kind"), "dense_channel"))
                   .column("index").to_pylist())
        dense_kinds = [(k, fld, int(get_field(geo.cfg, fld))) for k, (_, fld, _) in enumerate(cls.dense_mlp_paths)
                       if k in have]
    values = _Layers(
        experts={l: np.asarray(v, np.float64) for l, v in expert_values.items()},
        channels=unit_values("channel", list(params.moe_layers)) if routed_channels else None,
        groups=unit_values("kv_group", list(range(params.num_layers))) if "heads" in units else None,
        heads=unit_values("query_head", list(range(params.num_layers))) if "heads" in units else None,
        dense=[_dense_values(units_table, unit_method, k, w) for k, _, w in dense_kinds],
    )
    if values.channels is not None:
        bad = [l for l, m in values.channels.items() if m.shape != (params.num_experts, geo.width)]
        if bad:
            raise UspxError(f"channel scores of layers {bad} are not {params.num_experts} experts x {geo.width} "
                            "channels: they were made for another model")
    if values.groups is not None:
        bad = [l for l in values.groups if values.groups[l].shape != (geo.kv,) or values.heads[l].shape != (geo.heads,)]
        if bad:
            raise UspxError(f"head scores of layers {bad} are not {geo.kv} KV groups / {geo.heads} query heads: "
                            "they were made for another model")
    return values, dense_kinds


def _fitting_shapes(geo: _Geometry, units: list[str], tables: _Tables, dense_kinds: list[tuple[int, str, int]],
                    size: Callable[[Shape], mem.MemoryEstimate], budget_bytes: int,
                    channel_step: int | None) -> list[tuple[float, Shape, int]]:
    """(value, shape, bytes) of every shape that fits ``budget_bytes``, each with the best dense MLP
    widths that fit beside it; best first (ties: the smaller)."""
    n_exp, width, kv, rep = geo.params.num_experts, geo.width, geo.kv, geo.rep

    def steps(full: int) -> list[int]:
        step = channel_step or (8 if full <= 256 else 32)  # fused expert kernels (grouped_mm) need 16-byte strides
        return sorted(set(range(step, full + 1, step)) | {full})

    widths = steps(width) if "channels" in units and not geo.cls.expert_width_also_sizes else [width]
    counts = list(range(geo.params.top_k, n_exp + 1)) if "experts" in units else [n_exp]
    layouts = ([(g, r) for g in range(1, kv + 1) for r in range(1, rep + 1)] if "heads" in units else [(kv, rep)])
    full_dense = tuple((fld, w) for _, fld, w in dense_kinds)
    sizes = {(w, g, r): size(Shape(n_exp, w, g, r, full_dense)) for w in widths for g, r in layouts}
    whole = sizes[width, kv, rep]  # the grids always hold the whole model's width and head layout
    # a dense MLP's bytes add to the rest: each kind's saving is measured on the whole model once
    dense_options = []
    for i, (_, fld, full_w) in enumerate(dense_kinds):
        options = []
        for w in steps(full_w):
            shaped = dict(full_dense, **{fld: w})
            e = size(Shape(n_exp, width, kv, rep, tuple(shaped.items())))
            options.append((float(e.fixed_bytes - whole.fixed_bytes), float(tables.dense[i][w]), w))
        dense_options.append(options)
    frontier = _frontier(dense_options)
    front_cost = np.array([c for c, _, _ in frontier])

    def total(n: int, w: int, g: int, r: int, dense_cost: float = 0.0) -> int:
        e = sizes[w, g, r]  # sized without experts: fixed weights, KV cache and reserve
        return int(e.total_bytes + dense_cost + n * geo.params.num_moe_layers * e.expert_bytes)

    candidates: list[tuple[float, Shape, int]] = []
    for n in counts:
        for g, r in layouts:
            for w in widths:
                room = budget_bytes - total(n, w, g, r)
                j = int(np.searchsorted(front_cost, room, side="right")) - 1  # the best dense choice that fits
                if j < 0:
                    continue
                cost, _, choice = frontier[j]
                s = Shape(n, w, g, r, tuple((fld, cw) for (_, fld, _), cw in zip(dense_kinds, choice)))
                candidates.append((sum(_value(tables, s).values()), s, total(n, w, g, r, cost)))
    if not candidates:
        smallest = min(total(counts[0], widths[0], g, r, front_cost[0]) for g, r in layouts)
        raise UspxError(f"a budget of {mem.format_bytes(budget_bytes)} fits no shape of {', '.join(units)}: the "
                        f"smallest ({counts[0]} experts of {widths[0]} channels, "
                        f"{layouts[0][0]} KV group(s) of {layouts[0][1]} head(s)) takes "
                        f"{mem.format_bytes(smallest)} ({smallest} bytes)")
    candidates.sort(key=lambda c: (-c[0], c[2]))
    return candidates


def _joint_plan(geo: _Geometry, values: _Layers, tables: _Tables, dense_kinds: list[tuple[int, str, int]],
                candidates: list[tuple[float, Shape, int]], est: mem.MemoryEstimate, settings: dict,
                **plan: Any):
    """The plan of the best shape (``candidates[0]``, whose memory estimate is ``est``); ``settings``
    gain the shape and notes; ``plan``: the Plan's own fields (method, budget, fingerprints)."""
    cfg, cls, params, kv, rep = geo.cfg, geo.cls, geo.params, geo.kv, geo.rep
    best_value, best, best_bytes = candidates[0]
    experts, channels, head_ids, dense_ids = _kept_layout(values, best, rep)
    full_dense = tuple((fld, w) for _, fld, w in dense_kinds)
    full = _value(tables, Shape(params.num_experts, geo.width, kv, rep, full_dense))
    notes = []
    if "channels" in settings["units"] and cls.expert_width_also_sizes:
        notes.append(f"{cls.family}: the expert width also sizes {cls.expert_width_also_sizes}; experts keep their width")
    return Plan(
        kept=experts, uniform=True, top_k=params.top_k, num_experts=params.num_experts,
        predicted_bytes=int(best_bytes), model_type=cfg.model_type,
        sizes={"fixed_weights": est.fixed_bytes, "kv_cache": est.kv_bytes, "reserve": est.reserve_bytes,
               "kept_experts": best.experts * params.num_moe_layers * est.expert_bytes,
               "kv_per_token": mem.kv_cache_bytes(est.params, 1, est.kv_dtype),
               "kv_per_token_original": mem.kv_cache_bytes(params, 1, est.kv_dtype)},
        settings={**settings, "shape": _shape_record(best), "notes": notes},
        value=best_value, value_total=sum(full.values()),
        solver={"name": "shape enumeration", "shapes_fitting": len(candidates),
                "value_by_unit": _value(tables, best), "value_total_by_unit": full,
                "runner_up": [dict(shape=_shape_record(c[1]), value=c[0], bytes=c[2]) for c in candidates[1:4]]},
        **plan,
        channels=None if channels is None and not dense_ids else {
            "width": best.width, "original_width": geo.width, "kept": channels or {}, "group": values.group,
            "dense": [{"path": cls.dense_mlp_paths[k][0], "field": fld, "width": w, "original_width": full_w,
                       "kept": ids} for (k, fld, full_w), (_, w), ids in zip(dense_kinds, best.dense, dense_ids)]},
        heads=None if head_ids is None else {
            "kv_groups": best.kv_groups, "heads_per_group": best.heads_per_group,
            "original_kv_groups": kv, "original_heads_per_group": rep, "kept": head_ids},
    )


def _shape_record(s: Shape) -> dict:
    return {**asdict(s), "dense": dict(s.dense)}


def _dense_values(units_table: UnitScores, method: str, kind: int, width: int) -> dict[int, np.ndarray]:
    """Decoder layer -> [width] channel values of the dense MLPs of ``kind``."""
    t = units_table.table
    t = t.filter(pc.and_(pc.and_(pc.equal(t.column("kind"), "dense_channel"), pc.equal(t.column("index"), kind)),
                         pc.equal(t.column("method"), method)))
    if not t.num_rows:
        raise UspxError(f"no {method!r} scores for dense MLP channels in this unit table")
    out: dict[int, np.ndarray] = {}
    for layer, c, v in zip(t.column("layer").to_pylist(), t.column("channel").to_pylist(), t.column("value").to_pylist()):
        out.setdefault(layer, np.zeros(width))[c] = v
    return out


def select_plan(table, units_dir: str | Path | None, config: Any, *, units: Sequence[str] | str = ("experts",),
                method: str, budget: int | str | None = None, keep: str | int | float | None = None,
                dtype: str = "bf16", context: int = 4096, kv_dtype: str = "bf16", uniform: bool = True,
                solver: str = "lagrangian", unit_method: str | None = None, channel_step: int | None = None,
                seed: int = 0, model_fingerprint: str | None = None):
    """The plan ``uspx select`` and ``uspx extract`` write: whole experts from the score ``table``
    (:func:`uspx.plan.select_experts`), or with channels or heads in ``units`` the best shape under
    the ``budget`` from the table and the unit scores in ``units_dir`` (:func:`select_units`).
    ``method="random"`` ranks experts by a seeded random draw (the baseline)."""
    units = parse_units(units)
    fingerprint = sha256_json(table.meta)
    if units == ["experts"]:
        return select_experts(
            table.random(seed) if method == "random" else table.method(method), budget=budget, keep=keep,
            config=config, dtype=dtype, context=context if budget is not None else 0, kv_dtype=kv_dtype,
            uniform=uniform, method=solver, scores_fingerprint=fingerprint, model_fingerprint=model_fingerprint)
    if budget is None or keep is not None or not uniform or method == "random":
        raise UspxError(f"cutting {', '.join(units)} chooses one shape under a byte budget: give --budget "
                        "(not --keep, a non-uniform plan or random scores)")
    if units_dir is None:
        raise UspxError(f"choosing {', '.join(units)} needs their scores: run `uspx score ... --units {','.join(units)}`")
    layers, matrix = table.matrix(method)
    return select_units(dict(zip(layers, matrix)), load_units(units_dir), config, units=units, budget=budget,
                        method=method, unit_method=unit_method, dtype=dtype, context=context, kv_dtype=kv_dtype,
                        channel_step=channel_step, scores_fingerprint=fingerprint, model_fingerprint=model_fingerprint)
