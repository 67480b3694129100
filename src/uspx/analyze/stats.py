"""Interval estimates used by every section: Wilson for proportions, bootstrap over prompts.

Tokens of one prompt are correlated, so a token-level interval (Wilson) is too narrow whenever
routing depends on the prompt; the prompt-level bootstrap is the honest one there. Sections report
both where both are cheap and decide with the more conservative bound.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np

from uspx.evaluate.stats import wilson_bounds

N_BOOT = 200
wilson = wilson_bounds  # the sections' Wilson interval: elementwise over count arrays


def poisson_weights(n_samples: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """[n_boot, n_samples] Poisson(1) weights: a bootstrap over prompts that can be streamed.

    Each prompt gets one weight per replicate, fixed before the pass, so rows of a prompt that land in
    different batches or shards get the same weight (the Poisson bootstrap of Hanley & MacGibbon).
    """
    rng = np.random.default_rng(seed)
    return rng.poisson(1.0, size=(n_boot, max(n_samples, 1))).astype(np.float32)


def bootstrap_ratio(num: np.ndarray, den: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Ratio of sums (e.g. loss per token) with a 95% percentile bootstrap over prompts.

    ``num`` and ``den`` hold one value per prompt; extra trailing dims of ``num`` are kept.
    """
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    total = den.sum()
    value = num.sum(axis=0) / total if total > 0 else np.full(num.shape[1:], np.nan)
    if len(den) < 2:
        return dict(value=value, lo=np.full_like(value, np.nan), hi=np.full_like(value, np.nan), prompts=len(den))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(den), size=(n_boot, len(den)))
    d = den[idx].sum(axis=1)
    n = num[idx].sum(axis=1)
    lo, hi = percentile_ci(n / np.where(d > 0, d, np.nan).reshape((-1,) + (1,) * (n.ndim - 1)))
    return dict(value=value, lo=lo, hi=hi, prompts=len(den))


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats of (unnormalised) non-negative weights along ``axis``."""
    p = np.asarray(p, dtype=np.float64)
    s = p.sum(axis=axis, keepdims=True)
    q = p / np.where(s > 0, s, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(q > 0, -q * np.log(q), 0.0)
    return terms.sum(axis=axis)


def balance(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Load-balance figures of usage counts along the last axis: CV, max/mean, normalised entropy."""
    counts = np.asarray(counts, dtype=np.float64)
    mean = counts.mean(axis=-1)
    safe = np.where(mean > 0, mean, np.nan)
    return dict(
        cv=counts.std(axis=-1) / safe,
        max_over_mean=counts.max(axis=-1) / safe,
        entropy_norm=entropy(counts, axis=-1) / np.log(counts.shape[-1]),
    )


def percentile_ci(reps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """95% percentile interval over the replicates on axis 0 (NaN replicates ignored)."""
    lo, hi = np.nanpercentile(reps, [2.5, 97.5], axis=0)
    return lo, hi


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` (at least 1) for the block, then restored; None: unchanged."""
    import torch

    saved = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def single_thread() -> contextlib.AbstractContextManager[None]:
    """Run small torch ops on one thread: on a shared, loaded machine, intra-op threads of tiny
    matmuls spin against each other (a 300-step probe fit went from 0.5 s to 14 s with 2 threads)."""
    return torch_threads(1)
