"""Routing recorded by vLLM and SGLang, imported: files built in the engines' formats from a uspx
trace of a tiny model must give back that trace (ids) and its frequency scores."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import write_jsonl
from uspx.cli import app
from uspx.io import UspxError
from uspx.score import load_scores, score
from uspx.serving import import_routing
from uspx.trace import Trace, trace

ROWS = [{"prompt": f"def f{i}(x):", "completion": f" return x * {i}", "family": "code"} for i in range(9)]
COLUMNS = ["sample", "position", "token_id", "layer", "expert_ids", "is_completion"]


@pytest.fixture(scope="module")
def traced(tmp_path_factory, tiny_gpt_oss_dir):
    """A uspx trace of the tiny model, and per item (tokens, completion start, ids [T, L, k])."""
    tmp = tmp_path_factory.mktemp("serving")
    wl = write_jsonl(tmp / "w.jsonl", ROWS)
    tr = Trace(trace(tiny_gpt_oss_dir, wl, tmp / "t", progress=False) and tmp / "t")
    rows = tr.table().to_pandas().sort_values(["sample", "position", "layer"])
    items = tr.items().to_pandas()
    per_item = []
    for sample, start in zip(items["sample"], items["completion_start"]):
        r = rows[rows["sample"] == sample]
        tokens = r[r["layer"] == 0]["token_id"].to_numpy()
        ids = np.stack(r["expert_ids"].to_numpy()).reshape(len(tokens), 2, 2)  # 2 MoE layers, top-2
        per_item.append((tokens, int(start), ids))
    return wl, tr, per_item


def rows_of(path):
    t = Trace(path).table().to_pandas().sort_values(["sample", "position", "layer"])
    return t[COLUMNS].reset_index(drop=True)


def test_vllm_routed_experts_import_equals_the_trace(tmp_path, tiny_gpt_oss_dir, traced, one_thread):
    wl, tr, per_item = traced
    lines = []
    for i, (tokens, start, ids) in enumerate(per_item):
        # vLLM: the completion ends with one sampled token never run, so routing has len(tokens) rows
        lines.append(dict(request_id=f"r{i}", prompt_token_ids=tokens[:start].tolist(),
                          output_token_ids=tokens[start:].tolist() + [7], routed_experts=ids.tolist()))
    lines.append(dict(lines[3]))  # the same request logged twice
    extra = dict(lines[5], request_id="r-spec")  # a request whose last rows are routing of rejected drafts
    extra["routed_experts"] = per_item[5][2].tolist() + [[[0, 1], [2, 3]]] * 3
    lines.append(extra)
    src = write_jsonl(tmp_path / "vllm.jsonl", lines)
    res = import_routing([src], "vllm", tiny_gpt_oss_dir, tmp_path / "imp", family="code")
    assert res.kind == "trace" and res.items == len(per_item) + 1
    assert res.dropped == {"duplicate requests": 1, "rows past the request's tokens": 3}
    got, want = rows_of(tmp_path / "imp"), rows_of(tr.path)
    n = len(want)
    assert got.iloc[:n].drop(columns="expert_ids").equals(want.drop(columns="expert_ids"))
    assert np.array_equal(np.stack(got["expert_ids"][:n]), np.stack(want["expert_ids"]))
    # the extra request is item 5's tokens and routing again, the draft rows left out
    assert np.array_equal(np.stack(got["expert_ids"][n:]), np.stack(want[want["sample"] == 5]["expert_ids"]))
    assert np.isnan(np.stack(Trace(tmp_path / "imp").table()["expert_weights"].to_pylist())).all()

    # `uspx score --methods frequency` reads it; its values are the uspx trace's (item 5 counted twice)
    imp = score(tiny_gpt_oss_dir, tmp_path / "imp", tmp_path / "imp" / "workload.jsonl", tmp_path / "s1",
                methods=["frequency"], progress=False, bootstrap=0)
    ref = score(tiny_gpt_oss_dir, tr.path, wl, tmp_path / "s2", methods=["frequency"], split="all", progress=False,
                bootstrap=0)
    five = want[want["sample"] == 5]
    count = np.zeros((2, 8))
    for layer, ids in zip(want["layer"].tolist() + five["layer"].tolist(), list(want["expert_ids"]) + list(five["expert_ids"])):
        np.add.at(count[layer], ids.astype(int), 1)
    tokens = (len(want) + len(five)) / 2
    assert imp.matrix("frequency")[1] == pytest.approx(count / tokens)
    assert not np.allclose(imp.matrix("frequency")[1], ref.matrix("frequency")[1])  # the repeat counts


def test_vllm_bad_lines_are_named(tmp_path, tiny_gpt_oss_dir):
    good = dict(request_id="a", prompt_token_ids=[1, 2], output_token_ids=[3], routed_experts=[[[0, 1], [2, 3]]] * 2)
    src = write_jsonl(tmp_path / "v.jsonl", [good, dict(good, request_id="b", routed_experts=[[[0, 1, 2]]])])
    with pytest.raises(UspxError, match=r"v\.jsonl:2: 'routed_experts' has shape \[1, 1, 3\]"):
        import_routing([src], "vllm", tiny_gpt_oss_dir, tmp_path / "o")
    src = write_jsonl(tmp_path / "w.jsonl", [dict(good, routed_experts=[[[0, 9], [2, 3]]] * 2)])
    with pytest.raises(UspxError, match=r"w\.jsonl:1: expert id 9 outside 0\.\.7"):
        import_routing([src], "vllm", tiny_gpt_oss_dir, tmp_path / "o")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UspxError, match="not empty"):
        import_routing([write_jsonl(tmp_path / "g.jsonl", [good])], "vllm", tiny_gpt_oss_dir, tmp_path / "full")


def _per_token_dump(path, per_item, rank):
    """SGLang per_token dump: a prefill pass per item, physical ids through a map with two replicas
    (physical 8 and 9 hold logical 0 and 1), top-k ids padded to 8 columns with -1, plus a verify pass."""
    p2l = torch.tensor([list(range(8)) + [0, 1]] * 2)
    records = []
    for i, (tokens, _, ids) in enumerate(per_item):
        phys = ids.transpose(1, 0, 2).copy()  # [layers, tokens, k]
        phys[(phys < 2) & (np.arange(len(tokens))[None, :, None] % 2 == 1)] += 8  # odd tokens use the replicas
        topk = np.full((2, len(tokens), 8), -1)
        topk[:, :, :2] = phys
        records.append(dict(forward_pass_id=i, rank=rank, gatherer_key="primary", input_ids=tokens.tolist(),
                            positions=list(range(len(tokens))), extend_seq_lens=[len(tokens)], forward_mode=1,
                            topk_ids_of_layer=torch.tensor(topk, dtype=torch.int32), misc_objects=[]))
    records.append(dict(records[0], forward_pass_id=99, forward_mode=5,  # TARGET_VERIFY: drafts, some rejected
                        topk_ids_of_layer=torch.full((2, len(per_item[0][0]), 8), 3, dtype=torch.int32)))
    torch.save(dict(records=records, last_physical_to_logical_map=p2l), path)
    return path


def test_sglang_per_token_dump_equals_the_trace(tmp_path, tiny_gpt_oss_dir, traced):
    _, tr, per_item = traced
    files = [_per_token_dump(tmp_path / f"expert_distribution_recorder_17.5_{r}.pt", per_item, r) for r in (0, 1)]
    res = CliRunner().invoke(app, ["import-routing", *map(str, files), "--format", "sglang", "--model",
                                   str(tiny_gpt_oss_dir), "-o", str(tmp_path / "imp")])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "dropped: 2 passes of forward_mode 5" in text and f"dropped: {len(per_item)} duplicate passes" in text
    got, want = rows_of(tmp_path / "imp"), rows_of(tr.path)
    assert np.array_equal(np.stack(got["expert_ids"]), np.stack(want["expert_ids"]))
    assert got["token_id"].equals(want["token_id"]) and got["position"].equals(want["position"])


def test_sglang_stat_dumps_give_the_trace_frequency(tmp_path, tiny_gpt_oss_dir, traced):
    wl, tr, per_item = traced
    counts = np.zeros((len(per_item), 2, 8), np.int32)  # one pass per item, counted by hand from its routing
    for i, (_, _, ids) in enumerate(per_item):
        for layer in range(2):
            np.add.at(counts[i, layer], ids[:, layer].reshape(-1), 1)
    ring = np.concatenate([counts[:4], np.zeros((3, 2, 8), np.int32)])  # a ring buffer with unused slots
    torch.save(dict(rank=0, logical_count=torch.tensor(ring), average_utilization_rate_over_window=None),
               tmp_path / "expert_distribution_recorder_1.0.pt")
    torch.save(dict(rank=0, logical_count=torch.tensor(counts), average_utilization_rate_over_window=None),
               tmp_path / "expert_distribution_recorder_2.0.pt")  # accumulated: the first dump's passes again
    (tmp_path / "copy.pt").write_bytes((tmp_path / "expert_distribution_recorder_2.0.pt").read_bytes())
    files = [tmp_path / n for n in ("expert_distribution_recorder_2.0.pt", "expert_distribution_recorder_1.0.pt",
                                    "copy.pt")]
    res = import_routing(files, "sglang", tiny_gpt_oss_dir, tmp_path / "s", bootstrap=50)
    assert res.kind == "scores" and res.items == len(per_item)
    assert res.dropped == {"passes accumulated from an earlier dump": 4, "files given twice": 1}
    table = load_scores(tmp_path / "s")
    ref = score(tiny_gpt_oss_dir, tr.path, wl, tmp_path / "ref", methods=["frequency"], split="all", progress=False,
                bootstrap=0)
    assert table.matrix("frequency")[1] == pytest.approx(ref.matrix("frequency")[1])
    assert table.meta["options"]["bootstrap_unit"] == "forward pass"
    low, high = table.matrix("frequency", "ci_low")[1], table.matrix("frequency", "ci_high")[1]
    value = table.matrix("frequency")[1]
    assert ((low <= value + 1e-12) & (value <= high + 1e-12)).all()


def test_sglang_per_pass_dump_maps_replicas(tmp_path, tiny_gpt_oss_dir, traced):
    """per_pass: per-pass physical counts; a replica's count goes to its logical expert."""
    _, _, per_item = traced
    counts = np.zeros((len(per_item), 2, 8), np.int64)
    for i, (_, _, ids) in enumerate(per_item):
        for layer in range(2):
            np.add.at(counts[i, layer], ids[:, layer].reshape(-1), 1)
    physical = np.concatenate([counts, np.zeros((len(per_item), 2, 1), np.int64)], axis=2)
    physical[:, :, 8] = physical[:, :, 3] // 2  # physical 8 replicates logical 3 and took half its tokens
    physical[:, :, 3] -= physical[:, :, 8]
    p2l = torch.tensor([list(range(8)) + [3]] * 2)
    records = [dict(forward_pass_id=i, rank=0, gatherer_key="primary", global_physical_count=torch.tensor(c))
               for i, c in enumerate(physical)]
    torch.save(dict(records=records, last_physical_to_logical_map=p2l), tmp_path / "expert_distribution_recorder_3.0_0.pt")
    res = import_routing([tmp_path / "expert_distribution_recorder_3.0_0.pt"], "sglang", tiny_gpt_oss_dir,
                         tmp_path / "s", bootstrap=10)
    assert res.kind == "scores" and res.format == "sglang per_pass"
    total = counts.sum(0)
    assert load_scores(tmp_path / "s").matrix("frequency")[1] == pytest.approx(total / (total.sum(1, keepdims=True) / 2))
