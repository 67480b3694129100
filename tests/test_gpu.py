"""The engine's paired mode on a GPU: a layer-by-layer evaluation and a layer-by-layer recovery with
each layer moved to CUDA give the CPU's numbers. Skipped where no CUDA device is present."""

from __future__ import annotations

import pytest
import torch

from conftest import gpu_growth, save_tiny, write_jsonl
from uspx.engine import open_source

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROWS = [{"prompt": f"def f{i}(x):", "completion": f" return x * {i} + {i % 3}", "family": "code",
         "split": "heldout" if i >= 10 else "calibration"} for i in range(13)]


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "mixtral"])
def test_layer_by_layer_eval_on_cuda_equals_cpu(family, tmp_path):
    from uspx.evaluate import evaluate
    from uspx.models import adapter_for, load_model

    folder = save_tiny(family, tmp_path / family)
    wl = write_jsonl(tmp_path / "w.jsonl", ROWS)
    kept = {l.index: list(range(0, l.num_experts, 2)) for l in adapter_for(load_model(folder).model).layers}
    cpu = evaluate(open_source(folder, streaming=True, dtype="fp32"), None, wl, kept=kept, speed=False)
    runs = []
    assert gpu_growth(lambda: runs.append(evaluate(open_source(folder, streaming=True, dtype="fp32", device="cuda"),
                                                   None, wl, kept=kept, speed=False))) == 0  # layers went back
    for key in ("loss_teacher", "loss_candidate", "kl", "top1_agreement"):
        assert runs[-1]["overall"][key] == pytest.approx(cpu["overall"][key], abs=1e-3), key


def test_layer_by_layer_recovery_on_cuda_trains_and_writes(tmp_path):
    from uspx.extract import extract
    from uspx.recover import Settings, recover
    from uspx.recover.run import run_source

    folder = save_tiny("gpt_oss", tmp_path / "m")
    wl = write_jsonl(tmp_path / "w.jsonl", ROWS)
    extract(folder, wl, tmp_path / "run", keep="50%", speed=False, progress=False)
    settings = Settings(train="full", steps=20, eval_every=5, patience=10, batch_size=4, lr=1e-3, generated=0)
    res = recover(tmp_path / "run", original=open_source(run_source(tmp_path / "run"), streaming=True, dtype="fp32",
                                                        device="cuda"),
                  settings=settings, dtype="fp32", out_dir=tmp_path / "rec", others=wl, progress=False)
    layers = res["history"]["layers"]
    assert layers and all(r["val_after"] <= r["val_before"] for r in layers)
    assert any(r["val_after"] < r["val_before"] for r in layers)
