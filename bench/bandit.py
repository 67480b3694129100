"""Bandit ablation against exhaustive ablation on the bundled teacher: same kept set, fewer forwards?

    python bench/bandit.py [--user python_dev] [--keep 8] [--fractions 0.1,0.05]

Exhaustive interventional ablation of every expert on every calibration item (one item per forward,
items that do not route to the expert skipped), then the bandit (``uspx.score.bandit``, LUCB) with a
budget per layer of each fraction of the exhaustive forwards. Goal: Jaccard >= 0.9 between the kept
sets (every layer's ``keep`` best experts) with at least 10x fewer forwards.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


class _Bar:
    def advance(self, n=1):
        pass

    def describe(self, text):
        pass


def main() -> None:
    from uspx.engine.batches import pad_id_of
    from uspx.models import adapter_for, load_model
    from uspx.score.ablation import run_ablation
    from uspx.score.bandit import bandit_ablation, jaccard
    from uspx.score.baseline import run_baseline
    from uspx.workload import encode, load_workload

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--user", default="python_dev")
    ap.add_argument("--keep", type=int, default=8)
    ap.add_argument("--fractions", default="0.1,0.05")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_bandit")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model("default")
    adapter = adapter_for(lm.model)
    items = encode(load_workload(args.user).part("calibration"), lm.tokenizer, 512)
    base = run_baseline(lm.model, adapter, items, batch_size=1, pad_id=pad_id_of(lm.tokenizer), norms=False,
                        progress=False)
    t0 = time.perf_counter()
    exhaustive = run_ablation(lm.model, adapter, base, "interventional", _Bar())
    ex_seconds = time.perf_counter() - t0
    exact = exhaustive.delta_sum.sum(0) / base.loss_tokens().sum()
    want = {l.index: sorted(np.argsort(-exact[p], kind="stable")[: args.keep].tolist()) for p, l in enumerate(adapter.layers)}
    per_layer = exhaustive.forwards / len(adapter.layers)
    rows = []
    for fraction in [float(f) for f in args.fractions.split(",")]:
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            res = bandit_ablation(lm.model, adapter, base, args.keep, budget=int(per_layer * fraction), seed=seed)
            rows.append(dict(fraction=fraction, seed=seed, forwards=res.forwards,
                             ratio=exhaustive.forwards / res.forwards, jaccard=jaccard(res.kept, want),
                             settled_layers=int(sum(res.settled)), seconds=round(time.perf_counter() - t0, 1)))
            print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(dict(
        machine=dict(platform=platform.platform(), torch=torch.__version__, threads=args.threads),
        command="python bench/bandit.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        exhaustive=dict(forwards=exhaustive.forwards, skipped=exhaustive.skipped, seconds=round(ex_seconds, 1)),
        rows=rows), indent=1))
    print(f"\nexhaustive: {exhaustive.forwards} forwards ({ex_seconds:.0f} s)")
    print("| budget (share of exhaustive) | seed | forwards | fewer by | Jaccard with exhaustive | layers settled |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['fraction']:.2f} | {r['seed']} | {r['forwards']} | {r['ratio']:.1f}x | {r['jaccard']:.3f} | "
              f"{r['settled_layers']} of {len(adapter.layers)} |")


if __name__ == "__main__":
    main()
