"""Experts only, channels only, heads only, or all three under one budget: which should a user cut?

    python bench/joint.py [--users python_dev,shell_user,docs_writer] [--contexts 4096,32768]

For each user and context: trace the bundled teacher on the user's calibration items, score experts
(reconstruction) and channels and heads (reconstruction, the same currency), then choose under one
budget (weights plus KV cache at that context) with ``uspx.plan.joint.select_units`` restricted to
experts, to channels, to heads, and free over all three. The budget is what keeping half of the
experts costs at that context (so "experts only" is the 50% plan). Each plan is exported
(verified against the masked model) and evaluated on the user's held-out items: held-out delta
(nats per completion token) per family, the bytes, and the KV cache at 4,096 and 32,768 tokens.
Writes ``<out>/results.json`` and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {"experts only": ["experts"], "channels only": ["channels"], "heads only": ["heads"],
            "joint": ["experts", "channels", "heads"]}


def main() -> None:
    from uspx.evaluate import evaluate
    from uspx.extract import checkpoint_dtype
    from uspx.io import UspxError
    from uspx.models import load_model
    from uspx.models.loading import resolve_model_path
    from uspx.plan import memory as mem
    from uspx.plan.joint import Shape, select_units, shaped_config
    from uspx.prune import export
    from uspx.score import load_scores, score
    from uspx.score.units import load_units
    from uspx.trace import trace

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", default="python_dev,shell_user,docs_writer")
    ap.add_argument("--contexts", default="4096,32768")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_joint")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    path = resolve_model_path("default")
    lm = load_model(path)
    cfg = lm.model.config
    dtype = checkpoint_dtype(path)
    full = mem.count_params(cfg)
    rows = []
    for user in args.users.split(","):
        base = args.out / user
        if not (base / "trace" / "manifest.json").exists():
            trace(lm, user, base / "trace", split="calibration", progress=False)
        if not (base / "scores" / "scores.json").exists():
            score(lm, base / "trace", user, base / "scores", ["reconstruction"], units=["experts", "channels", "heads"],
                  unit_methods=["reconstruction"], progress=False)
        table, units = load_scores(base / "scores"), load_units(base / "scores")
        layers, matrix = table.matrix("reconstruction")
        for context in map(int, args.contexts.split(",")):
            half = mem.estimate(full, dtype, context=context, experts_per_layer=full.num_experts // 2).total_bytes
            for name, unit_types in VARIANTS.items():
                tag = f"{context}-{name.replace(' ', '_')}"
                row = dict(user=user, context=context, variant=name, budget=half)
                try:
                    plan = select_units(dict(zip(layers, matrix)), units, path, units=unit_types, budget=half,
                                        dtype=dtype, context=context)
                except UspxError as exc:  # this unit type alone cannot reach the budget
                    rows.append({**row, "fits": False, "why": str(exc)})
                    print(rows[-1], flush=True)
                    continue
                folder = base / tag
                if not (folder / "uspx_export.json").exists():
                    plan.save(base / f"{tag}.plan.json")
                    export(lm, base / f"{tag}.plan.json", folder)
                ev = evaluate(lm, folder, user, speed=False, progress=False)
                shape = Shape(**{**plan.settings["shape"], "dense": tuple(plan.settings["shape"]["dense"].items())})
                s = mem.count_params(shaped_config(cfg, shape))
                row.update(fits=True, predicted_bytes=plan.predicted_bytes, shape=plan.settings["shape"],
                           kv_4096=mem.kv_cache_bytes(s, 4096), kv_32768=mem.kv_cache_bytes(s, 32768),
                           kv_4096_full=mem.kv_cache_bytes(full, 4096), kv_32768_full=mem.kv_cache_bytes(full, 32768),
                           delta=ev["overall"]["delta"],
                           families={f: v["delta"] for f, v in ev["families"].items()})
                rows.append(row)
                print({k: v for k, v in row.items() if k != "families"}, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(dict(
        machine=dict(platform=platform.platform(), torch=torch.__version__, threads=args.threads),
        command="python bench/joint.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        seconds=round(time.perf_counter() - started, 1), rows=rows), indent=1))
    print("\n| user | context | budget | variant | shape (experts, width, KV groups x heads) | held-out delta | KV at 4096 | KV at 32768 |")
    print("|---|---:|---:|---|---|---:|---:|---:|")
    for r in rows:
        if not r["fits"]:
            print(f"| {r['user']} | {r['context']} | {r['budget'] / 2**20:.2f} MiB | {r['variant']} | does not fit | | | |")
            continue
        s = r["shape"]
        shape = f"{s['experts']}, {s['width']}, {s['kv_groups']} x {s['heads_per_group']}"
        print(f"| {r['user']} | {r['context']} | {r['budget'] / 2**20:.2f} MiB | {r['variant']} | {shape} | "
              f"{r['delta']:+.3f} | {r['kv_4096'] / 2**20:.2f} MiB | {r['kv_32768'] / 2**20:.2f} MiB |")


if __name__ == "__main__":
    main()
