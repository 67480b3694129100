"""``score()``: every importance score for (layer, expert) in one table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

import uspx
from uspx.io import UspxError
from uspx.engine import open_source
from uspx.plan.select import parse_keep
from uspx.models import LoadedModel
from uspx.progress import progress_bar
from uspx.score.ablation import run_ablation
from uspx.score.baseline import Baseline, run_baseline
from uspx.score.bootstrap import Factor, estimate
from uspx.score.reconstruction import reconstruction_sums, traced_sums
from uspx.score.sequential import sequential_sums
from uspx.dist import current
from uspx.score.table import FORMAT, ScoreTable, build_table
from uspx.score.taylor import run_taylor
from uspx.score.trace_stats import RouterStats, stats_from_trace
from uspx.trace import Trace
from uspx.engine.batches import pad_id_of
from uspx.workload import EncodedItem, Workload, encode, load_workload

METHODS = (
    "frequency",
    "reap",
    "ean",
    "ablation_natural",
    "ablation_interventional",
    "usage_x_marginal",
    "taylor",
    "reconstruction",
    "l0",
    "l0_layer",
    "capability",
    "ablation_guided",
)
# need ``keep``: the default (every method) leaves them out when it is not given
KEEP_METHODS = ("l0", "l0_layer", "ablation_guided")
TRACE_METHODS = ("frequency", "reap", "ean", "capability")
LOCAL_METHODS = ("frequency", "reap", "ean", "reconstruction", "l0_layer", "capability")  # need no whole-model forward: streamable  # computable from a trace alone (reap/ean need norms)
NORM_METHODS = ("reap", "ean")
# Chosen by the method benchmark (bench/methods.py, docs/benchmarks.md): on the teacher with the user's own
# calibration, reconstruction has the lowest mean held-out loss delta (tied with the ablations, which cost
# 10-18x more), beats REAP in 8 of 9 user x budget cells and is local (streams layer by layer). With generic
# calibration data only, taylor does better.
DEFAULT_METHOD = "reconstruction"

LOSS_DEFINITION = (
    "mean next-token cross-entropy over target tokens: completion tokens when an item has a "
    "completion, else every token but the first; token-weighted over the prompt set"
)



def score(*args, **kwargs) -> ScoreTable:
    """Score every (layer, expert); see :func:`_score` for the arguments. Under torchrun every
    process runs it: the ablations' (layer, expert) units, taylor's prompts and, when the trace
    holds no reconstruction sums, reconstruction's batches are shared out and their sums added
    across processes; the learned masks (l0, l0_layer) are refused. Rank 0 writes the table: every
    process returns the single-process one."""
    d = current()
    try:
        return _score(*args, **kwargs)
    finally:
        d.barrier()


def _score(
    model: str | Path | LoadedModel,
    trace_dir: str | Path,
    workload: str | Path | Workload,
    out_dir: str | Path,
    methods: Sequence[str] = METHODS,
    *,
    split: str = "calibration",
    max_tokens: int | None = None,
    bootstrap: int = 200,
    seed: int = 0,
    progress: bool = True,
    batch_size: int = 8,
    marginal: str = "interventional",
    trust_remote_code: bool = False,
    streaming: bool = False,
    dtype: str = "auto",
    sequential: str | int | None = None,
    keep: str | int | None = None,
    tool_families: Sequence[str] | None = None,
    device_map: str | Path | dict | None = None,
    max_memory: str | dict | None = None,
    units: Sequence[str] | str = ("experts",),
    unit_methods: Sequence[str] | None = None,
    ablation_budget: float = 0.1,
) -> ScoreTable:
    """Score every (layer, expert) of ``model`` with ``methods`` and write ``out_dir/scores.*``.

    The trace must come from this model and workload (FingerprintMismatch otherwise). Trace-only
    methods use every trace row of ``split``; model-based methods (ablations, usage x marginal,
    taylor, reconstruction, and reap / ean when the trace has no norms) run on the same split's
    prompts, subsampled to about ``max_tokens`` tokens (whole prompts, seeded) when given.
    ``marginal`` picks the removal behind usage x marginal: "interventional" (as pruning does) or
    "natural". ``streaming`` reads the model a decoder layer at a time (computing in ``dtype``),
    which allows the local methods only (:data:`LOCAL_METHODS`). ``sequential`` (experts kept per
    layer: a count or a share) scores each layer on the model with its earlier layers pruned by the
    same method to that many experts (``uspx.score.sequential``; local methods, one pass per method).
    ``keep`` (experts per layer: a count or a share) is the budget "l0" learns its masks under
    (``uspx.recover.masks``; required by it). Its value is the learned P(gate open) of each expert:
    one estimate from the whole calibration set, so the table has no CI for it (NaN).

    ``capability`` (needs ``tool_families``, the families whose work goes to tools) is each
    expert's routing frequency on the other families' tokens: experts that serve only the tool
    families score 0 and go first, experts that serve both keep what they do for the rest. The
    share of each expert's routed tokens in the tool families, with its interval, is recorded in
    the table's options.

    ``device_map`` / ``max_memory`` place the whole model across devices (accelerate; see
    :func:`uspx.models.load_model`); taylor then needs every expert weight in memory (not on disk).

    ``ablation_guided`` (needs ``keep``) is interventional ablation estimated with ``ablation_budget``
    (a share) of the forward passes exhaustive ablation would take: a first-order pass over every
    item, then ablations spent on the experts nearest each layer's keep boundary
    (:func:`uspx.score.bandit.guided_ablation`); its interval is the estimate +- 1.96 standard errors.

    ``units`` adds the units inside the layers ("channels": expert intermediate channels, "heads":
    KV groups and query heads), scored on the same prompts with ``unit_methods``
    (:mod:`uspx.score.units`) and written to ``units.parquet`` beside the expert table.
    """
    from uspx.score.units import DEFAULT_METHODS as UNIT_DEFAULTS, parse_units

    inner_units = [u for u in parse_units(units) if u != "experts"]
    if inner_units and (streaming or sequential is not None):
        raise UspxError(f"{', '.join(inner_units)} are scored on the whole model in memory, not layer by layer")
    if methods is METHODS:
        methods = [m for m in METHODS if m not in KEEP_METHODS or keep is not None]
        methods = [m for m in methods if m != "capability" or tool_families]
    methods = _check_methods(methods)
    d = current()
    progress = progress and d.main
    if "capability" in methods and not tool_families:
        raise UspxError("capability scores need the families handed to tools (--tool-families, e.g. arith)")
    needs_keep = [m for m in methods if m in KEEP_METHODS]
    if keep is None and needs_keep:
        raise UspxError(f"{', '.join(needs_keep)} decide which experts to keep under a budget: give keep "
                        "(--keep: a count or a share like 50%)")
    if d.active and needs_keep:
        # one sequence of steps (training, or ablations chosen from the ones before), not a sum over
        # items to share out; run alone, the other processes would only wait on it
        raise UspxError(f"{', '.join(needs_keep)} run as one sequence in one process: run `uspx score` for them "
                        f"without torchrun (this run has {d.world} processes), or `uspx extract`, whose rank 0 scores")
    if not ablation_budget > 0:
        raise UspxError(f"ablation_budget must be a positive share of exhaustive ablation's forwards, not {ablation_budget}")
    if streaming or sequential is not None:
        whole = [m for m in methods if m not in LOCAL_METHODS]
        if whole:
            raise UspxError(
                f"{', '.join(whole)} need the whole model in memory (a full forward, or gradients, per expert); "
                f"a layer-by-layer run scores only the local methods {', '.join(LOCAL_METHODS)}"
            )
    if bootstrap < 0:
        raise UspxError("bootstrap must be >= 0")
    if max_tokens is not None and max_tokens < 1:
        raise UspxError("max_tokens must be >= 1")
    if marginal not in ("natural", "interventional"):
        raise UspxError(f"marginal must be 'natural' or 'interventional', not {marginal!r}")
    wl = workload if isinstance(workload, Workload) else load_workload(workload)
    tr = Trace(trace_dir)
    trace_split = tr.manifest.get("options", {}).get("split", "all")
    if trace_split not in ("all", split):
        raise UspxError(f"{tr.path}: the trace covers split {trace_split!r}, not {split!r}")
    traced = wl.part(trace_split)
    has_norms = "expert_norms" in _trace_columns(tr)
    if streaming and not has_norms and any(m in NORM_METHODS for m in methods):
        raise UspxError(f"{tr.path}: reap / ean need expert norms in the trace for a layer-by-layer run; trace with --norms")
    if d.active and (device_map is not None or max_memory is not None):
        raise UspxError(f"--device-map places one process's model across devices; this run has {d.world} "
                        "processes, each with its own copy: start it without torchrun")
    lm = open_source(model, streaming=streaming, dtype=dtype, trust_remote_code=trust_remote_code,
                     device_map=device_map, max_memory=max_memory)
    tr.check(model=lm.fingerprint, workload=traced.fingerprint)
    adapter = lm.source.adapter
    n_keep = parse_keep(sequential, adapter.num_experts) if sequential is not None else None
    layers = [l.index for l in adapter.layers]
    if list(tr.moe_layers) != layers or tr.num_experts != adapter.num_experts:
        raise UspxError(f"{tr.path}: trace layers / expert count do not match the model")

    seconds: dict[str, float] = {}
    counts: dict[str, dict] = {}
    rows: list[pa.Table] = []
    cost = [adapter.bytes_per_expert(l) for l in adapter.layers] if lm.source.resident else lm.source.stored_expert_bytes()

    def add(method: str, factors: list[Factor], tokens: np.ndarray, n_prompts: int, n_boot: int | None = None) -> None:
        est = estimate(factors, bootstrap if n_boot is None else n_boot, seed)
        tok = np.broadcast_to(tokens, est.value.shape)
        rows.append(build_table(layers, adapter.num_experts, method, est.value, tok, est.ci_low, est.ci_high, cost, n_prompts))

    # ----- trace-based -----------------------------------------------------------------------------
    trace_stats: RouterStats | None = None
    capability_meta = None
    from_trace = [] if n_keep is not None else [m for m in methods if m in ("frequency", "capability")
                                                or (m in NORM_METHODS and has_norms)]
    if from_trace:
        t0 = time.perf_counter()
        trace_stats = stats_from_trace(tr, split, norms=has_norms and any(m in NORM_METHODS for m in methods))
        seconds["trace_stats"] = time.perf_counter() - t0
        for m in [m for m in from_trace if m != "capability"]:
            add(m, [getattr(trace_stats, m)()], trace_stats.count.sum(0), len(trace_stats.samples))
        if "capability" in from_trace:
            unknown = sorted(set(tool_families) - set(traced.families))
            if unknown:
                raise UspxError(f"--tool-families {unknown} are not families of {wl.source} ({', '.join(traced.families)})")
            tool = np.array([traced.items[int(i)].family in set(tool_families) for i in trace_stats.samples])
            count = trace_stats.count.astype(np.float64)
            fluent = ~tool
            add("capability", [Factor(count * fluent[:, None, None], (trace_stats.tokens * fluent)[:, None, None]
                                      .astype(np.float64))], (count * fluent[:, None, None]).sum(0), int(fluent.sum()))
            share = estimate([Factor(count * tool[:, None, None], count)], bootstrap, seed)
            capability_meta = dict(tool_families=sorted(tool_families), tool_prompts=int(tool.sum()),
                                   tool_share=np.round(share.value, 4).tolist(),
                                   tool_share_ci=[np.round(share.ci_low, 4).tolist(), np.round(share.ci_high, 4).tolist()])

    # ----- model-based -----------------------------------------------------------------------------
    model_methods = [m for m in methods if m not in from_trace]
    base: Baseline | None = None
    items: list[EncodedItem] = []
    if model_methods:
        if lm.tokenizer is None:
            raise UspxError(f"{lm.path}: no tokenizer; model-based scores need one")
        items = _items(tr, traced, lm.tokenizer, split, max_tokens, seed)
        pad_id = pad_id_of(lm.tokenizer)
    if n_keep is not None:
        sequential_kept = {}
        for m in model_methods:
            t0 = time.perf_counter()
            sums = sequential_sums(lm.source, items, m, n_keep, pad_id=pad_id, batch_size=batch_size, progress=progress)
            seconds[f"sequential_{m}"] = time.perf_counter() - t0
            f = (Factor(sums.err, sums.stats.tokens[:, None, None].astype(float)) if m == "reconstruction"
                 else getattr(sums.stats, m)())
            add(m, [f], (sums.routed if m == "reconstruction" else sums.stats.count).sum(0), len(items))
            sequential_kept[m] = {str(l): v for l, v in sums.kept.items()}
        model_methods = []
    if "reconstruction" in model_methods:
        t0 = time.perf_counter()
        sums = traced_sums(tr, np.array([e.index for e in items])) if tr.manifest["options"].get("reconstruction") else None
        err, routed = sums if sums is not None else reconstruction_sums(
            lm.source, items, pad_id=pad_id, batch_size=batch_size, progress=progress, dist=d)
        seconds["reconstruction"] = time.perf_counter() - t0
        tokens = np.array([len(e.input_ids) for e in items], dtype=float)
        add("reconstruction", [Factor(err, tokens[:, None, None])], routed.sum(0), len(items))
    l0_meta = None
    if any(m not in ("reconstruction", "l0", "l0_layer") for m in model_methods):
        t0 = time.perf_counter()
        base = run_baseline(
            lm.source.model, adapter, items, batch_size=batch_size, pad_id=pad_id,
            norms=any(m in NORM_METHODS for m in model_methods), progress=progress,
        )
        seconds["baseline"] = time.perf_counter() - t0
        p = base.n_prompts
        loss_tokens = base.loss_tokens()
        for m in model_methods:
            if m in NORM_METHODS:
                add(m, [getattr(base.router, m)()], base.router.count.sum(0), p)

        kinds = [k for k in ("natural", "interventional") if f"ablation_{k}" in methods]
        if "usage_x_marginal" in methods and marginal not in kinds:
            kinds.append(marginal)
        results = {}
        if kinds:
            total = len(kinds) * len(layers) * adapter.num_experts * len(base.batches)
            with progress_bar("ablation", total=total, unit="batches", enabled=progress) as bar:
                for kind in kinds:
                    t0 = time.perf_counter()
                    results[kind] = run_ablation(lm.source.model, adapter, base, kind, bar, dist=d)
                    seconds[f"ablation_{kind}"] = time.perf_counter() - t0
                    counts[f"ablation_{kind}"] = dict(forwards=results[kind].forwards, skipped=results[kind].skipped)
        for kind in ("natural", "interventional"):
            if f"ablation_{kind}" in methods:
                add(f"ablation_{kind}", [Factor(results[kind].delta_sum, loss_tokens[:, None, None].astype(float))],
                    np.full((len(layers), adapter.num_experts), loss_tokens.sum()), p)
        if "usage_x_marginal" in methods:
            routed_loss = base.routed_loss_tokens()
            add("usage_x_marginal",
                [base.router.frequency(), Factor(results[marginal].routed_delta_sum, routed_loss.astype(float))],
                routed_loss.sum(0), p)
        if "taylor" in methods:
            t0 = time.perf_counter()
            with progress_bar("taylor", total=p, unit="prompts", enabled=progress) as bar:
                sal = run_taylor(lm.source.model, adapter, items, pad_id, bar, dist=d)
            seconds["taylor"] = time.perf_counter() - t0
            add("taylor", [Factor(sal, np.ones((p, 1, 1)))], base.router.count.sum(0), p)
        if "ablation_guided" in methods:
            from uspx.score.bandit import SURROGATE_FORWARDS, guided_ablation

            t0 = time.perf_counter()
            # one item per pull, as exhaustive ablation's forwards are counted
            single = base if batch_size == 1 else run_baseline(lm.source.model, adapter, items, batch_size=1,
                                                               pad_id=pad_id, progress=progress)
            exhaustive = int(sum(int(r.any(2).any(1).sum()) for r in single.routed))
            budget = max(int(ablation_budget * exhaustive), SURROGATE_FORWARDS * len(items))
            res = guided_ablation(lm.source.model, adapter, single, parse_keep(keep, adapter.num_experts),
                                  budget=budget, seed=seed)
            seconds["ablation_guided"] = time.perf_counter() - t0
            counts["ablation_guided"] = dict(forwards=int(res.forwards), exhaustive_forwards=exhaustive)
            rows.append(build_table(layers, adapter.num_experts, "ablation_guided", res.value,
                                    np.full(res.value.shape, loss_tokens.sum()), res.value - 1.96 * res.se,
                                    res.value + 1.96 * res.se, cost, p))

    for method in [m for m in ("l0", "l0_layer") if m in model_methods]:
        from uspx.recover.masks import layer_masks, learn_masks
        from uspx.recover.objectives import gate_open_probability

        t0 = time.perf_counter()
        l0_keep = parse_keep(keep, adapter.num_experts)
        if method == "l0":  # the whole model's output (token KD)
            log_alpha, history = learn_masks(lm.source.model, items, l0_keep, batch_size=batch_size, seed=seed,
                                             pad_id=pad_id, progress=progress)
        else:  # each layer's block output alone: streams
            log_alpha, history = layer_masks(lm.source, items, l0_keep, batch_size=batch_size, seed=seed,
                                             pad_id=pad_id, progress=progress)
        seconds[method] = time.perf_counter() - t0
        value = gate_open_probability(log_alpha.double()).numpy()
        if trace_stats is not None or base is not None:  # routed counts at hand
            l0_tokens = (trace_stats.count if trace_stats is not None else base.router.count).sum(0)
        else:  # no routed counts at hand: the calibration tokens behind the masks
            l0_tokens = np.full(value.shape, sum(len(e.input_ids) for e in items))
        # one learned value per expert (P = 1): nothing to resample, so no bootstrap and NaN CIs
        add(method, [Factor(value[None], np.ones((1, 1, 1)))], l0_tokens, len(items), n_boot=0)
        l0_meta = {**(l0_meta or {}), method: dict(keep=l0_keep, history=history,
                                                   log_alpha=[[round(float(x), 4) for x in row] for row in log_alpha])}
    unit_table = None
    if inner_units and d.main:  # one pass over the prompts: not shared out, only rank 0 writes
        from uspx.score.units import score_units

        if lm.tokenizer is None:
            raise UspxError(f"{lm.path}: no tokenizer; channel and head scores need one")
        if not items:
            items, pad_id = _items(tr, traced, lm.tokenizer, split, max_tokens, seed), pad_id_of(lm.tokenizer)
        t0 = time.perf_counter()
        unit_table = score_units(lm.source.model, items, inner_units, unit_methods or UNIT_DEFAULTS, pad_id=pad_id,
                                 batch_size=batch_size, bootstrap=bootstrap, seed=seed, progress=progress)
        seconds["units"] = time.perf_counter() - t0
    order = {m: i for i, m in enumerate(methods)}
    rows.sort(key=lambda t: order[t.column("method")[0].as_py()])
    meta = dict(
        format=FORMAT,
        uspx_version=uspx.__version__,
        model=dict(
            source=lm.path, label=lm.label, fingerprint=lm.fingerprint, family=adapter.family,
            moe_layers=layers, num_experts=adapter.num_experts, top_k=adapter.top_k,
        ),
        workload=dict(source=wl.source, fingerprint=wl.fingerprint, trace_fingerprint=traced.fingerprint, split=split),
        trace=dict(path=str(Path(trace_dir).resolve()), split=trace_split, norms=has_norms),
        methods=list(methods),
        options=dict(
            split=split, max_tokens=max_tokens, bootstrap=bootstrap, seed=seed, batch_size=batch_size,
            streaming=streaming, dtype=dtype if streaming else None,
            sequential=dict(keep=n_keep, kept=sequential_kept) if n_keep is not None else None,
            l0=(l0_meta or {}).get("l0"), l0_layer=(l0_meta or {}).get("l0_layer"),
            capability=capability_meta,
            units=["experts", *inner_units], unit_methods=unit_table.methods() if unit_table is not None else None,
            marginal=marginal, ci_level=0.95, bootstrap_unit="prompt", loss=LOSS_DEFINITION,
            taylor_fisher="per-prompt empirical Fisher (gradient of each prompt's mean target loss)",
            reconstruction_removal="interventional (banned in the router, next expert takes the slot)",
        ),
        prompts=dict(
            trace=int(len(trace_stats.samples)) if trace_stats is not None else None,
            model=len(items) if model_methods else None,
            model_tokens=int(sum(len(e.input_ids) for e in items)) if model_methods else None,
            loss_tokens=int(base.loss_tokens().sum()) if base is not None else None,
        ),
        method_source={m: ("trace" if m in from_trace else "model") for m in methods},
        cost_bytes="bytes of one expert as the model holds it" if lm.source.resident else
        "bytes of one expert in the checkpoint as stored (quantized blocks and scales, biases, router row)",
        seconds={k: round(v, 3) for k, v in seconds.items()},
        ablation_forwards=counts,
    )
    table = ScoreTable(pa.concat_tables(rows), meta)
    if d.main:
        if unit_table is not None:  # before scores.json, which marks a complete folder
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            unit_table.write(out_dir)
        table.write(out_dir)
    return table


def default_methods(trace_dir: str | Path) -> list[str]:
    """The local methods a trace allows (reap and ean need its expert norms), without those that
    need more than the trace (a budget to learn masks under, tool families)."""
    has_norms = "expert_norms" in _trace_columns(Trace(trace_dir))
    return [m for m in LOCAL_METHODS if (has_norms or m not in NORM_METHODS) and m not in KEEP_METHODS
            and m != "capability"]


def _check_methods(methods: Sequence[str]) -> list[str]:
    if isinstance(methods, str):
        methods = [methods]
    out = []
    for m in methods:
        if m not in METHODS:
            raise UspxError(f"unknown score method {m!r}; choose from {', '.join(METHODS)}")
        if m not in out:
            out.append(m)
    if not out:
        raise UspxError("no score methods given")
    return out


def _trace_columns(tr: Trace) -> list[str]:
    import pyarrow.parquet as pq

    files = tr.files()
    return pq.read_schema(files[0]).names if files else []


def _items(tr: Trace, traced: Workload, tokenizer, split: str, max_tokens: int | None, seed: int) -> list[EncodedItem]:
    """The prompts of ``split`` tokenised exactly as the trace did (same max_length), then checked
    against the trace's token counts, so model-based and trace-based scores see the same tokens."""
    max_length = tr.manifest.get("options", {}).get("max_length") or 2048
    encoded = encode(traced, tokenizer, max_length)
    if split != "all":
        encoded = [e for e in encoded if e.split == split]
    if not encoded:
        raise UspxError(f"the workload has no {split!r} items")
    items_tab = tr.items()
    traced_tokens = dict(zip(items_tab.column("sample").to_pylist(), items_tab.column("tokens").to_pylist()))
    bad = [e.index for e in encoded if traced_tokens.get(e.index) != len(e.input_ids)]
    if bad:
        raise UspxError(
            f"{tr.path}: {len(bad)} items tokenise differently from the trace (first: item {bad[0]}); "
            "was the trace made with another tokenizer?"
        )
    if max_tokens is not None:
        # whole prompts (the bootstrap unit), in a seeded random order, until the budget is reached
        order = np.random.default_rng(seed).permutation(len(encoded))
        chosen, total = [], 0
        for i in order:
            if total >= max_tokens:
                break
            chosen.append(int(i))
            total += len(encoded[i].input_ids)
        encoded = [encoded[i] for i in sorted(chosen)]
    return encoded
