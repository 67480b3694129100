"""Selection under a budget: which experts to keep in every MoE layer.

A knapsack over (layer, expert) items with value v (an importance score) and weight w (bytes pruning
the expert saves), grouped: every layer keeps at least top-k experts (fewer and the router cannot
fill its k slots). Uniform plans (the default, since stock configs hold one expert count) keep the
same n everywhere: the largest n that fits, then each layer's n most valuable experts; with equal
costs that is exact. Non-uniform plans use greedy v/w or a Lagrangian solver (bisection on lambda,
keep v - lambda*w > 0) whose dual value bounds the optimum, so the plan can say how far from it it is.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from uspx.models import ADAPTERS
from uspx.io import UspxError, read_json, write_json
from uspx.plan import memory as mem
from uspx.score.keep import parse_keep  # noqa: F401 (uspx.plan.parse_keep too)

FORMAT, VERSION = "uspx-plan", 1
METHODS = ("greedy", "lagrangian")


@dataclass(frozen=True)
class Item:
    expert: int
    value: float
    cost: float


Groups = Mapping[int, Sequence[Item]]
Selection = dict[int, list[int]]


# ----- score tables ---------------------------------------------------------------------------------
def read_scores(table: Any, need_cost: bool = True) -> list[tuple[int, int, float, float | None]]:
    """(layer, expert, value, cost_bytes) rows from records, a column dict, pandas or pyarrow."""
    if hasattr(table, "to_pylist"):  # pyarrow.Table
        records = table.to_pylist()
    elif hasattr(table, "to_dict") and hasattr(table, "columns"):  # pandas.DataFrame
        records = table.to_dict("records")
    elif isinstance(table, Mapping):  # {"layer": [...], "expert": [...], ...}
        keys = list(table)
        records = [dict(zip(keys, row)) for row in zip(*(table[k] for k in keys))]
    else:
        records = list(table)
    need = ("layer", "expert", "value") + (("cost_bytes",) if need_cost else ())
    rows, seen = [], set()
    for i, rec in enumerate(records):
        if missing := [c for c in need if rec.get(c) is None]:
            raise UspxError(f"score table row {i}: no {', '.join(missing)} (columns needed: {', '.join(need)})")
        layer, expert, value = int(rec["layer"]), int(rec["expert"]), float(rec["value"])
        cost = None if rec.get("cost_bytes") is None else float(rec["cost_bytes"])
        if not math.isfinite(value):
            raise UspxError(f"score table row {i}: value of layer {layer} expert {expert} is {value}")
        if cost is not None and not (math.isfinite(cost) and cost >= 0):
            raise UspxError(f"score table row {i}: cost_bytes of layer {layer} expert {expert} is {cost}")
        if (layer, expert) in seen:
            raise UspxError(f"score table lists layer {layer} expert {expert} twice")
        seen.add((layer, expert))
        rows.append((layer, expert, value, cost))
    if not rows:
        raise UspxError("score table is empty")
    return rows


# ----- solvers (pure: groups of items, a capacity in cost units, a per-group floor) --------------
def _floor_cost(items: Sequence[Item], floor: int) -> float:
    return sum(sorted(it.cost for it in items)[:floor])


def _ratio(it: Item) -> float:
    if it.cost == 0:
        return math.inf if it.value > 0 else 0.0
    return it.value / it.cost


def _check_groups(groups: Groups, floor: int) -> None:
    if small := {l: len(items) for l, items in groups.items() if len(items) < floor}:
        raise UspxError(f"layers {sorted(small)} have fewer than top-k = {floor} experts in the score table")


def uniform_counts(groups: Groups, capacity: float, floor: int) -> Selection | None:
    """The largest n kept in every group (each group's n most valuable) within ``capacity``."""
    _check_groups(groups, floor)
    ranked = {l: sorted(items, key=lambda it: (-it.value, it.expert)) for l, items in groups.items()}
    for n in range(min(len(v) for v in ranked.values()), floor - 1, -1):
        if sum(it.cost for items in ranked.values() for it in items[:n]) <= capacity:
            return {l: sorted(it.expert for it in items[:n]) for l, items in ranked.items()}
    return None


def greedy(groups: Groups, capacity: float, floor: int) -> Selection | None:
    """Each group's ``floor`` best items by v/w, then the rest by v/w while they fit (v > 0 only)."""
    _check_groups(groups, floor)
    order = lambda it: (-_ratio(it), -it.value, it.expert)  # noqa: E731
    chosen = {l: sorted(items, key=order)[:floor] for l, items in groups.items()}
    if sum(it.cost for c in chosen.values() for it in c) > capacity:
        # the best-ratio floor is too heavy: fall back to the cheapest floor of every group
        chosen = {l: sorted(items, key=lambda it: (it.cost, -it.value, it.expert))[:floor]
                  for l, items in groups.items()}
    if sum(it.cost for c in chosen.values() for it in c) > capacity:
        return None
    return _fill(groups, chosen, capacity)


def _fill(groups: Groups, chosen: dict[int, list[Item]], capacity: float) -> Selection:
    """Add the unchosen items with v > 0 by v/w while they fit (greedy, and the Lagrangian's slack)."""
    used = sum(it.cost for c in chosen.values() for it in c)
    taken = {(l, it.expert) for l, c in chosen.items() for it in c}
    rest = [(l, it) for l, items in groups.items() for it in items if (l, it.expert) not in taken and it.value > 0]
    for l, it in sorted(rest, key=lambda p: (-_ratio(p[1]), -p[1].value, p[0], p[1].expert)):
        if used + it.cost <= capacity:
            chosen[l].append(it)
            used += it.cost
    return {l: sorted(it.expert for it in c) for l, c in chosen.items()}


def _lagrange_pick(groups: Groups, lam: float, floor: int) -> tuple[dict[int, list[Item]], float, float]:
    """argmax over sets with >= floor items per group of sum(v - lam*w): (sets, weight, dual term)."""
    sets, weight, dual = {}, 0.0, 0.0
    for l, items in groups.items():
        ranked = sorted(items, key=lambda it: (-(it.value - lam * it.cost), it.cost, it.expert))
        keep = [it for it in ranked if it.value - lam * it.cost > 0]
        if len(keep) < floor:
            keep = ranked[:floor]
        sets[l] = keep
        weight += sum(it.cost for it in keep)
        dual += sum(it.value - lam * it.cost for it in keep)
    return sets, weight, dual


def lagrangian(groups: Groups, capacity: float, floor: int, iters: int = 80) -> tuple[Selection | None, dict]:
    """Bisection on lambda for the smallest one whose pick fits, then a greedy fill of the slack.

    Any lambda >= 0 gives the upper bound dual(lambda) + lambda * capacity on the best value under the
    floor constraints; the smallest one seen is returned as ``upper_bound``.
    """
    _check_groups(groups, floor)
    sets, w, dual = _lagrange_pick(groups, 0.0, floor)
    bound, lam = dual, 0.0
    if w > capacity:
        ratios = (_ratio(it) for items in groups.values() for it in items)
        lo, hi = 0.0, max([1.0] + [abs(r) for r in ratios if math.isfinite(r)]) * 2
        while _lagrange_pick(groups, hi, floor)[1] > capacity and hi < 1e300:
            hi *= 16  # a large lambda picks each group's cheapest floor
        for _ in range(iters):
            mid = (lo + hi) / 2
            _, w_mid, d_mid = _lagrange_pick(groups, mid, floor)
            bound = min(bound, d_mid + mid * capacity)
            if w_mid > capacity:
                lo = mid
            else:
                hi = mid
        sets, w, dual = _lagrange_pick(groups, hi, floor)
        lam = hi
        bound = min(bound, dual + hi * capacity)
        if w > capacity:
            return None, {"lambda": lam}
    kept = _fill(groups, {l: list(s) for l, s in sets.items()}, capacity)  # the slack bisection left
    return kept, {"lambda": lam, "upper_bound": bound}


# ----- plans -----------------------------------------------------------------------------------------
@dataclass
class Plan:
    """A kept set per MoE layer with its predicted size; written as JSON by :meth:`save`."""

    kept: dict[int, list[int]]
    method: str  # the score method the experts were ranked by (the solver is ``solver["name"]``)
    uniform: bool
    top_k: int
    num_experts: int
    predicted_bytes: int  # fixed weights + kept experts + KV cache + reserve
    sizes: dict[str, int] = field(default_factory=dict)
    budget_bytes: int | None = None
    keep: str | None = None
    model_type: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    value: float = 0.0  # sum of kept values
    value_total: float = 0.0  # sum of all values in the score table
    solver: dict[str, Any] = field(default_factory=dict)
    scores_fingerprint: str | None = None
    model_fingerprint: str | None = None
    padding: str | None = None  # how a non-uniform plan exports, and what that costs
    # joint plans (``uspx.plan.joint``): narrower experts and fewer heads, or None for whole ones
    channels: dict[str, Any] | None = None  # width, original_width, kept: layer -> per kept expert, its channels
    heads: dict[str, Any] | None = None  # kv_groups, heads_per_group, original_*, kept: layer -> query heads

    @property
    def counts(self) -> dict[int, int]:
        return {l: len(v) for l, v in self.kept.items()}

    def kept_set(self) -> dict[int, list[int]]:
        return {l: list(v) for l, v in self.kept.items()}

    def runtime_notes(self) -> list[str]:
        """:func:`runtime_notes` for this plan: its counts (padded where its family pads exactly),
        and its expert width in the dtype it exports in."""
        ch = self.channels or {}
        return runtime_notes(self.counts, self.top_k, padded=bool(_pad_mechanism(self.model_type)),
                             width=ch.get("width"), original_width=ch.get("original_width"),
                             dtype=self.settings.get("dtype"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "method": self.method, "uniform": self.uniform,
            "top_k": self.top_k, "num_experts": self.num_experts, "model_type": self.model_type,
            "budget_bytes": self.budget_bytes, "keep": self.keep,
            "kept": _by_layer(self.kept), "counts": _by_layer(self.counts),
            "predicted_bytes": self.predicted_bytes, "sizes": self.sizes, "settings": self.settings,
            "value": self.value, "value_total": self.value_total, "solver": self.solver,
            "scores_fingerprint": self.scores_fingerprint, "model_fingerprint": self.model_fingerprint,
            "padding": self.padding,
            **({"channels": {**self.channels, "kept": _by_layer(self.channels["kept"]),
                             "dense": [{**d, "kept": _by_layer(d["kept"])}
                                       for d in self.channels.get("dense") or []]}}
               if self.channels else {}),
            **({"heads": {**self.heads, "kept": _by_layer(self.heads["kept"])}} if self.heads else {}),
        }

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())  # atomic: a crash never leaves half a plan

    def __rich__(self) -> Any:
        from rich.table import Table

        target = (f"budget {mem.format_bytes(self.budget_bytes)}" if self.budget_bytes is not None
                  else f"keep {self.keep}")
        table = Table(title=f"{self.method} plan ({self.solver.get('name', 'solver')}), {target}: predicted {mem.format_bytes(self.predicted_bytes)}, "
                            f"value kept {self.value:.4g} of {self.value_total:.4g}")
        table.add_column("layer", justify="right")
        table.add_column("kept", justify="right")
        table.add_column("experts")
        for layer, ids in sorted(self.kept.items()):
            table.add_row(str(layer), f"{len(ids)}/{self.num_experts}", " ".join(map(str, ids)))
        lines = [self.padding] if self.padding else []
        if self.channels:
            lines.append(f"expert width {self.channels['width']} of {self.channels['original_width']} channels")
            for d in self.channels.get("dense") or []:
                lines.append(f"{d['path']} width {d['width']} of {d['original_width']} channels")
        if self.heads:
            h = self.heads
            lines.append(f"attention: {h['kv_groups']} of {h['original_kv_groups']} KV groups, {h['heads_per_group']} of "
                         f"{h['original_heads_per_group']} query heads each; KV cache "
                         f"{self.sizes.get('kv_per_token', 0)} bytes per token (was {self.sizes.get('kv_per_token_original', 0)})")
        if not lines:
            return table
        from rich.console import Group
        from rich.text import Text

        return Group(table, *map(Text, lines))  # a caption would wrap to the table's width


def select_experts(
    scores: Any,
    *,
    budget: int | str | None = None,
    keep: int | float | str | None = None,
    config: Any = None,
    top_k: int | None = None,
    dtype: str = "bf16",
    context: int = 0,
    kv_dtype: str = "bf16",
    batch: int = 1,
    reserve_bytes: int = 0,
    scale_group: int | None = None,
    fixed_bytes: int = 0,
    uniform: bool = True,
    method: str = "lagrangian",
    scores_fingerprint: str | None = None,
    model_fingerprint: str | None = None,
) -> Plan:
    """Choose the kept experts under ``budget`` (bytes for the whole model) or ``keep`` per layer.

    With ``config`` (a config, config.json dict/path or :class:`memory.ModelParams`) the expert cost
    and the fixed bytes come from the memory planner at ``dtype`` (the table's ``cost_bytes`` are
    ignored: they describe the scored copy, not the exported one), KV cache for ``context`` tokens
    counts when context > 0, and experts missing from the table score 0. Without it, costs come from
    the table, ``fixed_bytes`` is the rest of the model and ``top_k`` must be given.
    """
    if (budget is None) == (keep is None):
        raise UspxError("give exactly one of a byte budget or keep (a fraction or a count per layer)")
    if method not in METHODS:
        raise UspxError(f"unknown selection method {method!r}; choose one of {', '.join(METHODS)}")
    rows = read_scores(scores, need_cost=config is None)
    if config is not None:
        params = config if isinstance(config, mem.ModelParams) else mem.count_params(config)
        # from the config itself: a GGUF quantization's per-row types need its rows' lengths
        est = mem.estimate(config, dtype, context=context, kv_dtype=kv_dtype, batch=batch,
                           experts_per_layer=0, scale_group=scale_group, reserve_bytes=reserve_bytes)
        groups = _groups_from_planner(rows, params, est.expert_bytes)
        top_k, n_exp, model_type = params.top_k, params.num_experts, params.model_type
        base = est.fixed_bytes + est.kv_bytes + reserve_bytes
        sizes = {"fixed_weights": est.fixed_bytes, "kv_cache": est.kv_bytes, "reserve": reserve_bytes}
        settings = {"dtype": est.dtype, "kv_dtype": kv_dtype, "context": context, "batch": batch,
                    "scale_group": scale_group, "cost_source": f"memory planner ({est.dtype})"}
    else:
        if top_k is None:
            raise UspxError("without a model config, top_k must be given")
        groups = {}
        for layer, expert, value, cost in rows:
            groups.setdefault(layer, []).append(Item(expert, value, float(cost)))
        n_exp, model_type, base = max(r[1] for r in rows) + 1, None, int(fixed_bytes)
        sizes, settings = {"fixed_weights": int(fixed_bytes)}, {"cost_source": "score table"}

    min_bytes = math.ceil(base + sum(_floor_cost(items, top_k) for items in groups.values()))
    if budget is not None:
        budget_bytes = mem.parse_size(budget)
        capacity, solve_groups, keep_text = budget_bytes - base, groups, None
    else:
        n = parse_keep(keep, n_exp)
        if n < top_k:
            raise UspxError(f"keep={keep!r} is {n} experts per layer, fewer than top-k = {top_k}; "
                            f"keep at least {top_k} ({math.ceil(100 * top_k / n_exp)}%)")
        budget_bytes, keep_text = None, str(keep)
        # a count budget is a knapsack with unit costs: n per layer on average
        solve_groups = {l: [Item(it.expert, it.value, 1.0) for it in items] for l, items in groups.items()}
        capacity = n * len(groups)

    solver: dict[str, Any] = {}
    if uniform:
        kept, used = uniform_counts(solve_groups, capacity, top_k), "uniform"
    elif method == "greedy":
        kept, used = greedy(solve_groups, capacity, top_k), "greedy"
    else:
        (kept, solver), used = lagrangian(solve_groups, capacity, top_k), "lagrangian"
    if kept is None:
        raise UspxError(
            f"a budget of {mem.format_bytes(budget_bytes or 0)} cannot keep top-k = {top_k} experts in "
            f"each of {len(groups)} MoE layers; the smallest size that can is "
            f"{mem.format_bytes(min_bytes)} ({min_bytes} bytes)")

    item = {(l, it.expert): it for l, items in groups.items() for it in items}
    experts_bytes = math.ceil(sum(item[l, e].cost for l, v in kept.items() for e in v))
    plan = Plan(
        kept=kept, method=_score_method(scores), uniform=uniform, top_k=top_k, num_experts=n_exp,
        predicted_bytes=int(base + experts_bytes), sizes={**sizes, "kept_experts": int(experts_bytes)},
        budget_bytes=budget_bytes, keep=keep_text, model_type=model_type, settings=settings,
        value=sum(item[l, e].value for l, v in kept.items() for e in v),
        value_total=sum(it.value for it in item.values()), solver={"name": used, **solver},
        scores_fingerprint=scores_fingerprint, model_fingerprint=model_fingerprint,
    )
    plan.padding = _padding_note(plan, groups)
    return plan


def _score_method(scores: Any) -> str:
    """The score method a selection ranked by: the table's ``method`` column, when it has one."""
    import pyarrow as pa

    if isinstance(scores, pa.Table) and "method" in scores.column_names and scores.num_rows:
        names = set(scores.column("method").to_pylist())
        if len(names) == 1:
            return str(names.pop())
    return "scores"


def _groups_from_planner(rows: Iterable[tuple], params: mem.ModelParams, cost: int) -> dict[int, list[Item]]:
    moe = set(params.moe_layers)
    values: dict[int, dict[int, float]] = {l: {} for l in params.moe_layers}
    for layer, expert, value, _ in rows:
        if layer not in moe:
            raise UspxError(f"score table names layer {layer}, not a MoE layer of this {params.model_type} "
                            f"model (MoE layers: {sorted(moe)})")
        if not 0 <= expert < params.num_experts:
            raise UspxError(f"score table names expert {expert} of layer {layer}; "
                            f"the model has experts 0..{params.num_experts - 1}")
        values[layer][expert] = value
    if empty := [l for l, v in values.items() if not v]:
        raise UspxError(f"score table has no rows for MoE layers {empty}")
    # experts the table leaves out were never seen by the scorer: they carry value 0
    return {l: [Item(e, values[l].get(e, 0.0), float(cost)) for e in range(params.num_experts)]
            for l in params.moe_layers}


def _padding_note(plan: Plan, groups: Groups) -> str | None:
    counts = plan.counts
    if len(set(counts.values())) <= 1:
        return None
    top = max(counts.values())
    pad = sum((top - counts[l]) * max(it.cost for it in groups[l]) for l in counts)
    padded = plan.predicted_bytes + math.ceil(pad)
    plan.sizes["padded"] = padded
    head = (f"non-uniform counts ({min(counts.values())}..{top}); stock configs hold one count, so export "
            f"pads every layer to {top} experts with never-routed ones: {mem.format_bytes(padded)} "
            f"({padded} bytes) instead of {mem.format_bytes(plan.predicted_bytes)}")
    if plan.budget_bytes is not None and padded > plan.budget_bytes:
        head += ", over the budget"
    if mechanism := _pad_mechanism(plan.model_type):
        return f"{head}. Exact for {plan.model_type}: {mechanism} never routes them."
    paddable = ", ".join(f for f, cls in ADAPTERS.items() if cls.pad_mechanism)
    return (f"{head}. uspx can pad exactly only for {paddable}"
            f"{'' if plan.model_type is None else f', not {plan.model_type}'}: "
            "export a uniform plan or ship the ranking instead.")


def runtime_notes(counts: Mapping[int, int] | Sequence[int], top_k: int, padded: bool = False,
                  width: int | None = None, original_width: int | None = None, dtype: str | None = None) -> list[str]:
    """What keeps a plan with these expert counts per layer (and, narrowed, ``width`` channels per
    expert stored in ``dtype``) from loading, or running fast, in the runtimes users run (llama.cpp,
    vLLM, transformers). Empty when nothing does."""
    values = sorted(set(counts.values() if isinstance(counts, Mapping) else counts))
    notes = _width_notes(width, dtype) if width is not None and width != original_width else []
    if values and values[0] < top_k:
        notes.append(f"{values[0]} experts in a layer is fewer than top-k = {top_k}: llama.cpp, vLLM and "
                     "transformers refuse a top-k above the expert count")
    if len(values) > 1:
        notes.append(f"different counts per layer ({values[0]}..{values[-1]}): llama.cpp and vLLM hold one count "
                     "for the whole model" + ("; the export pads to the largest" if padded else
                                              " and cannot load it without padding"))
    uniform = values[-1] if len(values) == 1 or padded else None
    if uniform is not None and uniform & (uniform - 1):
        notes.append(f"{uniform} experts per layer is not a power of two: llama.cpp's fused CUDA top-k routing "
                     "kernel covers power-of-two counts only, so routing falls back to its slower general path "
                     f"(nearest: {1 << (uniform.bit_length() - 1)} or {1 << uniform.bit_length()})")
    return notes


def _width_notes(width: int, dtype: str | None) -> list[str]:
    """Narrower experts load wherever the config's expert width is read (transformers, llama.cpp's
    converter); what a width costs in each runtime's storage formats."""
    notes = [f"experts of {width} channels load in transformers and convert to GGUF for llama.cpp (the width is "
             "read from the config)"]
    if dtype == "mxfp4" and width % 32:
        notes.append(f"{width} channels is not whole MXFP4 blocks of 32: the experts cannot stay MXFP4")
    if width % 256:
        notes.append(f"{width} channels is not a multiple of 256: llama.cpp's K-quants (Q4_K_M, Q5_K_M, Q6_K) "
                     "quantize rows of 256, so llama-quantize stores the down projections in a fallback type "
                     + ("(Q4_0/Q5_0/Q8_0, rows of 32)" if width % 32 == 0 else "(F16: not even a multiple of 32)"))
    if width % 8:
        notes.append(f"{width} channels is not a multiple of 8: transformers' grouped expert kernels want rows "
                     "of a multiple of 16 bytes")
    return notes


def _pad_mechanism(model_type: str | None) -> str | None:
    return next((cls.pad_mechanism for cls in ADAPTERS.values() if model_type in cls.model_types), None)


def _by_layer(per_layer: Mapping[int, Any]) -> dict[str, Any]:
    """A layer-keyed mapping as JSON writes it: string keys, in layer order."""
    return {str(l): v for l, v in sorted(per_layer.items())}


# ----- reading plans back -------------------------------------------------------------------------
def load_plan(path: str | os.PathLike) -> Plan:
    """Read and validate a plan file; errors name the file and the field."""
    data = read_json(path)

    def bad(field_name: str, why: str) -> UspxError:
        return UspxError(f"{path}: field {field_name!r}: {why}")

    if not isinstance(data, dict):
        raise UspxError(f"{path}: not a uspx plan (a JSON object is expected)")
    if data.get("format") != FORMAT:
        raise bad("format", f"expected {FORMAT!r}, found {data.get('format')!r}; not a uspx plan")
    if data.get("version") != VERSION:
        raise bad("version", f"this uspx reads version {VERSION}, found {data.get('version')!r}")
    for name, kind in (("top_k", int), ("num_experts", int), ("predicted_bytes", int), ("method", str),
                       ("uniform", bool)):
        if not isinstance(data.get(name), kind) or (kind is int and isinstance(data.get(name), bool)):
            raise bad(name, f"expected {kind.__name__}, found {data.get(name)!r}")
    for name in ("scores_fingerprint", "model_fingerprint", "model_type", "padding", "keep"):
        if data.get(name) is not None and not isinstance(data[name], str):
            raise bad(name, f"expected a string or null, found {data[name]!r}")
    budget = data.get("budget_bytes")
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 0):
        raise bad("budget_bytes", f"expected a byte count or null, found {budget!r}")
    raw = data.get("kept")
    if not isinstance(raw, dict) or not raw:
        raise bad("kept", "expected a non-empty object: layer -> list of expert ids")
    top_k, n_exp = data["top_k"], data["num_experts"]
    kept: dict[int, list[int]] = {}
    for key, ids in raw.items():
        where = f"kept.{key}"
        if not str(key).isdigit():
            raise bad(where, "layer keys must be non-negative integers")
        if not isinstance(ids, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in ids):
            raise bad(where, f"expected a list of expert ids, found {ids!r}")
        if ids != sorted(set(ids)):
            raise bad(where, "expert ids must be sorted and unique")
        if ids and not (0 <= ids[0] and ids[-1] < n_exp):
            raise bad(where, f"expert ids must be in 0..{n_exp - 1}")
        if len(ids) < top_k:
            raise bad(where, f"keeps {len(ids)} experts, fewer than top-k = {top_k}")
        kept[int(key)] = ids
    counts = data.get("counts")
    if counts is not None and counts != {str(l): len(v) for l, v in kept.items()}:
        raise bad("counts", "does not match the kept lists")
    if data["uniform"] and len({len(v) for v in kept.values()}) > 1:
        raise bad("uniform", "the plan says uniform but its layers keep different counts")
    return Plan(
        kept=dict(sorted(kept.items())), method=data["method"], uniform=data["uniform"], top_k=top_k,
        num_experts=n_exp, predicted_bytes=data["predicted_bytes"], sizes=dict(data.get("sizes") or {}),
        budget_bytes=budget, keep=data.get("keep"), model_type=data.get("model_type"),
        settings=dict(data.get("settings") or {}), value=float(data.get("value") or 0.0),
        value_total=float(data.get("value_total") or 0.0), solver=dict(data.get("solver") or {}),
        scores_fingerprint=data.get("scores_fingerprint"), model_fingerprint=data.get("model_fingerprint"),
        padding=data.get("padding"),
        channels=_read_channels(data.get("channels"), kept, bad),
        heads=_read_heads(data.get("heads"), bad),
    )


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _read_channels(raw: Any, experts: dict[int, list[int]], bad) -> dict[str, Any] | None:
    """A joint plan's channel choice: per MoE layer, one sorted list of ``width`` channel ids per
    kept expert (in the order of the kept experts)."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or not _count(raw.get("width")) or not _count(raw.get("original_width")):
        raise bad("channels", "expected an object with positive width and original_width and kept")
    width, full = raw["width"], raw["original_width"]
    if width > full:
        raise bad("channels.width", f"{width} is above original_width {full}")
    kept = raw.get("kept")
    whole = width == full and kept == {}  # experts keep their width (only dense MLPs narrow)
    if not whole and (not isinstance(kept, dict) or sorted(int(k) for k in kept if str(k).isdigit()) != sorted(experts)):
        raise bad("channels.kept", f"expected one entry per layer of kept ({sorted(experts)})")
    dense = raw.get("dense") or []
    if not isinstance(dense, list):
        raise bad("channels.dense", "expected a list of dense MLP kinds")
    for i, d in enumerate(dense):
        where = f"channels.dense.{i}"
        if (not isinstance(d, dict) or not _count(d.get("width")) or not _count(d.get("original_width"))
                or not isinstance(d.get("field"), str) or not isinstance(d.get("path"), str)
                or not isinstance(d.get("kept"), dict)):
            raise bad(where, "expected path, field, width, original_width and kept")
        for key, ids in d["kept"].items():
            if not str(key).isdigit() or not _channel_ids(ids, d["width"], d["original_width"]):
                raise bad(f"{where}.kept.{key}", f"expected {d['width']} sorted, unique channel ids in "
                                                 f"0..{d['original_width'] - 1}")
        d["kept"] = {int(k): v for k, v in d["kept"].items()}
    out = {}
    for key, lists in kept.items():
        layer = int(key)
        if not isinstance(lists, list) or len(lists) != len(experts[layer]):
            raise bad(f"channels.kept.{key}", f"expected {len(experts[layer])} lists, one per kept expert")
        if not all(_channel_ids(ids, width, full) for ids in lists):
            raise bad(f"channels.kept.{key}", f"each list must hold {width} sorted, unique channel ids in 0..{full - 1}")
        out[layer] = lists
    return {**raw, "kept": out, "dense": dense}


def _channel_ids(ids: Any, width: int, full: int) -> bool:
    """Whether ``ids`` is a list of ``width`` sorted, unique channel ids in 0..full - 1."""
    return (isinstance(ids, list) and len(ids) == width and ids == sorted(set(ids))
            and all(isinstance(c, int) and 0 <= c < full for c in ids))


def _read_heads(raw: Any, bad) -> dict[str, Any] | None:
    """A joint plan's head choice: per decoder layer, the kept query heads (sorted), ``heads_per_group``
    of each of ``kv_groups`` groups."""
    if raw is None:
        return None
    names = ("kv_groups", "heads_per_group", "original_kv_groups", "original_heads_per_group")
    if not isinstance(raw, dict) or not all(_count(raw.get(n)) for n in names):
        raise bad("heads", f"expected an object with positive {', '.join(names)} and kept")
    g, r, full_g, full_r = (raw[n] for n in names)
    if g > full_g or r > full_r:
        raise bad("heads", f"{g} groups of {r} heads exceed the original {full_g} of {full_r}")
    kept = raw.get("kept")
    if not isinstance(kept, dict) or not kept:
        raise bad("heads.kept", "expected an object: layer -> kept query heads")
    out = {}
    for key, ids in kept.items():
        if not str(key).isdigit() or not isinstance(ids, list) or ids != sorted(set(ids)) or len(ids) != g * r:
            raise bad(f"heads.kept.{key}", f"expected {g * r} sorted, unique query head ids")
        groups = {}
        for h in ids:
            if not isinstance(h, int) or not 0 <= h < full_g * full_r:
                raise bad(f"heads.kept.{key}", f"query head ids must lie in 0..{full_g * full_r - 1}")
            groups.setdefault(h // full_r, []).append(h)
        if len(groups) != g or any(len(v) != r for v in groups.values()):
            raise bad(f"heads.kept.{key}", f"must keep {r} heads in each of {g} KV groups")
        out[int(key)] = ids
    return {**raw, "kept": out}
