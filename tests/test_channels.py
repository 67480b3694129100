"""Narrower experts: the intermediate activations match transformers' expert code, the narrowed
model equals the masked one, and a channel's score is the output change its removal causes."""

from __future__ import annotations

import pytest
import torch

from uspx.models import adapter_for
from uspx.prune.channels import channel_scores, kept_channels, masked, narrowed
from uspx.testing import tiny_model
from uspx.workload import EncodedItem

FAMILIES = ["gpt_oss", "qwen3_moe", "mixtral"]


def _items(n=4, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [EncodedItem(i, str(i), "f", "calibration", torch.randint(2, 120, (length + i,), generator=g).tolist(), 0)
            for i in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_intermediate_times_down_is_the_experts_output(family, one_thread):
    model = tiny_model(family)
    adapter = adapter_for(model)
    layer = adapter.layers[0]
    x = torch.randn(7, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = adapter.expert_outputs(layer, x, torch.full((7, 1), 3))[:, 0]  # transformers' expert forward
        h = adapter.expert_intermediate(layer, x, 3)
        dim, index = adapter.channel_layout(layer, adapter.expert_width())["down_proj"]
        down = layer.experts.down_proj[3]
        got = h @ (down if dim == 1 else down.T)
        if hasattr(layer.experts, "down_proj_bias"):
            got = got + layer.experts.down_proj_bias[3]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_narrowed_model_equals_the_masked_one(family, one_thread, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    adapter = adapter_for(model)
    width = adapter.expert_width()
    g = torch.Generator().manual_seed(4)
    kept = {l.index: torch.stack([torch.randperm(width, generator=g)[: width // 2].sort().values
                                  for _ in range(l.num_experts)]) for l in adapter.layers}
    narrow = narrowed(model, kept)
    assert adapter_for(narrow).expert_width() == width // 2
    narrow.save_pretrained(tmp_path / "n")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "n")  # stock loading
    ids = torch.randint(0, 120, (2, 11), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, masked(model, kept)(ids).logits, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(reloaded(ids).logits, model(ids).logits)  # something was removed


def test_channel_score_is_the_output_change_of_removing_it(one_thread):
    """||block(x) - block without channel c of expert e (x)|| per calibration token, computed
    by running transformers' own MoE block with that down column zeroed, equals the score."""
    model = tiny_model("qwen3_moe")
    adapter = adapter_for(model)
    items = _items()
    scores = channel_scores(model, items)
    layer = adapter.layers[-1]
    inputs = []
    hook = layer.block.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for e in items:  # one item at a time: no padding
            model(input_ids=torch.tensor([e.input_ids]))
    hook.remove()
    x = torch.cat(inputs)
    s = scores[layer.index]
    e, c = [int(v) for v in torch.nonzero(s == s.max())[0]]
    with torch.no_grad():
        base = layer.block(x[None]).reshape(len(x), -1).double()
        down = layer.experts.down_proj
        saved = down[e, :, c].clone()
        down[e, :, c] = 0
        without = layer.block(x[None]).reshape(len(x), -1).double()
        down[e, :, c] = saved
    assert float((base - without).norm(dim=1).sum()) / len(x) == pytest.approx(float(s[e, c]), rel=1e-4)
    kept = kept_channels(scores, 3)
    assert all(v.shape == (layer.num_experts, 3) for v in kept.values())
    assert c in kept[layer.index][e].tolist()  # the best channel is kept
