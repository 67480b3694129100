"""Stop when the kept set has settled (``uspx trace --until-stable``, ``uspx score --until-stable``;
``uspx trace-stable`` is the first): observe a block of prompts at a time instead of every one.

Both shuffle the prompts (seeded, so every block mixes the workload's families) and, after each
block, take the score of every prompt so far (per-prompt sums, bootstrap unit the prompt), the
kept set under the requested count or byte budget, and its bootstrap stability: the mean Jaccard
index between the kept set of a resample of the prompts and the kept set of all of them. The rule
(:class:`Settling`): stop after the block at which the kept set (every layer's, pooled) had a
Jaccard index of at least ``1 - tolerance`` with the previous block's for ``patience`` blocks in a
row.

* Tracing (:func:`trace_until_stable`): each block of calibration items is traced into its own
  folder (``blocks/block-NNNN``, resumable like any trace) and scored from the trace alone
  (frequency, REAP, EAN, or reconstruction, whose sums come out of the tracing pass). The blocks
  traced become one trace (``trace/``, of the items in ``workload.jsonl``), their scores a table
  (``scores/``), the history ``stable.json``.
* Scoring (:func:`score_until_stable`): the prompts of a trace, a block at a time, with a method
  whose per-prompt sums grow by block: read from the trace, or a model pass over the block's
  prompts only (reconstruction without traced sums, taylor), which is where stopping saves.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from uspx.drift import ratio
from uspx.io import UspxError, read_json, write_json
from uspx.progress import console, progress_bar
from uspx.workload import Workload, load_workload

if TYPE_CHECKING:
    from uspx.engine import Opened
    from uspx.score import ScoreTable

METHODS = ("frequency", "reap", "ean", "reconstruction")  # computed from the trace alone
SCORE_METHODS = METHODS + ("taylor",)  # per-prompt sums a block of prompts adds to
FILENAME = "stable.json"


def kept_mask(value: np.ndarray, n: int) -> np.ndarray:
    """[..., L, E] True for the ``n`` highest values of each layer (ties: the lower expert index)."""
    order = np.argsort(-value, axis=-1, kind="stable")[..., :n]
    mask = np.zeros(value.shape, bool)
    np.put_along_axis(mask, order, True, axis=-1)
    return mask


def jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Jaccard index of kept sets given as masks [..., L, E], every layer pooled."""
    inter = (a & b).sum((-2, -1))
    union = (a | b).sum((-2, -1))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def stability(num: np.ndarray, den: np.ndarray, n: int, n_boot: int, seed: int) -> float:
    """Mean Jaccard index between the kept sets of bootstrap resamples of the prompts and the kept set."""
    from uspx.score.bootstrap import resample_counts

    point = kept_mask(ratio(num, den)[0], n)
    draws = kept_mask(ratio(num, den, resample_counts(num.shape[0], n_boot, seed)), n)
    return float(jaccard(draws, point[None]).mean())


@dataclass
class Settling:
    """The stop rule, fed a block of prompts' score sums at a time: the kept set under ``n_keep``
    after each block, its Jaccard index with the block before's, its bootstrap stability, and
    whether ``patience`` blocks in a row stayed within ``tolerance``."""

    n_keep: int
    tolerance: float
    patience: int
    bootstrap: int
    seed: int
    num: np.ndarray | None = None  # every prompt's sums so far, [P, L, E], in the order added
    den: np.ndarray | None = None  # their denominators, broadcast to them
    count: np.ndarray | None = None  # their routed counts
    history: list = field(default_factory=list)
    kept: np.ndarray | None = None
    calm: int = 0
    prompts: int = 0
    tokens: int = 0

    @property
    def stable(self) -> bool:
        return self.calm >= self.patience

    def add(self, num: np.ndarray, den: np.ndarray, count: np.ndarray, tokens: int, say: bool = False) -> bool:
        """One block's per-prompt sums ([P, L, E] numerators, denominators broadcast to them, routed
        counts) entered in the history (and, with ``say``, printed); returns whether to stop."""
        block = (num, np.broadcast_to(den, num.shape), count)
        self.num, self.den, self.count = (np.concatenate([b] if so_far is None else [so_far, b])
                                          for so_far, b in zip((self.num, self.den, self.count), block))
        self.prompts += len(num)
        self.tokens += tokens
        kept = kept_mask(ratio(self.num, self.den)[0], self.n_keep)
        prev, self.kept = self.kept, kept
        j = float(jaccard(kept, prev)) if prev is not None else None
        self.calm = self.calm + 1 if j is not None and j >= 1 - self.tolerance else 0
        entry = dict(block=len(self.history), items=self.prompts, tokens=self.tokens, jaccard_previous=j,
                     changed=int((kept != prev).sum() // 2) if prev is not None else None,
                     stability=round(stability(self.num, self.den, self.n_keep, self.bootstrap, self.seed), 4))
        self.history.append(entry)
        if say:
            versus = "-" if j is None else f"Jaccard {j:.3f}, {entry['changed']} experts swapped"
            console.print(f"block {entry['block']}: {self.prompts} items, {self.tokens} tokens; kept set vs the "
                          f"block before: {versus}; bootstrap stability {entry['stability']:.3f}")
        return self.stable

    def rule(self) -> str:
        return (f"stop after {self.patience} blocks in a row whose kept set has a Jaccard index >= "
                f"{1 - self.tolerance:g} with the block before's (every layer pooled)")


def _check_rule(block: int, tolerance: float, patience: int, bootstrap: int) -> None:
    if block < 1 or patience < 1 or not 0 <= tolerance < 1 or bootstrap < 1:
        raise UspxError("--block and --patience must be >= 1, --tolerance in [0, 1), --bootstrap >= 1")


def trace_until_stable(model: str | Path | Opened, workload: str | Path | Workload, out_dir: str | Path, *,
                       keep: str | int | None = None, budget: str | int | None = None, method: str = "frequency",
                       block: int = 16, tolerance: float = 0.05, patience: int = 2, bootstrap: int = 200,
                       seed: int = 0, batch_size: int = 8, max_length: int | None = None, context: int = 4096,
                       kv_dtype: str = "bf16", progress: bool = True, dtype: str = "auto") -> dict:
    """Trace the calibration items of ``workload`` a ``block`` at a time until the kept set under
    ``keep`` / ``budget`` is stable (see the module doc); writes ``out_dir/blocks/``, the items
    traced as one trace (``out_dir/trace/``, of the workload ``out_dir/workload.jsonl``),
    ``out_dir/scores/`` and ``out_dir/stable.json``, and returns the latter."""
    from uspx.drift import prompt_sums
    from uspx.engine import open_source
    from uspx.extract import experts_kept
    from uspx.trace import Trace, trace
    from uspx.update import write_workload

    if method not in METHODS:
        raise UspxError(f"--method {method!r}: a stable trace scores with {', '.join(METHODS)} (from the trace alone)")
    _check_rule(block, tolerance, patience, bootstrap)
    opened = open_source(model, dtype=dtype)
    rule = Settling(experts_kept(opened, keep, budget, context, kv_dtype), tolerance, patience, bootstrap, seed)
    wl = load_workload(workload)
    items = list(wl.part("calibration").items)
    random.Random(seed).shuffle(items)  # every block a mix of the workload's families
    out, started = Path(out_dir), time.perf_counter()
    blocks, traced = [], []
    for b in range(0, len(items), block):
        chunk = items[b : b + block]
        path = out / "blocks" / f"block-{b // block:04d}"
        manifest = trace(opened, Workload(wl.source, chunk, wl.summary, wl.heldout_fraction), path, split="all",
                         batch_size=batch_size, max_length=max_length, norms=method in ("reap", "ean"),
                         reconstruction=method == "reconstruction", progress=False)
        sums = prompt_sums(Trace(path), method)
        count = (sums if method == "frequency" else prompt_sums(Trace(path), "frequency")).score.num
        blocks.append(path)
        traced += chunk
        if rule.add(sums.score.num, sums.score.den, count, manifest["summary"]["tokens"], say=progress):
            break
    traced_wl = write_workload(traced, out / "workload.jsonl")  # the items the joined trace and scores name
    _concatenate(blocks, traced_wl, out / "trace")
    table = _scores(opened, rule, method, traced_wl, out / "scores", str((out / "trace").resolve()), "calibration")
    return _result(out, opened, table, rule, method, keep, budget, block, seed, seconds=time.perf_counter() - started,
                   workload=wl.source, items=len(traced), calibration_items=len(items), scores=str(out / "scores"),
                   trace=str(out / "trace"))


def _concatenate(blocks: list[Path], traced: Workload, out: Path) -> None:
    from uspx.trace.concat import concatenate

    if (out / "manifest.json").exists():  # a run resumed after it stopped: another stop may differ
        import shutil

        if read_json(out / "manifest.json")["workload"]["fingerprint"] != traced.fingerprint:
            shutil.rmtree(out)
    concatenate(blocks, traced, out)


def score_until_stable(model: str | Path | Opened, trace_dir: str | Path, workload: str | Path | Workload,
                       out_dir: str | Path, *, method: str = "frequency", keep: str | int | None = None,
                       budget: str | int | None = None, block: int = 16, tolerance: float = 0.05, patience: int = 2,
                       bootstrap: int = 200, seed: int = 0, split: str = "calibration", batch_size: int = 8,
                       context: int = 4096, kv_dtype: str = "bf16", progress: bool = True,
                       dtype: str = "auto") -> dict:
    """Score the prompts of a trace a ``block`` at a time, in a seeded order, until the kept set
    under ``keep`` / ``budget`` is stable; writes the score table of the prompts scored to
    ``out_dir`` (as ``uspx score`` does) and the history to ``out_dir/stable.json``.

    ``method``: frequency, REAP, EAN (read from the trace), reconstruction (from the trace's sums,
    or a model pass over each block when it has none) or taylor (a forward and backward per prompt
    of each block): the model passes stop with the blocks."""
    from uspx.engine import open_source
    from uspx.extract import experts_kept
    from uspx.score.api import traced_split
    from uspx.score.trace_stats import stats_from_trace
    from uspx.trace import Trace

    if method not in SCORE_METHODS:
        raise UspxError(f"--method {method!r}: scoring until stable uses {', '.join(SCORE_METHODS)} "
                        "(per-prompt sums that grow a block at a time)")
    _check_rule(block, tolerance, patience, bootstrap)
    opened = open_source(model, dtype=dtype)
    if method == "taylor" and opened.streaming:
        raise UspxError("taylor needs the whole model in memory; a layer-by-layer run scores from the trace")
    wl = load_workload(workload)
    tr = Trace(trace_dir)
    traced = wl.part(traced_split(tr, split))
    tr.check(model=opened.fingerprint, workload=traced.fingerprint)
    stats = stats_from_trace(tr, split, norms=method in ("reap", "ean"))
    rule = Settling(experts_kept(opened, keep, budget, context, kv_dtype), tolerance, patience, bootstrap, seed)
    blocks = _prompt_blocks(len(stats.samples), block, seed)
    sums = _BlockSums(opened, tr, traced, split, stats, method, batch_size)
    started = time.perf_counter()
    for rows in blocks:
        num, den = sums.factor(rows)
        if rule.add(num, den, stats.count[rows], int(stats.tokens[rows].sum()), say=progress):
            break
    used = np.sort(np.concatenate(blocks[: len(rule.history)]))
    out = Path(out_dir)
    table = _scores(opened, rule, method, traced, out, str(tr.path.resolve()), split,
                    from_model=sums.items is not None)
    return _result(out, opened, table, rule, method, keep, budget, block, seed, seconds=time.perf_counter() - started,
                   workload=wl.source, items=rule.prompts, calibration_items=len(stats.samples), scores=str(out),
                   trace=str(tr.path), samples=stats.samples[used].tolist())


def _prompt_blocks(n: int, block: int, seed: int) -> list[np.ndarray]:
    """Positions of the prompts, shuffled (seeded) and cut into blocks."""
    order = np.array(random.Random(seed).sample(range(n), n), dtype=np.int64)
    return [order[b : b + block] for b in range(0, n, block)]


class _BlockSums:
    """Per-prompt numerators and denominators of one method for the prompts asked, read from the
    trace or computed by a model pass over just those prompts."""

    def __init__(self, opened: Opened, tr, traced: Workload, split: str, stats, method: str, batch_size: int):
        from uspx.score.reconstruction import traced_sums

        self.opened, self.stats, self.method, self.batch_size = opened, stats, method, batch_size
        self.items = self.traced = None
        if method == "reconstruction":
            self.traced = traced_sums(tr, stats.samples) if tr.manifest["options"].get("reconstruction") else None
        if method in ("taylor", "reconstruction") and self.traced is None:
            from uspx.engine import pad_id_of
            from uspx.score.methods import split_items

            if opened.tokenizer is None:
                raise UspxError(f"{opened.path}: no tokenizer; {method} scores need one")
            by_sample = {e.index: e for e in split_items(tr, traced, opened.tokenizer, split, None, 0)}
            self.items = [by_sample[int(s)] for s in stats.samples]
            self.pad_id = pad_id_of(opened.tokenizer)

    def factor(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s, m = self.stats, self.method
        tokens = s.tokens[rows].astype(float)[:, None, None]
        if m in ("frequency", "reap", "ean"):
            f = getattr(s, m)()
            return f.num[rows], np.broadcast_to(f.den, f.num.shape)[rows]
        if self.traced is not None:
            return np.asarray(self.traced[0][rows], float), tokens
        items = [self.items[int(r)] for r in rows]
        if m == "reconstruction":
            from uspx.score.reconstruction import reconstruction_sums

            err, _ = reconstruction_sums(self.opened.source, items, pad_id=self.pad_id, batch_size=self.batch_size,
                                         progress=False)
            return err, tokens
        from uspx.score.taylor import run_taylor

        with progress_bar("taylor", total=len(items), unit="prompts", enabled=False) as bar:
            sal = run_taylor(self.opened.source.model, self.opened.source.adapter, items, self.pad_id, bar)
        return sal, np.ones((len(items), 1, 1))


def _result(out: Path, opened: Opened, table: ScoreTable, rule: Settling, method: str, keep, budget, block: int,
            seed: int, *, seconds: float, **extra) -> dict:
    """The history and the kept set, written to ``out/stable.json``."""
    layers = table.meta["model"]["moe_layers"]
    result = dict(
        model=dict(source=opened.path, fingerprint=opened.fingerprint), method=method,
        experts_per_layer=rule.n_keep, keep=keep, budget=budget, block=block, tolerance=rule.tolerance,
        patience=rule.patience, seed=seed, stable=rule.stable, tokens=rule.tokens,
        kept={str(l): np.flatnonzero(rule.kept[i]).tolist() for i, l in enumerate(layers)}, history=rule.history,
        rule=rule.rule(), **extra, seconds=round(seconds, 2))
    write_json(out / FILENAME, result)
    return result


def _scores(opened: Opened, rule: Settling, method: str, traced: Workload, out: Path, trace_path: str,
            split: str, from_model: bool = False) -> ScoreTable:
    """The score table of the prompts scored (``out``), bootstrap intervals over prompts;
    ``from_model``: the sums came from model passes over them, not from the trace."""
    import uspx
    from uspx.score.bootstrap import Factor, estimate
    from uspx.score.table import FORMAT, ScoreTable, build_table

    a, n_prompts = opened.source.adapter, rule.prompts
    layers = [l.index for l in a.layers]
    est = estimate([Factor(rule.num, rule.den)], rule.bootstrap, rule.seed)
    cost = [a.bytes_per_expert(l) for l in a.layers] if opened.source.resident else opened.source.stored_expert_bytes()
    table = build_table(layers, a.num_experts, method, est.value, rule.count.sum(0), est.ci_low, est.ci_high, cost,
                        n_prompts)
    meta = dict(
        format=FORMAT, uspx_version=uspx.__version__,
        model=dict(source=opened.path, label=opened.label, fingerprint=opened.fingerprint, family=a.family,
                   moe_layers=layers, num_experts=a.num_experts, top_k=a.top_k),
        workload=dict(source=traced.source, fingerprint=traced.fingerprint, split=split, items=n_prompts),
        trace=dict(path=trace_path, split=split, norms=method in ("reap", "ean")),
        methods=[method],
        options=dict(bootstrap=rule.bootstrap, seed=rule.seed, ci_level=0.95, bootstrap_unit="prompt",
                     sequential=None, units=["experts"], until_stable=dict(rule=rule.rule(), stable=rule.stable)),
        prompts=dict(trace=n_prompts, model=n_prompts if from_model else None, model_tokens=None, loss_tokens=None),
        method_source={method: "model" if from_model else "trace"},
    )
    t = ScoreTable(table, meta)
    t.write(out)
    return t
