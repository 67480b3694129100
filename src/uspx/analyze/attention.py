"""Section 6, attention vs routing.

Probe (model): the output of the layer's own attention module (captured by a forward hook on its
``self_attn``, so gpt_oss sinks and sliding windows are the model's) -> that layer's highest-weight
expert, by multinomial logistic regression trained on calibration prompts and measured on held-out
prompts; against the majority-class baseline. Contexts (trace only): how often two occurrences of
the same token id get different primary experts, against two random tokens.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from uspx.analyze.blocks import Block
from uspx.analyze.collect import Capture
from uspx.analyze.stats import single_thread, wilson


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, n_out: int, loss_fn, steps: int = 300,
                     seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """A linear probe on standardised ``x``, fitted with Adam on ``loss_fn(scores, y)``."""
    torch.manual_seed(seed)
    mean, std = x.mean(0), x.std(0) + 1e-5
    lin = torch.nn.Linear(x.shape[1], n_out)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-4)
    xs = (x - mean) / std
    with torch.enable_grad(), single_thread():  # callers may run under no_grad; tiny ops
        for _ in range(steps):
            opt.zero_grad()
            loss_fn(lin(xs), y).backward()
            opt.step()
    return lambda z: lin((z - mean) / std)


def split_masks(cap: Capture) -> tuple[np.ndarray, np.ndarray]:
    """Train on calibration prompts, test on held-out prompts; if a part is empty, split by prompt id."""
    train, test = cap.split == "calibration", cap.split == "heldout"
    if train.sum() == 0 or test.sum() == 0:
        test = cap.sample % 5 == 0
        train = ~test
    return train, test


def attention_probe(cap: Capture, layers: list[int], n_experts: int) -> dict:
    if cap.attn_out is None:
        return dict(note="no self-attention module found next to the MoE blocks; probe skipped")
    train, test = split_masks(cap)
    tr, te = torch.from_numpy(train), torch.from_numpy(test)
    rows = []
    for li, layer in enumerate(layers):
        y = cap.top1[:, li]
        probe = fit_linear_probe(cap.attn_out[tr, li], y[tr], n_experts, torch.nn.functional.cross_entropy)
        with torch.no_grad():
            pred = probe(cap.attn_out[te, li]).argmax(-1)
        hits = int((pred == y[te]).sum())
        n = int(te.sum())
        major = int(torch.bincount(y[tr], minlength=n_experts).argmax())
        base = int((y[te] == major).sum())
        lo, hi = wilson(hits, n)
        blo, bhi = wilson(base, n)
        rows.append(dict(layer=layer, train_tokens=int(tr.sum()), test_tokens=n, accuracy=hits / max(n, 1),
                         lo=float(lo), hi=float(hi), majority=base / max(n, 1), majority_lo=float(blo),
                         majority_hi=float(bhi), chance=1.0 / n_experts))
    return dict(target="highest-weight expert of the same layer",
                features="output of the layer's self-attention module (before the residual add)",
                train="calibration prompts", test="held-out prompts", rows=rows)


class Contexts:
    """Counts (token id, layer, primary expert) over the trace, merged batch by batch (sparse)."""

    def __init__(self, n_layers: int, n_experts: int):
        self.L, self.E = n_layers, n_experts
        self.keys = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0

    def update(self, b: Block) -> None:
        key = (b.token[:, None] * self.L + np.arange(self.L)[None]) * self.E + b.top1
        self.pending.append(key.ravel())
        self.pending_rows += key.size
        if self.pending_rows > 4 * max(len(self.keys), 1 << 20):
            self._merge()

    def _merge(self) -> None:
        if not self.pending:
            return
        k = np.concatenate([self.keys] + self.pending)
        c = np.concatenate([self.counts] + [np.ones(len(p), np.int64) for p in self.pending])
        self.keys, inv = np.unique(k, return_inverse=True)
        self.counts = np.bincount(inv, weights=c).astype(np.int64)
        self.pending, self.pending_rows = [], 0

    def result(self, layers: list[int]) -> dict:
        self._merge()
        token = self.keys // (self.L * self.E)
        layer = (self.keys // self.E) % self.L
        rows = []
        for l in range(self.L):
            m = layer == l
            tok, c = token[m], self.counts[m]
            uniq, inv = np.unique(tok, return_inverse=True)
            n = np.bincount(inv, weights=c)  # occurrences per token id
            same = np.bincount(inv, weights=c * (c - 1))  # ordered same-expert pairs
            distinct = np.bincount(inv)
            multi = n >= 2
            pairs = (n * (n - 1))[multi].sum()
            differ = (pairs - same[multi].sum()) / pairs if pairs > 0 else float("nan")
            tot = np.bincount(self.keys[m] % self.E, weights=c, minlength=self.E)
            p = tot / max(tot.sum(), 1)
            rows.append(dict(layer=layers[l], token_ids_seen_twice=int(multi.sum()),
                             occurrences=int(n[multi].sum()), pair_differ=float(differ),
                             random_pair_differ=float(1 - (p ** 2).sum()),
                             ids_with_several_experts=float((distinct[multi] > 1).mean()) if multi.any() else float("nan")))
        return dict(definition="P(two occurrences of one token id have different highest-weight experts)",
                    rows=rows)
