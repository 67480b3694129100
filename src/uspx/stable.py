"""``uspx trace-stable``: trace the calibration items a block at a time and stop once the kept set
has settled, instead of observing every item.

The calibration items are shuffled (seeded, so every block mixes the workload's families) and
traced a block at a time, each block its own trace folder (``blocks/block-NNNN``, resumable like
any trace). After each block, the score (frequency, REAP, EAN or reconstruction, from the trace
alone) of every prompt so far gives the kept set under the requested count or byte budget, and
its bootstrap stability: the mean Jaccard index between the kept set of a resample of the prompts
and the kept set of all of them. The rule: stop after the block at which the kept set (every
layer's, pooled) had a Jaccard index of at least ``1 - tolerance`` with the previous block's for
``patience`` blocks in a row. The scores of the items traced so far go to ``scores/`` (a score
table, bootstrap intervals over prompts) and the history to ``stable.json``.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from uspx.io import UspxError, write_json
from uspx.progress import console
from uspx.drift import ratio
from uspx.workload import Workload, load_workload

if TYPE_CHECKING:
    from uspx.engine import Opened
    from uspx.score import ScoreTable
    from uspx.score.bootstrap import Factor

METHODS = ("frequency", "reap", "ean", "reconstruction")  # computed from the trace alone
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


def experts_kept(opened: Opened, keep: str | int | None, budget: str | int | None, context: int,
                 kv_dtype: str) -> int:
    """Experts kept per layer: ``keep`` (a count or a share) or what fits ``budget`` (weights and
    the KV cache of ``context`` tokens, as :func:`uspx.extract.extract` counts them)."""
    from uspx.score.keep import parse_keep

    if (keep is None) == (budget is None):
        raise UspxError("give exactly one of --keep (e.g. 50%) or --budget (e.g. 8GiB)")
    if keep is not None:
        return parse_keep(keep, opened.source.adapter.num_experts)
    from uspx.extract import checkpoint_dtype
    from uspx.plan import fit_experts

    return fit_experts(Path(opened.path), budget, context=context, dtype=checkpoint_dtype(opened.path),
                       kv_dtype=kv_dtype).require().experts_per_layer


def trace_until_stable(model: str | Path | Opened, workload: str | Path | Workload, out_dir: str | Path, *,
                       keep: str | int | None = None, budget: str | int | None = None, method: str = "frequency",
                       block: int = 16, tolerance: float = 0.05, patience: int = 2, bootstrap: int = 200,
                       seed: int = 0, batch_size: int = 8, max_length: int | None = None, context: int = 4096,
                       kv_dtype: str = "bf16", progress: bool = True, dtype: str = "auto") -> dict:
    """Trace the calibration items of ``workload`` a ``block`` at a time until the kept set under
    ``keep`` / ``budget`` is stable (see the module doc); writes ``out_dir/blocks/``,
    ``out_dir/scores/`` and ``out_dir/stable.json``, and returns the latter."""
    from uspx.drift import prompt_sums
    from uspx.engine import open_source
    from uspx.trace import Trace, trace

    if method not in METHODS:
        raise UspxError(f"--method {method!r}: a stable trace scores with {', '.join(METHODS)} (from the trace alone)")
    if block < 1 or patience < 1 or not 0 <= tolerance < 1 or bootstrap < 1:
        raise UspxError("--block and --patience must be >= 1, --tolerance in [0, 1), --bootstrap >= 1")
    opened = open_source(model, dtype=dtype)
    n_keep = experts_kept(opened, keep, budget, context, kv_dtype)
    wl = workload if isinstance(workload, Workload) else load_workload(workload)
    items = list(wl.part("calibration").items)
    random.Random(seed).shuffle(items)  # every block a mix of the workload's families
    out, started = Path(out_dir), time.perf_counter()
    nums, dens, counts, history, traced = [], [], [], [], []
    prev, calm, tokens = None, 0, 0
    for b in range(0, len(items), block):
        chunk = items[b : b + block]
        path = out / "blocks" / f"block-{b // block:04d}"
        manifest = trace(opened, Workload(wl.source, chunk, wl.summary, wl.heldout_fraction), path, split="all",
                         batch_size=batch_size, max_length=max_length, norms=method in ("reap", "ean"),
                         reconstruction=method == "reconstruction", progress=False)
        sums = prompt_sums(Trace(path), method)
        nums.append(sums.score.num)
        dens.append(np.broadcast_to(sums.score.den, sums.score.num.shape) if method in ("reap", "ean") else sums.score.den)
        counts.append((sums if method == "frequency" else prompt_sums(Trace(path), "frequency")).score.num)
        traced += chunk
        tokens += manifest["summary"]["tokens"]
        num, den = np.concatenate(nums), np.concatenate(dens)
        kept = kept_mask(ratio(num, den)[0], n_keep)
        j = float(jaccard(kept, prev)) if prev is not None else None
        calm = calm + 1 if j is not None and j >= 1 - tolerance else 0
        history.append(dict(block=b // block, items=len(traced), tokens=tokens, jaccard_previous=j,
                            changed=int((kept != prev).sum() // 2) if prev is not None else None,
                            stability=round(stability(num, den, n_keep, bootstrap, seed), 4)))
        if progress:
            h = history[-1]
            versus = "-" if j is None else f"Jaccard {j:.3f}, {h['changed']} experts swapped"
            console.print(f"block {h['block']}: {h['items']} items, {tokens} tokens; kept set vs the block before: "
                          f"{versus}; bootstrap stability {h['stability']:.3f}")
        prev = kept
        if calm >= patience:
            break
    table = _scores(opened, np.concatenate(nums), np.concatenate(dens), np.concatenate(counts), method,
                    Workload(wl.source, traced, wl.summary, wl.heldout_fraction), out, bootstrap, seed)
    layers = table.meta["model"]["moe_layers"]
    result = dict(
        model=dict(source=opened.path, fingerprint=opened.fingerprint), workload=wl.source, method=method,
        experts_per_layer=n_keep, keep=keep, budget=budget, block=block, tolerance=tolerance, patience=patience,
        seed=seed, stable=calm >= patience, items=len(traced), calibration_items=len(items), tokens=tokens,
        kept={str(l): np.flatnonzero(prev[i]).tolist() for i, l in enumerate(layers)}, history=history,
        rule=f"stop after {patience} blocks in a row whose kept set has a Jaccard index >= {1 - tolerance:g} "
             "with the block before's (every layer pooled)",
        scores=str(out / "scores"), seconds=round(time.perf_counter() - started, 2))
    write_json(out / FILENAME, result)
    return result


def _scores(opened: Opened, num: np.ndarray, den: np.ndarray, count: np.ndarray, method: str, traced: Workload,
            out: Path, bootstrap: int, seed: int) -> ScoreTable:
    """The score table of the prompts traced (``out/scores``), bootstrap intervals over prompts."""
    import uspx
    from uspx.score.bootstrap import Factor, estimate
    from uspx.score.table import FORMAT, ScoreTable, build_table

    a = opened.source.adapter
    layers = [l.index for l in a.layers]
    est = estimate([Factor(num, den)], bootstrap, seed)
    cost = [a.bytes_per_expert(l) for l in a.layers] if opened.source.resident else opened.source.stored_expert_bytes()
    table = build_table(layers, a.num_experts, method, est.value, count.sum(0), est.ci_low, est.ci_high, cost, len(num))
    meta = dict(
        format=FORMAT, uspx_version=uspx.__version__,
        model=dict(source=opened.path, label=opened.label, fingerprint=opened.fingerprint, family=a.family,
                   moe_layers=layers, num_experts=a.num_experts, top_k=a.top_k),
        workload=dict(source=traced.source, fingerprint=traced.fingerprint, split="calibration",
                      items=len(traced.items)),
        trace=dict(path=str((out / "blocks").resolve()), split="calibration", norms=method in ("reap", "ean")),
        methods=[method],
        options=dict(bootstrap=bootstrap, seed=seed, ci_level=0.95, bootstrap_unit="prompt", sequential=None,
                     units=["experts"], until_stable=True),
        prompts=dict(trace=int(len(num)), model=None, model_tokens=None, loss_tokens=None),
        method_source={method: "trace"},
    )
    t = ScoreTable(table, meta)
    t.write(out / "scores")
    return t
