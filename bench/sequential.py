"""Does sequential calibration help? One-pass vs sequential scores, per method and budget, on the
teacher's bundled users: held-out loss delta of the teacher restricted to each selection.

    python bench/sequential.py [--users python_dev,shell_user,docs_writer] [--keeps 75%,50%,25%]

One pass: every layer scored on the original model's hidden states. Sequential: every layer scored
with the layers before it already pruned to the kept count by the same method (``--sequential``).
Both select the same number of experts per layer (uniform plans); the candidate is the teacher
restricted to the selection, evaluated on the user's held-out items (``uspx.evaluate``, the verdict's
loss delta). Writes ``<out>/results.json`` and prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
METHODS = ("frequency", "reap", "ean", "reconstruction")


def main() -> None:
    from uspx.evaluate import evaluate
    from uspx.extract import checkpoint_dtype
    from uspx.io import write_json
    from uspx.models import load_model
    from uspx.models.loading import BUNDLED_TEACHER
    from uspx.plan import select_experts
    from uspx.score import score
    from uspx.trace import trace
    from uspx.workload import load_workload

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", default="python_dev,shell_user,docs_writer")
    ap.add_argument("--keeps", default="75%,50%,25%")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_sequential")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    started = time.perf_counter()
    lm = load_model("default")
    precision = checkpoint_dtype(BUNDLED_TEACHER)
    rows = []
    for user in args.users.split(","):
        wl = load_workload(user)
        base = args.out / user
        trace(lm, wl, base / "trace", split="calibration", norms=True, max_length=512, progress=False)
        one = score(lm, base / "trace", wl, base / "scores", methods=methods, bootstrap=0, progress=False)
        for keep in args.keeps.split(","):
            for m in methods:
                res = {}
                for mode in ("one-pass", "sequential"):
                    t0 = time.perf_counter()
                    table = one if mode == "one-pass" else score(
                        lm, base / "trace", wl, base / f"seq-{m}-{keep.strip('%')}", methods=[m], bootstrap=0,
                        progress=False, sequential=keep)
                    plan = select_experts(table.method(m), keep=keep, config=BUNDLED_TEACHER, dtype=precision)
                    ev = evaluate(lm, None, wl, kept=plan.kept_set(), split="heldout", max_length=512, speed=False)
                    res[mode] = dict(delta=ev["overall"]["delta"], ci95=ev["overall"]["delta_ci95"],
                                     seconds=round(time.perf_counter() - t0, 1), kept=plan.kept_set())
                same = res["one-pass"]["kept"] == res["sequential"]["kept"]
                rows.append(dict(user=user, keep=keep, method=m, **{k: v["delta"] for k, v in res.items()},
                                 ci95=res, identical_selection=same))
                print(f"{user:12s} {keep:>4s} {m:15s} one-pass {res['one-pass']['delta']:+.4f}  "
                      f"sequential {res['sequential']['delta']:+.4f}{'  (same experts)' if same else ''}", flush=True)
    out = dict(machine=dict(platform=platform.platform(), torch=torch.__version__, threads=args.threads),
               command="python bench/sequential.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
               seconds=round(time.perf_counter() - started, 1), rows=rows)
    write_json(args.out / "results.json", out)
    print("\n| user | keep | method | one-pass delta | sequential delta | sequential - one-pass |")
    print("|---|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['user']} | {r['keep']} | {r['method']} | {r['one-pass']:+.3f} | {r['sequential']:+.3f} | "
              f"{r['sequential'] - r['one-pass']:+.3f}{' (same selection)' if r['identical_selection'] else ''} |")


if __name__ == "__main__":
    main()
