"""Bandit ablation: with an unbounded budget and bounds that never separate early it draws every
item of the arms it needs and finds exhaustive ablation's kept set and values; with a budget it
stays within it. Guided ablation: its surrogate is the derivative of moving a layer's output towards
the ablated one (finite differences) and its full step is the ablation; with an unbounded budget it
is exhaustive ablation; its estimator is exact where its model holds, unbiased with calibrated
errors where the model holds up to noise, and draws items in proportion to size."""

from __future__ import annotations

import numpy as np
import pytest

from uspx.models import adapter_for
from uspx.score.ablation import run_ablation
from uspx.score.bandit import bandit_ablation, jaccard
from uspx.score.baseline import run_baseline
from uspx.testing import tiny_model
from uspx.workload import EncodedItem

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend


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


# ----- guided ablation ---------------------------------------------------------------------------

def _setup64(family="gpt_oss"):
    model = tiny_model(family)
    model.set_experts_implementation("eager")  # the grouped kernels take no float64
    model = model.double()
    adapter = adapter_for(model)
    items = [EncodedItem(i, str(i), "f", "calibration", list(range(2 + i, 12 + i)), 3) for i in range(6)]
    base = run_baseline(model, adapter, items, batch_size=1, pad_id=0, norms=False, progress=False)
    return model, adapter, base


def _moved_output(model, adapter, base, b, pos, expert, eps):
    """Summed target loss of batch ``b`` with layer ``pos``'s expert output moved by ``eps`` times
    the change that rerouting without ``expert`` makes (the module's own router, restricted, and its
    own experts forward), and the squared change at the loss-predicting positions."""
    import torch

    layer = adapter.layers[pos]
    kept = [e for e in range(adapter.num_experts) if e != expert]
    box = {}

    def hook(module, args, output):
        hidden = args[0]
        with adapter.restrict({layer.index: kept}):
            _, weights, index = layer.router(hidden)
        change = module.forward(hidden, index, weights) - output
        box["change"] = change
        return output + eps * change

    batch = base.batches[b]
    handle = layer.experts.register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        mask = batch.loss_mask[:, :-1]
        logp = torch.log_softmax(logits[:, :-1].double(), -1)
        loss = -float(logp.gather(-1, batch.input_ids[:, 1:, None])[..., 0][mask].sum())
    finally:
        handle.remove()
    predicting = batch.loss_mask.reshape(-1)
    size = float((box["change"].reshape(-1, box["change"].shape[-1])[predicting] ** 2).sum())
    return loss, size


def test_surrogate_is_the_derivative_of_moving_towards_the_ablated_output(one_thread):
    """First order: the derivative of the loss along the output change that removing the expert makes
    (central differences); size: that change's squared norm at the loss-predicting positions; and the
    full step is exactly the ablation's loss change."""
    from uspx.score.bandit import removal_surrogate

    model, adapter, base = _setup64()
    sur = removal_surrogate(model, adapter, base)
    exhaustive = run_ablation(model, adapter, base, "interventional", _Bar())
    checked = 0
    for b in range(0, len(base.batches), 2):
        row = base.batches[b].rows[0]
        for pos in range(len(adapter.layers)):
            for expert in range(adapter.num_experts):
                if not base.hit(b, pos, expert):
                    assert sur.first_order[row, pos, expert] == 0 and sur.size[row, pos, expert] == 0
                    continue
                # central differences, Richardson-extrapolated: the model computes in float32 in places
                # (its norms), so the steps cannot be tiny
                central = [(_moved_output(model, adapter, base, b, pos, expert, h)[0]
                            - _moved_output(model, adapter, base, b, pos, expert, -h)[0]) / (2 * h) for h in (2e-2, 1e-2)]
                derivative = (4 * central[1] - central[0]) / 3
                assert sur.first_order[row, pos, expert] == pytest.approx(derivative, rel=2e-3, abs=2e-4)
                _, size = _moved_output(model, adapter, base, b, pos, expert, 1.0)
                assert sur.size[row, pos, expert] == pytest.approx(size, rel=1e-9, abs=1e-12)
                full, _ = _moved_output(model, adapter, base, b, pos, expert, 1.0)
                none, _ = _moved_output(model, adapter, base, b, pos, expert, 0.0)
                assert full - none == pytest.approx(exhaustive.delta_sum[row, pos, expert], rel=1e-4, abs=1e-4)
                checked += 1
    assert checked > 10
    assert sur.forwards == 4 * len(base.items)


def test_guided_ablation_with_an_unbounded_budget_is_exhaustive_ablation(one_thread):
    from uspx.score.bandit import guided_ablation

    model, adapter, base = _setup64()
    exhaustive = run_ablation(model, adapter, base, "interventional", _Bar())
    exact = exhaustive.delta_sum.sum(0) / base.loss_tokens().sum()
    keep = 4
    want = {l.index: sorted(np.argsort(-exact[pos], kind="stable")[:keep].tolist()) for pos, l in enumerate(adapter.layers)}
    res = guided_ablation(model, adapter, base, keep, budget=10**6)
    np.testing.assert_allclose(res.value, exact, rtol=1e-9, atol=1e-12)
    assert res.kept == want and (res.se == 0).all()
    assert res.forwards == 4 * len(base.items) + exhaustive.forwards


def test_guided_ablation_respects_its_budget(one_thread):
    from uspx.score.bandit import guided_ablation, removal_surrogate

    model, adapter, base = _setup()
    sur = removal_surrogate(model, adapter, base)
    calls = []
    real = {}

    def pull(pos, expert, b):  # brute force, memoised: a repeated (arm, item) would show in calls
        calls.append((pos, expert, b))
        if (pos, expert) not in real:
            real[pos, expert] = run_single(model, adapter, base, pos, expert)
        return real[pos, expert][b]

    res = guided_ablation(model, adapter, base, 4, budget=sur.forwards + 30, surrogate=sur, pull=pull)
    assert res.forwards == sur.forwards + 30 == sur.forwards + len(calls)
    assert len(set(calls)) == len(calls) and all(base.hit(b, p, e) for p, e, b in calls)
    assert res.pulls.sum() == 30 and all(len(v) == 4 for v in res.kept.values())
    with pytest.raises(ValueError, match="surrogate"):
        guided_ablation(model, adapter, base, 4, budget=sur.forwards - 1, surrogate=sur, pull=pull)


def run_single(model, adapter, base, pos, expert):
    """Per batch: the summed loss change of removing one expert (the removal done by hand: the
    layer's router restricted to the other experts)."""
    import torch

    from uspx.score.loss import token_losses

    layer = adapter.layers[pos]
    out = []
    for b, batch in enumerate(base.batches):
        with torch.no_grad(), adapter.restrict({layer.index: [e for e in range(adapter.num_experts) if e != expert]}):
            losses = token_losses(model, batch)
        out.append(float(((losses - base.losses[b]).double() * batch.loss_mask).sum()))
    return out


def test_guided_selection_is_exact_where_its_model_holds():
    """Loss changes that are exactly first order plus a per-expert multiple of the size: two
    ablations per expert pin its multiple, and the estimates are the true sums."""
    from uspx.score.bandit import guided_selection

    rng = np.random.default_rng(0)
    items, layers, experts = 40, 3, 8
    first = rng.normal(0, 1, (items, layers, experts))
    size = rng.gamma(0.5, 1, (items, layers, experts))
    hit = rng.random((items, layers, experts)) < 0.9
    gamma = rng.uniform(0.5, 2, (layers, experts))
    d = np.where(hit, first + gamma * size, 0.0)
    out = guided_selection(first, size, hit, 3, 2 * layers * experts, lambda l, e, i: d[i, l, e], initial=2)
    np.testing.assert_allclose(out["value"], d.sum(0), rtol=1e-9, atol=1e-9)
    assert out["kept"] == [sorted(np.argsort(-d.sum(0)[l])[:3].tolist()) for l in range(layers)]
    assert out["spent"] == 2 * layers * experts


def test_guided_selection_draws_items_in_proportion_to_their_size():
    """The first item ablated for an arm is item ``i`` with probability proportional to its size
    plus the floor (5% of the arm's mean size)."""
    from uspx.score.bandit import guided_selection

    size = np.array([0.0, 1.0, 3.0, 6.0])[:, None, None] * np.ones((1, 1, 2))
    first = np.zeros_like(size)
    hit = np.ones(size.shape, bool)
    draws = 4000
    counts = np.zeros(4)
    for seed in range(draws):
        seen = []
        guided_selection(first, size, hit, 1, 1, lambda l, e, i: seen.append(i) or 0.0, initial=1, seed=seed)
        counts[seen[0]] += 1
    weight = size[:, 0, 0] + 0.05 * size[:, 0, 0].mean()
    expected = weight / weight.sum()
    assert (np.abs(counts / draws - expected) <= 4 * np.sqrt(expected * (1 - expected) / draws)).all()


def test_guided_selection_estimates_are_unbiased_with_calibrated_errors():
    """Loss changes drawn from the model the estimator assumes (first order + slope * size + noise
    of variance proportional to the size): over many populations and draws the estimation error
    averages to zero and its spread matches the reported standard error."""
    from uspx.score.bandit import guided_selection

    z = []
    for seed in range(300):
        rng = np.random.default_rng(seed)
        items, experts = 60, 6
        first = rng.normal(0, 2, (items, 1, experts))
        size = rng.gamma(0.7, 1, (items, 1, experts))
        hit = np.ones(size.shape, bool)
        d = first + 1.3 * size + rng.normal(0, 0.5, size.shape) * np.sqrt(size + 0.05 * size.mean(0))
        out = guided_selection(first, size, hit, 3, 8 * experts, lambda l, e, i: d[i, l, e], initial=8, seed=seed)
        z.extend(((out["value"] - d.sum(0)) / out["se"]).ravel())
    z = np.array(z)
    assert abs(z.mean()) < 0.1 and 0.8 < z.std() < 1.25
