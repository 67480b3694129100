"""Tracing with several processes (torchrun, gloo on CPU) against one, on the same machine and data.

    python bench/dist_trace.py [--workload mixed] [--procs 2] [--repeats 2] [--modes whole,streaming]

For each mode and repeat: ``uspx trace default WORKLOAD --reconstruction --threads 1`` (mode
``streaming`` adds ``--streaming``: layer by layer, bf16) in one process, then ``torchrun
--nproc_per_node N -m uspx trace ...`` (each process one thread); wall time of the command (imports
and model loading included) and the tracing time the manifest records; the two folders are checked
equal (shards, items, reconstruction sums). Writes ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    return time.perf_counter() - t0


def same(a: Path, b: Path) -> bool:
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    if ma["shards"] != mb["shards"]:
        return False
    if not all(pq.read_table(a / s["file"]).equals(pq.read_table(b / s["file"])) for s in ma["shards"]):
        return False
    ra, rb = np.load(a / "reconstruction.npz"), np.load(b / "reconstruction.npz")
    return all(np.array_equal(ra[k], rb[k]) for k in ra.files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="mixed")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--modes", default="whole,streaming", help="whole (model in memory) and/or streaming (layer by layer)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_dist_trace")
    args = ap.parse_args()
    bin_dir = Path(sys.executable).parent
    rows = []
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        for r in range(args.repeats):
            folders = {}
            for procs in (1, args.procs):
                out = args.out / f"{mode}-{procs}"
                shutil.rmtree(out, ignore_errors=True)
                base = ["trace", "default", args.workload, "-o", str(out), "--reconstruction", "--threads", "1",
                        "--items-per-shard", "16", *(["--streaming"] if mode == "streaming" else [])]
                cmd = [str(bin_dir / "uspx"), *base] if procs == 1 else \
                    [str(bin_dir / "torchrun"), "--nproc_per_node", str(procs), "-m", "uspx", *base]
                load = os.getloadavg()[0]  # the machine is shared: what else was running
                wall = run(cmd)
                traced = json.loads((out / "manifest.json").read_text())["summary"]["seconds_this_run"]
                rows.append(dict(mode=mode, repeat=r, processes=procs, wall_seconds=round(wall, 2),
                                 trace_seconds=traced, load_before=round(load, 2)))
                folders[procs] = out
                print(rows[-1], flush=True)
            rows[-1]["identical_to_one_process"] = same(folders[args.procs], folders[1])
    summary = {}
    for mode in modes:
        one = [x for x in rows if x["processes"] == 1 and x["mode"] == mode]
        many = [x for x in rows if x["processes"] == args.procs and x["mode"] == mode]
        summary[mode] = dict(trace_speedup=[round(a["trace_seconds"] / b["trace_seconds"], 2) for a, b in zip(one, many)],
                             wall_speedup=[round(a["wall_seconds"] / b["wall_seconds"], 2) for a, b in zip(one, many)])
    print(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(dict(
        machine=dict(platform=platform.platform(), cpus=os.cpu_count()),
        command="python bench/dist_trace.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        rows=rows, summary=summary), indent=1))


if __name__ == "__main__":
    main()
