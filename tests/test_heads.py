"""Fewer KV groups: the narrowed model equals the masked one for gpt_oss (sinks, biases), qwen3_moe
(q/k norms) and mixtral (derived head_dim), and a group's score is the output change of removing it."""

from __future__ import annotations

import pytest
import torch

from uspx.prune.heads import group_heads, group_scores, kept_groups, kv_bytes_per_token, masked_heads, narrowed_heads
from uspx.testing import tiny_model
from uspx.workload import EncodedItem


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe", "mixtral"])
@pytest.mark.parametrize("query_heads", ["all", "half"])
def test_narrowed_attention_equals_the_masked_model(family, query_heads, one_thread, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(family)
    n_layers, kv = model.config.num_hidden_layers, model.config.num_key_value_heads
    rep = model.config.num_attention_heads // kv
    g = torch.Generator().manual_seed(1)
    groups = torch.stack([torch.randperm(kv, generator=g)[: kv // 2].sort().values for _ in range(n_layers)])
    kept = group_heads(groups, rep)
    if query_heads == "half":  # a random half of the query heads of each kept group
        if rep < 2:
            pytest.skip("one query head per KV group")
        kept = torch.stack([torch.cat([row[i * rep:(i + 1) * rep][torch.randperm(rep, generator=g)[: rep // 2]].sort().values
                                       for i in range(kv // 2)]) for row in kept])
    narrow = narrowed_heads(model, kept)
    assert narrow.config.num_key_value_heads == kv // 2
    assert narrow.config.num_attention_heads == kept.shape[1]
    assert kv_bytes_per_token(narrow.config) * 2 == kv_bytes_per_token(model.config)
    narrow.save_pretrained(tmp_path / "n")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "n")  # stock loading
    ids = torch.randint(0, 120, (2, 13), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, masked_heads(model, kept)(ids).logits, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(reloaded(ids).logits, model(ids).logits)


def test_group_score_is_the_output_change_of_removing_it(one_thread):
    model = tiny_model("gpt_oss")
    items = [EncodedItem(i, str(i), "f", "calibration", list(range(3 + i, 14 + i)), 0) for i in range(3)]
    scores = group_scores(model, items)
    attn = model.model.layers[1].self_attn
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    hd = model.config.head_dim
    captured = []
    hook = attn.o_proj.register_forward_hook(lambda m, a, o: captured.append((a[0].reshape(-1, a[0].shape[-1]), o)))
    with torch.no_grad():
        for e in items:
            model(input_ids=torch.tensor([e.input_ids]))
    hook.remove()
    g = 1
    cols = slice(g * (heads // kv) * hd, (g + 1) * (heads // kv) * hd)
    total = 0.0
    with torch.no_grad():
        for x, out in captured:
            x2 = x.clone()
            x2[:, cols] = 0  # the group's heads silenced: o_proj's output without them
            total += float((attn.o_proj(x) - attn.o_proj(x2)).double().norm(dim=1).sum())
    tokens = sum(len(e.input_ids) for e in items)
    assert float(scores[1, g]) == pytest.approx(total / tokens, rel=1e-5)
    assert kept_groups(scores, 1).shape == (model.config.num_hidden_layers, 1)
