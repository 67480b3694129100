"""``score()``: every importance score for (layer, expert) in one table."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pyarrow as pa

import uspx
from uspx.dist import Dist, current
from uspx.engine import Opened, dtype_name, open_source
from uspx.io import UspxError
from uspx.models import LoadedModel
from uspx.score.keep import parse_keep
from uspx.score.methods import REGISTRY, Inputs, Method, Needs, score_sequential
from uspx.score.table import FORMAT, ScoreTable
from uspx.score.trace_stats import trace_columns
from uspx.trace import Trace
from uspx.workload import Workload, load_workload

METHODS = tuple(REGISTRY)
# need ``keep``: the default (every method) leaves them out when it is not given
KEEP_METHODS = tuple(m for m in METHODS if REGISTRY[m].needs_keep)
TRACE_METHODS = tuple(m for m in METHODS if REGISTRY[m].reads_trace)  # computable from a trace alone (reap/ean need norms)
LOCAL_METHODS = tuple(m for m in METHODS if REGISTRY[m].streams)  # need no whole-model forward: streamable
SEQUENTIAL_METHODS = tuple(m for m in METHODS if REGISTRY[m].sequential)
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
    """Score every (layer, expert) of ``model`` with ``methods`` and write ``out_dir/scores.*``.

    The trace must come from this model and workload (FingerprintMismatch otherwise). Trace-only
    methods use every trace row of ``split``; model-based methods (ablations, usage x marginal,
    taylor, reconstruction, and reap / ean when the trace has no norms) run on the same split's
    prompts, subsampled to about ``max_tokens`` tokens (whole prompts, seeded) when given.
    ``marginal`` picks the removal behind usage x marginal: "interventional" (as pruning does) or
    "natural". ``model`` is an opened source (:func:`uspx.engine.open_source`), a loaded model or a
    folder (loaded whole in ``dtype``); a source opened layer by layer allows the local methods only
    (:data:`LOCAL_METHODS`). ``sequential`` (experts kept per
    layer: a count or a share) scores each layer on the model with its earlier layers pruned by the
    same method to that many experts (``uspx.score.sequential``; :data:`SEQUENTIAL_METHODS`, one pass
    per method). ``keep`` (experts per layer: a count or a share) is the budget "l0" learns its masks under
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

    The arguments are :func:`_score`'s. Under torchrun every process runs it: the ablations'
    (layer, expert) units, taylor's prompts and, when the trace holds no reconstruction sums,
    reconstruction's batches are shared out and their sums added across processes; the learned
    masks (l0, l0_layer) are refused. Rank 0 writes the table: every process returns the
    single-process one.
    """
    d = current()
    try:
        return _score(*args, **kwargs)
    finally:
        d.barrier()


def _score(
    model: str | Path | LoadedModel | Opened,
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
    """One process's share of :func:`score`, whose arguments these are."""
    chosen, inner_units = check_arguments(model, methods, keep=keep, tool_families=tool_families,
                                          ablation_budget=ablation_budget, sequential=sequential, bootstrap=bootstrap,
                                          max_tokens=max_tokens, marginal=marginal, units=units)
    layered = isinstance(model, Opened) and model.streaming
    d = current()
    wl = load_workload(workload)
    tr = Trace(trace_dir)
    trace_split = traced_split(tr, split)
    traced = wl.part(trace_split)
    has_norms = "expert_norms" in trace_columns(tr)
    if layered and not has_norms and any(m.norms for m in chosen):
        raise UspxError(f"{tr.path}: reap / ean need expert norms in the trace for a layer-by-layer run; trace with --norms")
    lm = _open_model(model, tr, traced, d, dtype=dtype, trust_remote_code=trust_remote_code,
                     device_map=device_map, max_memory=max_memory)
    n_keep = parse_keep(sequential, lm.source.adapter.num_experts) if sequential is not None else None
    run = Inputs(lm, tr, traced, split, d, has_norms, n_keep=n_keep, max_tokens=max_tokens, bootstrap=bootstrap,
                 seed=seed, batch_size=batch_size, progress=progress and d.main, marginal=marginal, keep=keep,
                 tool_families=tool_families, ablation_budget=ablation_budget)
    _run_methods(run, chosen)
    unit_table = None
    if inner_units and d.main:  # one pass over the prompts: not shared out, only rank 0 writes
        unit_table = _score_units(run, inner_units, unit_methods)
    order = {m.name: i for i, m in enumerate(chosen)}
    run.rows.sort(key=lambda t: order[t.column("method")[0].as_py()])
    meta = _meta(run, chosen, wl, trace_dir, trace_split, unit_table, inner_units)
    table = ScoreTable(pa.concat_tables(run.rows), meta)
    if d.main:
        if unit_table is not None:  # before scores.json, which marks a complete folder
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            unit_table.write(out_dir)
        table.write(out_dir)
    return table


def check_arguments(model: str | Path | LoadedModel | Opened, methods: Sequence[str] = METHODS, *,
                    keep: str | int | None = None, tool_families: Sequence[str] | None = None,
                    ablation_budget: float = 0.1, sequential: str | int | None = None, bootstrap: int = 200,
                    max_tokens: int | None = None, marginal: str = "interventional",
                    units: Sequence[str] | str = ("experts",)) -> tuple[list[Method], list[str]]:
    """The methods :func:`score` will run and the unit types inside the layers it scores, once every
    argument that needs neither the trace nor the weights is checked (a folder or a loaded model
    runs whole; a source opened layer by layer allows the local methods only)."""
    from uspx.score.units import parse_units

    inner_units = [u for u in parse_units(units) if u != "experts"]
    layered = isinstance(model, Opened) and model.streaming
    if inner_units and sequential is not None:
        raise UspxError(f"{', '.join(inner_units)} are scored on the original model, not sequentially")
    if methods is METHODS:
        methods = [m for m in METHODS if not REGISTRY[m].needs_keep or keep is not None]
        methods = [m for m in methods if m != "capability" or tool_families]
    chosen = [REGISTRY[m] for m in _check_methods(methods)]
    names, d = [m.name for m in chosen], current()
    if "capability" in names and not tool_families:
        raise UspxError("capability scores need the families handed to tools (--tool-families, e.g. arith)")
    needs_keep = [m.name for m in chosen if m.needs_keep]
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
    whole = [m.name for m in chosen if not m.streams]
    if whole and (layered or sequential is not None):
        raise UspxError(
            f"{', '.join(whole)} need the whole model in memory (a full forward, or gradients, per expert); "
            f"a layer-by-layer run scores only the local methods {', '.join(LOCAL_METHODS)}"
        )
    other = [m.name for m in chosen if not m.sequential]
    if other and sequential is not None:
        raise UspxError(f"{', '.join(other)} are not scored sequentially; sequential calibration scores "
                        f"{', '.join(SEQUENTIAL_METHODS)}")
    if bootstrap < 0:
        raise UspxError("bootstrap must be >= 0")
    if max_tokens is not None and max_tokens < 1:
        raise UspxError("max_tokens must be >= 1")
    if marginal not in ("natural", "interventional"):
        raise UspxError(f"marginal must be 'natural' or 'interventional', not {marginal!r}")
    return chosen, inner_units


def traced_split(tr: Trace, split: str) -> str:
    """The split of the workload the trace was made on, refused when it does not cover ``split``."""
    trace_split = tr.manifest.get("options", {}).get("split", "all")
    if trace_split not in ("all", split):
        raise UspxError(f"{tr.path}: the trace covers split {trace_split!r}, not {split!r}")
    return trace_split


def _open_model(model: str | Path | LoadedModel | Opened, tr: Trace, traced: Workload, d: Dist, *, dtype: str,
                trust_remote_code: bool, device_map: str | Path | dict | None, max_memory: str | dict | None) -> Opened:
    """The model as opened (a folder or a loaded model: whole), checked to be the one the trace was made from."""
    if d.active and (device_map is not None or max_memory is not None):
        raise UspxError(f"--device-map places one process's model across devices; this run has {d.world} "
                        "processes, each with its own copy: start it without torchrun")
    lm = open_source(model, dtype=dtype, trust_remote_code=trust_remote_code, device_map=device_map,
                     max_memory=max_memory)
    tr.check(model=lm.fingerprint, workload=traced.fingerprint)
    adapter = lm.source.adapter
    if list(tr.moe_layers) != [l.index for l in adapter.layers] or tr.num_experts != adapter.num_experts:
        raise UspxError(f"{tr.path}: trace layers / expert count do not match the model")
    return lm


def _run_methods(run: Inputs, chosen: list[Method]) -> None:
    """Gather what the chosen methods need, once, then let each add its rows."""
    if run.sequential:  # each method runs its own pass over the model it prunes as it goes
        run.gather(Needs(prompts=True))
        for m in chosen:
            score_sequential(m, run)
        return
    needs = Needs()
    for m in chosen:
        needs = needs | m.needs(run)
    run.gather(needs)
    for m in chosen:
        m.compute(run)


def _score_units(run: Inputs, inner_units: list[str], unit_methods: Sequence[str] | None):
    """Channels and heads, scored on the same prompts as the experts."""
    from uspx.score.units import DEFAULT_METHODS as UNIT_DEFAULTS, LOCAL_METHODS as UNIT_LOCAL, score_units

    run.load_prompts("channel and head scores")
    with run.timed("units"):
        defaults = UNIT_DEFAULTS if run.lm.source.resident else UNIT_LOCAL  # layer by layer: what runs there
        return score_units(run.lm.source, run.items, inner_units, unit_methods or defaults,
                           pad_id=run.pad_id, batch_size=run.batch_size, bootstrap=run.bootstrap, seed=run.seed,
                           progress=run.progress)


def _meta(run: Inputs, chosen: list[Method], wl: Workload, trace_dir: str | Path, trace_split: str, unit_table,
          inner_units: list[str]) -> dict:
    """The table's scores.json: where the scores come from and how they were computed."""
    lm, adapter, base = run.lm, run.adapter, run.baseline
    from_model = any(m.source(run) == "model" for m in chosen)
    return dict(
        format=FORMAT,
        uspx_version=uspx.__version__,
        model=dict(
            source=lm.path, label=lm.label, fingerprint=lm.fingerprint, family=adapter.family,
            moe_layers=run.layers, num_experts=adapter.num_experts, top_k=adapter.top_k,
        ),
        workload=dict(source=wl.source, fingerprint=wl.fingerprint, trace_fingerprint=run.traced.fingerprint,
                      split=run.split),
        trace=dict(path=str(Path(trace_dir).resolve()), split=trace_split, norms=run.has_norms),
        methods=[m.name for m in chosen],
        options=dict(
            split=run.split, max_tokens=run.max_tokens, bootstrap=run.bootstrap, seed=run.seed,
            batch_size=run.batch_size, streaming=lm.streaming, dtype=dtype_name(lm.dtype) if lm.streaming else None,
            sequential=dict(keep=run.n_keep, kept=run.options.get("sequential_kept", {})) if run.sequential else None,
            l0=run.options.get("l0"), l0_layer=run.options.get("l0_layer"),
            capability=run.options.get("capability"),
            units=["experts", *inner_units], unit_methods=unit_table.methods() if unit_table is not None else None,
            marginal=run.marginal, ci_level=0.95, bootstrap_unit="prompt", loss=LOSS_DEFINITION,
            taylor_fisher="per-prompt empirical Fisher (gradient of each prompt's mean target loss)",
            reconstruction_removal="interventional (banned in the router, next expert takes the slot)",
        ),
        prompts=dict(
            trace=int(len(run.stats.samples)) if run.stats is not None else None,
            model=len(run.items) if from_model else None,
            model_tokens=int(sum(len(e.input_ids) for e in run.items)) if from_model else None,
            loss_tokens=int(base.loss_tokens().sum()) if base is not None else None,
        ),
        method_source={m.name: m.source(run) for m in chosen},
        cost_bytes="bytes of one expert as the model holds it" if lm.source.resident else
        "bytes of one expert in the checkpoint as stored (quantized blocks and scales, biases, router row)",
        seconds={k: round(v, 3) for k, v in run.seconds.items()},
        ablation_forwards=run.counts,
    )


def default_methods(trace_dir: str | Path) -> list[str]:
    """The local methods a trace allows (reap and ean need its expert norms), without those that
    need more than the trace (a budget to learn masks under, tool families)."""
    has_norms = "expert_norms" in trace_columns(Trace(trace_dir))
    return [m for m in LOCAL_METHODS if (has_norms or not REGISTRY[m].norms) and not REGISTRY[m].needs_keep
            and m != "capability"]


def _check_methods(methods: Sequence[str]) -> list[str]:
    if isinstance(methods, str):
        methods = [methods]
    out = []
    for m in methods:
        if m not in REGISTRY:
            raise UspxError(f"unknown score method {m!r}; choose from {', '.join(REGISTRY)}")
        if m not in out:
            out.append(m)
    if not out:
        raise UspxError("no score methods given")
    return out
