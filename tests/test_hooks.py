"""Named hook points resolve to the modules transformers builds for each family; hooks attached with
``hooked`` see what the module computes and are gone afterwards, also after an error."""

from __future__ import annotations

import pytest
import torch

from uspx.engine import hooks
from uspx.io import UspxError
from uspx.models import adapter_for
from uspx.testing import tiny_model

# the modules as transformers names them, spelled out here (not read from any adapter)
EXPECTED = {
    "mixtral": ("model.layers.{i}", "mlp", "gate", "self_attn"),
    "qwen3_moe": ("model.layers.{i}", "mlp", "gate", "self_attn"),
    "gpt_oss": ("model.layers.{i}", "mlp", "router", "self_attn"),
    "dbrx": ("transformer.blocks.{i}", "ffn", "router", "norm_attn_norm.attn"),
}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_points_are_the_family_modules(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    layer_path, block, router, attn = EXPECTED[family]
    for layer in adapter.layers:
        base = layer_path.format(i=layer.index)
        want = {"decoder_layer": base, "block": f"{base}.{block}", "router": f"{base}.{block}.{router}",
                "experts": f"{base}.{block}.experts", "attention": f"{base}.{attn}"}
        for name, path in want.items():
            assert hooks.point(adapter, layer, name) is model.get_submodule(path), (name, path)
            assert hooks.named(adapter, f"blocks.{layer.index}.{name}") is model.get_submodule(path)
    assert [l.index for l, _ in hooks.points(adapter, "router")] == [l.index for l in adapter.layers]


def test_bad_point_names_are_named():
    adapter = adapter_for(tiny_model("mixtral"))
    with pytest.raises(UspxError, match="'mlp'"):
        hooks.point(adapter, 0, "mlp")
    with pytest.raises(UspxError, match="'layers.0.router'"):
        hooks.named(adapter, "layers.0.router")
    with pytest.raises(UspxError, match="module"):
        hooks.hooked([("not a module", print)]).__enter__()


def _hook_counts(module: torch.nn.Module) -> tuple[int, int]:
    return len(module._forward_hooks), len(module._forward_pre_hooks)


def test_hooked_sees_the_router_output_and_always_removes():
    model = tiny_model("mixtral")
    adapter = adapter_for(model)
    router, experts = hooks.point(adapter, 0, "router"), hooks.point(adapter, 0, "experts")
    seen, pre_seen = [], []
    ids = torch.tensor([[3, 9, 27, 81, 5]])
    with torch.no_grad():
        with hooks.hooked([(router, lambda m, a, out: seen.append((a[0], out[0])))]) as handles:
            with hooks.forward_pre_hooks([(experts, lambda m, a: pre_seen.append(a[1]))]):
                assert _hook_counts(experts) == (0, 1)
                model(ids)
            assert _hook_counts(experts) == (0, 0)
            assert len(handles) == 1
        x, logits = seen[0]
        # the router is a linear map of its input: recompute it by hand
        torch.testing.assert_close(logits, x @ router.weight.T)
        assert torch.equal(pre_seen[0], torch.topk(logits.softmax(-1), 2, dim=-1).indices)
        assert _hook_counts(router) == (0, 0)
        with pytest.raises(RuntimeError, match="boom"):
            with hooks.forward_hooks([(router, lambda m, a, out: None)]):
                raise RuntimeError("boom")
        assert _hook_counts(router) == (0, 0)


def test_prepended_hook_runs_first_and_replaces_output():
    model = tiny_model("mixtral")
    adapter = adapter_for(model)
    router = hooks.point(adapter, 0, "router")
    order = []
    doubled = lambda m, a, out: (order.append("prepended"), (out[0] * 2, *out[1:]))[1]  # noqa: E731
    with torch.no_grad(), hooks.hooked([
        hooks.forward_hook(router, lambda m, a, out: order.append(("later", out[0]))),
        hooks.forward_hook(router, doubled, prepend=True),
    ]):
        x = torch.randn(4, model.config.hidden_size)
        router(x)
    assert order[0] == "prepended" and order[1][0] == "later"
    torch.testing.assert_close(order[1][1], 2 * (x @ router.weight.T))


def test_pre_hook_with_kwargs_sees_keyword_arguments():
    model = tiny_model("mixtral")
    adapter = adapter_for(model)
    got = {}
    block = hooks.point(adapter, 1, "decoder_layer")
    with torch.no_grad(), hooks.hooked([hooks.pre_hook(block, lambda m, a, kw: got.update(kw), with_kwargs=True)]):
        model(torch.tensor([[1, 2, 3]]), use_cache=False)
    assert "attention_mask" in got or "position_embeddings" in got
    assert _hook_counts(block) == (0, 0)
