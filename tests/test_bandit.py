"""Bandit ablation: with an unbounded budget and bounds that never separate early it draws every
item of the arms it needs and finds exhaustive ablation's kept set and values; with a budget it
stays within it."""

from __future__ import annotations

import numpy as np
import pytest

from uspx.models import adapter_for
from uspx.score.ablation import run_ablation
from uspx.score.bandit import bandit_ablation, jaccard
from uspx.score.baseline import run_baseline
from uspx.testing import tiny_model
from uspx.workload import EncodedItem


class _Bar:
    def advance(self, n=1):
        pass

    def describe(self, text):
        pass


def _setup():
    model = tiny_model("mixtral")
    adapter = adapter_for(model)
    items = [EncodedItem(i, str(i), "f", "calibration", list(range(2 + i, 12 + i)), 3) for i in range(8)]
    base = run_baseline(model, adapter, items, batch_size=1, pad_id=0, norms=False, progress=False)
    return model, adapter, base


def test_bandit_without_shortcuts_equals_exhaustive_ablation(one_thread):
    model, adapter, base = _setup()
    exhaustive = run_ablation(model, adapter, base, "interventional", _Bar())
    exact = exhaustive.delta_sum.sum(0) / base.loss_tokens().sum()  # [L, E]
    keep = 4
    want = {l.index: sorted(np.argsort(-exact[pos], kind="stable")[:keep].tolist()) for pos, l in enumerate(adapter.layers)}
    res = bandit_ablation(model, adapter, base, keep, budget=10**6, z=1e9)
    assert res.kept == want and jaccard(res.kept, want) == 1.0
    full = res.pulls == np.array([[sum(base.hit(b, p, e) for b in range(len(base.batches))) for e in range(adapter.num_experts)]
                                  for p in range(len(adapter.layers))])
    np.testing.assert_allclose(res.value[full], exact[full], rtol=1e-9, atol=1e-12)
    assert full.any()


def test_bandit_respects_its_budget(one_thread):
    model, adapter, base = _setup()
    res = bandit_ablation(model, adapter, base, 4, budget=20, initial=1)
    # per layer: the initial pull of every arm, then pairs of pulls while the budget allows
    assert res.forwards <= len(adapter.layers) * max(20, adapter.num_experts)
    assert (res.pulls.sum(1) <= max(20, adapter.num_experts)).all()
    assert all(len(v) == 4 for v in res.kept.values())
    assert jaccard({0: [1, 2]}, {0: [2, 3]}) == pytest.approx(1 / 3)
