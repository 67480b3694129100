"""uspx.analyze: every statistic against hand-computed values on a tiny hand-written trace, the
seed tool's three bugs, cold-vs-undetermined, cache policies, and the model sections on tiny gpt_oss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from uspx.analyze import SECTIONS, analyze, resolve_sections
from uspx.analyze.blocks import Block, Vocab, iter_blocks
from uspx.analyze.prefetch import simulate
from uspx.analyze.stats import wilson
from uspx.analyze.utilisation import Utilisation
from uspx.io import UspxError, write_json
from uspx.trace import Trace

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend

# token: (sample, position, token_id, family, [(ids, weights) for layer 0, layer 1])
# The first slot is NOT always the highest weight (t0, t3, t4 at layer 0; t1, t3 at layer 1).
TOKENS = [
    (0, 0, 5, "a", [([1, 0], [0.3, 0.7]), ([2, 3], [0.6, 0.4])]),
    (0, 1, 6, "a", [([0, 1], [0.8, 0.2]), ([3, 2], [0.3, 0.7])]),
    (1, 0, 5, "a", [([0, 2], [0.9, 0.1]), ([2, 1], [0.55, 0.45])]),
    (1, 1, 7, "a", [([1, 0], [0.4, 0.6]), ([3, 2], [0.2, 0.8])]),
    (2, 0, 5, "b", [([3, 2], [0.4, 0.6]), ([1, 0], [0.7, 0.3])]),
    (2, 1, 6, "b", [([2, 3], [0.9, 0.1]), ([0, 1], [0.6, 0.4])]),
]


def write_trace(path: Path, tokens=TOKENS, layers=(0, 1), E: int = 4, k: int = 2, n_items: int = 3) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    rows = dict(sample=[], position=[], token_id=[], family=[], split=[], is_completion=[], layer=[], ids=[], w=[])
    for s, p, t, f, per_layer in tokens:
        for layer, (ids, w) in zip(layers, per_layer):
            for key, v in zip(("sample", "position", "token_id", "family", "split", "is_completion", "layer"),
                              (s, p, t, f, "calibration", True, layer)):
                rows[key].append(v)
            rows["ids"].append(ids)
            rows["w"].append(w)
    fixed = lambda vals, typ: pa.FixedSizeListArray.from_arrays(pa.array(np.array(vals).reshape(-1), typ), k)
    table = pa.table(dict(
        sample=pa.array(rows["sample"], pa.int32()), position=pa.array(rows["position"], pa.int32()),
        token_id=pa.array(rows["token_id"], pa.int32()), family=pa.array(rows["family"]).dictionary_encode(),
        split=pa.array(rows["split"]).dictionary_encode(), is_completion=pa.array(rows["is_completion"]),
        layer=pa.array(rows["layer"], pa.int16()), expert_ids=fixed(rows["ids"], pa.int16()),
        expert_weights=fixed(rows["w"], pa.float32()),
    ))
    pq.write_table(table, path / "shard-00000.parquet")
    pq.write_table(pa.table(dict(sample=pa.array(range(n_items), pa.int32()))), path / "items.parquet")
    write_json(path / "manifest.json", dict(
        format="uspx-trace/1", complete=True, model=dict(moe_layers=list(layers), num_experts=E, top_k=k, fingerprint="x"),
        workload=dict(fingerprint="y", source="hand", items=n_items),
        shards=[dict(index=0, file="shard-00000.parquet", rows=table.num_rows)],
    ))
    return path


@pytest.fixture
def hand(tmp_path) -> dict:
    out = analyze(write_trace(tmp_path / "trace"), tmp_path / "report", only="utilisation,circuits,attention,prefetch",
                  progress=False, capacities=[2, 3])
    return json.loads((tmp_path / "report" / "report.json").read_text()) | {"_html": (tmp_path / "report" / "report.html").read_text()}


def test_sections_and_aliases():
    assert resolve_sections("cold,circuits") == ["utilisation", "circuits"]
    assert resolve_sections(None) == SECTIONS
    with pytest.raises(UspxError):
        resolve_sections("nonsense")


def test_blocks_survive_batches_that_split_tokens(tmp_path):
    tr = Trace(write_trace(tmp_path / "t"))
    whole = list(iter_blocks(tr, Vocab()))
    small = list(iter_blocks(tr, Vocab(), batch_size=3))  # 3 rows: every other batch ends mid-token
    cat = lambda bs, f: np.concatenate([getattr(b, f) for b in bs])
    for f in ("sample", "position", "token", "ids", "weights"):
        assert np.array_equal(cat(whole, f), cat(small, f))
    assert cat(whole, "top1").tolist() == [[0, 2], [0, 2], [0, 2], [0, 2], [2, 1], [2, 0]]


def test_utilisation_by_hand(hand):
    u = hand["utilisation"]
    assert u["tokens"] == 6 and u["prompts"] == 3
    assert np.allclose(u["p_active"], [[4 / 6, 3 / 6, 3 / 6, 2 / 6], [2 / 6, 3 / 6, 4 / 6, 3 / 6]])
    lo, hi = wilson(4, 6)
    assert math.isclose(u["wilson_lo"][0][0], float(lo)) and math.isclose(u["wilson_hi"][0][0], float(hi))
    counts = np.array([4, 3, 3, 2])
    assert math.isclose(u["balance"]["cv"]["value"][0], counts.std() / counts.mean())
    assert math.isclose(u["balance"]["max_over_mean"]["value"][0], 4 / 3)
    q = counts / 12
    assert math.isclose(u["balance"]["entropy_norm"]["value"][0], -(q * np.log(q)).sum() / np.log(4))
    # per family: family b = tokens t4, t5; layer 0 hits {2: 2, 3: 2}
    assert u["families"]["b"]["tokens"] == 2
    assert np.allclose(u["families"]["b"]["p_active"][0], [0, 0, 1, 1])
    # position entropy at position 0, layer 0: selections {0,1},{0,2},{2,3} -> (2,1,2,1)/6
    pe = u["position_entropy"]
    p = np.array([2, 1, 2, 1]) / 6
    assert pe["positions"] == [0, 1] and pe["tokens"] == [3, 3]
    assert math.isclose(pe["entropy"][0][0], -(p * np.log(p)).sum())
    # 6 tokens cannot show any expert is below 1%: nothing is "cold"
    assert u["class_counts"]["cold"] == 0


def test_coactivation_divided_by_tokens_not_layers(hand):
    c = hand["circuits"]["coactivation"]
    # layer 0: pair (0,1) in t0, t1, t3 -> 3/6 (the seed tool would report 3/6/2 = 0.25)
    assert math.isclose(c["p"][0][0][1], 0.5)
    assert math.isclose(c["lift"][0][0][1], 0.5 / ((4 / 6) * (3 / 6)))
    assert math.isclose(c["p"][1][2][3], 0.5)
    assert c["count"][0][2][3] == 2  # t4, t5


def test_paths_over_all_prompts_and_highest_weight(hand):
    pa_ = hand["circuits"]["paths"]
    # highest-weight primary: (0,2) x4 over prompts 0 and 1; first-slot reading would give (1,2) for t0
    assert pa_["top"][0]["path"] == [0, 2] and pa_["top"][0]["tokens"] == 4 and pa_["top"][0]["prompts"] == 2
    assert pa_["distinct"] == 3  # a last-prompt-only count would see 2 paths
    assert math.isclose(pa_["repeated_token_share"], 4 / 6)
    tr = hand["circuits"]["transitions"]
    m = np.array(tr["matrices"][1]["conditional"], dtype=float)  # top1 kind
    assert m[0, 0, 2] == 1.0 and math.isclose(np.array(tr["matrices"][1]["lift"], float)[0, 0, 2], 1 / (4 / 6))
    assert math.isclose(tr["top1_predictability"][0], 5 / 6)
    s = np.array(tr["matrices"][0]["conditional"], dtype=float)  # set kind: P(2 at L1 | 0 at L0)
    # 2 at L0: t2, t4, t5, of which only t2 has 2 at L1; 3 at L0: t4, t5, neither has 2 at L1
    assert s[0, 0, 2] == 1.0 and math.isclose(s[0, 2, 2], 1 / 3) and s[0, 3, 2] == 0.0


def test_contexts_same_token(hand):
    rows = hand["attention"]["contexts"]["rows"]
    # layer 0 top-1: token 5 -> (0, 0, 2), token 6 -> (0, 2): (6-2 + 2-0) / (6+2)
    assert math.isclose(rows[0]["pair_differ"], 6 / 8)
    assert rows[0]["token_ids_seen_twice"] == 2


def test_cold_needs_power():
    def block(n: int) -> Block:
        ids = np.zeros((n, 1, 1), dtype=np.int64)
        ids[: n // 2] = 1
        ids[n // 2 :] = 2  # expert 0 and 3 never hit
        ids[: n // 10, 0, 0] = 0
        return Block(np.arange(n) // 10, np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64),
                     ids, np.ones((n, 1, 1), np.float32))

    for n, expected in ((79, "undetermined"), (2000, "cold")):
        u = Utilisation(1, 4, 1, n // 10 + 1)
        u.update(block(n))
        r = u.result([0], ["f"], threshold=0.01)
        assert r["classes"][0][3] == expected, (n, r["classes"])
        assert r["classes"][0][1] == "not_cold"
    assert wilson(0, 79)[1] > 0.01 > wilson(0, 2000)[1]


def test_cache_policies_by_hand():
    seq = [[e] for e in (1, 2, 3, 1, 2, 4, 1, 2)]
    assert simulate(seq, 2, "lru")["hits"] == 0
    assert simulate(seq, 2, "lfu")["hits"] == 1
    assert simulate(seq, 2, "belady")["hits"] == 2
    # Belady is the limit on random multi-expert requests; perfect prefetch hits everything
    rng = np.random.default_rng(0)
    req = [rng.choice(8, 2, replace=False).tolist() for _ in range(300)]
    b = simulate(req, 4, "belady")["hits"]
    assert b >= simulate(req, 4, "lru")["hits"] and b >= simulate(req, 4, "lfu")["hits"]
    perfect = simulate(req, 4, "lru", prefetch=req)
    assert perfect["hits"] == perfect["accesses"] == 600


def test_report_files(hand):
    assert "data:image/png;base64," in hand["_html"] and "1. Utilisation" in hand["_html"]
    assert "dynamics" in hand["skipped"] or hand["sections"] == ["utilisation", "circuits", "attention", "prefetch"]
    rows = hand["prefetch"]["cache"]["rows"]
    assert {(r["policy"], r["capacity"]) for r in rows} >= {("belady", 2), ("lru", 3)}


def test_model_sections_tiny_gpt_oss(tiny_gpt_oss_dir, small_workload, tmp_path):
    import torch

    from uspx.trace import trace

    torch.manual_seed(0)
    from uspx.analyze.stats import single_thread

    with single_thread():  # tiny ops: threads only spin against each other on a shared machine
        trace(tiny_gpt_oss_dir, small_workload, tmp_path / "tr", progress=False, batch_size=16)
    r = analyze(tmp_path / "tr", tmp_path / "rep", model=tiny_gpt_oss_dir, workload=small_workload, progress=False,
                max_items=6, gen_prompts=2, new_tokens=4, cache_tokens=200, threads=1)
    assert not r["skipped"]
    co = r["cooperation"]
    assert [row["k"] for row in co["rows"]] == [1, 2]
    assert co["rows"][-1]["loss"] == co["unablated_loss"] and co["full_k_equals_unablated"]  # exact, independent check
    assert co["rows"][-1]["top1_agreement"] == 1.0
    assert all(math.isfinite(row["loss"]) for row in co["rows"])
    d = r["dynamics"]
    assert len(d["stability"]) == 2 and all(0 <= v <= 1 for v in d["jaccard"])
    sim = r["similarity"]
    assert np.array(sim["layers"][0]["weight_cosine"]).shape == (8, 8)
    assert np.allclose(np.diag(sim["layers"][0]["weight_cosine"]), 1, atol=1e-5)
    assert [m["kind"] for m in sim["merges"]][0] == "most_similar" and all(math.isfinite(m["delta_loss"]) for m in sim["merges"])
    probe = r["attention"]["probe"]["rows"]
    assert len(probe) == 2 and all(0 <= p["accuracy"] <= 1 for p in probe)
    pred = r["prefetch"]["prediction"]["rows"]
    assert {p["method"] for p in pred} == {"router_early", "linear_probe", "most_frequent"}
    assert all(0 <= p["recall"] <= 1 for p in pred)
    assert r["prefetch"]["cache_with_prefetch"]["rows"]
    assert (tmp_path / "rep" / "report.html").stat().st_size > 1000
