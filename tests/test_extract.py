import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import save_tiny, write_jsonl
from uspx.extract import extract
from uspx.io import UspxError

ROWS = [
    {"prompt": f"def f{i}(x):", "completion": f" return x + {i} * x", "family": "code" if i % 2 else "prose"}
    for i in range(30)
]


@pytest.fixture
def workload(tmp_path):
    return write_jsonl(tmp_path / "w.jsonl", ROWS)


def test_extract_end_to_end_keep_half(tmp_path, tiny_gpt_oss_dir, workload):
    out = tmp_path / "run"
    report = extract(tiny_gpt_oss_dir, workload, out, keep="50%", method="frequency", speed=False, progress=False)
    assert set(report["counts"].values()) == {4}
    # the export loads with stock transformers and has half the experts
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.num_local_experts == 4
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4
    # its kept experts are the most frequent ones of the trace, counted here independently
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "trace" / "shard-00000.parquet").to_pandas()
    for layer in (0, 1):
        counts = torch.zeros(8)
        for ids in rows[rows["layer"] == layer]["expert_ids"]:
            counts[torch.tensor(ids.astype("int64"))] += 1
        top = set(torch.argsort(counts, descending=True)[:4].tolist())
        assert set(report["kept"][str(layer)]) == top
    assert abs(report["size"]["actual_bytes"] - report["size"]["plan_bytes"]) <= 0.02 * report["size"]["plan_bytes"]
    assert report["verification"]["max_abs_logit_diff"] <= 1e-4
    assert set(report["quality"]) == {"code", "prose"}
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["kept"] == report["kept"]

    # a second run reuses every artifact: the trace is not redone
    before = (out / "trace" / "manifest.json").stat().st_mtime_ns
    extract(tiny_gpt_oss_dir, workload, out, keep="50%", method="frequency", speed=False, progress=False)
    assert (out / "trace" / "manifest.json").stat().st_mtime_ns == before


def test_extract_refuses_other_model_in_folder(tmp_path, tiny_gpt_oss_dir, workload):
    out = tmp_path / "run"
    extract(tiny_gpt_oss_dir, workload, out, keep="50%", method="frequency", speed=False, progress=False)
    other = save_tiny("gpt_oss", tmp_path / "other", seed=3)
    with pytest.raises(UspxError, match="another model"):
        extract(other, workload, out, keep="50%", method="frequency", speed=False, progress=False)


def test_extract_budget_too_small_names_smallest(tmp_path, tiny_gpt_oss_dir, workload):
    with pytest.raises(UspxError, match="smallest"):
        extract(tiny_gpt_oss_dir, workload, tmp_path / "run", budget="10KiB", method="frequency", speed=False, progress=False)
    with pytest.raises(UspxError, match="exactly one"):
        extract(tiny_gpt_oss_dir, workload, tmp_path / "run2", speed=False, progress=False)
