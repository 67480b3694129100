"""``uspx drift``: does new traffic still fit the model an ``uspx extract`` run cut?

The new workload is traced on the run's original model (or a trace of it is given), then, per
MoE layer and per family of the new items:

* the share of routing mass (the sum of the routing weights) that the new tokens put on the experts
  the run dropped, and the share of the run's score (its method computed on the new traffic);
* the same shares of the run's own calibration prompts, with their spread: bootstrap resamples of
  the calibration prompts, as many prompts per draw as the compared set has, give a 95% interval
  of what a set of that size drawn from the calibration traffic puts on the dropped experts;
* when the new items carry completions, the loss delta of the pruned model on them
  (:func:`uspx.evaluate.evaluate` over every new item).

The verdict per family, and for the whole workload the worst of them:

* ``re-extract``: the loss delta exceeds the run's own held-out delta by more than epsilon
  (the pruned model does clearly worse on the new work than on the work it was cut for), or, with
  no loss measured, the set is drifting and more than half of the MoE layers are above their own
  calibration interval;
* ``drifting``: the share of routing mass or of score over all MoE layers is above the upper
  bound of the calibration's interval, but the loss (if measured) is within that bound;
* ``covered``: neither share above the calibration's interval and the loss (if measured) within
  the bound.

The folder written (default ``RUN_DIR/drift/NAME``) holds ``trace/`` (the new traffic's routing),
``evaluation.json`` (when the loss was measured) and ``drift.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from uspx.io import FingerprintMismatch, UspxError, read_json, write_json
from uspx.progress import console
from uspx.workload import Workload, load_workload

if TYPE_CHECKING:  # imported when run: torch stays unloaded until a pass needs it
    from uspx.engine import Opened
    from uspx.score.bootstrap import Factor
    from uspx.trace import Trace

FORMAT = "uspx-drift/1"
FILENAME = "drift.json"
# score methods whose per-prompt sums a trace holds (reap / ean need its norms, reconstruction its
# reconstruction sums); a run scored otherwise is compared on frequency, and the report says so
SCORE_METHODS = ("frequency", "reap", "ean", "reconstruction")
LEVEL = 0.95
VERDICTS = ("covered", "drifting", "re-extract")
RULE = ("re-extract: loss delta on the new items > max(run's held-out delta, 0) + epsilon, or (no loss "
        "measured) drifting with more than half of the MoE layers above their own calibration interval; "
        "drifting: the share of routing mass or of score that all MoE layers put on the dropped experts above "
        "the upper bound of the 95% bootstrap interval of calibration resamples of the same number of prompts; "
        "covered: otherwise")


@dataclass
class RunInfo:
    """What drift needs of a finished ``uspx extract`` run."""

    path: Path
    model_source: str  # the original model folder
    fingerprint: str  # the original model's fingerprint
    method: str  # the run's score method
    layers: list[int]  # decoder indices of the MoE layers
    num_experts: int
    kept: dict[int, list[int]]
    epsilon: float
    run_delta: float | None  # the judged model's held-out loss delta on the run's own workload
    judged: Path  # the pruned model judged (the recovered one when the run recovered)
    max_length: int  # the calibration trace's truncation, used for the new traffic too

    @property
    def dropped(self) -> np.ndarray:
        """[L, E] True where the run dropped the expert."""
        out = np.ones((len(self.layers), self.num_experts), bool)
        for i, layer in enumerate(self.layers):
            out[i, self.kept[layer]] = False
        return out


@dataclass
class PromptSums:
    """Per-prompt sums of a trace, the bootstrap unit."""

    samples: np.ndarray  # [P] trace sample ids, sorted
    families: np.ndarray  # [P] family of each prompt
    mass: np.ndarray  # [P, L, E] routing weights summed over the prompt's tokens
    score: Factor | None  # the score method's per-prompt ratio (None when the trace cannot give it)


def read_run(run_dir: str | Path, judged: str | Path | None = None, epsilon: float | None = None) -> RunInfo:
    """The run's original model, kept set, score method, acceptance bound and judged model."""
    from uspx.extract import run_epsilon

    run = Path(run_dir)
    for need in ("report.json", "plan.json", "trace/manifest.json"):
        if not (run / need).exists():
            raise UspxError(f"{run}: not a finished `uspx extract` run ({need} is missing)")
    report, plan = read_json(run / "report.json"), read_json(run / "plan.json")
    manifest = read_json(run / "trace" / "manifest.json")
    try:
        fingerprint, source = report["model"]["fingerprint"], report["model"]["source"]
        kept = {int(l): [int(e) for e in v] for l, v in plan["kept"].items()}
        method = report["method"]
    except (KeyError, TypeError, ValueError) as exc:
        raise UspxError(f"{run}: report.json or plan.json lacks {exc} (not an `uspx extract` run?)") from None
    if manifest["model"]["fingerprint"] != fingerprint or plan.get("model_fingerprint", fingerprint) != fingerprint:
        raise FingerprintMismatch(f"{run}: its trace, plan and report name different models")
    layers = list(manifest["model"]["moe_layers"])
    if sorted(kept) != sorted(layers):
        raise UspxError(f"{run / 'plan.json'}: kept layers {sorted(kept)} differ from the trace's {layers}")
    recovered = report.get("recovered") or {}
    run_delta = (recovered.get("heldout") or {}).get("all", {}).get("delta") if recovered else report.get("overall_delta")
    return RunInfo(run, source, fingerprint, method, layers, int(manifest["model"]["num_experts"]), kept,
                   run_epsilon(report) if epsilon is None else float(epsilon), run_delta,
                   _judged(run, recovered, judged), int(manifest["options"].get("max_length") or 512))


def _judged(run: Path, recovered: dict, given: str | Path | None) -> Path:
    """The pruned model drift evaluates: the one given, the recovered one when the run recovered
    (what the run's verdict is about), else ``RUN_DIR/model``."""
    if given is not None:
        return Path(given)
    if recovered.get("model"):
        path = Path(recovered["model"])
        for candidate in (path, run / "recover" / "model"):  # the report's path is relative to where it ran
            if (candidate / "config.json").exists():
                return candidate
    if not (run / "model" / "config.json").exists():
        raise UspxError(f"{run / 'model'}: the run's pruned model is missing")
    return run / "model"


def score_method(run: RunInfo, calibration: Trace) -> tuple[str, str | None]:
    """The method the score shares use, and why it is not the run's own when it is not."""
    method = run.method
    if method not in SCORE_METHODS:
        return "frequency", f"the run's method {method!r} needs model passes per expert; scores compared on frequency"
    if not _holds(calibration, method):
        lacks = ("holds no reconstruction sums" if method == "reconstruction"
                 else f"has no expert norms for {method}")
        return "frequency", f"the run's trace {lacks}; scores compared on frequency"
    return method, None


def prompt_sums(trace: Trace, method: str, weighted: bool = True) -> PromptSums:
    """Per-prompt routing mass and ``method``'s per-prompt score sums, over every row of ``trace``.
    Not ``weighted`` (or a trace without routing weights, as engines record them): each routed slot
    carries 1/k, so the mass is the share of routed slots."""
    import pyarrow as pa

    items = trace.items()
    all_samples = np.asarray(items.column("sample").to_numpy())
    family_of = dict(zip(all_samples.tolist(), items.column("family").cast(pa.string()).to_pylist()))
    samples = np.sort(all_samples)
    layers, n_exp = list(trace.moe_layers), trace.num_experts
    pos_of_sample = np.full(int(samples.max()) + 1, -1, np.int64)
    pos_of_sample[samples] = np.arange(len(samples))
    pos_of_layer = {layer: i for i, layer in enumerate(layers)}
    mass = np.zeros((len(samples), len(layers), n_exp))
    weighted = weighted and trace.manifest["options"].get("weights", True)
    for batch in trace.iter_batches(["sample", "layer", "expert_ids", "expert_weights"]):
        sample = batch.column("sample").to_numpy().astype(np.int64)
        layer = batch.column("layer").to_numpy().astype(np.int64)
        if sample.max() >= len(pos_of_sample) or (pos_of_sample[sample] < 0).any() or \
                not set(np.unique(layer).tolist()) <= set(pos_of_layer):
            raise UspxError(f"{trace.path}: rows name samples or layers that items.parquet and the manifest do not list")
        ids = _fixed(batch.column("expert_ids"))
        weights = _fixed(batch.column("expert_weights")) if weighted else np.full(ids.shape, 1.0 / ids.shape[1])
        if ids.size and (ids.min() < 0 or ids.max() >= n_exp):
            raise UspxError(f"{trace.path}: rows name expert ids outside 0..{n_exp - 1}")
        row = pos_of_sample[sample] * len(layers) + np.array([pos_of_layer[l] for l in layer.tolist()], np.int64)
        flat = np.repeat(row, ids.shape[1]) * n_exp + ids.reshape(-1).astype(np.int64)
        mass += np.bincount(flat, weights=weights.reshape(-1).astype(np.float64),
                            minlength=mass.size).reshape(mass.shape)
    families = np.array([family_of[int(s)] for s in samples])
    return PromptSums(samples, families, mass, _score_factor(trace, method, samples))


def _fixed(col) -> np.ndarray:
    """A FixedSizeList column as an [N, width] array."""
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size)


def _score_factor(trace: Trace, method: str, samples: np.ndarray) -> Factor | None:
    """``method``'s per-prompt ratio (as ``uspx score`` computes it) from ``trace``; None when the
    trace lacks what it needs."""
    from uspx.score.bootstrap import Factor
    from uspx.score.reconstruction import traced_sums
    from uspx.score.trace_stats import stats_from_trace

    if not _holds(trace, method):
        return None
    if method == "reconstruction":
        sums = traced_sums(trace, samples)
        tokens = trace.items().to_pandas().set_index("sample").loc[samples, "tokens"].to_numpy().astype(float)
        return Factor(np.asarray(sums[0], float), tokens[:, None, None])
    stats = stats_from_trace(trace, "all", norms=method in ("reap", "ean"))
    if not np.array_equal(stats.samples, samples):
        raise UspxError(f"{trace.path}: its rows and items.parquet list different prompts")
    return getattr(stats, method)()


# ----- shares -----------------------------------------------------------------------------------
def ratio(num: np.ndarray, den: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """[B, L, E] (B = rows of ``w``, 1 when None): ``sum_p w num / sum_p w den`` per (layer,
    expert) over prompts ``p`` weighted by ``w`` [B, P]; 0 where nothing was routed."""
    p = num.shape[0]
    w = np.ones((1, p)) if w is None else w
    den = np.broadcast_to(den, num.shape)
    n = (w @ num.reshape(p, -1)).reshape(len(w), *num.shape[1:])
    d = (w @ den.reshape(p, -1)).reshape(n.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d > 0, n / np.where(d > 0, d, 1), 0.0)


def dropped_share(num: np.ndarray, den: np.ndarray, dropped: np.ndarray,
                  draws: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Share of a per-expert value on the ``dropped`` experts, per layer [.., L] and over every
    layer [..]. The value of an expert is ``sum_p num[p] / sum_p den[p]`` over prompts weighted by
    ``draws`` [B, P] (how often each prompt is drawn; None: every prompt once, no leading axis).
    An expert with no data carries nothing (0); a layer carrying nothing has a NaN share."""
    value = ratio(num, den, draws)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_layer = (value * dropped).sum(-1) / value.sum(-1)
        overall = (value * dropped).sum((-2, -1)) / value.sum((-2, -1))
    return (per_layer[0], overall[0]) if draws is None else (per_layer, overall)


def resample(n_prompts: int, size: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n_prompts]: how often each prompt is drawn in each of ``n_boot`` resamples of
    ``size`` prompts drawn with replacement (seeded)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(size, np.full(n_prompts, 1.0 / n_prompts), size=n_boot).astype(np.float64)


def _interval(boot: np.ndarray) -> list:
    import warnings

    alpha = (1 - LEVEL) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a layer that carried nothing in every draw
        lo, hi = np.nanpercentile(boot, [100 * alpha, 100 * (1 - alpha)], axis=0)
    return [_round(lo), _round(hi)]


def _round(x) -> float | list | None:
    arr = np.asarray(x, float)
    if arr.ndim == 0:
        return None if np.isnan(arr) else round(float(arr), 6)
    return [None if np.isnan(v) else round(float(v), 6) for v in arr]


def compare_set(new: PromptSums, rows: np.ndarray, calibration: PromptSums, dropped: np.ndarray, *,
                n_boot: int, seed: int) -> dict:
    """The new prompts ``rows`` against the calibration prompts: each share (mass, and score when
    both traces give it) of the new set with its own interval, and the calibration's point share
    with the interval of resamples of as many calibration prompts as the new set has."""
    out: dict = dict(prompts=int(len(rows)))
    kinds = {"mass": (new.mass, 1.0, calibration.mass, 1.0)}  # a mass is its own value: denominator 1
    if new.score is not None and calibration.score is not None:
        kinds["score"] = (new.score.num, new.score.den, calibration.score.num, calibration.score.den)
    own = resample(len(rows), len(rows), n_boot, seed)
    ref = resample(len(calibration.samples), len(rows), n_boot, seed + 1)
    for name, (num, den, c_num, c_den) in kinds.items():
        out[name] = dict(_shares(num[rows], np.broadcast_to(den, num.shape)[rows], dropped, own),
                         calibration=_shares(c_num, c_den, dropped, ref))
    return out


def _shares(num: np.ndarray, den: np.ndarray, dropped: np.ndarray, draws: np.ndarray) -> dict:
    """The share on the dropped experts, per layer and over all, each with its interval over ``draws``."""
    layer, total = dropped_share(num, den, dropped)
    b_layer, b_total = dropped_share(num, den, dropped, draws)
    return dict(share=_round(layer), ci=_interval(b_layer), total=_round(total), total_ci=_interval(b_total))


# ----- the new traffic --------------------------------------------------------------------------
def new_trace(run: RunInfo, new: str | Path | Workload, out: Path, method: str, *, model: str | Path | Opened | None,
              batch_size: int, progress: bool, dtype: str) -> tuple[Trace, Workload | None, str | None]:
    """The trace of the new traffic (a given trace folder, checked to come from the run's model, or
    ``out/trace`` traced now), the workload behind it (None when it cannot be read back) and why not."""
    from uspx.trace import Trace, trace

    if not isinstance(new, Workload) and (Path(new) / "manifest.json").exists():
        tr = Trace(new)
        _check_model(tr.manifest["model"]["fingerprint"], run, f"{tr.path}")
        return tr, *_traced_workload(tr)
    wl = load_workload(new)
    opened = open_original(run, model, dtype)
    trace(opened, wl, out / "trace", split="all", batch_size=batch_size, max_length=run.max_length,
          norms=method in ("reap", "ean"), reconstruction=method == "reconstruction", progress=progress)
    return Trace(out / "trace"), wl, None


def open_original(run: RunInfo, model: str | Path | Opened | None, dtype: str) -> Opened:
    """The run's original model (or the copy given), opened whole, its fingerprint checked."""
    from uspx.engine import open_source

    opened = open_source(model if model is not None else run.model_source, dtype=dtype)
    _check_model(opened.fingerprint, run, opened.path)
    return opened


def _check_model(found: str, run: RunInfo, where: str) -> None:
    if found != run.fingerprint:
        raise FingerprintMismatch(f"{where}: model fingerprint {found[:12]} is not the one {run.path} was cut from "
                                  f"({run.fingerprint[:12]}, {run.model_source}); drift compares routing of one model")


def _traced_workload(tr: Trace) -> tuple[Workload | None, str | None]:
    """The workload a given trace was made from, when it can still be read and is unchanged."""
    info = tr.manifest.get("workload") or {}
    if (tr.manifest["options"].get("imported") or {}).get("format") == "sglang":
        return None, "the imported items are SGLang forward passes (tokens of several requests), not requests"
    try:
        wl = load_workload(info["source"])
    except (UspxError, KeyError, OSError) as exc:
        return None, f"the trace's workload cannot be read ({exc})"
    if wl.fingerprint != info.get("fingerprint"):
        return None, f"{info['source']} changed since it was traced (fingerprint differs)"
    return wl, None


def measure_loss(run: RunInfo, wl: Workload, original: Opened, out: Path, *, batch_size: int,
                 progress: bool, dtype: str) -> dict:
    """The judged model's loss delta on every new item (``out/evaluation.json``), per family."""
    from uspx.evaluate import evaluate
    from uspx.virtual.sandbox import run_python

    ev = evaluate(original, run.judged, wl, split="all", max_length=run.max_length, batch_size=batch_size,
                  epsilon=run.epsilon, speed=False, out=out / "evaluation.json", progress=progress, dtype=dtype,
                  sandbox=run_python)
    return {f: dict(delta=v["delta"], delta_ci95=v.get("delta_ci95"), loss_original=v["loss_teacher"],
                    loss_pruned=v["loss_candidate"], tokens=v.get("tokens"))
            for f, v in [*ev["families"].items(), ("*all*", ev["overall"])] if v.get("delta") is not None}


# ----- the verdict ------------------------------------------------------------------------------
def judge(cmp: dict, layers: list[int], loss: dict | None, bound: float) -> dict:
    """One set's verdict under :data:`RULE`, with the numbers behind it. The share over every MoE
    layer decides (one comparison per kind: testing each layer alone would flag traffic of the
    calibration's own kind in one layer or another by chance); the layers above their own
    interval are the detail, and decide only when no loss was measured."""
    above: dict[str, list[int]] = {}
    total_above = []
    for kind in ("mass", "score"):
        if kind in cmp:
            c = cmp[kind]
            hi = c["calibration"]["ci"][1]
            above[kind] = [l for l, s, h in zip(layers, c["share"], hi) if s is not None and h is not None and s > h]
            top = c["calibration"]["total_ci"][1]
            if c["total"] is not None and top is not None and c["total"] > top:
                total_above.append(kind)
    outside = sorted(set().union(*above.values()))
    reasons = [f"{kind} on dropped experts over all layers {100 * cmp[kind]['total']:.1f}% against the calibration's "
               f"{100 * cmp[kind]['calibration']['total_ci'][0]:.1f}-{100 * cmp[kind]['calibration']['total_ci'][1]:.1f}%"
               f"{' (above)' if kind in total_above else ''}; {len(ls)} of {len(layers)} layers above their own interval"
               f"{f' ({ls})' if ls else ''}" for kind, ls in above.items() if cmp[kind]["total"] is not None]
    drifting = bool(total_above)
    if loss is not None:
        reasons.append(f"loss delta {loss['delta']:+.4f} nats/token against the bound {bound:+.4f}")
        verdict = "re-extract" if loss["delta"] > bound else "drifting" if drifting else "covered"
    else:
        reasons.append("loss not measured")
        verdict = ("re-extract" if drifting and len(outside) > len(layers) / 2 else
                   "drifting" if drifting else "covered")
    return dict(verdict=verdict, total_above=total_above, layers_above=above, reasons=reasons)


# ----- the command ------------------------------------------------------------------------------
def drift(run_dir: str | Path, new: str | Path | Workload, out_dir: str | Path | None = None, *,
          model: str | Path | Opened | None = None, judged: str | Path | None = None, epsilon: float | None = None,
          bootstrap: int = 1000, seed: int = 0, batch_size: int = 8, progress: bool = True,
          dtype: str = "auto") -> dict:
    """Compare the new traffic ``new`` (a workload, or a trace folder of it made on the run's
    original model) with the calibration traffic of the extract run ``run_dir``; writes and returns
    ``drift.json`` in ``out_dir`` (default ``RUN_DIR/drift/NAME``).

    ``model``: the run's original model, when it moved (an opened source, or a folder; its
    fingerprint must be the run's). ``judged``: the pruned model whose loss is measured (default the
    recovered one when the run recovered, else ``RUN_DIR/model``). ``epsilon``: the loss bound's
    margin (default the run's acceptance epsilon). ``bootstrap`` draws per interval (``seed``).
    """
    from uspx.trace import Trace

    if bootstrap < 1:
        raise UspxError(f"bootstrap must be >= 1 draw, not {bootstrap}")
    run = read_run(run_dir, judged, epsilon)
    calibration_trace = Trace(run.path / "trace")
    method, why = score_method(run, calibration_trace)
    out = Path(out_dir) if out_dir is not None else run.path / "drift" / _name(new)
    tr, wl, no_loss = new_trace(run, new, out, method, model=model, batch_size=batch_size, progress=progress,
                                dtype=dtype)
    if list(tr.moe_layers) != run.layers or tr.num_experts != run.num_experts:
        raise UspxError(f"{tr.path}: MoE layers / expert count differ from the run's")
    # both sides counted alike: routing weights when both traces hold them, else routed slots
    weighted = all(t.manifest["options"].get("weights", True) for t in (tr, calibration_trace))
    if not _holds(tr, method):  # a given trace made without them, or a server's routing: compare on ids
        why = f"{tr.path} lacks what {method} needs (expert norms or reconstruction sums); scores compared on frequency"
        method = "frequency"
    calibration, new_sums = prompt_sums(calibration_trace, method, weighted), prompt_sums(tr, method, weighted)
    loss = None
    if wl is not None and not any(i.completion for i in wl.items):
        no_loss = "the new items carry no completions"
    elif wl is not None:
        original = open_original(run, model, dtype)
        loss = measure_loss(run, wl, original, out, batch_size=batch_size, progress=progress, dtype=dtype)
    bound = max(run.run_delta or 0.0, 0.0) + run.epsilon
    overall, families = compare_families(new_sums, calibration, run, loss, bound, bootstrap=bootstrap, seed=seed)
    result = dict(
        format=FORMAT, run=str(run.path), out=str(out), model=dict(source=run.model_source, fingerprint=run.fingerprint),
        new=dict(trace=str(tr.path), workload=tr.manifest.get("workload"), prompts=int(len(new_sums.samples))),
        calibration=dict(trace=str(calibration_trace.path), prompts=int(len(calibration.samples))),
        layers=run.layers, dropped={str(l): np.flatnonzero(run.dropped[i]).tolist() for i, l in enumerate(run.layers)},
        score_method=method, score_note=why, mass=_mass_kind(tr, calibration_trace), judged=str(run.judged),
        loss_note=no_loss if loss is None else None, epsilon=run.epsilon, run_delta=run.run_delta, loss_bound=bound,
        bootstrap=dict(draws=bootstrap, seed=seed, level=LEVEL, unit="prompt"), rule=RULE, overall=overall,
        families=families, verdict=max((f["verdict"] for f in families.values()), key=VERDICTS.index),
    )
    write_json(out / FILENAME, result)
    return result


def compare_families(new: PromptSums, calibration: PromptSums, run: RunInfo, loss: dict | None, bound: float, *,
                     bootstrap: int, seed: int) -> tuple[dict, dict[str, dict]]:
    """Every new prompt, and each family's, against the calibration, each with its verdict."""
    sets = {}
    for fam in ["*all*", *sorted(set(new.families.tolist()))]:
        rows = np.arange(len(new.samples)) if fam == "*all*" else np.flatnonzero(new.families == fam)
        cmp = compare_set(new, rows, calibration, run.dropped, n_boot=bootstrap, seed=seed)
        cmp["loss"] = (loss or {}).get(fam)
        cmp.update(judge(cmp, run.layers, cmp["loss"], bound))
        sets[fam] = cmp
    overall = sets.pop("*all*")
    return overall, sets


def _holds(tr: Trace, method: str) -> bool:
    """Whether ``tr`` holds what ``method``'s per-prompt sums need."""
    if method == "reconstruction":
        return (tr.path / "reconstruction.npz").exists()
    return method not in ("reap", "ean") or bool(tr.manifest["options"].get("norms"))


def _mass_kind(new: Trace, calibration: Trace) -> str:
    weighted = [t.manifest["options"].get("weights", True) for t in (new, calibration)]
    if all(weighted):
        return "routing weights"
    return "routed slots (1/k each), on both sides: " + ", ".join(
        f"{t.path} records no routing weights" for t, w in zip((new, calibration), weighted) if not w)


def _name(new: str | Path | Workload) -> str:
    return Path(new.source if isinstance(new, Workload) else new).stem or "workload"


def print_drift(result: dict) -> None:
    """The short table: per family, the shares on the dropped experts (all MoE layers) against the
    calibration's interval, the layers above it, the loss delta and the verdict."""
    from rich import box
    from rich.table import Table

    t = Table(title=f"new traffic on the experts {Path(result['run']).name} dropped, all MoE layers "
                    "(cal.: 95% interval of calibration resamples of n prompts)", box=box.SIMPLE,
              pad_edge=False, collapse_padding=True)
    for col in ("family", "n", "mass %", "cal.", "score %", "cal.", "above", "Δloss", "verdict"):
        t.add_column(col, justify="left" if col in ("family", "verdict") else "right")
    rows = list(result["families"].items())
    if len(rows) > 1:
        rows.append(("all", result["overall"]))
    for fam, f in rows:
        cells = [fam, str(f["prompts"])]
        for kind in ("mass", "score"):
            s = f.get(kind)
            lo, hi = s["calibration"]["total_ci"] if s else (None, None)
            star = "*" if kind in f["total_above"] else ""
            cells += [_pct(s["total"]) + star, f"{_pct(lo)}-{_pct(hi)}"] if s else ["-", "-"]  # percent
        above = sorted(set().union(*f["layers_above"].values()))
        cells += [f"{len(above)}/{len(result['layers'])}",
                  f"{f['loss']['delta']:+.4f}" if f.get("loss") else "-", f["verdict"]]
        t.add_row(*cells)
    console.print(t)
    console.print("* above the calibration's interval; above: layers above their own interval")
    for note in (result["score_note"], result["loss_note"]):
        if note:
            console.print(f"note: {note}")
    console.print(f"verdict: [bold]{result['verdict']}[/] (loss bound {result['loss_bound']:+.4f} = max(run's "
                  f"held-out delta, 0) + epsilon {result['epsilon']}; score: {result['score_method']}; "
                  f"per-layer numbers in drift.json)")
    source = (result["new"].get("workload") or {}).get("source")
    if result["verdict"] != "covered" and source:
        console.print(f"to bring the run up to date with this work: uspx extract --update {result['run']} {source}",
                      markup=False, highlight=False)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"
