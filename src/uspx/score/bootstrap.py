"""Point estimates and bootstrap confidence intervals over prompts.

Every score is a product of ratios of per-prompt sums, ``value = prod_f (sum_i num_f[i] / sum_i
den_f[i])`` (a mean over routed tokens is sum-over-prompts / routed-count-over-prompts; usage x
marginal is two such ratios). Tokens of one prompt are not independent, so the resampling unit is
the prompt: each bootstrap draw resamples prompts with replacement and recomputes the ratio from
the resampled sums; the interval is the 2.5 / 97.5 percentile of those draws.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np


@dataclass
class Factor:
    """One ratio: per-prompt numerators [P, L, E] over denominators broadcastable to it ([P, 1, 1])."""

    num: np.ndarray
    den: np.ndarray


@dataclass
class Estimate:
    value: np.ndarray  # [L, E]
    ci_low: np.ndarray  # [L, E]
    ci_high: np.ndarray  # [L, E]


def resample_counts(n_prompts: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, P] how often each prompt is drawn in each resample (seeded, reproducible)."""
    rng = np.random.default_rng(seed)
    if n_prompts == 0 or n_boot == 0:
        return np.zeros((n_boot, n_prompts))
    return rng.multinomial(n_prompts, np.full(n_prompts, 1.0 / n_prompts), size=n_boot).astype(np.float64)


def _ratio(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = num / den
    return np.where(den > 0, out, empty)


def estimate(factors: list[Factor], n_boot: int, seed: int, level: float = 0.95) -> Estimate:
    """Point value and percentile interval of ``prod_f sum(num_f) / sum(den_f)``.

    A ratio with no data (zero denominator: an expert never routed) has value 0, since it carried
    nothing on this workload, and an interval of NaN, since nothing was measured; bootstrap draws in
    which it has no data are left out of the percentiles for the same reason.
    """
    p = factors[0].num.shape[0]
    shape = factors[0].num.shape[1:]
    value = np.ones(shape)
    for f in factors:
        den = np.broadcast_to(f.den, f.num.shape)
        value = value * _ratio(f.num.sum(0), den.sum(0), 0.0)
    if n_boot <= 0 or p == 0:
        nan = np.full(shape, np.nan)
        return Estimate(value, nan, nan.copy())
    w = resample_counts(p, n_boot, seed)  # one set of draws shared by all factors of a score
    boot = np.ones((n_boot, *shape))
    for f in factors:
        den = np.broadcast_to(f.den, f.num.shape)
        num_b = (w @ f.num.reshape(p, -1)).reshape(n_boot, *shape)
        den_b = (w @ den.reshape(p, -1)).reshape(n_boot, *shape)
        boot = boot * _ratio(num_b, den_b, np.nan)
    alpha = (1.0 - level) / 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: experts never routed
        lo, hi = np.nanpercentile(boot, [100 * alpha, 100 * (1 - alpha)], axis=0)
    return Estimate(value, lo, hi)
