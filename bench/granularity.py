"""What the MXFP4 block constraint costs: the joint cut with 32-channel groups against single
channels, at equal bytes, on a bf16 model (the bundled teacher).

    python bench/granularity.py [--users python_dev,shell_user,docs_writer] [--shares 0.5,0.25]

An MXFP4 checkpoint can only drop whole blocks of 32 intermediate channels (the down projection
packs them into one block with one scale), so its joint cut chooses among widths in steps of 32 and
keeps each expert's best blocks. This bench makes both choices on the same scores of a bf16 model,
where either can be exported: ``uspx.plan.joint.select_units`` with ``channel_group=32`` (as for
MXFP4) and with single channels (width steps of 8, the default), under the budget of keeping
``share`` of the experts at 4,096 tokens; both exported (verified) and evaluated on the user's
held-out items. Reuses the traces and scores of ``bench/cut.py`` when present (else makes them).
Writes ``<out>/results.json`` and prints a Markdown table.
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
    from uspx.evaluate import evaluate
    from uspx.extract import checkpoint_dtype
    from uspx.models import load_model
    from uspx.models.loading import resolve_model_path
    from uspx.plan import memory as mem
    from uspx.plan.joint import select_units
    from uspx.prune import export
    from uspx.score import load_scores, score
    from uspx.score.units import load_units
    from uspx.trace import trace

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", default="python_dev,shell_user,docs_writer")
    ap.add_argument("--shares", default="0.5,0.25")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scores-from", type=Path, default=REPO / "runs" / "bench_cut")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_granularity")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    path = resolve_model_path("default")
    lm = load_model(path)
    dtype = checkpoint_dtype(path)
    params = mem.count_params(lm.model.config)
    rows = []
    for user in args.users.split(","):
        scores = next(iter(sorted((args.scores_from / user).glob("*-joint/scores"))), None)
        if scores is None or not (scores / "units.parquet").exists():
            scores = args.out / user / "scores"
            trace(lm, user, args.out / user / "trace", split="calibration", progress=False)
            score(lm, args.out / user / "trace", user, scores, ["reconstruction"], units=["experts", "channels", "heads"],
                  unit_methods=["reconstruction"], progress=False)
        table, units = load_scores(scores), load_units(scores)
        layers, matrix = table.matrix("reconstruction")
        for share in map(float, args.shares.split(",")):
            n = max(params.top_k, round(share * params.num_experts))
            budget = mem.estimate(params, dtype, context=4096, experts_per_layer=n).total_bytes
            for group in (1, 32):
                plan = select_units(dict(zip(layers, matrix)), units, path, units="experts,channels,heads",
                                    budget=budget, dtype=dtype, context=4096, channel_group=group)
                folder = args.out / user / f"{int(share * 100)}-group{group}"
                plan.save(folder.with_suffix(".plan.json"))
                record = export(lm, folder.with_suffix(".plan.json"), folder)
                ev = evaluate(lm, folder, user, speed=False, progress=False)
                rows.append(dict(user=user, share=share, group=group, budget=budget, shape=plan.settings["shape"],
                                 written_bytes=record["size"]["actual_bytes"], value=plan.value,
                                 delta=ev["overall"]["delta"]))
                print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(dict(
        machine=dict(platform=platform.platform(), torch=torch.__version__, threads=args.threads),
        command="python bench/granularity.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                          if k not in ("out", "scores_from")),
        seconds=round(time.perf_counter() - started, 1), rows=rows), indent=1))
    print("\n| user | share | budget | channel unit | shape: experts, width, KV groups x heads | bytes | held-out delta |")
    print("|---|---:|---:|---|---|---:|---:|")
    for r in rows:
        s = r["shape"]
        unit = "single channels" if r["group"] == 1 else f"blocks of {r['group']}"
        print(f"| {r['user']} | {r['share']:.0%} | {r['budget'] / 2**20:.2f} MiB | {unit} | {s['experts']}, {s['width']}, "
              f"{s['kv_groups']} x {s['heads_per_group']} | {r['written_bytes'] / 2**20:.2f} MiB | {r['delta']:+.3f} |")


if __name__ == "__main__":
    main()
