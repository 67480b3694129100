"""Write a random stand-in for openai/gpt-oss-20b: same config.json, tensor names, shapes, dtypes
and MXFP4 experts, 12.8 GiB on disk, written with bounded memory (one 64 MiB chunk at a time).

    python bench/make_gpt_oss_20b.py                      # -> data/gpt-oss-20b-synthetic
    python bench/make_gpt_oss_20b.py --scale tiny --out /tmp/tiny

It is for memory and speed benchmarks of streaming and pruning; its outputs mean nothing.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

from uspx.io import UspxError
from uspx.models.synthetic import checkpoint_bytes, gpt_oss_config, write_gpt_oss

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "data" / "gpt-oss-20b-synthetic")
    ap.add_argument("--scale", choices=["20b", "tiny"], default="20b")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-shard-gib", type=float, default=4.0)
    args = ap.parse_args(argv)

    need = checkpoint_bytes(gpt_oss_config(args.scale))
    args.out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.out).free
    if free < need * 1.05:  # shards are written to temporary files before they are renamed
        raise UspxError(f"{args.out}: {need / 2**30:.1f} GiB needed, only {free / 2**30:.1f} GiB free")
    print(f"writing {need / 2**30:.2f} GiB to {args.out}", file=sys.stderr)
    t0 = time.perf_counter()
    write_gpt_oss(args.out, args.scale, seed=args.seed, max_shard_bytes=int(args.max_shard_gib * 2**30),
                  progress=lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
    size = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"done in {time.perf_counter() - t0:.0f} s: {size / 2**30:.2f} GiB on disk, "
          f"peak RSS {peak / 2**20:.0f} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UspxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
