"""Fewer KV groups on the bundled teacher: what halving the KV cache costs each user.

    python bench/heads.py [--users python_dev,shell_user,docs_writer] [--groups 50%]

``uspx heads default USER --groups G``: every layer keeps its best KV groups on the user's
calibration items. Held-out delta, weight bytes and the KV cache at 4,096 and 32,768 tokens (bf16)
before and after. Writes ``<out>/results.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    from uspx.narrow import export_heads

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", default="python_dev,shell_user,docs_writer")
    ap.add_argument("--groups", default="50%")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_heads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for user in args.users.split(","):
        folder = args.out / f"{user}-{args.groups.strip('%')}"
        rec = json.loads((folder / "uspx_export.json").read_text()) if (folder / "uspx_export.json").exists() \
            else export_heads("default", user, folder, groups=args.groups)
        kv = rec["kv_bytes_per_token"]
        rows.append(dict(user=user, groups=f"{rec['kv_groups']} of {rec['original_kv_groups']}", delta=rec["heldout"]["all"],
                         bytes=rec["bytes"], kv_per_token=kv,
                         kv_4096=(kv["original"] * 4096, kv["narrowed"] * 4096),
                         kv_32768=(kv["original"] * 32768, kv["narrowed"] * 32768)))
        print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(dict(
        machine=dict(platform=platform.platform(), torch=torch.__version__, threads=args.threads),
        command="python bench/heads.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        rows=rows), indent=1))
    print("\n| user | KV groups kept | held-out delta | weights | KV cache at 4,096 tokens | at 32,768 tokens |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['user']} | {r['groups']} | {r['delta']:+.3f} | {r['bytes']['original'] / 2**20:.2f} -> "
              f"{r['bytes']['narrowed'] / 2**20:.2f} MiB | {r['kv_4096'][0] / 2**20:.1f} -> {r['kv_4096'][1] / 2**20:.1f} MiB | "
              f"{r['kv_32768'][0] / 2**20:.1f} -> {r['kv_32768'][1] / 2**20:.1f} MiB |")


if __name__ == "__main__":
    main()
