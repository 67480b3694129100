"""Whole experts, channels or the joint cut at 75, 50 and 25% of the experts' bytes, one-shot and
recovered: what `uspx extract --budget` should cut by default.

    python bench/cut.py [--users python_dev,shell_user,docs_writer] [--shares 0.75,0.5,0.25]
                        [--recover-shares 0.5,0.25] [--recover-steps N] [--threads 1]

For each bundled user and share ``s``: the budget is what keeping ``s`` of the experts costs at
4,096 tokens of context (weights in the stored precision plus the KV cache), and ``uspx extract``
runs three times under it: ``--units experts`` (whole experts only), ``--units channels`` (every
expert, narrower) and the default joint cut (experts, channels and heads). The three share one
trace and one score table (copied before the runs; extract checks their fingerprints). At the
``--recover-shares`` the whole-experts and joint cuts are also recovered (``--recover``: every
kept weight distilled from the original, at most ``--recover-steps`` steps). Writes ``<out>/results.json`` and prints a Markdown table
of held-out deltas (nats per completion token, the user's one family).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {"whole experts": "experts", "channels": "channels", "joint": None}


def _budget(share: float, context: int) -> int:
    from uspx.extract import checkpoint_dtype
    from uspx.models.loading import resolve_model_path
    from uspx.plan import memory as mem

    path = resolve_model_path("default")
    params = mem.count_params(mem.load_config(path))
    n = max(params.top_k, round(share * params.num_experts))
    return mem.estimate(params, checkpoint_dtype(path), context=context, experts_per_layer=n).total_bytes


def _run(user: str, share: float, variant: str, budget: int, out: Path, recover: bool, seed_from: Path | None,
         steps: int | None) -> dict:
    from uspx.extract import extract
    from uspx.io import read_json

    folder = out / user / f"{int(share * 100)}-{variant.replace(' ', '_')}"
    if (folder / "report.json").exists() and ("recovered" in read_json(folder / "report.json") or not recover):
        return read_json(folder / "report.json")
    if seed_from is not None and not (folder / "scores").exists():  # one trace and one table for the three cuts
        for part in ("trace", "scores"):
            shutil.copytree(seed_from / part, folder / part, dirs_exist_ok=True)
    return extract("default", user, folder, budget=budget, context=4096, units=VARIANTS[variant], compare=False,
                   speed=False, progress=False, recover=recover, recover_steps=steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", default="python_dev,shell_user,docs_writer")
    ap.add_argument("--shares", default="0.75,0.5,0.25")
    ap.add_argument("--recover-shares", default="0.5,0.25")
    ap.add_argument("--recover-steps", type=int, default=None, help="training steps at most (default: recover's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_cut")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    recover_shares = {float(s) for s in args.recover_shares.split(",") if s}
    rows = []
    for user in args.users.split(","):
        seed_from = None
        for share in map(float, args.shares.split(",")):
            budget = _budget(share, 4096)
            for variant in ("joint", "whole experts", "channels"):
                recover = share in recover_shares and variant != "channels"
                t0 = time.perf_counter()
                report = _run(user, share, variant, budget, args.out, recover, seed_from, args.recover_steps)
                seed_from = seed_from or args.out / user / f"{int(share * 100)}-joint"
                row = dict(user=user, share=share, variant=variant, budget=budget, shape=report["shape"],
                           written_bytes=report["size"]["actual_bytes"], delta=report["overall_delta"],
                           recovered=(report.get("recovered") or {}).get("heldout", {}).get("all", {}).get("delta"),
                           seconds=round(time.perf_counter() - t0, 1))
                rows.append(row)
                print(row, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(dict(
        machine=dict(platform=platform.platform(), torch=torch.__version__, threads=args.threads),
        command="python bench/cut.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        seconds=round(time.perf_counter() - started, 1), rows=rows), indent=1))
    print("\n| user | share | budget | cut | shape: experts, width, KV groups x heads | bytes | one-shot delta | recovered delta |")
    print("|---|---:|---:|---|---|---:|---:|---:|")
    for r in rows:
        s = r["shape"]
        shape = f"{s['experts']}, {s['width'] or s.get('original_width') or '-'}, " + (
            f"{s['kv_groups']} x {s['heads_per_group']}" if s["kv_groups"] else "all")
        rec = f"{r['recovered']:+.3f}" if r["recovered"] is not None else ""
        print(f"| {r['user']} | {r['share']:.0%} | {r['budget'] / 2**20:.2f} MiB | {r['variant']} | {shape} | "
              f"{r['written_bytes'] / 2**20:.2f} MiB | {r['delta']:+.3f} | {rec} |")


if __name__ == "__main__":
    main()
