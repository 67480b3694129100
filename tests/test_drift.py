"""uspx drift: shares on the dropped experts computed by hand, the end-to-end command on a tiny model."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import save_tiny, write_jsonl
from uspx.cli import app
from uspx.drift import compare_set, drift, dropped_share, judge, prompt_sums, resample
from uspx.io import FingerprintMismatch, write_json
from uspx.trace import Trace
from uspx.trace.format import FORMAT, rows_table, write_items
from uspx.workload import EncodedItem

# two MoE layers (decoder indices 0 and 2), four experts, top-2. Per prompt: its family and, per
# token, (layer 0 ids, layer 0 weights, layer 2 ids, layer 2 weights)
PROMPTS = [
    ("a", [([0, 1], [0.75, 0.25], [0, 2], [0.5, 0.5]),
           ([2, 3], [0.5, 0.5], [1, 3], [0.875, 0.125])]),
    ("a", [([1, 3], [0.625, 0.375], [2, 3], [0.5, 0.5])]),
    ("b", [([0, 2], [0.5, 0.5], [0, 1], [0.25, 0.75]),
           ([0, 1], [0.5, 0.5], [0, 3], [0.5, 0.5]),
           ([3, 0], [1.0, 0.0], [2, 0], [0.5, 0.5])]),
]
DROPPED = np.array([[False, True, False, True],  # layer 0 dropped experts 1 and 3
                    [False, False, True, True]])  # layer 2 dropped experts 2 and 3


def hand_trace(path, prompts=PROMPTS):
    """A trace folder written from the hand-made routing above."""
    path.mkdir()
    items = [EncodedItem(i, f"p{i}", fam, "all", [5] * len(toks), 0) for i, (fam, toks) in enumerate(prompts)]
    write_items(path / "items.parquet", items)
    n = sum(len(t) for _, t in prompts)
    sample = np.concatenate([[i] * len(t) for i, (_, t) in enumerate(prompts)])
    ids = np.array([[t[0], t[2]] for _, toks in prompts for t in toks])
    w = np.array([[t[1], t[3]] for _, toks in prompts for t in toks])
    table = rows_table(sample, np.zeros(n), np.full(n, 5), np.array([p[0] for p in prompts])[sample],
                       np.full(n, "all"), np.zeros(n, bool), [0, 2], dict(expert_ids=ids, expert_weights=w))
    pq.write_table(table, path / "shard-00000.parquet")
    write_json(path / "manifest.json", dict(
        format=FORMAT, complete=True, options=dict(norms=False, max_length=64),
        model=dict(fingerprint="f", moe_layers=[0, 2], num_experts=4, top_k=2), workload=dict(source="hand"),
        shards=[dict(index=0, file="shard-00000.parquet", first_item=0, end_item=len(prompts), rows=2 * n, tokens=n)]))
    return Trace(path)


def test_shares_on_the_dropped_experts_by_hand(tmp_path):
    sums = prompt_sums(hand_trace(tmp_path / "t"), "frequency")
    assert sums.families.tolist() == ["a", "a", "b"]
    # routing mass on dropped experts, summed by hand from PROMPTS
    # layer 0: prompt 0 puts 0.25 (e1) + 0.5 (e3) of 2; prompt 1 puts 1.0 of 1; prompt 2: 0.5 (e1) + 1.0 (e3) of 3
    # layer 2: prompt 0 puts 0.5 (e2) + 0.125 (e3) of 2; prompt 1 puts 1.0 of 1; prompt 2: 0.5 (e3) + 0.5 (e2) of 3
    layer, total = dropped_share(sums.mass, np.ones((3, 1, 1)), DROPPED)
    assert layer == pytest.approx([(0.75 + 1.0 + 1.5) / 6, (0.625 + 1.0 + 1.0) / 6])
    assert total == pytest.approx((0.75 + 1.0 + 1.5 + 0.625 + 1.0 + 1.0) / 12)
    # family a alone (prompts 0 and 1)
    layer_a, _ = dropped_share(sums.mass[:2], np.ones((2, 1, 1)), DROPPED)
    assert layer_a == pytest.approx([1.75 / 3, 1.625 / 3])
    # frequency score: routed-token counts per expert / tokens; share of the counts on the dropped
    # layer 0 counts: e0 4 (p0 t0, p2 t0, t1, t2), e1 3, e2 2, e3 3 -> dropped 6 of 12
    # layer 2 counts: e0 4, e1 2, e2 3, e3 3 -> dropped 6 of 12
    layer_f, total_f = dropped_share(sums.score.num, sums.score.den, DROPPED)
    assert layer_f == pytest.approx([0.5, 0.5]) and total_f == pytest.approx(0.5)
    # a resample counting prompt 2 twice and prompt 1 never: layer 0 (0.75 + 2 * 1.5) / (2 + 6)
    boot, _ = dropped_share(sums.mass, np.ones((3, 1, 1)), DROPPED, np.array([[1.0, 0.0, 2.0]]))
    assert boot[0, 0] == pytest.approx(3.75 / 8)


def test_calibration_interval_and_verdict(tmp_path):
    calibration = prompt_sums(hand_trace(tmp_path / "c", [PROMPTS[1]] * 5), "frequency")  # five identical prompts
    new = prompt_sums(hand_trace(tmp_path / "n"), "frequency")
    cmp = compare_set(new, np.array([0, 1]), calibration, DROPPED, n_boot=50, seed=0)
    assert cmp["prompts"] == 2
    # identical calibration prompts: every resample has the same share, the interval is that point
    # (prompt 1 puts all its layer-0 and layer-2 mass on dropped experts)
    assert cmp["mass"]["calibration"]["share"] == [1.0, 1.0]
    assert cmp["mass"]["calibration"]["ci"] == [[1.0, 1.0], [1.0, 1.0]]
    assert cmp["mass"]["share"] == pytest.approx([1.75 / 3, 1.625 / 3])
    assert resample(5, 2, 7, 0).sum(1).tolist() == [2.0] * 7
    assert cmp["mass"]["total"] == pytest.approx((1.75 + 1.625) / 6)
    # nothing above the calibration's upper bound: covered unless the loss says otherwise
    assert judge(cmp, [0, 2], None, 0.1)["verdict"] == "covered"
    assert judge(cmp, [0, 2], dict(delta=0.2), 0.1)["verdict"] == "re-extract"

    def with_calibration(ci, total_ci):
        return dict(cmp, mass=dict(cmp["mass"], calibration=dict(cmp["mass"]["calibration"], ci=ci, total_ci=total_ci)))

    # all layers together above (0.5625 > 0.55); layer 0 (0.583 > 0.5) above its own, layer 2 (0.542 < 0.9) not
    v = judge(with_calibration([[0, 0], [0.5, 0.9]], [0, 0.55]), [0, 2], None, 0.1)
    assert v["total_above"] == ["mass"] and v["layers_above"]["mass"] == [0] and v["verdict"] == "drifting"
    # both layers above their own interval too: more than half, and no loss to say otherwise
    assert judge(with_calibration([[0, 0], [0.5, 0.5]], [0, 0.55]), [0, 2], None, 0.1)["verdict"] == "re-extract"
    assert judge(with_calibration([[0, 0], [0.5, 0.5]], [0, 0.55]), [0, 2], dict(delta=0.05), 0.1)["verdict"] == "drifting"
    # a layer above its own interval while the whole is within: chance among many layers, covered
    assert judge(with_calibration([[0, 0], [0.5, 0.9]], [0, 0.6]), [0, 2], None, 0.1)["verdict"] == "covered"

CAL = [{"prompt": f"def f{i}(x):", "completion": f" return x + {i} * x", "family": "code"} for i in range(16)]
NEW = ([{"prompt": f"ls -la /tmp/{i} | grep", "completion": f" foo{i} && echo done", "family": "shell"} for i in range(6)]
       + [{"prompt": f"The river {i} runs", "completion": f" to the sea {i} times.", "family": "prose"} for i in range(4)])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_gpt_oss_dir):
    from uspx.extract import extract

    tmp = tmp_path_factory.mktemp("drift_run")
    workload = write_jsonl(tmp / "cal.jsonl", CAL)
    extract(tiny_gpt_oss_dir, workload, tmp / "run", keep="50%", method="frequency", speed=False, progress=False)
    return tmp / "run"


def test_drift_end_to_end(tmp_path, run_dir, one_thread):
    new = write_jsonl(tmp_path / "new.jsonl", NEW)
    res = drift(run_dir, new, tmp_path / "d", bootstrap=200, progress=False)
    on_disk = json.loads((tmp_path / "d" / "drift.json").read_text())
    assert on_disk["verdict"] == res["verdict"] and set(on_disk["families"]) == {"shell", "prose"}
    assert res["score_method"] == "frequency" and res["score_note"] is None
    # the mass share of every new token on the dropped experts, recounted from the new trace's rows
    plan = json.loads((run_dir / "plan.json").read_text())
    rows = pq.read_table(tmp_path / "d" / "trace" / "shard-00000.parquet").to_pandas()
    on, total = np.zeros(2), np.zeros(2)
    for layer, ids, w in zip(rows["layer"], rows["expert_ids"], rows["expert_weights"]):
        for e, x in zip(ids, w):
            total[layer] += x
            on[layer] += x * (int(e) not in plan["kept"][str(layer)])
    assert res["overall"]["mass"]["share"] == pytest.approx(list(on / total), abs=1e-6)
    # the loss delta is the evaluation's, and each verdict follows the rule from the numbers shown
    ev = json.loads((tmp_path / "d" / "evaluation.json").read_text())
    for fam, f in res["families"].items():
        assert f["loss"]["delta"] == pytest.approx(ev["families"][fam]["delta"])
        for kind in ("mass", "score"):
            assert (f[kind]["total"] > f[kind]["calibration"]["total_ci"][1]) == (kind in f["total_above"])
        expected = "re-extract" if f["loss"]["delta"] > res["loss_bound"] else "drifting" if f["total_above"] else "covered"
        assert f["verdict"] == expected
    assert res["loss_bound"] == pytest.approx(max(res["run_delta"], 0) + 0.05)

    # the same trace given instead of the workload: the same numbers, no new trace
    again = drift(run_dir, tmp_path / "d" / "trace", tmp_path / "d2", bootstrap=200, progress=False)
    assert again["overall"]["mass"] == res["overall"]["mass"] and not (tmp_path / "d2" / "trace").exists()
    assert again["families"]["shell"]["loss"] == res["families"]["shell"]["loss"]

    # the command prints the table and the verdict
    out = CliRunner().invoke(app, ["drift", str(run_dir), str(tmp_path / "d" / "trace"), "-o", str(tmp_path / "d3"),
                                   "--bootstrap", "50"])
    assert out.exit_code == 0, out.output
    assert "verdict:" in out.output and "shell" in out.output


def test_drift_refuses_a_trace_of_another_model(tmp_path, run_dir, one_thread):
    from uspx.trace import trace

    other = save_tiny("gpt_oss", tmp_path / "other", seed=3)
    new = write_jsonl(tmp_path / "new.jsonl", NEW[:3])
    trace(other, new, tmp_path / "t", progress=False)
    with pytest.raises(FingerprintMismatch, match=str(tmp_path / "t")):
        drift(run_dir, tmp_path / "t", tmp_path / "d", progress=False)


def test_drift_of_routing_a_server_recorded(tmp_path, run_dir, one_thread):
    """vLLM routing (ids only) of the new traffic: drift counts routed slots, on both sides."""
    from uspx.serving import import_routing
    from uspx.trace import trace

    new = write_jsonl(tmp_path / "new.jsonl", NEW)
    source = json.loads((run_dir / "report.json").read_text())["model"]["source"]
    tr = Trace(trace(source, new, tmp_path / "t", progress=False) and tmp_path / "t")
    rows = tr.table().to_pandas().sort_values(["sample", "position", "layer"])
    lines = []
    for sample, start in zip(tr.items()["sample"].to_pylist(), tr.items()["completion_start"].to_pylist()):
        r = rows[rows["sample"] == sample]
        tokens = r[r["layer"] == 0]["token_id"].tolist()
        ids = np.stack(r["expert_ids"].to_numpy()).reshape(len(tokens), 2, 2).tolist()
        lines.append(dict(request_id=str(sample), prompt_token_ids=tokens[:start],
                          output_token_ids=tokens[start:] + [0], routed_experts=ids))
    import_routing([write_jsonl(tmp_path / "vllm.jsonl", lines)], "vllm", source, tmp_path / "served")
    res = drift(run_dir, tmp_path / "served", tmp_path / "d", bootstrap=100, progress=False)
    assert res["mass"].startswith("routed slots")
    plan = json.loads((run_dir / "plan.json").read_text())
    on = np.zeros(2)
    for layer, ids in zip(rows["layer"], rows["expert_ids"]):
        on[layer] += sum(int(e) not in plan["kept"][str(layer)] for e in ids)
    slots = len(rows) / 2 * 2  # tokens per layer x top-2
    assert res["overall"]["mass"]["share"] == pytest.approx(list(on / slots), abs=1e-6)  # drift.json rounds to 6 places
    # the run scored on frequency: its score share is the same share of routed slots
    assert res["overall"]["score"]["share"] == pytest.approx(list(on / slots), abs=1e-6)
    assert res["families"]["serving"]["loss"] is not None  # the imported items' text is at hand
