"""Benchmark: the engine layer by layer on the user's GPU against the CPU, same checkpoint, same items.

    python bench/gpu_layers.py                               # gpt-oss-20b-shaped stand-in, 8 of 24 layers
    python bench/gpu_layers.py --scale tiny --devices cpu    # smoke test, seconds

1. A random checkpoint at gpt-oss-20b's layer shapes (MXFP4 experts, ``write_gpt_oss`` with
   ``--layers`` decoder layers; a character tokenizer) and a workload of random printable text.
   For each device in ``--devices``: ``uspx.trace`` on ``open_source(model, streaming=True,
   device=d)``, each layer read from the files, its experts decoded from MXFP4 and computed in the
   checkpoint's bf16 there. Seconds, tokens per second and the GPU's peak memory, then how far the
   routing agrees between the devices: the share of (token, layer) expert sets that are equal and
   the largest difference of a kept expert's weight.
2. The bundled teacher, layer by layer, evaluated with half its experts kept on each device (fp32):
   loss of each model, KL and top-1 agreement side by side.

Writes ``<out>/bench.json``. On a machine without CUDA only the CPU rows run.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from uspx.testing import CHARS, char_tokenizer

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30


def stand_in(path: Path, scale: str, layers: int) -> float:
    from uspx.models.synthetic import write_gpt_oss

    if (path / "config.json").exists():
        return 0.0
    t0 = time.perf_counter()
    overrides = {"num_hidden_layers": layers} if scale == "20b" else {}
    write_gpt_oss(path, scale, **overrides)
    char_tokenizer().save_pretrained(path)
    return time.perf_counter() - t0


def random_workload(path: Path, items: int, length: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows = [dict(text="".join(rng.choice(CHARS) for _ in range(length)), family="random", split="calibration",
                 id=f"c{i}") for i in range(items)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def routing(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(sorted(folder.glob("shard-*.parquet")), columns=["expert_ids", "expert_weights"])
    ids = np.stack(table.column("expert_ids").to_numpy(zero_copy_only=False))
    weights = np.stack(table.column("expert_weights").to_numpy(zero_copy_only=False))
    return ids, weights


def timed_trace(model: Path, workload: Path, out: Path, device: str) -> dict:
    from uspx.engine import open_source
    from uspx.trace import trace

    shutil.rmtree(out, ignore_errors=True)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    manifest = trace(open_source(model, streaming=True, device=device), workload, out, progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = manifest["summary"]["tokens"]
    row = dict(device=device, seconds=round(seconds, 2), tokens=tokens, tokens_per_s=round(tokens / seconds, 1))
    if device.startswith("cuda"):
        row["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
    return row


def teacher_eval(device: str) -> dict:
    from uspx.engine import open_source
    from uspx.evaluate import evaluate
    from uspx.models.loading import resolve_model_path

    folder = resolve_model_path("default")
    cfg = json.loads((folder / "config.json").read_text())
    experts = cfg["num_local_experts"]
    kept = {i: list(range(0, experts, 2)) for i in range(cfg["num_hidden_layers"])}
    wl = REPO / "src" / "uspx" / "data" / "workloads" / "python_dev.jsonl"
    t0 = time.perf_counter()
    rec = evaluate(open_source(folder, streaming=True, dtype="fp32", device=device), None, wl, kept=kept,
                   speed=False, progress=False)
    o = rec["overall"]
    return dict(device=device, seconds=round(time.perf_counter() - t0, 2),
                **{k: o[k] for k in ("loss_teacher", "loss_candidate", "kl", "top1_agreement")})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=["20b", "tiny"], default="20b")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the 20b-shaped stand-in (it has 24)")
    ap.add_argument("--model", type=Path, default=REPO / "data" / "gpt-oss-20b-8layers-synthetic")
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--length", type=int, default=256, help="characters (= tokens) per item")
    ap.add_argument("--devices", default="cuda,cpu" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_gpu_layers")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = dict(machine=dict(platform=platform.platform(), torch=torch.__version__,
                                     gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                                     cpu_threads=torch.get_num_threads()),
                        stand_in=dict(path=str(args.model), scale=args.scale, layers=args.layers),
                        trace=[], teacher_eval=[])
    result["stand_in"]["write_seconds"] = round(stand_in(args.model, args.scale, args.layers), 1)
    wl = args.out / "workload.jsonl"
    random_workload(wl, args.items, args.length)
    for d in devices:
        row = timed_trace(args.model, wl, args.out / f"trace-{d.replace(':', '')}", d)
        print(json.dumps(row), flush=True)
        result["trace"].append(row)
    if len(devices) > 1:
        (a_ids, a_w), (b_ids, b_w) = (routing(args.out / f"trace-{d.replace(':', '')}") for d in devices[:2])
        same = np.all(np.sort(a_ids, axis=1) == np.sort(b_ids, axis=1), axis=1)
        both = same & np.all(a_ids == b_ids, axis=1)
        result["agreement"] = dict(rows=int(len(same)), equal_sets=round(float(same.mean()), 5),
                                   max_weight_diff=float(np.abs(a_w[both] - b_w[both]).max()) if both.any() else None)
        print(json.dumps(result["agreement"]), flush=True)
    for d in devices:
        row = teacher_eval(d)
        print(json.dumps(row), flush=True)
        result["teacher_eval"].append(row)
    (args.out / "bench.json").write_text(json.dumps(result, indent=1))
    print(f"written {args.out / 'bench.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
