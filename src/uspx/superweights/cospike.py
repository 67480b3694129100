"""Co-spike score on the tokens routed to one expert.

    S(r, c) = sum_t |X[t, r] Y[t, c]| / (sqrt(sum_t X[t, r]^2) sqrt(sum_t Y[t, c]^2) + eps)

X [T, d_ff] is the down-projection's input, Y [T, d_model] its output, on routed tokens only.
Because |X Y| = |X| |Y|, the numerator is one matrix product |X|^T |Y|. S is scale-free and lies in
[0, 1] (Cauchy-Schwarz): it is 1 when |Y[:, c]| is proportional to |X[:, r]|, which is what a single
dominant scalar W_down[c, r] produces, and about 2/pi for independent Gaussian channels. A fixed cut
such as 0.12 therefore admits every pair; the "auto" cut is a permutation null instead: S recomputed
with the token order of Y shuffled (which breaks any co-spiking), and its 95th percentile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-8


@dataclass
class CoSpike:
    score: float  # S(r*, c*)
    r: int  # d_ff index (input channel of W_down)
    c: int  # d_model index (output channel)
    tau: float  # the cut this expert was held to
    null_q95: float  # 95th percentile of S under the permutation null
    n_dominant: int  # pairs above tau whose peak contribution is >= half the largest such (see co_spike)
    n_pairs: int
    tokens: int


def score_matrix(x: torch.Tensor, y: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """S [d_ff, d_model] for X [T, d_ff], Y [T, d_model]."""
    x, y = x.double(), y.double()
    num = x.abs().t() @ y.abs()
    den = x.pow(2).sum(0).sqrt()[:, None] * y.pow(2).sum(0).sqrt()[None, :] + eps
    return num / den


def co_spike(
    x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, tau: float | str = "auto", seed: int = 0, eps: float = EPS
) -> CoSpike:
    """Argmax of S, its cut, and how many pairs dominate.

    ``w`` is W_down [d_model, d_ff] (Linear convention). S alone is scale-free, so "dominant" pairs
    (a super weight shows as very few dominant (r, c) pairs) are counted by what the scalar can
    write: peak contribution max_t |X[t, r]| * |W[c, r]|, among pairs that pass the cut.
    """
    s = score_matrix(x, y, eps)
    flat = int(torch.argmax(s))
    r, c = divmod(flat, s.shape[1])
    best = float(s[r, c])
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(y.shape[0], generator=g)
    null = score_matrix(x, y[perm], eps).flatten()
    q95 = float(torch.quantile(null[:16_000_000].float(), 0.95))  # torch.quantile's input size limit
    cut = q95 if tau == "auto" else float(tau)
    contrib = x.double().abs().amax(0)[:, None] * w.double().abs().t()  # [d_ff, d_model]
    contrib = contrib * (s >= cut)
    n_dom = int((contrib >= 0.5 * contrib.max()).sum()) if best >= cut and float(contrib.max()) > 0 else 0
    return CoSpike(best, r, c, cut, q95, n_dom, s.numel(), int(x.shape[0]))
