"""Ablation scores by a bandit: the experts to keep found with a fraction of the forward passes.

Exhaustive ablation removes every expert of every layer on every calibration item (items where the
expert is never routed cost nothing: removing it changes nothing there). The score of expert
``e`` is its loss increase summed over items, per target token: ``sum_i delta_i(e) / T``. A bandit
treats each expert of a layer as an arm; pulling it removes the expert on one item it serves, drawn
without replacement, and the score is estimated as ``|H_e| * mean(delta) / T`` (``H_e`` the items
that route to it), with a confidence half-width from the sample spread and the finite-population
correction (an arm whose items are all drawn is known exactly). LUCB (Kalyanakrishnan et al., 2012)
pulls, in each round, the least certain member of the current top ``keep`` and the most promising
arm outside it, and stops a layer when the two sets' bounds separate, or when the budget of
forward passes is spent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from uspx.models import MoEAdapter
from uspx.score.ablation import ablate
from uspx.score.baseline import Baseline
from uspx.score.loss import token_losses


@dataclass
class BanditResult:
    value: np.ndarray  # [L, E] estimated scores (loss increase per target token)
    pulls: np.ndarray  # [L, E] forward passes spent on each arm
    kept: dict[int, list[int]]  # per MoE layer, the ``keep`` experts with the highest estimates
    forwards: int
    settled: list[bool] = field(default_factory=list)  # per layer: the bounds separated before the budget ran out


def bandit_ablation(model: torch.nn.Module, adapter: MoEAdapter, base: Baseline, keep: int, *,
                    budget: int, kind: str = "interventional", z: float = 2.0, initial: int = 2,
                    seed: int = 0) -> BanditResult:
    """LUCB over each layer's experts with at most ``budget`` forward passes per layer (items of one
    prompt each: build ``base`` with ``batch_size=1``)."""
    rng = np.random.default_rng(seed)
    layers = adapter.layers
    e_count = adapter.num_experts
    total_tokens = float(base.loss_tokens().sum())
    value = np.zeros((len(layers), e_count))
    pulls = np.zeros((len(layers), e_count), dtype=np.int64)
    kept, settled, forwards = {}, [], 0
    with torch.no_grad():
        for pos, layer in enumerate(layers):
            hits = [rng.permutation([b for b in range(len(base.batches)) if base.hit(b, pos, e)]) for e in range(e_count)]
            samples: list[list[float]] = [[] for _ in range(e_count)]

            def pull(e: int) -> None:
                nonlocal forwards
                batch_index = int(hits[e][len(samples[e])])
                batch = base.batches[batch_index]
                with ablate(adapter, layer, e, kind):
                    losses = token_losses(model, batch)
                forwards += 1
                pulls[pos, e] += 1
                samples[e].append(float(((losses - base.losses[batch_index]).double() * batch.loss_mask).sum()))

            def bounds(e: int) -> tuple[float, float, float]:
                n, size = len(samples[e]), len(hits[e])
                if size == 0:
                    return 0.0, 0.0, 0.0
                mean = float(np.mean(samples[e])) if n else 0.0
                est = size * mean / total_tokens
                if n >= size:
                    return est, est, est
                spread = float(np.std(samples[e], ddof=1)) if n > 1 else abs(mean) + 1e-12
                half = z * size * spread / math.sqrt(n) * math.sqrt((size - n) / max(size - 1, 1)) / total_tokens
                return est, est - half, est + half

            spent = 0
            for e in range(e_count):
                for _ in range(min(initial, len(hits[e]))):
                    pull(e)
                    spent += 1
            done = False
            while True:
                b = [bounds(e) for e in range(e_count)]
                order = sorted(range(e_count), key=lambda e: (-b[e][0], e))
                top, rest = order[:keep], order[keep:]
                weakest = min(top, key=lambda e: b[e][1])
                strongest = max(rest, key=lambda e: b[e][2]) if rest else None
                if strongest is None or b[weakest][1] >= b[strongest][2]:
                    done = True
                    break
                candidates = [e for e in (weakest, strongest) if len(samples[e]) < len(hits[e])]
                if not candidates or spent + len(candidates) > budget:
                    break
                for e in candidates:
                    pull(e)
                    spent += 1
            for e in range(e_count):
                value[pos, e] = bounds(e)[0]
            kept[layer.index] = sorted(order[:keep])
            settled.append(done)
    return BanditResult(value, pulls, kept, forwards, settled)


def jaccard(a: dict[int, list[int]], b: dict[int, list[int]]) -> float:
    """Overlap of two kept sets over every (layer, expert) pair."""
    sa = {(l, e) for l, v in a.items() for e in v}
    sb = {(l, e) for l, v in b.items() for e in v}
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0
