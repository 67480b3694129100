"""Section 2, circuits: co-activation within a layer, transitions between adjacent layers, and
full-path signatures, all counted over every token of every prompt in one streaming pass.

Counting rules: a pair's co-activation frequency is divided by the number of tokens routed in THAT
layer (not by the layer count); paths are counted over all prompts (not the last prompt only); the
"primary" expert of a layer is the one with the highest routing weight (not the first slot of an
unordered argpartition).
"""

from __future__ import annotations

import numpy as np

from uspx.analyze.blocks import Block
from uspx.analyze.stats import wilson


class Circuits:
    def __init__(self, n_layers: int, n_experts: int, top_k: int):
        self.L, self.E, self.k = n_layers, n_experts, top_k
        self.tokens = 0
        self.hits = np.zeros((n_layers, n_experts), dtype=np.int64)
        self.top1 = np.zeros((n_layers, n_experts), dtype=np.int64)
        self.pairs = np.zeros((n_layers, n_experts, n_experts), dtype=np.int64)  # i < j filled
        self.trans = np.zeros((max(n_layers - 1, 0), n_experts, n_experts), dtype=np.int64)  # sets
        self.trans1 = np.zeros((max(n_layers - 1, 0), n_experts, n_experts), dtype=np.int64)  # top-1
        self.paths: dict[bytes, list[int]] = {}  # path -> [tokens, prompts, last prompt seen]
        self._a, self._b = np.triu_indices(top_k, 1)

    def update(self, blk: Block) -> None:
        L, E = self.L, self.E
        T = len(blk.sample)
        ids, top1 = blk.ids, blk.top1
        self.tokens += T
        lay = np.arange(L)[None, :, None]
        self.hits += np.bincount((lay * E + ids).ravel(), minlength=L * E).reshape(L, E)
        self.top1 += np.bincount((np.arange(L)[None] * E + top1).ravel(), minlength=L * E).reshape(L, E)
        lo = np.minimum(ids[:, :, self._a], ids[:, :, self._b])  # unordered pair -> (min, max)
        hi = np.maximum(ids[:, :, self._a], ids[:, :, self._b])
        self.pairs += np.bincount(((lay * E + lo) * E + hi).ravel(), minlength=L * E * E).reshape(L, E, E)
        if L > 1:
            src = ids[:, :-1, :, None]  # [T, L-1, k, 1]
            dst = ids[:, 1:, None, :]  # [T, L-1, 1, k]
            cell = (np.arange(L - 1)[None, :, None, None] * E + src) * E + dst
            self.trans += np.bincount(cell.ravel(), minlength=(L - 1) * E * E).reshape(L - 1, E, E)
            cell1 = (np.arange(L - 1)[None] * E + top1[:, :-1]) * E + top1[:, 1:]
            self.trans1 += np.bincount(cell1.ravel(), minlength=(L - 1) * E * E).reshape(L - 1, E, E)
        keys = np.ascontiguousarray(top1.astype(np.int16))
        for t in range(T):  # rows are sorted by prompt, so "last prompt seen" counts distinct prompts
            key = keys[t].tobytes()
            s = int(blk.sample[t])
            rec = self.paths.get(key)
            if rec is None:
                self.paths[key] = [1, 1, s]
            else:
                rec[0] += 1
                if rec[2] != s:
                    rec[1] += 1
                    rec[2] = s

    def result(self, layers: list[int], top: int = 20, min_support: int = 5) -> dict:
        n = max(self.tokens, 1)
        p = self.hits / n
        pair_p = self.pairs / n  # divided by tokens of the layer, NOT by the number of layers
        expect = p[:, :, None] * p[:, None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            lift = np.where(expect > 0, pair_p / expect, np.nan)
        plo, phi = wilson(self.pairs, n)
        iu = np.triu_indices(self.E, 1)
        pair_rows = []
        for l in range(self.L):
            for i, j in zip(*iu):
                c = int(self.pairs[l, i, j])
                if c >= min_support:
                    pair_rows.append(dict(layer=layers[l], a=int(i), b=int(j), count=c, p=float(pair_p[l, i, j]),
                                          lift=float(lift[l, i, j]), lift_lo=float(plo[l, i, j] / expect[l, i, j]),
                                          lift_hi=float(phi[l, i, j] / expect[l, i, j])))
        pair_rows.sort(key=lambda r: -r["lift"])
        out = dict(
            tokens=self.tokens, layers=layers,
            coactivation=dict(count=self.pairs, p=pair_p, lift=lift, top_by_lift=pair_rows[:top],
                              max_lift_per_layer=[float(np.nanmax(np.where(self.pairs[l] >= min_support, lift[l], np.nan), initial=np.nan))
                                                  if (self.pairs[l] >= min_support).any() else None for l in range(self.L)]),
        )
        out["transitions"] = self._transitions(layers, top, min_support)
        out["paths"] = self._paths(top)
        return out

    def _transitions(self, layers: list[int], top: int, min_support: int) -> dict:
        n = max(self.tokens, 1)
        rows, per_pair = [], []
        for name, counts, marg in (("set", self.trans, self.hits), ("top1", self.trans1, self.top1)):
            src = marg[:-1, :, None].astype(np.float64)  # tokens with i at l
            with np.errstate(divide="ignore", invalid="ignore"):
                cond = np.where(src > 0, counts / src, np.nan)  # P(j at l+1 | i at l)
                base = marg[1:, None, :] / n  # P(j at l+1)
                lift = np.where(base > 0, cond / base, np.nan)
            lo, hi = wilson(counts, src)
            per_pair.append(dict(kind=name, conditional=cond, lift=lift, count=counts))
            for l in range(self.L - 1):
                for i, j in zip(*np.nonzero(counts[l] >= min_support)):
                    rows.append(dict(kind=name, layer=layers[l], next_layer=layers[l + 1], i=int(i), j=int(j),
                                     count=int(counts[l, i, j]), given=int(src[l, i, 0]), p=float(cond[l, i, j]),
                                     p_lo=float(lo[l, i, j]), p_hi=float(hi[l, i, j]), lift=float(lift[l, i, j])))
        by_lift = {kind: sorted([r for r in rows if r["kind"] == kind], key=lambda r: -r["lift"])[:top]
                   for kind in ("set", "top1")}
        # how predictable is the next layer's primary expert from this layer's: max_j P(j|i) averaged
        predict = [float(c.max(axis=1).sum() / max(c.sum(), 1)) for c in self.trans1]
        return dict(matrices=per_pair, top_top1_by_lift=by_lift["top1"], top_set_by_lift=by_lift["set"],
                    top1_predictability=predict,
                    top1_marginal_baseline=[float(self.top1[l + 1].max() / max(self.tokens, 1)) for l in range(self.L - 1)])

    def _paths(self, top: int) -> dict:
        n = self.tokens
        counts = np.array([v[0] for v in self.paths.values()], dtype=np.int64)
        prompts = np.array([v[1] for v in self.paths.values()], dtype=np.int64)
        order = np.argsort(-counts, kind="stable")[:top]
        keys = list(self.paths.keys())
        repeated = int(counts[counts >= 2].sum())
        lo, hi = wilson(repeated, n)
        top_rows = []
        for i in order:
            c = int(counts[i])
            plo, phi = wilson(c, n)
            top_rows.append(dict(path=np.frombuffer(keys[i], dtype=np.int16).tolist(), tokens=c, share=c / max(n, 1),
                                 share_lo=float(plo), share_hi=float(phi), prompts=int(prompts[i])))
        return dict(
            definition="per token: the highest-weight expert of every MoE layer, in layer order",
            tokens=n, distinct=len(counts), repeated_token_share=repeated / max(n, 1),
            repeated_lo=float(lo), repeated_hi=float(hi),
            paths_in_2plus_prompts=int((prompts >= 2).sum()),
            top=top_rows, possible=float(self.E) ** self.L,
        )
