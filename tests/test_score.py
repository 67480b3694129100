import copy
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from conftest import make_tokenizer, save_tiny, write_jsonl
from uspx.io import FingerprintMismatch, UspxError
from uspx.models import adapter_for, load_model, model_fingerprint
from uspx.score import DEFAULT_METHOD, METHODS, compute_loss, load_scores, score
from uspx.score.api import KEEP_METHODS

SCORED = [m for m in METHODS if m not in KEEP_METHODS and m != "capability"]  # need neither a kept count nor tool families
from uspx.score.bootstrap import Factor, estimate
from uspx.trace import trace
from uspx.workload import EncodedItem, encode, load_workload

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend

ROWS = [
    {"prompt": f"def f{i}(x):", "completion": f" return x * {i} + {i * i}", "family": "code", "split": "calibration"}
    for i in range(4)
] + [
    {"text": f"the {i} quick brown foxes jump " * (1 + i % 2), "family": "prose", "split": "calibration"}
    for i in range(3)
]


# ----- helpers: independent re-implementations ---------------------------------------------------
def manual_item_loss(model, ids: list[int], start: int) -> tuple[float, int]:
    """Summed CE of tokens max(start,1)..n-1, one unpadded sequence, full logits."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    first = max(start, 1)
    loss = F.cross_entropy(logits[first - 1 : len(ids) - 1], torch.tensor(ids[first:]), reduction="sum")
    return float(loss), len(ids) - first


def manual_set_loss(model, items) -> float:
    total = n = 0
    for e in items:
        s, c = manual_item_loss(model, e.input_ids, e.completion_start)
        total, n = total + s, n + c
    return total / n


def value_of(df, method, layer, expert, col="value"):
    row = df[(df.method == method) & (df.layer == layer) & (df.expert == expert)]
    assert len(row) == 1
    return row[col].iloc[0]


# ----- a hand-written trace ------------------------------------------------------------------------
def write_hand_trace(folder, model_dir, wl_path, rows):
    """A trace folder written by hand: manifest, items and one shard in the tracer's schema."""
    folder.mkdir()
    wl = load_workload(wl_path)
    items = pa.table(dict(
        sample=pa.array([0, 1, 2, 3], pa.int32()), id=["a", "b", "c", "d"], family=["x"] * 4,
        split=["calibration", "calibration", "calibration", "heldout"],
        tokens=pa.array([2, 1, 1, 1], pa.int32()), completion_start=pa.array([0] * 4, pa.int32()),
    ))
    pq.write_table(items, folder / "items.parquet")
    split_of = {0: "calibration", 1: "calibration", 2: "calibration", 3: "heldout"}
    cols = dict(
        sample=pa.array([r[0] for r in rows], pa.int32()),
        position=pa.array([r[1] for r in rows], pa.int32()),
        token_id=pa.array([5] * len(rows), pa.int32()),
        family=pa.array(["x"] * len(rows)).dictionary_encode(),
        split=pa.array([split_of[r[0]] for r in rows]).dictionary_encode(),
        is_completion=pa.array([True] * len(rows)),
        layer=pa.array([r[2] for r in rows], pa.int16()),
        expert_ids=pa.FixedSizeListArray.from_arrays(pa.array([i for r in rows for i in r[3]], pa.int16()), 2),
        expert_weights=pa.FixedSizeListArray.from_arrays(pa.array([w for r in rows for w in r[4]], pa.float32()), 2),
        expert_norms=pa.FixedSizeListArray.from_arrays(pa.array([n for r in rows for n in r[5]], pa.float32()), 2),
    )
    pq.write_table(pa.table(cols), folder / "shard-00000.parquet")
    manifest = dict(
        format="uspx-trace/1", uspx_version="0", complete=True,
        model=dict(source=str(model_dir), label="tiny", fingerprint=model_fingerprint(model_dir), family="gpt_oss",
                   model_type="gpt_oss", moe_layers=[0, 1], num_experts=8, top_k=2),
        workload=dict(source=str(wl_path), fingerprint=wl.fingerprint, items=4, families=["x"]),
        options=dict(split="all", batch_size=8, max_length=64, logits=False, norms=True, items_per_shard=64),
        shards=[dict(index=0, file="shard-00000.parquet", first_item=0, end_item=4, rows=len(rows), tokens=5)],
    )
    (folder / "manifest.json").write_text(json.dumps(manifest))


# (sample, position, layer, expert ids, weights, norms); samples 0-2 calibration, 3 held out.
# Token (0, 0) goes to expert 0 in both layers; expert 6 serves only the held-out token.
HAND_ROWS = [
    (0, 0, 0, [0, 1], [0.75, 0.25], [2.0, 4.0]),
    (0, 1, 0, [0, 2], [0.5, 0.5], [1.0, 3.0]),
    (1, 0, 0, [1, 0], [0.6, 0.4], [5.0, 3.0]),
    (2, 0, 0, [3, 2], [0.9, 0.1], [1.0, 10.0]),
    (3, 0, 0, [6, 7], [0.5, 0.5], [100.0, 100.0]),
    (0, 0, 1, [0, 5], [0.8, 0.2], [1.0, 2.0]),
    (0, 1, 1, [5, 4], [0.7, 0.3], [2.0, 2.0]),
    (1, 0, 1, [0, 4], [0.5, 0.5], [6.0, 1.0]),
    (2, 0, 1, [5, 0], [0.9, 0.1], [1.0, 20.0]),
    (3, 0, 1, [6, 7], [0.5, 0.5], [100.0, 100.0]),
]


def test_trace_scores_match_hand_computation(tmp_path, tiny_gpt_oss_dir):
    wl = write_jsonl(tmp_path / "w.jsonl", [{"prompt": c, "id": c} for c in "abcd"])
    write_hand_trace(tmp_path / "t", tiny_gpt_oss_dir, wl, HAND_ROWS)
    st = score(tiny_gpt_oss_dir, tmp_path / "t", wl, tmp_path / "s", ("frequency", "reap", "ean"), progress=False)
    df = load_scores(tmp_path / "s").to_pandas()
    assert len(df) == 3 * 2 * 8
    expected = {  # (layer, expert): (routed tokens, frequency, reap, ean), calibration tokens = 4
        (0, 0): (3, 3 / 4, (0.75 * 2 + 0.5 * 1 + 0.4 * 3) / 3, (2 + 1 + 3) / 3),
        (0, 1): (2, 2 / 4, (0.25 * 4 + 0.6 * 5) / 2, (4 + 5) / 2),
        (0, 2): (2, 2 / 4, (0.5 * 3 + 0.1 * 10) / 2, (3 + 10) / 2),
        (0, 3): (1, 1 / 4, 0.9 * 1, 1.0),
        (0, 6): (0, 0.0, 0.0, 0.0),  # routed only on the held-out token
        (1, 0): (3, 3 / 4, (0.8 * 1 + 0.5 * 6 + 0.1 * 20) / 3, (1 + 6 + 20) / 3),
        (1, 5): (3, 3 / 4, (0.2 * 2 + 0.7 * 2 + 0.9 * 1) / 3, (2 + 2 + 1) / 3),
        (1, 4): (2, 2 / 4, (0.3 * 2 + 0.5 * 1) / 2, (2 + 1) / 2),
        (1, 7): (0, 0.0, 0.0, 0.0),
    }
    for (layer, expert), (tokens, freq, reap, ean) in expected.items():
        for method, want in (("frequency", freq), ("reap", reap), ("ean", ean)):
            assert value_of(df, method, layer, expert) == pytest.approx(want, rel=1e-6), (method, layer, expert)
            assert value_of(df, method, layer, expert, "tokens") == tokens
    assert (df.n_prompts == 3).all()
    # never routed: no data behind a mean over routed tokens -> NaN interval
    assert np.isnan(value_of(df, "reap", 0, 6, "ci_low"))
    routed = df[df.tokens > 0]
    assert (routed.ci_low <= routed.value + 1e-12).all() and (routed.value <= routed.ci_high + 1e-12).all()
    assert st.meta["method_source"] == {"frequency": "trace", "reap": "trace", "ean": "trace"}
    adapter = adapter_for(load_model(tiny_gpt_oss_dir).model)
    assert (df.cost_bytes == adapter.bytes_per_expert(adapter.layers[0])).all()


def test_bootstrap_contains_estimate_and_shrinks():
    rng = np.random.default_rng(1)

    def ratio_ci(p):
        routed = rng.integers(1, 20, size=(p, 1, 3)).astype(float)
        num = routed * rng.gamma(2.0, 1.0, size=(p, 1, 3))
        return estimate([Factor(num, routed)], 300, seed=0)

    small, big = ratio_ci(15), ratio_ci(600)
    for est in (small, big):
        assert (est.ci_low <= est.value).all() and (est.value <= est.ci_high).all()
    assert ((big.ci_high - big.ci_low) < 0.5 * (small.ci_high - small.ci_low)).all()
    # seeded: same draws twice
    num, den = np.arange(10.0).reshape(10, 1, 1), np.ones((10, 1, 1))
    a, b = estimate([Factor(num, den)], 100, seed=3), estimate([Factor(num, den)], 100, seed=3)
    assert np.array_equal(a.ci_low, b.ci_low) and a.value[0, 0] == pytest.approx(4.5)


# ----- model-based scores on a tiny gpt_oss --------------------------------------------------------
@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    d = tmp_path_factory.mktemp("score")
    model_dir = save_tiny("gpt_oss", d / "m")
    wl = write_jsonl(d / "w.jsonl", ROWS)
    trace(model_dir, wl, d / "t", norms=True, progress=False)
    st = score(model_dir, d / "t", wl, d / "s", METHODS, progress=False, bootstrap=50, batch_size=3)
    lm = load_model(model_dir)
    items = encode(load_workload(wl), make_tokenizer(), 256)
    return dict(dir=d, model_dir=model_dir, wl=wl, table=st, df=st.to_pandas(), model=lm.model, items=items)


def busiest(df, layer):
    rows = df[(df.method == "frequency") & (df.layer == layer)]
    return int(rows.sort_values("tokens").expert.iloc[-1])


def test_table_complete_and_reloads(scored):
    df = scored["df"]
    assert sorted(df.method.unique()) == sorted(SCORED)
    assert len(df) == len(SCORED) * 2 * 8
    back = load_scores(scored["dir"] / "s")
    assert back.methods == SCORED and back.to_pandas().equals(df)
    back.check(model=back.model_fingerprint)
    with pytest.raises(FingerprintMismatch):
        back.check(model="0" * 64)
    with pytest.raises(FingerprintMismatch):
        back.check(workload="0" * 64)
    assert DEFAULT_METHOD in METHODS


@pytest.mark.parametrize("layer", [0, 1])  # layer 1 also checks the replayed layer-0 prefix
def test_natural_ablation_equals_zeroed_expert(scored, layer):
    model, items, df = scored["model"], scored["items"], scored["df"]
    e = busiest(df, layer)
    base = manual_set_loss(model, items)
    zeroed = copy.deepcopy(model)
    experts = zeroed.model.layers[layer].mlp.experts
    with torch.no_grad():  # f_e(x) = act(x W_gu + b_gu) W_d + b_d: zeroing W_d and b_d makes it exactly 0
        experts.down_proj[e].zero_()
        experts.down_proj_bias[e].zero_()
    want = manual_set_loss(zeroed, items) - base
    assert abs(want) > 1e-4  # the check means something
    assert value_of(df, "ablation_natural", layer, e) == pytest.approx(want, abs=2e-5)
    assert value_of(df, "ablation_natural", layer, e, "tokens") == sum(
        len(i.input_ids) - max(i.completion_start, 1) for i in items)


@pytest.mark.parametrize("layer", [0, 1])
def test_interventional_ablation_equals_router_bias_ban(scored, layer):
    model, items, df = scored["model"], scored["items"], scored["df"]
    e = busiest(df, layer)
    base = manual_set_loss(model, items)
    banned = copy.deepcopy(model)
    with torch.no_grad():
        banned.model.layers[layer].mlp.router.bias[e] = float("-inf")
    want = manual_set_loss(banned, items) - base
    assert abs(want) > 1e-4
    assert value_of(df, "ablation_interventional", layer, e) == pytest.approx(want, abs=2e-5)
    # natural and interventional differ (the next expert takes the slot)
    assert value_of(df, "ablation_natural", layer, e) != pytest.approx(want, abs=1e-4)


def test_usage_x_marginal_uses_routed_tokens_only(scored):
    model, items, df = scored["model"], scored["items"], scored["df"]
    layer = 1
    e = busiest(df, layer)
    banned = copy.deepcopy(model)
    with torch.no_grad():
        banned.model.layers[layer].mlp.router.bias[e] = float("-inf")
    routed_tokens = all_tokens = 0
    delta_sum, delta_n = 0.0, 0
    for it in items:
        ids = torch.tensor([it.input_ids])
        first, n = max(it.completion_start, 1), len(it.input_ids)
        with torch.no_grad():
            out = model(input_ids=ids, output_router_logits=True)
            logits_b = banned(input_ids=ids).logits[0]
        top = torch.topk(out.router_logits[layer].reshape(n, -1), 2, dim=-1).indices  # gpt_oss: top-k on logits
        hit = (top == e).any(-1)
        routed_tokens, all_tokens = routed_tokens + int(hit.sum()), all_tokens + n
        tgt = ids[0, first:]
        d = F.cross_entropy(logits_b[first - 1 : n - 1], tgt, reduction="none") - F.cross_entropy(
            out.logits[0][first - 1 : n - 1], tgt, reduction="none")
        delta_sum += float(d[hit[first - 1 : n - 1]].sum())
        delta_n += int(hit[first - 1 : n - 1].sum())
    want = routed_tokens / all_tokens * delta_sum / delta_n
    assert value_of(df, "usage_x_marginal", layer, e) == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert value_of(df, "usage_x_marginal", layer, e, "tokens") == delta_n


def test_taylor_equals_hand_computed_fisher(scored):
    model, items, df = scored["model"], scored["items"], scored["df"]
    layer, e = 1, busiest(scored["df"], 1)
    m = copy.deepcopy(model)
    experts = m.model.layers[layer].mlp.experts
    params = [experts.gate_up_proj, experts.gate_up_proj_bias, experts.down_proj, experts.down_proj_bias]
    terms = []
    for it in items:
        ids = torch.tensor([it.input_ids])
        first = max(it.completion_start, 1)
        logits = m(input_ids=ids).logits[0].float()
        loss = F.cross_entropy(logits[first - 1 : -1], ids[0, first:])  # mean over the prompt's targets
        grads = torch.autograd.grad(loss, params)
        terms.append(0.5 * sum(float((p[e].detach().double() ** 2 * g[e].double() ** 2).sum()) for p, g in zip(params, grads)))
    want = float(np.mean(terms))
    assert want > 0
    assert value_of(df, "taylor", layer, e) == pytest.approx(want, rel=1e-4)


def test_reconstruction_equals_block_output_change(scored):
    model, items, df = scored["model"], scored["items"], scored["df"]
    layer, e = 1, busiest(scored["df"], 1)
    block = model.model.layers[layer].mlp
    inputs = []
    h = block.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for it in items:
            model(input_ids=torch.tensor([it.input_ids]))
    h.remove()
    x = torch.cat(inputs)
    banned = copy.deepcopy(block)
    with torch.no_grad():
        banned.router.bias[e] = float("-inf")
        y, y_e = block(x[None])[0][0], banned(x[None])[0][0]
    want = float((y - y_e).double().pow(2).sum(1).mean())
    assert want > 0
    assert value_of(df, "reconstruction", layer, e) == pytest.approx(want, rel=1e-4)


def test_never_routed_expert_scores_zero(tmp_path):
    from uspx.testing import tiny_model

    model = tiny_model("gpt_oss")
    with torch.no_grad():
        model.model.layers[1].mlp.router.bias[3] = -1e4  # expert (1, 3) can never win a slot
    model.save_pretrained(tmp_path / "m")
    make_tokenizer().save_pretrained(tmp_path / "m")
    wl = write_jsonl(tmp_path / "w.jsonl", ROWS[:3])
    trace(tmp_path / "m", wl, tmp_path / "t", progress=False)
    st = score(tmp_path / "m", tmp_path / "t", wl, tmp_path / "s",
               ("frequency", "reconstruction", "ablation_natural"), progress=False, bootstrap=20)
    df = st.to_pandas()
    for method in ("frequency", "reconstruction", "ablation_natural"):
        assert value_of(df, method, 1, 3) == 0.0, method
    assert value_of(df, "reconstruction", 1, 3, "tokens") == 0
    assert value_of(df, "reconstruction", 1, 2) > 0 or value_of(df, "reconstruction", 1, 2, "tokens") == 0
    assert df[(df.method == "reconstruction") & (df.tokens > 0)].value.gt(0).all()


def test_fingerprint_mismatch_between_trace_and_model(tmp_path, tiny_gpt_oss_dir):
    other = save_tiny("gpt_oss", tmp_path / "other", seed=1)
    wl = write_jsonl(tmp_path / "w.jsonl", ROWS[:2])
    trace(tiny_gpt_oss_dir, wl, tmp_path / "t", progress=False)
    with pytest.raises(FingerprintMismatch):
        score(other, tmp_path / "t", wl, tmp_path / "s", ("frequency",), progress=False)
    wl2 = write_jsonl(tmp_path / "w2.jsonl", ROWS[2:4])
    with pytest.raises(FingerprintMismatch):
        score(tiny_gpt_oss_dir, tmp_path / "t", wl2, tmp_path / "s", ("frequency",), progress=False)
    with pytest.raises(UspxError, match="unknown score method"):
        score(tiny_gpt_oss_dir, tmp_path / "t", wl, tmp_path / "s", ("magic",), progress=False)
    assert not (tmp_path / "s").exists()


def test_loss_on_completion_tokens_only(tiny_gpt_oss_dir):
    model = load_model(tiny_gpt_oss_dir).model
    ids = [10, 20, 30, 40, 50, 60, 70, 80]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    # completion = tokens 5..7, predicted by the logits at positions 4..6
    want = F.cross_entropy(logits[4:7], torch.tensor(ids[5:8]), reduction="sum").item()
    # no completion: tokens 1..3 of a 4-token item
    want_short = F.cross_entropy(logits[0:3], torch.tensor(ids[1:4]), reduction="sum").item()
    items = [EncodedItem(0, "a", "f", "calibration", ids, 5), EncodedItem(1, "b", "f", "calibration", ids[:4], 0)]
    for batch_size in (1, 2):  # batched with right padding: same numbers
        got = compute_loss(model, items, batch_size=batch_size)
        assert got.n_tokens.tolist() == [3, 3]
        assert got.sum_loss[0] == pytest.approx(want, rel=1e-5)
        assert got.sum_loss[1] == pytest.approx(want_short, rel=1e-5)
        assert got.mean() == pytest.approx((want + want_short) / 6, rel=1e-5)
        assert list(got)[0][1] == 3


def test_load_scores_rejects_damaged_tables(scored, tmp_path):
    import shutil

    folder = tmp_path / "s"
    shutil.copytree(scored["dir"] / "s", folder)
    t = pq.read_table(folder / "scores.parquet")
    pq.write_table(t.slice(1), folder / "scores.parquet")
    with pytest.raises(UspxError, match="rows"):
        load_scores(folder)
    (folder / "scores.json").write_text("{}")
    with pytest.raises(UspxError, match="not a uspx score table"):
        load_scores(folder)


def test_guided_ablation_method_with_enough_budget_is_exhaustive_ablation(scored, tmp_path):
    """ablation_guided with a budget covering every (expert, item) pair measures every one of them:
    its values are interventional ablation's, computed by the exhaustive method in the fixture; a
    small budget is kept to, and is recorded with the exhaustive count."""
    d, ref = scored["dir"], scored["df"]
    st = score(scored["model_dir"], d / "t", scored["wl"], tmp_path / "s", ("ablation_guided",),
               keep="50%", ablation_budget=50.0, progress=False, bootstrap=0)
    df = st.to_pandas()
    full = ref[ref.method == "ablation_interventional"].sort_values(["layer", "expert"]).value.to_numpy()
    guided = df[df.method == "ablation_guided"].sort_values(["layer", "expert"]).value.to_numpy()
    assert np.abs(full).max() > 1e-4
    np.testing.assert_allclose(guided, full, rtol=1e-4, atol=1e-6)
    small = score(scored["model_dir"], d / "t", scored["wl"], tmp_path / "s2", ("ablation_guided",), keep="50%",
                  ablation_budget=0.1, progress=False)
    counts = small.meta["ablation_forwards"]["ablation_guided"]
    from uspx.score.bandit import SURROGATE_FORWARDS

    assert counts["forwards"] <= max(int(0.1 * counts["exhaustive_forwards"]), SURROGATE_FORWARDS * len(scored["items"]))
    with pytest.raises(UspxError, match="keep"):
        score(scored["model_dir"], d / "t", scored["wl"], tmp_path / "s3", ("ablation_guided",), progress=False)


# ----- the method table ----------------------------------------------------------------------------
def test_a_method_added_to_the_table_is_scored(tmp_path, tiny_gpt_oss_dir, monkeypatch):
    """A method is one object in the table: declaring the trace's routing sums as its need is enough
    for score() to gather them and write its column."""
    from dataclasses import dataclass

    from uspx.score.methods import REGISTRY, Method, Needs

    @dataclass(frozen=True)
    class RoutedPerPrompt(Method):
        def source(self, run):
            return "trace"

        def needs(self, run):
            return Needs(trace_stats=True)

        def compute(self, run):
            count = run.stats.count.astype(float)
            run.add(self.name, [Factor(count, np.ones((len(count), 1, 1)))], count.sum(0), len(count))

    monkeypatch.setitem(REGISTRY, "routed_per_prompt", RoutedPerPrompt("routed_per_prompt", streams=True))
    wl = write_jsonl(tmp_path / "w.jsonl", [{"prompt": c, "id": c} for c in "abcd"])
    write_hand_trace(tmp_path / "t", tiny_gpt_oss_dir, wl, HAND_ROWS)
    st = score(tiny_gpt_oss_dir, tmp_path / "t", wl, tmp_path / "s", ("routed_per_prompt", "frequency"), progress=False)
    df = st.to_pandas()
    # routed calibration tokens in HAND_ROWS (samples 0-2) over the 3 calibration prompts
    for (layer, expert), routed in {(0, 0): 3, (0, 1): 2, (0, 3): 1, (0, 6): 0, (1, 5): 3, (1, 4): 2}.items():
        assert value_of(df, "routed_per_prompt", layer, expert) == pytest.approx(routed / 3)
        assert value_of(df, "routed_per_prompt", layer, expert, "tokens") == routed
    assert list(df.method.unique()) == ["routed_per_prompt", "frequency"]
    assert st.meta["method_source"] == {"routed_per_prompt": "trace", "frequency": "trace"}


def test_passes_shared_by_methods_run_once(scored, tmp_path, monkeypatch):
    """One baseline pass for every method built on it, one ablation pass per removal kind."""
    import uspx.score.methods as sm

    calls = []
    real_baseline, real_ablation = sm.run_baseline, sm.run_ablation
    monkeypatch.setattr(sm, "run_baseline", lambda *a, **k: calls.append("baseline") or real_baseline(*a, **k))
    monkeypatch.setattr(sm, "run_ablation", lambda *a, **k: calls.append(a[3]) or real_ablation(*a, **k))
    d = scored["dir"]
    score(scored["model_dir"], d / "t", scored["wl"], tmp_path / "a", ("ablation_interventional", "usage_x_marginal",
          "taylor"), bootstrap=0, progress=False)
    assert calls == ["baseline", "interventional"]
    calls.clear()
    score(scored["model_dir"], d / "t", scored["wl"], tmp_path / "b", ("ablation_interventional", "usage_x_marginal"),
          marginal="natural", bootstrap=0, progress=False)
    assert sorted(calls) == ["baseline", "interventional", "natural"]


def test_sequential_refuses_methods_it_cannot_score(tmp_path):
    # refused before the trace or the model is read
    with pytest.raises(UspxError, match="l0_layer are not scored sequentially.*frequency, reap, ean, reconstruction"):
        score("default", tmp_path / "t", "python_dev", tmp_path / "s", ["frequency", "l0_layer"], keep=2,
              sequential=2, progress=False)
    with pytest.raises(UspxError, match="capability are not scored sequentially"):
        score("default", tmp_path / "t", "python_dev", tmp_path / "s", ["capability"], tool_families=["arith"],
              sequential=2, progress=False)


def test_sequential_scores_record_their_prompts(scored, tmp_path):
    d = scored["dir"]
    st = score(scored["model_dir"], d / "t", scored["wl"], tmp_path / "s", ("frequency",), sequential=8, bootstrap=0,
               progress=False)
    assert st.meta["prompts"]["model"] == len(ROWS)  # every row is a calibration item
    assert st.meta["prompts"]["model_tokens"] == sum(len(e.input_ids) for e in scored["items"])
    assert st.meta["method_source"] == {"frequency": "model"}
