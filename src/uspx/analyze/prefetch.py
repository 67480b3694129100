"""Section 7, prefetch: predict layer l+d's experts early, and simulate a per-layer expert cache.

Predictors (need the model): a linear probe fitted on calibration tokens from the router input at
layer l to the top-k set at l+d, and "the next router applied early" (router of l+d on the hidden
state at l). Cache (trace only): each layer keeps C experts; a token needs all k of its experts
resident; LRU, LFU and Belady's MIN (evict the expert whose next use is farthest: the offline limit).
With a predictor, its predicted experts are loaded into the cache before the token's access.
"""

from __future__ import annotations

import numpy as np
import torch

from uspx.analyze.blocks import Block
from uspx.analyze.attention import fit_linear_probe
from uspx.analyze.stats import wilson


class AccessLog:
    """Keeps the first ``max_tokens`` tokens' expert sets per layer, in trace order, for the cache sim."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.parts: list[np.ndarray] = []
        self.n = 0

    def update(self, b: Block) -> None:
        if self.n >= self.max_tokens:
            return
        take = b.ids[: self.max_tokens - self.n]
        self.parts.append(take.astype(np.int16))
        self.n += len(take)

    def sets(self) -> np.ndarray:  # [T, L, k]
        return np.concatenate(self.parts) if self.parts else np.zeros((0, 0, 0), np.int16)


def simulate(requests: list[list[int]], capacity: int, policy: str,
             prefetch: list[list[int]] | None = None) -> dict:
    """Simulate one layer's cache over a sequence of expert sets.

    ``requests[t]``: experts the t-th token needs (all must be resident together, so capacity must be
    at least the set size). ``prefetch[t]``: experts loaded just before token t (LRU/LFU only); they
    count as prefetch loads, not misses. Returns hits, misses, accesses and prefetch loads.
    """
    if policy not in ("lru", "lfu", "belady"):
        raise ValueError(policy)
    if prefetch is not None and policy == "belady":
        raise ValueError("Belady is the offline limit; prefetch does not apply")
    cache: set[int] = set()
    last: dict[int, int] = {}
    freq: dict[int, int] = {}
    nxt = _next_uses(requests) if policy == "belady" else None
    hits = misses = loads = 0
    clock = 0

    def victim(protect: set[int], t: int) -> int:
        cands = [e for e in cache if e not in protect]
        if policy == "lru":
            return min(cands, key=lambda e: (last.get(e, -1), e))
        if policy == "lfu":
            return min(cands, key=lambda e: (freq.get(e, 0), last.get(e, -1), e))
        return max(cands, key=lambda e: (nxt[t].get(e, float("inf")), e))  # farthest next use

    for t, req in enumerate(requests):
        need = set(int(e) for e in req)
        if len(need) > capacity:
            raise ValueError(f"capacity {capacity} is below the {len(need)} experts one token needs")
        if prefetch is not None:
            ahead = set(int(e) for e in prefetch[t])
            for e in sorted(ahead - cache):
                if len(cache) >= capacity:
                    # the prefetcher knows only its prediction: it never evicts a predicted expert
                    cache.discard(victim(ahead, t))
                cache.add(e)
                last[e] = clock
                loads += 1
        for e in sorted(need):
            if e in cache:
                hits += 1
            else:
                misses += 1
                if len(cache) >= capacity:
                    cache.discard(victim(need, t))
                cache.add(e)
        clock += 1
        for e in need:
            last[e] = clock
            freq[e] = freq.get(e, 0) + 1
    return dict(hits=hits, misses=misses, accesses=hits + misses, prefetch_loads=loads)


def _next_uses(requests: list[list[int]]) -> list[dict[int, int]]:
    """For each step t, the next step > t at which each expert is requested (absent: never)."""
    out: list[dict[int, int]] = [dict() for _ in requests]
    upcoming: dict[int, int] = {}
    for t in range(len(requests) - 1, -1, -1):
        out[t] = dict(upcoming)
        for e in requests[t]:
            upcoming[int(e)] = t
    return out


def cache_table(sets: np.ndarray, layers: list[int], capacities: list[int],
                predicted: dict[int, np.ndarray] | None = None) -> list[dict]:
    """Hit rates per layer, capacity and policy (and with prefetch, where predictions exist)."""
    rows = []
    for li, layer in enumerate(layers):
        req = sets[:, li, :].tolist()
        for cap in capacities:
            for policy in ("lru", "lfu", "belady"):
                r = simulate(req, cap, policy)
                rows.append(dict(layer=layer, capacity=cap, policy=policy, prefetch="none", tokens=len(req),
                                 **_hit_rate(r), **r))
            if predicted is not None and li in predicted:
                pf = predicted[li].tolist()
                n = min(len(pf), len(req))
                for policy in ("lru", "lfu"):
                    r = simulate(req[:n], cap, policy, prefetch=pf[:n])
                    base = simulate(req[:n], cap, policy)
                    rows.append(dict(layer=layer, capacity=cap, policy=policy, prefetch="router_early", tokens=n,
                                     **_hit_rate(r), hit_rate_without=_hit_rate(base)["hit_rate"], **r))
    return rows


def _hit_rate(r: dict) -> dict:
    """One simulation's hit rate with its Wilson interval."""
    lo, hi = wilson(r["hits"], r["accesses"])
    return dict(hit_rate=r["hits"] / max(r["accesses"], 1), lo=float(lo), hi=float(hi))


# ----- predictors (model) ---------------------------------------------------------------------------
def set_metrics(pred: torch.Tensor, actual: torch.Tensor) -> dict:
    """Recall = |pred ∩ actual| / |actual|, precision = |pred ∩ actual| / |pred|, pooled over tokens."""
    inter = (pred[:, :, None] == actual[:, None, :]).any(-1).sum().item()
    n_act, n_pred = actual.numel(), pred.numel()
    rlo, rhi = wilson(inter, n_act)
    plo, phi = wilson(inter, n_pred)
    return dict(tokens=int(actual.shape[0]), budget=int(pred.shape[1]), recall=inter / max(n_act, 1),
                recall_lo=float(rlo), recall_hi=float(rhi), precision=inter / max(n_pred, 1),
                precision_lo=float(plo), precision_hi=float(phi))


def fit_multilabel_probe(x: torch.Tensor, sets: torch.Tensor, n_experts: int, steps: int = 200,
                         seed: int = 0):
    """Linear probe x -> expert scores, trained with BCE against the top-k set (multi-label)."""
    y = torch.zeros(x.shape[0], n_experts)
    y.scatter_(1, sets.long(), 1.0)
    return fit_linear_probe(x, y, n_experts, torch.nn.functional.binary_cross_entropy_with_logits, steps, seed)


@torch.no_grad()
def early_prediction(adapter, cap, train: np.ndarray, test: np.ndarray, distance: int = 1) -> dict:
    """Predict the top-k set of layer l+d from the router input at layer l, on held-out tokens."""
    layers = adapter.layers
    k, E = adapter.top_k, adapter.num_experts
    tr, te = torch.from_numpy(train), torch.from_numpy(test)
    rows, predicted = [], {}
    for src in range(len(layers) - distance):
        dst = src + distance
        actual = cap.ids[te, dst]
        h_tr, h_te = cap.router_in[tr, src], cap.router_in[te, src]
        router_scores = adapter.router_logits(layers[dst].router(h_te)).float()
        probe = fit_multilabel_probe(h_tr, cap.ids[tr, dst], E)
        probe_scores = probe(h_te)
        # "same experts as this layer" baseline: ids are per layer, so this is near chance (a control)
        for name, scores in (("router_early", router_scores), ("linear_probe", probe_scores)):
            for budget in sorted({k, min(2 * k, E)}):
                pred = torch.topk(scores, budget, dim=-1).indices
                rows.append(dict(source=layers[src].index, target=layers[dst].index, method=name, **set_metrics(pred, actual)))
                if name == "router_early" and budget == k:
                    predicted[dst] = pred.numpy()
        freq = torch.bincount(cap.ids[tr, dst].reshape(-1), minlength=E).float()
        pred = torch.topk(freq.expand(len(actual), E), k, dim=-1).indices
        rows.append(dict(source=layers[src].index, target=layers[dst].index, method="most_frequent", **set_metrics(pred, actual)))
    return dict(distance=distance, rows=rows, predicted=predicted)
