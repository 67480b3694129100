"""Attribution patching: the one-backward estimate is the derivative of the loss along the unit's
removal (checked by central finite differences), and its rank agreement with true removal."""

from __future__ import annotations

import pytest
import torch

from uspx.score.attribution import attribution, mean_loss, spearman, validate
from uspx.testing import tiny_model
from uspx.workload import EncodedItem

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend

ITEMS = [EncodedItem(i, str(i), "f", "calibration", list(range(3 + 2 * i, 15 + 2 * i)), 4) for i in range(4)]


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)


def _scaled_loss(w, dim, cols, expert, factor):
    with torch.no_grad():
        target = w[expert] if expert is not None else w
        saved = target.index_select(dim, cols).clone()
        target.index_copy_(dim, cols, saved * factor)
        loss = float(mean_loss(MODEL[0], ITEMS))
        target.index_copy_(dim, cols, saved)
    return loss


MODEL = []


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe"])
def test_estimates_are_the_derivative_along_removal(family, one_thread):
    from uspx.models import adapter_for

    model = tiny_model(family)
    MODEL[:] = [model]
    est = attribution(model, ITEMS)
    assert est.loss == pytest.approx(float(mean_loss(model, ITEMS)), rel=1e-6)
    eps = 0.1  # central differences: (L(1 + eps) - L(1 - eps)) / (2 eps) = dL/dm, the estimate is -dL/dm
    adapter = adapter_for(model)
    moe = adapter.layers[-1]
    dim, index = adapter.channel_layout(moe, adapter.expert_width())["down_proj"]
    w = moe.experts.down_proj
    for e, c in ((1, 3), (0, 0)):
        d = (_scaled_loss(w, dim - 1, index[c], e, 1 + eps) - _scaled_loss(w, dim - 1, index[c], e, 1 - eps)) / (2 * eps)
        assert float(est.channels[moe.index][e, c]) == pytest.approx(-d, rel=5e-2, abs=2e-5)
    # a KV group: top-k routing downstream makes the loss piecewise in m (finite differences jump
    # across routing changes), so the reference is autograd through an explicit scale on the
    # group's input to o_proj
    o = model.model.layers[0].self_attn.o_proj
    heads, kv, hd = model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim
    width = (heads // kv) * hd
    m = torch.ones((), requires_grad=True)

    def scaled(module, args):
        x = args[0]
        return (x * torch.cat([m.expand(width), torch.ones(x.shape[-1] - width)]),)

    handle = o.register_forward_pre_hook(scaled)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        (dm,) = torch.autograd.grad(mean_loss(model, ITEMS, grad=True), [m])
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    assert float(est.groups[0, 0]) == pytest.approx(-float(dm), rel=1e-4)


def test_validation_measures_true_removal(one_thread):
    model = tiny_model("gpt_oss")
    est = attribution(model, ITEMS)
    report = validate(model, ITEMS, est, channels=12)
    assert report["channels"]["units"] == 12 and report["groups"]["units"] == model.config.num_hidden_layers * 2
    assert float(mean_loss(model, ITEMS)) == pytest.approx(report["base_loss"])  # the model is left as it was
