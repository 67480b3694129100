"""Experts against channels at equal bytes: which half of an expert's bytes should a user give up?

    python bench/channels.py [--users python_dev,shell_user,docs_writer] [--shares 75%,50%]

For each user and share: ``uspx extract default USER --keep SHARE`` (whole experts, reconstruction
scores) against ``uspx channels default USER --width SHARE`` (every expert keeps that share of its
intermediate channels, activation-weighted scores). Both remove the same share of the experts'
weights (routers apart). Held-out delta (nats per completion token) and tensor bytes; writes
``<out>/results.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    from uspx.extract import extract
    from uspx.narrow import export_channels
    from uspx.prune.files import weight_files

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", default="python_dev,shell_user,docs_writer")
    ap.add_argument("--shares", default="75%,50%")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_channels")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = []
    for user in args.users.split(","):
        for share in args.shares.split(","):
            tag = f"{user}-{share.strip('%')}"
            run = args.out / f"experts-{tag}"
            if not (run / "report.json").exists():
                extract("default", user, run, keep=share, speed=False, progress=False)
            ev = json.loads((run / "evaluation.json").read_text())
            folder = args.out / f"channels-{tag}"
            rec = json.loads((folder / "uspx_export.json").read_text()) if (folder / "uspx_export.json").exists() \
                else export_channels("default", user, folder, width=share, progress=False)
            rows.append(dict(user=user, share=share, experts_delta=ev["overall"]["delta"],
                             experts_bytes=weight_files(run / "model").tensor_bytes,
                             channels_delta=rec["heldout"]["all"], channels_bytes=rec["bytes"]["narrowed"]))
            print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(dict(
        machine=dict(platform=platform.platform(), torch=torch.__version__, threads=args.threads),
        command="python bench/channels.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        seconds=round(time.perf_counter() - started, 1), rows=rows), indent=1))
    print("\n| user | share kept | whole experts: delta | bytes | channels in every expert: delta | bytes |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['user']} | {r['share']} | {r['experts_delta']:+.3f} | {r['experts_bytes'] / 2**20:.2f} MiB | "
              f"{r['channels_delta']:+.3f} | {r['channels_bytes'] / 2**20:.2f} MiB |")


if __name__ == "__main__":
    main()
