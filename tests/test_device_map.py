"""A model placed by accelerate's device map (some decoder layers left on disk, read from the
safetensors files at each forward) traces exactly as the plain load does: the routing hooks fire in
the offloaded layers and see the same router logits, expert ids, weights and norms."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import write_jsonl
from uspx.cli import app
from uspx.io import UspxError
from uspx.models import load_model

ROWS = [{"prompt": f"def f{i}(x):", "completion": f" return x * {i}", "family": "code",
         "split": "heldout" if i >= 6 else "calibration"} for i in range(8)]
# layer 1 (of 2) on disk, the rest in memory
ON_DISK = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
           "model.norm": "cpu", "lm_head": "cpu"}
OPTIONS = dict(logits=True, norms=True, reconstruction=True, items_per_shard=3, progress=False)


def _same(a, b):
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma["shards"] == mb["shards"] and ma["options"] == mb["options"] and mb["complete"]
    for s in ma["shards"]:
        ta, tb = pq.read_table(a / s["file"]), pq.read_table(b / s["file"])
        assert "router_logits" in ta.column_names and tb.equals(ta), s["file"]
    ra, rb = np.load(a / "reconstruction.npz"), np.load(b / "reconstruction.npz")
    assert all(np.array_equal(ra[k], rb[k]) for k in ra.files)


@pytest.fixture(scope="module")
def plain(tiny_gpt_oss_dir, tmp_path_factory, one_thread):  # every run on one thread: threads change float sums
    from uspx.trace import trace

    root = tmp_path_factory.mktemp("dm")
    wl = write_jsonl(root / "w.jsonl", ROWS)
    trace(tiny_gpt_oss_dir, wl, root / "plain", **OPTIONS)
    return root, wl


def test_a_layer_on_disk_traces_as_the_plain_load(tiny_gpt_oss_dir, plain, one_thread):
    from uspx.trace import trace

    root, wl = plain
    lm = load_model(tiny_gpt_oss_dir, device_map=ON_DISK)
    offloaded = {n for n, p in lm.model.named_parameters() if p.device.type == "meta"}
    assert offloaded and all(n.startswith("model.layers.1.") for n in offloaded)  # really not in memory
    assert any(".mlp.router." in n for n in offloaded) and any(".mlp.experts." in n for n in offloaded)
    trace(lm, wl, root / "disk", **OPTIONS)
    _same(root / "plain", root / "disk")


def test_cli_device_map_file_and_computed_map(tiny_gpt_oss_dir, plain, one_thread):
    root, wl = plain
    (root / "map.json").write_text(json.dumps(ON_DISK))
    flags = ["--logits", "--norms", "--reconstruction", "--items-per-shard", "3"]
    res = CliRunner().invoke(app, ["trace", str(tiny_gpt_oss_dir), str(wl), "-o", str(root / "file"), *flags,
                                   "--device-map", str(root / "map.json")])
    assert res.exit_code == 0, res.output
    _same(root / "plain", root / "file")
    # a computed map whose CPU budget holds less than the model: accelerate sends the rest to disk
    size = sum(p.numel() * p.element_size() for p in load_model(tiny_gpt_oss_dir).model.parameters())
    budget = f"cpu={int(size * 0.92) // 1000}KB"
    placed = load_model(tiny_gpt_oss_dir, device_map="sequential", max_memory=budget).model.hf_device_map
    assert "disk" in placed.values() and "cpu" in placed.values(), placed
    res = CliRunner().invoke(app, ["trace", str(tiny_gpt_oss_dir), str(wl), "-o", str(root / "computed"), *flags,
                                   "--device-map", "sequential", "--max-memory", budget])
    assert res.exit_code == 0, res.output
    _same(root / "plain", root / "computed")


def test_device_map_errors_name_the_value(tiny_gpt_oss_dir, plain, tmp_path):
    from uspx.score import score

    root, wl = plain
    with pytest.raises(UspxError, match="'everywhere'"):
        load_model(tiny_gpt_oss_dir, device_map="everywhere")
    with pytest.raises(UspxError, match="DEVICE=SIZE"):
        load_model(tiny_gpt_oss_dir, device_map="auto", max_memory="20GiB")
    with pytest.raises(UspxError, match="bounds a computed device map"):
        load_model(tiny_gpt_oss_dir, device_map=ON_DISK, max_memory="cpu=1GiB")
    bad = tmp_path / "bad.json"
    bad.write_text('["model.layers.0"]')
    with pytest.raises(UspxError, match="module name -> device"):
        load_model(tiny_gpt_oss_dir, device_map=bad)
    with pytest.raises(UspxError, match="layer-by-layer"):
        from uspx.engine import open_source

        open_source(tiny_gpt_oss_dir, streaming=True, device_map=ON_DISK)
    # an offloaded expert weight would never receive its gradient: taylor refuses instead of scoring 0
    with pytest.raises(UspxError, match="taylor needs every expert weight in memory.*layers.1"):
        score(tiny_gpt_oss_dir, root / "plain", wl, tmp_path / "s", ["taylor"], device_map=ON_DISK, progress=False)
