"""Channels and heads scored, chosen with experts under one budget, and exported.

Unit scores are checked against quantities computed here by other means: the output change of
transformers' own modules with a unit zeroed, autograd derivatives of the loss with a unit's block
scaled, and the loss measured with a head removed. The joint choice is checked against a brute force
over every shape, with costs from models of that shape built by transformers. The joint export is
reloaded with stock ``from_pretrained`` and compared with a masked model built here."""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
import torch

from conftest import save_tiny
from uspx.io import UspxError
from uspx.models import adapter_for
from uspx.score.units import load_units, score_units
from uspx.testing import tiny_model
from uspx.workload import EncodedItem


def _items(n=4, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [EncodedItem(i, str(i), "f", "calibration", torch.randint(2, 90, (length + i,), generator=g).tolist(), 0)
            for i in range(n)]


def _mean_loss(model, items, params=None):
    """Token-weighted mean next-token loss over every token but the first, one item at a time
    (with ``params``, those parameters replaced)."""
    total, count = 0.0, 0
    for e in items:
        ids = torch.tensor([e.input_ids])
        out = torch.func.functional_call(model, params, (), {"input_ids": ids}) if params else model(input_ids=ids)
        total = total + torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:], reduction="sum")
        count += len(e.input_ids) - 1
    return total / count


def _block_inputs(model, layer, items):
    """The MoE block's input at every token of ``items``, one item at a time (no padding)."""
    inputs = []
    hook = layer.block.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for e in items:
            model(input_ids=torch.tensor([e.input_ids]))
    hook.remove()
    return torch.cat(inputs)


@pytest.fixture(scope="module")
def scored():
    torch.manual_seed(0)
    model = tiny_model("gpt_oss")
    items = _items()
    with torch.no_grad():  # larger sinks and o_proj make head effects visible in a random model
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(4)
    return model, items, score_units(model, items, ["channels", "heads"], ["reconstruction", "activation",
                                                                            "attribution", "fisher", "ablation"],
                                     batch_size=3, bootstrap=20)


def test_channel_reconstruction_is_the_squared_output_change(scored, one_thread):
    model, items, us = scored
    layer = adapter_for(model).layers[1]
    x = _block_inputs(model, layer, items)
    value = us.matrix("channel", "reconstruction", layer.index)
    act = us.matrix("channel", "activation", layer.index)
    for e, c in [np.unravel_index(value.argmax(), value.shape), (3, 5)]:
        with torch.no_grad():
            base = layer.block(x[None])[0].reshape(len(x), -1).double()
            down = layer.experts.down_proj
            saved = down[e, c].clone()  # gpt_oss: down [E, I, H]
            down[e, c] = 0
            without = layer.block(x[None])[0].reshape(len(x), -1).double()
            down[e, c] = saved
        change = (base - without).norm(dim=1)
        assert value[e, c] == pytest.approx(float(change.pow(2).sum()) / len(x), rel=1e-4, abs=1e-12)
        assert act[e, c] == pytest.approx(float(change.sum()) / len(x), rel=1e-4, abs=1e-12)


def test_head_reconstruction_and_ablation_are_the_changes_of_removing_the_head(scored, one_thread):
    model, items, us = scored
    attn = model.model.layers[0].self_attn
    hd = model.config.head_dim
    outputs = []
    hook = attn.o_proj.register_forward_hook(lambda m, a, out: outputs.append(out[0]))
    with torch.no_grad():
        base_loss = float(_mean_loss(model, items))
    for kind, cols in (("query_head", slice(hd, 2 * hd)), ("kv_group", slice(2 * hd, 4 * hd))):
        unit = 1
        outputs.clear()
        with torch.no_grad():
            for e in items:
                model(input_ids=torch.tensor([e.input_ids]))
            base = torch.cat(outputs).double()
            saved = attn.o_proj.weight[:, cols].clone()
            attn.o_proj.weight[:, cols] = 0
            outputs.clear()
            for e in items:
                model(input_ids=torch.tensor([e.input_ids]))
            without = torch.cat(outputs).double()
            removed_loss = float(_mean_loss(model, items))
            attn.o_proj.weight[:, cols] = saved
        n = len(base)
        assert us.matrix(kind, "reconstruction", 0)[unit] == pytest.approx(
            float((base - without).norm(dim=1).pow(2).sum()) / n, rel=1e-4)
        assert us.matrix(kind, "ablation", 0)[unit] == pytest.approx(removed_loss - base_loss, rel=1e-3, abs=1e-6)
    hook.remove()


def test_attribution_and_fisher_are_the_loss_derivatives(scored, one_thread):
    """-dL/dm and (1/2) mean_i (dL_i/dm)^2 with the unit's block scaled by m, from autograd here; and
    the first-order estimate agrees with brute-force removal scaled down (finite difference)."""
    model, items, us = scored
    layer = adapter_for(model).layers[0]
    down = layer.experts.down_proj
    attribution = us.matrix("channel", "attribution", 0)
    e, c = np.unravel_index(np.abs(attribution).argmax(), attribution.shape)
    m = torch.ones((), requires_grad=True)
    onehot = torch.zeros(down.shape[0], down.shape[1], 1)
    onehot[e, c] = 1.0

    def loss_at(m, which):  # down [E, I, H]: channel c of expert e is row down[e, c]
        w = down.detach() * (1 + (m - 1) * onehot)
        return _mean_loss(model, which, {"model.layers.0.mlp.experts.down_proj": w})

    (grad,) = torch.autograd.grad(loss_at(m, items), m)
    assert us.matrix("channel", "attribution", 0)[e, c] == pytest.approx(-float(grad), rel=1e-3, abs=1e-8)
    per_item = [float(torch.autograd.grad(loss_at(m, [it]), m)[0]) for it in items]
    assert us.matrix("channel", "fisher", 0)[e, c] == pytest.approx(0.5 * np.mean(np.square(per_item)), rel=1e-3, abs=1e-12)
    with torch.no_grad():  # central difference, with a step float32's digits resolve
        eps = 0.2
        fd = (float(loss_at(torch.tensor(1 - eps), items)) - float(loss_at(torch.tensor(1 + eps), items))) / (2 * eps)
    assert us.matrix("channel", "attribution", 0)[e, c] == pytest.approx(fd, rel=0.1)


def test_intervals_bracket_the_value(scored):
    _, _, us = scored
    t = us.table.to_pandas()
    t = t[t.value.abs() > 1e-9]
    assert (t.ci_low <= t.value + 1e-12).mean() > 0.95 and (t.ci_high >= t.value - 1e-12).mean() > 0.95
    assert (t.ci_high > t.ci_low).any()


# ----- joint selection -------------------------------------------------------------------------------
def _weight_bytes(family, experts, width, groups, heads, bytes_per=2):
    """Bytes of a model of that shape built by transformers (every parameter, bf16)."""
    from transformers import AutoModelForCausalLM

    from uspx.testing import tiny_config

    cfg = tiny_config(family)
    cfg.num_local_experts, cfg.intermediate_size = experts, width
    cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim = groups, groups * heads, cfg.head_dim
    model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters()) * bytes_per


def test_joint_selection_is_the_best_shape_under_the_budget():
    from uspx.plan.joint import select_units
    from uspx.score.units import SCHEMA, UnitScores
    import pyarrow as pa

    from uspx.testing import tiny_config

    cfg = tiny_config("gpt_oss")
    rng = np.random.default_rng(3)
    L, E, I, G, H = cfg.num_hidden_layers, cfg.num_local_experts, cfg.intermediate_size, 2, 4
    experts = {l: rng.gamma(1.0, 1.0, E) for l in range(L)}
    chan = {l: rng.gamma(0.5, 0.1, (E, I)) for l in range(L)}
    groups = {l: rng.gamma(2.0, 1.0, G) for l in range(L)}
    heads = {l: rng.gamma(1.0, 0.5, H) for l in range(L)}
    rows = []
    for l in range(L):
        for e in range(E):
            for c in range(I):
                rows.append(("channel", l, e, c, chan[l][e, c]))
        rows += [("kv_group", l, g, -1, groups[l][g]) for g in range(G)]
        rows += [("query_head", l, h, -1, heads[l][h]) for h in range(H)]
    kind, layer, index, channel, value = zip(*rows)
    n = len(rows)
    table = pa.table(dict(kind=list(kind), layer=pa.array(layer, pa.int16()), index=pa.array(index, pa.int32()),
                          channel=pa.array(channel, pa.int32()), method=["reconstruction"] * n, value=list(value),
                          ci_low=[np.nan] * n, ci_high=[np.nan] * n, n_prompts=pa.array([1] * n, pa.int32())),
                     schema=SCHEMA)

    def brute(budget_weights):
        """Every shape by hand: value of each layer's best units, bytes of the built model."""
        best = None
        for n_e, w, g, r in itertools.product(range(2, E + 1), (4, 8, 12, 16), (1, 2), (1, 2)):
            size = _cached_bytes(n_e, w, g, r)
            if size > budget_weights:
                continue
            v = 0.0
            for l in range(L):
                keep = np.argsort(-experts[l], kind="stable")[:n_e]
                v += experts[l][keep].sum() + sum(np.sort(chan[l][e])[::-1][:w].sum() for e in keep)
                kg = np.argsort(-groups[l], kind="stable")[:g]
                v += groups[l][kg].sum() + sum(np.sort(heads[l][k * 2:(k + 1) * 2])[::-1][:r].sum() for k in kg)
            if best is None or v > best[0] + 1e-9:
                best = (v, (n_e, w, g, r), size)
        return best

    cache = {}

    def _cached_bytes(*shape):
        if shape not in cache:
            cache[shape] = _weight_bytes("gpt_oss", *shape)
        return cache[shape]

    full, least = _cached_bytes(E, I, G, 2), _cached_bytes(2, 4, 1, 1)
    for share in (0.3, 0.6, 0.85):
        budget = int(least + (full - least) * share)
        plan = select_units(experts, UnitScores(table), cfg, budget=budget, dtype="bf16", context=0, channel_step=4)
        want_value, want_shape, want_bytes = brute(budget)
        s = plan.settings["shape"]
        assert (s["experts"], s["width"], s["kv_groups"], s["heads_per_group"]) == want_shape
        assert plan.predicted_bytes == want_bytes  # the planner's size is the built model's
        assert plan.value == pytest.approx(want_value)
        assert all(len(v) == want_shape[0] for v in plan.kept.values())
    # at a long context the KV cache outweighs the weights: a budget of the whole weights and half
    # the cache is met by dropping a KV group per layer
    from uspx.plan import memory as mem

    kv_full = mem.kv_cache_bytes(mem.count_params(cfg), 4096)
    assert kv_full > 2 * (full - least)
    plan = select_units(experts, UnitScores(table), cfg, budget=full + kv_full // 2, dtype="bf16", context=4096,
                        channel_step=4)
    assert plan.heads["kv_groups"] == 1 and plan.sizes["kv_per_token"] * 2 == plan.sizes["kv_per_token_original"]
    assert plan.sizes["kv_cache"] * 2 == kv_full and plan.predicted_bytes <= full + kv_full // 2
    with pytest.raises(UspxError, match="fits no shape"):
        select_units(experts, UnitScores(table), cfg, budget=1000, dtype="bf16", context=0)
    with pytest.raises(UspxError, match="needs their scores"):
        select_units(experts, None, cfg, budget=full, units="experts,channels")


# ----- joint export ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v3"])
def test_joint_export_equals_the_masked_model(family, tmp_path, one_thread):
    """Half the experts, half of every kept expert's channels, one query head of one KV group per
    layer, and half of every dense MLP's channels (qwen2_moe's gated shared expert, deepseek's dense
    layer), each as the family allows; exported, reloaded stock, compared with a masked model built here."""
    from transformers import AutoModelForCausalLM

    from uspx.models import load_model
    from uspx.models.base import submodule
    from uspx.plan.select import Plan, load_plan
    from uspx.prune import export

    src = save_tiny(family, tmp_path / "src")
    lm = load_model(src)
    adapter = adapter_for(lm.model)
    cls = type(adapter)
    cfg = lm.model.config
    width, kv = adapter.expert_width(), cfg.num_key_value_heads
    rep = cfg.num_attention_heads // kv
    narrow_experts, cut_heads = cls.expert_width_also_sizes is None, cls.heads_prunable
    g = torch.Generator().manual_seed(0)
    kept = {l.index: torch.randperm(l.num_experts, generator=g)[: l.num_experts // 2].sort().values.tolist()
            for l in adapter.layers}
    channels = {l: [torch.randperm(width, generator=g)[: width // 2].sort().values.tolist() for _ in v]
                for l, v in kept.items()} if narrow_experts else {}
    heads = {}
    for i in range(cfg.num_hidden_layers):  # one group, one query head of it, per layer
        group = int(torch.randint(kv, (1,), generator=g))
        heads[i] = [group * rep + int(torch.randint(rep, (1,), generator=g))]
    dense = []
    for i, k, mlp, _ in adapter.dense_mlps(lm.model):
        path, fld, _ = cls.dense_mlp_paths[k]
        full = mlp.down_proj.weight.shape[1]
        kind = next((d for d in dense if d["field"] == fld), None)
        if kind is None:
            kind = {"path": path, "field": fld, "width": full // 2, "original_width": full, "kept": {}}
            dense.append(kind)
        kind["kept"][i] = torch.randperm(full, generator=g)[: full // 2].sort().values.tolist()
    assert dense or family not in ("qwen2_moe", "deepseek_v3")
    # the size a model of that shape has when transformers builds it
    shaped_cfg = copy.deepcopy(cfg)
    setattr(shaped_cfg, cls.expert_count_field, len(kept[adapter.layers[0].index]))
    if narrow_experts:
        setattr(shaped_cfg, cls.expert_width_field, width // 2)
    for d in dense:
        setattr(shaped_cfg, d["field"], d["width"])
    if cut_heads:
        shaped_cfg.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        shaped_cfg.num_key_value_heads, shaped_cfg.num_attention_heads = 1, 1
    expected = sum(p.numel() for p in AutoModelForCausalLM.from_config(shaped_cfg).state_dict().values()) * 4
    plan = Plan(kept=kept, method="test", uniform=True, top_k=adapter.top_k, num_experts=adapter.num_experts,
                predicted_bytes=expected, settings={"dtype": "fp32"},
                channels={"width": width // 2 if narrow_experts else width, "original_width": width,
                          "kept": channels, "dense": dense},
                heads={"kv_groups": 1, "heads_per_group": 1, "original_kv_groups": kv,
                       "original_heads_per_group": rep, "kept": heads} if cut_heads else None)
    plan.save(tmp_path / "plan.json")
    record = export(src, tmp_path / "plan.json", tmp_path / "out")
    assert record["size"]["actual_bytes"] == expected
    plan = load_plan(tmp_path / "plan.json")

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # stock loading
    rcfg = reloaded.config
    if cut_heads:
        assert rcfg.num_key_value_heads == 1 and rcfg.num_attention_heads == 1
    assert adapter_for(reloaded).expert_width() == plan.channels["width"]
    assert adapter_for(reloaded).num_experts == len(plan.kept[adapter.layers[0].index])
    for d in dense:
        assert getattr(rcfg, d["field"]) == d["width"]

    # the masked model, built here: dropped channels' down columns and dropped heads' o_proj columns zeroed
    ref = copy.deepcopy(lm.model).float()
    ra = adapter_for(ref)
    hd = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    with torch.no_grad():
        for layer in ra.layers:
            if not narrow_experts:
                break
            dim, index = ra.channel_layout(layer, width)["down_proj"]
            for e, keep in zip(plan.kept[layer.index], plan.channels["kept"][layer.index]):
                drop = [c for c in range(width) if c not in keep]
                layer.experts.down_proj[e].index_fill_(dim - 1, index[drop].reshape(-1), 0.0)
        for d in dense:
            for i, keep in d["kept"].items():
                down = submodule(ra.decoder_layers(ref)[i], d["path"]).down_proj.weight
                down[:, [c for c in range(d["original_width"]) if c not in keep]] = 0
        for i, dl in enumerate(ra.decoder_layers(ref)):
            if not cut_heads:
                break
            o = getattr(dl, ra.attention_attr).o_proj.weight
            for h in range(cfg.num_attention_heads):
                if h not in plan.heads["kept"][i]:
                    o[:, h * hd:(h + 1) * hd] = 0
    ids = torch.randint(2, 90, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), ra.restrict(plan.kept):
        want = ref(ids).logits
    with torch.no_grad():
        got = reloaded(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got, lm.model(ids).logits, atol=1e-3)


def test_plan_with_bad_channel_lists_is_refused(tmp_path):
    from uspx.plan.select import load_plan

    data = {"format": "uspx-plan", "version": 1, "method": "reconstruction", "uniform": True, "top_k": 1,
            "num_experts": 2, "predicted_bytes": 10, "kept": {"0": [0, 1]},
            "channels": {"width": 2, "original_width": 4, "kept": {"0": [[0, 1], [3, 1]]}}}
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(UspxError, match=r"channels\.kept\.0.*sorted"):
        load_plan(tmp_path / "p.json")
    data["channels"]["kept"]["0"][1] = [1, 3]
    data["heads"] = {"kv_groups": 1, "heads_per_group": 2, "original_kv_groups": 2, "original_heads_per_group": 2,
                     "kept": {"0": [1, 2]}}
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(UspxError, match=r"heads\.kept\.0.*2 heads in each of 1"):
        load_plan(tmp_path / "p.json")


def test_units_file_missing_names_the_command(tmp_path):
    with pytest.raises(UspxError, match="--units"):
        load_units(tmp_path)


def test_dense_channel_scores_include_the_shared_experts_gate(one_thread):
    """qwen2_moe's shared expert writes sigmoid(gate(x)) * mlp(x): a channel's reconstruction is the
    squared change of transformers' MoE block output with its down column zeroed, and its attribution
    the autograd derivative with that column scaled."""
    model = tiny_model("qwen2_moe")
    items = _items(n=3)
    us = score_units(model, items, ["channels"], ["reconstruction", "attribution"], bootstrap=0)
    layer = adapter_for(model).layers[0]
    t = us.table.to_pandas()
    kinds = set(t[t.kind == "dense_channel"]["index"])
    assert kinds == {0}  # the shared expert (the tiny model has no dense layers)
    down = layer.block.shared_expert.down_proj.weight
    x = _block_inputs(model, layer, items)
    t = t[(t.kind == "dense_channel") & (t.layer == layer.index)]
    rec = t[t.method == "reconstruction"].set_index("channel").value
    c = int(rec.idxmax())
    with torch.no_grad():
        base = layer.block(x[None]).reshape(len(x), -1).double()
        saved = down[:, c].clone()
        down[:, c] = 0
        without = layer.block(x[None]).reshape(len(x), -1).double()
        down[:, c] = saved
    assert rec[c] == pytest.approx(float((base - without).norm(dim=1).pow(2).sum()) / len(x), rel=1e-4)
    m = torch.ones((), requires_grad=True)
    onehot = torch.zeros(down.shape[1]).index_fill(0, torch.tensor([c]), 1.0)
    name = f"model.layers.{layer.index}.mlp.shared_expert.down_proj.weight"
    loss = _mean_loss(model, items, {name: down.detach() * (1 + (m - 1) * onehot)})
    (grad,) = torch.autograd.grad(loss, m)
    assert t[t.method == "attribution"].set_index("channel").value[c] == pytest.approx(-float(grad), rel=1e-3, abs=1e-9)


def test_latent_attention_heads_are_refused():
    model = tiny_model("deepseek_v3")
    with pytest.raises(UspxError, match="latent attention"):
        score_units(model, _items(n=1), ["heads"], ["reconstruction"], bootstrap=0)


def test_joint_selection_weighs_dense_mlp_channels(one_thread):
    """qwen2_moe: the shared expert's width is one more free count; the choice is the brute-force best
    over every shape, its size that of the model transformers builds with it."""
    from transformers import AutoModelForCausalLM

    from uspx.plan.joint import select_units

    model = tiny_model("qwen2_moe")
    cfg = model.config
    us = score_units(model, _items(n=3), ["channels", "heads"], ["reconstruction"], bootstrap=0)
    rng = np.random.default_rng(1)
    experts = {l.index: rng.gamma(1.0, 0.05, l.num_experts) for l in adapter_for(model).layers}
    t = us.table.to_pandas()
    E, I, S = cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    cache = {}

    def size(n, w, g, r, s):
        if (n, w, g, r, s) not in cache:
            c = copy.deepcopy(cfg)
            c.num_experts, c.moe_intermediate_size, c.shared_expert_intermediate_size = n, w, s
            c.head_dim = cfg.hidden_size // cfg.num_attention_heads
            c.num_key_value_heads, c.num_attention_heads = g, g * r
            cache[n, w, g, r, s] = sum(p.numel() for p in AutoModelForCausalLM.from_config(c).parameters()) * 4
        return cache[n, w, g, r, s]

    def layer_values(kind, layer):
        x = t[(t.kind == kind) & (t.layer == layer)]
        return x

    def value(n, w, g, r, s):
        v = 0.0
        for layer, ev in experts.items():
            keep = np.argsort(-ev, kind="stable")[:n]
            ch = layer_values("channel", layer)
            v += ev[keep].sum() + sum(np.sort(ch[ch["index"] == e].value.to_numpy())[::-1][:w].sum() for e in keep)
            dn = layer_values("dense_channel", layer)
            v += np.sort(dn.value.to_numpy())[::-1][:s].sum()
        for layer in range(cfg.num_hidden_layers):
            gv = layer_values("kv_group", layer).sort_values("index").value.to_numpy()
            hv = layer_values("query_head", layer).sort_values("index").value.to_numpy().reshape(len(gv), -1)
            kg = np.argsort(-gv, kind="stable")[:g]
            v += gv[kg].sum() + sum(np.sort(hv[k])[::-1][:r].sum() for k in kg)
        return v

    full, least = size(E, I, 2, 2, S), size(2, 8, 1, 1, 8)
    shared = set()
    for share in (0.15, 0.5):
        budget = int(least + share * (full - least))
        plan = select_units(experts, us, cfg, budget=budget, dtype="fp32", context=0, method="reconstruction")
        best = max(((value(*s), s) for s in itertools.product(range(2, E + 1), (8, 16), (1, 2), (1, 2), (8, 16, 24, 32))
                    if size(*s) <= budget), key=lambda p: p[0])
        shape = plan.settings["shape"]
        got = (shape["experts"], shape["width"], shape["kv_groups"], shape["heads_per_group"],
               shape["dense"]["shared_expert_intermediate_size"])
        assert got == best[1] and plan.value == pytest.approx(best[0])
        assert plan.predicted_bytes == size(*got)
        assert plan.channels["dense"][0]["path"] == "mlp.shared_expert"
        shared.add(got[4])
    assert min(shared) < S  # a tight budget narrows the shared expert too
