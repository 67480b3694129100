"""Section 1, utilisation: p_active per (layer, expert), cold experts with statistical power,
per-family usage, position entropy and load balance.

"Cold" needs evidence: an expert is cold only when the UPPER 95% bound of its p_active lies below
the threshold. Zero hits in 79 tokens has a Wilson upper bound of 4.6%, so against a 1% threshold it
is "undetermined" (not enough tokens), never "cold".
"""

from __future__ import annotations

import numpy as np

from uspx.analyze.blocks import Block
from uspx.analyze.stats import N_BOOT, balance, entropy, percentile_ci, poisson_weights, wilson

COLD, NOT_COLD, UNDETERMINED = "cold", "not_cold", "undetermined"


class PromptBootstrap:
    """Streams per-prompt count arrays into [n_boot, ...] Poisson-weighted replicate totals."""

    def __init__(self, n_samples: int, shape: tuple[int, ...], n_boot: int = N_BOOT, seed: int = 0):
        self.w = poisson_weights(n_samples, n_boot, seed)
        self.seed = seed
        self.shape = shape
        self.total = np.zeros((n_boot, int(np.prod(shape))), dtype=np.float64)

    def add(self, sample: np.ndarray, flat_index: np.ndarray, size: int) -> None:
        """Add one count per (sample[i], flat_index[i]); flat_index is into ``shape`` (size cells)."""
        if sample.max(initial=-1) >= self.w.shape[1]:  # hand-made traces may lack items.parquet
            extra = poisson_weights(int(sample.max()) + 1 - self.w.shape[1], self.w.shape[0], self.seed + self.w.shape[1])
            self.w = np.concatenate([self.w, extra], axis=1)
        uniq, local = np.unique(sample, return_inverse=True)
        counts = np.bincount(local * size + flat_index, minlength=len(uniq) * size).reshape(len(uniq), size)
        self.total += self.w[:, uniq] @ counts.astype(np.float32)

    def replicates(self) -> np.ndarray:
        return self.total.reshape((-1,) + self.shape)


class Utilisation:
    def __init__(self, n_layers: int, n_experts: int, top_k: int, n_samples: int, max_position: int = 128):
        self.L, self.E, self.k, self.P = n_layers, n_experts, top_k, max_position
        self.hits = np.zeros((n_layers, n_experts), dtype=np.int64)
        self.top1 = np.zeros((n_layers, n_experts), dtype=np.int64)
        self.tokens = 0
        self.seen: set[int] = set()
        self.fam_hits: dict[int, np.ndarray] = {}
        self.fam_tokens: dict[int, int] = {}
        self.pos_hits = np.zeros((max_position, n_layers, n_experts), dtype=np.int64)
        self.pos_tokens = np.zeros(max_position, dtype=np.int64)
        # replicate [.., L*E] expert hits plus one extra cell: the prompt's token count
        self.boot = PromptBootstrap(n_samples, (n_layers * n_experts + 1,))

    def update(self, b: Block) -> None:
        T, L, E = len(b.sample), self.L, self.E
        cell = (np.arange(L)[None, :, None] * E + b.ids).reshape(T, -1)  # [T, L*k]
        self.hits += np.bincount(cell.ravel(), minlength=L * E).reshape(L, E)
        self.top1 += np.bincount((np.arange(L)[None, :] * E + b.top1).ravel(), minlength=L * E).reshape(L, E)
        self.tokens += T
        self.seen.update(np.unique(b.sample).tolist())
        for f in np.unique(b.family):
            m = b.family == f
            h = np.bincount(cell[m].ravel(), minlength=L * E).reshape(L, E)
            self.fam_hits[int(f)] = self.fam_hits.get(int(f), 0) + h
            self.fam_tokens[int(f)] = self.fam_tokens.get(int(f), 0) + int(m.sum())
        pos = np.minimum(b.position, self.P - 1)  # the last bin pools every later position
        self.pos_tokens += np.bincount(pos, minlength=self.P)
        self.pos_hits += np.bincount((pos[:, None] * L * E + cell).ravel(), minlength=self.P * L * E).reshape(self.P, L, E)
        size = L * E + 1
        flat = np.concatenate([cell.ravel(), np.full(T, L * E)])
        smp = np.concatenate([np.repeat(b.sample, cell.shape[1]), b.sample])
        self.boot.add(smp, flat, size)

    def result(self, layers: list[int], families: list[str], threshold: float) -> dict:
        n = self.tokens
        p = self.hits / max(n, 1)
        lo, hi = wilson(self.hits, n)
        reps = self.boot.replicates()
        rep_p = reps[:, :-1].reshape(-1, self.L, self.E) / np.maximum(reps[:, -1:, None], 1)
        blo, bhi = percentile_ci(rep_p)
        upper = np.maximum(hi, bhi)  # the more conservative of token-level and prompt-level bounds
        lower = np.minimum(lo, blo)
        cls = _classify(lower, upper, threshold)
        bal = balance(self.hits)
        rep_bal = balance(reps[:, :-1].reshape(-1, self.L, self.E))
        fam = {}
        for code, h in sorted(self.fam_hits.items()):
            nf = self.fam_tokens[code]
            flo, fhi = wilson(h, nf)
            fam[families[code]] = dict(
                tokens=nf, p_active=h / nf, wilson_lo=flo, wilson_hi=fhi,
                classes=_count_classes(_classify(flo, fhi, threshold)),
            )
        pos_ent = _position_entropy(self.pos_hits, self.pos_tokens)
        return dict(
            tokens=n, layers=layers, num_experts=self.E, top_k=self.k, threshold=threshold,
            p_active=p, wilson_lo=lo, wilson_hi=hi, boot_lo=blo, boot_hi=bhi, prompts=len(self.seen),
            top1_share=self.top1 / max(n, 1),
            classes=cls.tolist(), class_counts=_count_classes(cls),
            **{kind: [dict(layer=layers[l], expert=int(e), hits=int(self.hits[l, e]), upper=float(upper[l, e]))
                      for l, e in zip(*np.nonzero(cls == kind))]
               for kind in (COLD, UNDETERMINED)},
            balance={key: dict(value=v, **dict(zip(("lo", "hi"), percentile_ci(rep_bal[key]))))
                     for key, v in bal.items()},
            families=fam, position_entropy=pos_ent,
        )


def _classify(lower: np.ndarray, upper: np.ndarray, threshold: float) -> np.ndarray:
    """Cold only if even the upper bound is below the threshold; not cold if the lower bound reaches it."""
    return np.where(upper < threshold, COLD, np.where(lower >= threshold, NOT_COLD, UNDETERMINED))


def _count_classes(cls: np.ndarray) -> dict[str, int]:
    return {c: int((cls == c).sum()) for c in (COLD, NOT_COLD, UNDETERMINED)}


def _position_entropy(pos_hits: np.ndarray, pos_tokens: np.ndarray) -> dict:
    """H^(l)(pos): entropy of the empirical expert-selection frequencies at a position.

    p_hat(e) = hits / (k * tokens at pos), so it sums to 1 over experts. The plug-in estimate is
    biased low when few tokens sit at a position, so the token count is reported beside it.
    """
    keep = pos_tokens > 0
    h = entropy(pos_hits[keep])  # [P', L]: the hits at a position sum to k * its tokens
    return dict(
        positions=np.nonzero(keep)[0], tokens=pos_tokens[keep], entropy=h.T,  # [L, P']
        max_entropy=float(np.log(pos_hits.shape[-1])), last_bin_pools_later=True,
    )
