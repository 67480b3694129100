"""Ablation with fewer forwards against exhaustive ablation on the bundled teacher: same kept set?

    python bench/bandit.py [--user python_dev] [--keep 8] [--fractions 0.1,0.05] [--seeds 3]
                           [--methods guided,lucb] [--simulate]

Exhaustive interventional ablation of every expert on every calibration item (one item per forward,
items that do not route to the expert skipped; cached in ``--cache``, keyed by the baseline losses),
then each method with a budget of each fraction of the exhaustive forwards, all layers together:

- ``guided`` (``uspx.score.bandit.guided_ablation``): the surrogate pass (charged
  ``SURROGATE_FORWARDS`` forwards per item) and ablations where they decide the kept set;
- ``lucb`` (``uspx.score.bandit.bandit_ablation``): the budget split evenly over the layers.

Goal: Jaccard >= 0.9 between the kept sets (every layer's ``keep`` best experts) with at least 10x
fewer forwards. ``--simulate`` answers each ablation from the cached exhaustive losses instead of
running it (the same numbers up to float rounding, since a forward is deterministic): for sweeps
over many seeds; the surrogate pass is run for real either way.
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


class _Exhaustive:
    def __init__(self, delta_sum, forwards, skipped, seconds):
        self.delta_sum, self.forwards, self.skipped, self.seconds = delta_sum, int(forwards), int(skipped), float(seconds)


def _key(base) -> float:
    return float(sum(float(l.double().sum()) for l in base.losses))


def _exhaustive(path: Path, model, adapter, base, run_ablation) -> _Exhaustive:
    """Exhaustive interventional ablation, cached in ``path`` (keyed by the baseline losses, so a
    different model or calibration set recomputes it)."""
    key = _key(base)
    if path.exists():
        z = np.load(path)
        if z["delta_sum"].shape == (base.n_prompts, len(adapter.layers), adapter.num_experts) and abs(float(z["key"]) - key) < 1e-6:
            return _Exhaustive(z["delta_sum"], z["forwards"], z["skipped"], z["seconds"])
    t0 = time.perf_counter()
    res = run_ablation(model, adapter, base, "interventional", _Bar())
    seconds = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, delta_sum=res.delta_sum, forwards=res.forwards, skipped=res.skipped, seconds=seconds, key=key)
    return _Exhaustive(res.delta_sum, res.forwards, res.skipped, seconds)


def main() -> None:
    from uspx.engine.batches import pad_id_of
    from uspx.models import adapter_for, load_model
    from uspx.score.ablation import run_ablation
    from uspx.score.bandit import SURROGATE_FORWARDS, bandit_ablation, guided_ablation, jaccard, removal_surrogate
    from uspx.score.baseline import run_baseline
    from uspx.score.loss import token_losses
    from uspx.workload import encode, load_workload

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--user", default="python_dev")
    ap.add_argument("--keep", type=int, default=8)
    ap.add_argument("--fractions", default="0.1,0.05")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default="guided,lucb")
    ap.add_argument("--simulate", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_bandit")
    ap.add_argument("--cache", type=Path, default=REPO / "runs" / "bench_bandit", help="where the exhaustive run is kept")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model("default")
    adapter = adapter_for(lm.model)
    items = encode(load_workload(args.user).part("calibration"), lm.tokenizer, 512)
    base = run_baseline(lm.model, adapter, items, batch_size=1, pad_id=pad_id_of(lm.tokenizer), norms=False,
                        progress=False)
    exhaustive = _exhaustive(args.cache / f"exhaustive_{args.user}.npz", lm.model, adapter, base, run_ablation)
    exact = exhaustive.delta_sum.sum(0) / base.loss_tokens().sum()
    want = {l.index: sorted(np.argsort(-exact[p], kind="stable")[: args.keep].tolist()) for p, l in enumerate(adapter.layers)}

    # what the surrogate pass costs next to plain forwards, on the same items (wall clock, this machine)
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in base.batches:
            token_losses(lm.model, batch)
    plain_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    surrogate = removal_surrogate(lm.model, adapter, base)
    surrogate_seconds = time.perf_counter() - t0

    def cached(pos, expert, b):  # an ablation answered from the exhaustive run (batches of one item)
        return float(exhaustive.delta_sum[base.batches[b].rows[0], pos, expert])

    pull = cached if args.simulate else None

    rows = []
    for method in args.methods.split(","):
        for fraction in [float(f) for f in args.fractions.split(",")]:
            budget = int(exhaustive.forwards * fraction)
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                if method == "guided":
                    res = guided_ablation(lm.model, adapter, base, args.keep, budget=budget, surrogate=surrogate, seed=seed,
                                          pull=pull)
                    seconds = time.perf_counter() - t0 + surrogate_seconds
                elif not args.simulate:
                    res = bandit_ablation(lm.model, adapter, base, args.keep, budget=budget // len(adapter.layers), seed=seed)
                    seconds = time.perf_counter() - t0
                else:
                    continue
                rows.append(dict(method=method, fraction=fraction, seed=seed, forwards=res.forwards,
                                 ratio=exhaustive.forwards / res.forwards, jaccard=jaccard(res.kept, want),
                                 swaps=len({(l, e) for l, v in want.items() for e in v} - {(l, e) for l, v in res.kept.items() for e in v}),
                                 settled_layers=int(sum(res.settled)), seconds=round(seconds, 1)))
                print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "results_simulated.json" if args.simulate else "results.json"
    (args.out / name).write_text(json.dumps(dict(
        machine=dict(platform=platform.platform(), torch=torch.__version__, threads=args.threads),
        command="python bench/bandit.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if k not in ("out", "cache", "simulate")) + (" --simulate" if args.simulate else ""),
        exhaustive=dict(forwards=exhaustive.forwards, skipped=exhaustive.skipped, seconds=round(exhaustive.seconds, 1)),
        surrogate=dict(forwards=surrogate.forwards, per_item=SURROGATE_FORWARDS, seconds=round(surrogate_seconds, 1),
                       plain_forward_seconds=round(plain_seconds, 1),
                       measured_forwards_per_item=round(surrogate_seconds / plain_seconds, 2)),
        rows=rows), indent=1))
    print(f"\nexhaustive: {exhaustive.forwards} forwards ({exhaustive.seconds:.0f} s); surrogate pass "
          f"{surrogate_seconds:.1f} s = {surrogate_seconds / plain_seconds:.1f} plain forwards per item "
          f"(charged {SURROGATE_FORWARDS})")
    print("| method | budget (share of exhaustive) | seed | forwards | fewer by | Jaccard with exhaustive | swaps | layers settled |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['fraction']:.3g} | {r['seed']} | {r['forwards']:,} | {r['ratio']:.1f}x | {r['jaccard']:.3f} | "
              f"{r['swaps']} | {r['settled_layers']} of {len(adapter.layers)} |")


if __name__ == "__main__":
    main()
