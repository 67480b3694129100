"""Routing statistics: p_active, position entropy, overflow, expert selection.

These replace the ">50% of samples" filter: an expert is examined when it is used by at least
``p_floor`` of the tokens, or when it is routinely picked at a low-entropy (stable) position, so
rare-but-critical experts stay in and are weighted by p_active later instead of being dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MIN_POSITION_COUNT = 8  # a position's entropy from fewer sequences is biased low (log(k * n) bound)
TRAVERSE_SHARE = 0.5  # "routes through" a low-entropy position: picked there in >= half the sequences


@dataclass
class LayerRouting:
    layer: int
    tokens: int
    p_active: torch.Tensor  # [E]
    positions: torch.Tensor  # positions with enough sequences for an entropy
    entropy: torch.Tensor  # [P] H(pos) in nats
    threshold: float
    low_entropy_positions: list[int]
    traverses: dict[int, list[int]]  # expert -> low-entropy positions where it is routinely picked
    active: list[int]
    overflow_rate: float
    stability: dict

    def as_json(self, top_k: int) -> dict:
        return dict(
            layer=self.layer,
            tokens=self.tokens,
            p_active=[round(float(p), 6) for p in self.p_active],
            p_active_sum=round(float(self.p_active.sum()), 6),
            top_k=top_k,
            entropy_threshold=round(self.threshold, 6),
            entropy_median=round(float(self.entropy.median()), 6) if self.entropy.numel() else None,
            entropy_max_possible=round(math.log(len(self.p_active)), 6),
            positions_scored=int(self.positions.numel()),
            low_entropy_positions=self.low_entropy_positions,
            active_experts=self.active,
            capacity_overflow_rate=self.overflow_rate,
            low_entropy_stability=self.stability,
        )


def position_entropy(index: torch.Tensor, position: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions, H(pos), per-position pick share [P, E]) for positions seen >= MIN_POSITION_COUNT times.

    p_hat_pos(e) = picks of e at pos / (k * sequences at pos), so it sums to 1 over experts.
    """
    k = index.shape[1]
    n_pos = int(position.max()) + 1 if position.numel() else 0
    counts = torch.zeros(n_pos, num_experts, dtype=torch.float64)
    counts.index_put_((position.repeat_interleave(k), index.reshape(-1).long()), torch.ones(index.numel(), dtype=torch.float64), accumulate=True)
    seqs = torch.bincount(position, minlength=n_pos).double()
    keep = torch.nonzero(seqs >= MIN_POSITION_COUNT).flatten()
    share = counts[keep] / seqs[keep, None]  # share of sequences picking e at pos
    p_hat = share / k
    ent = -(p_hat * torch.log(p_hat.clamp(min=1e-30))).sum(-1)
    return keep, ent, share


def layer_routing(
    layer: int,
    index: torch.Tensor,
    position: torch.Tensor,
    group: torch.Tensor,
    num_experts: int,
    p_floor: float,
    entropy_thr: float | str,
) -> LayerRouting:
    """Statistics of one layer from its routing ``index`` [N, k] over N real tokens.

    ``group`` [N] labels each token's prompt class (task family, or a half of the prompts) for the
    stability check of low-entropy positions.
    """
    n, k = index.shape
    p_active = torch.bincount(index.reshape(-1).long(), minlength=num_experts).double() / max(n, 1)
    positions, ent, share = position_entropy(index, position, num_experts)
    if entropy_thr == "auto":
        thr = 0.7 * float(ent.median()) if ent.numel() else 0.0  # low entropy: at most 0.7 * median(H)
    else:
        thr = float(entropy_thr)
    low_mask = ent <= thr
    low = [int(p) for p in positions[low_mask]]
    traverses: dict[int, list[int]] = {}
    for e in range(num_experts):
        hit = positions[low_mask & (share[:, e] >= TRAVERSE_SHARE)]
        if hit.numel():
            traverses[e] = [int(p) for p in hit]
    active = [e for e in range(num_experts) if float(p_active[e]) >= p_floor or e in traverses]
    # Capacity: transformers' MoE blocks have no capacity factor, so no token is ever dropped or
    # rerouted. Measured anyway: a token whose k slots do not name k distinct experts lost a slot.
    distinct = torch.sort(index, dim=1).values
    dropped = (distinct[:, 1:] == distinct[:, :-1]).any(1) if k > 1 else torch.zeros(n, dtype=torch.bool)
    overflow = float(dropped.double().mean()) if n else 0.0
    return LayerRouting(
        layer, n, p_active, positions, ent, thr, low, traverses, active, overflow,
        _stability(index, position, group, num_experts, thr),
    )


def _stability(index: torch.Tensor, position: torch.Tensor, group: torch.Tensor, num_experts: int, thr: float) -> dict:
    """Jaccard overlap of the low-entropy position sets of two prompt classes (a checklist item:
    stable positions should not depend on the kind of prompt).

    Compared only over positions scored in both classes. No low-entropy position in either class
    counts as agreement (both say "nothing is stable"), reported as such.
    """
    labels = sorted(int(g) for g in torch.unique(group))
    if len(labels) < 2:
        return dict(groups=len(labels), jaccard=None, note="one prompt class only")
    sets, scored = [], []
    for g in labels[:2] if len(labels) == 2 else _two_largest(group, labels):
        m = group == g
        pos, ent, _ = position_entropy(index[m], position[m], num_experts)
        sets.append({int(p) for p in pos[ent <= thr]})
        scored.append({int(p) for p in pos})
    common = scored[0] & scored[1]
    a, b = sets[0] & common, sets[1] & common
    union = a | b
    jac = len(a & b) / len(union) if union else 1.0
    return dict(groups=len(labels), compared_positions=len(common), low_a=len(a), low_b=len(b), jaccard=round(jac, 4),
                note="no low-entropy position in either class" if not union else "")


def _two_largest(group: torch.Tensor, labels: list[int]) -> list[int]:
    counts = sorted(((int((group == g).sum()), g) for g in labels), reverse=True)
    return [counts[0][1], counts[1][1]]


def per_prompt_p_active(index: torch.Tensor, sample: torch.Tensor, n_samples: int, expert: int) -> torch.Tensor:
    """[S] p_active(e | prompt): share of each prompt's tokens that route through ``expert``."""
    hit = (index == expert).any(1).double()
    num = torch.zeros(n_samples, dtype=torch.float64).index_add_(0, sample, hit)
    den = torch.bincount(sample, minlength=n_samples).double()
    return num / den.clamp(min=1)
