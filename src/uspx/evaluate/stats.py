"""Small statistics for task evaluation: pass@k, Wilson intervals, McNemar's exact test, and a
paired bootstrap over items.

Items are the sampling unit everywhere: two models answer the same items, so their difference is
judged item by item (paired), never as two independent samples.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Z95 = 1.959963984540054  # the two-sided 95% normal quantile
BOOTSTRAP_RESAMPLES = 2000


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from ``n`` samples of which ``c`` passed:
    ``1 - C(n-c, k) / C(n, k)`` (Chen et al. 2021), computed as a product so large ``n`` cannot
    overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def wilson_bounds(hits: np.ndarray | float, n: np.ndarray | float,
                  z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval for hits/n, elementwise (``hits`` may be fractional: a sum of per-item
    pass@k estimates); n = 0 gives the uninformative [0, 1]."""
    hits = np.asarray(hits, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    safe = np.where(n > 0, n, 1.0)
    p = hits / safe
    z2 = z * z
    denom = 1.0 + z2 / safe
    centre = (p + z2 / (2 * safe)) / denom
    half = z * np.sqrt(np.maximum(p * (1 - p) / safe + z2 / (4 * safe * safe), 0.0)) / denom
    lo = np.where(n > 0, np.clip(centre - half, 0.0, 1.0), 0.0)
    hi = np.where(n > 0, np.clip(centre + half, 0.0, 1.0), 1.0)
    # exact at the edges: the formula leaves ~1e-17 residue at 0 hits / n hits
    return np.where(hits <= 0, 0.0, lo), np.where(hits >= n, 1.0, hi)


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float] | None:
    """``wilson_bounds`` for one proportion, as Python floats; None without trials."""
    if n <= 0:
        return None
    lo, hi = wilson_bounds(successes, n, z)
    return float(lo), float(hi)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs: ``b`` items only the first model
    passed, ``c`` only the second. Under no difference each discordant item is a fair coin."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_bootstrap(values: Sequence[float], weights: Sequence[float] | None = None, *,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float] | None:
    """95% percentile interval of the (weighted) mean of per-item ``values``, items resampled with
    replacement. For a paired difference pass each item's difference; with ``weights`` (tokens) the
    statistic is ``sum(w * v) / sum(w)``, a token-weighted mean. None for fewer than two items."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return None
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(resamples, len(v)))
    num, den = (w * v)[idx].sum(axis=1), w[idx].sum(axis=1)
    stats = num[den > 0] / den[den > 0]
    if not len(stats):
        return None
    lo, hi = np.quantile(stats, [0.025, 0.975])
    return float(lo), float(hi)


__all__ = ["BOOTSTRAP_RESAMPLES", "Z95", "mcnemar_exact", "paired_bootstrap", "pass_at_k", "wilson",
           "wilson_bounds"]
