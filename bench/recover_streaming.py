"""Benchmark: router recovery layer by layer on a checkpoint the machine cannot hold, memory sampled.

    python bench/recover_streaming.py                       # the gpt-oss-20b stand-in of bench/stream_20b.py
    python bench/recover_streaming.py --run runs/stream_20b/extract --steps 20

Needs a finished layer-by-layer extraction (``python bench/stream_20b.py`` makes one: the 12.8 GiB
MXFP4 stand-in pruned to 16 of 32 experts per layer). Runs the training part of
``uspx recover RUN --train router|full --streaming`` (``uspx.recover.layers.train_layers``: both hidden
streams, each MoE layer's router trained on router KD plus layer matching, in float32) on the run's
calibration items, while a thread samples this process's RSS every 0.2 s; then writes the
recovered checkpoint with its MXFP4 experts copied byte for byte. The held-out evaluation is left
out here (``uspx recover`` runs it; on this stand-in each takes minutes and says nothing, the weights
being random). Writes ``<out>/bench.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import threading
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30


def main() -> None:
    from uspx.engine import compute_dtype
    from uspx.engine.batches import pad_id_of
    from uspx.engine.checkpoint import write_replacing
    from uspx.io import read_json, write_json
    from uspx.prune.files import weight_files
    from uspx.recover import Settings
    from uspx.engine import FromCheckpoint
    from uspx.recover.layers import train_layers
    from uspx.workload import encode, load_workload

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "stream_20b" / "extract")
    ap.add_argument("--steps", type=int, default=10, help="training steps per layer at most")
    ap.add_argument("--train", default="router", choices=["router", "full"], help="what trains in each layer")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "recover_streaming")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    record = read_json(args.run / "model" / "uspx_export.json")
    report = read_json(args.run / "report.json")
    source, pruned = Path(record["source"]), args.run / "model"
    kept = {int(l): v for l, v in record["kept"].items()}
    tokenizer = AutoTokenizer.from_pretrained(source)
    items = encode(load_workload(report["workload"]["source"]).part("calibration"), tokenizer, 4096)
    settings = Settings(train=args.train, steps=args.steps, eval_every=5, patience=2, batch_size=4)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)

    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        proc = psutil.Process()
        while not stop.is_set():
            samples.append(proc.memory_info().rss)
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    rss0 = psutil.Process().memory_info().rss
    sampler.start()
    t0 = time.perf_counter()
    original = FromCheckpoint(source, compute_dtype(args.dtype))
    trained, history = train_layers(original, pruned, kept, items, settings, args.out / "work", {"bench": 1},
                                    dtype=compute_dtype(args.dtype), pad_id=pad_id_of(tokenizer),
                                    frozen_experts=weight_files(pruned).is_mxfp4(), progress=False)
    train_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    written = write_replacing(pruned, args.out / "model", trained, skip_files=("uspx_export.json",))
    write_seconds = time.perf_counter() - t1
    stop.set()
    sampler.join()
    result = dict(
        command="python bench/recover_streaming.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        machine=dict(platform=platform.platform(), torch=torch.__version__, threads=args.threads,
                     memory_bytes=psutil.virtual_memory().total, cpus=psutil.cpu_count()),
        source=str(source), source_bytes=weight_files(source).file_bytes, pruned_bytes=weight_files(pruned).file_bytes,
        calibration_tokens=sum(len(e.input_ids) for e in items),
        settings=dict(steps=args.steps, dtype=args.dtype, train=args.train),
        train_seconds=round(train_seconds, 1), write_seconds=round(write_seconds, 1), written_bytes=written,
        rss_after_imports_bytes=rss0, sampled_peak_rss_bytes=max(samples),
        ru_maxrss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        layers=[vars(r) for r in history.layers],
    )
    write_json(args.out / "bench.json", result)
    print(json.dumps({k: v for k, v in result.items() if k != "layers"}, indent=1))
    for r in history.layers:
        print(f"layer {r.layer:2d}: {r.val_before:.4f} -> {r.val_after:.4f} ({r.steps} steps, {r.seconds:.0f} s)")


if __name__ == "__main__":
    main()
