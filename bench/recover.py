"""What recovery buys: one-shot pruning against distillation variants, on the teacher's bundled users.

    python bench/recover.py [--users python_dev,shell_user,docs_writer] [--keeps 50%,25%] [--variants all]

For each user and share kept: ``uspx extract`` (the default one-shot selection), then ``uspx recover``
with each variant on the same pruned checkpoint. Reports the held-out loss delta against the
original before and after (all items and per family), the share of the one-shot gap recovered,
tokens seen, wall time, why training stopped, the held-out minus calibration delta (overfitting) and
the cost on the other families (the ``mixed`` workload). Writes ``<out>/results.json`` and prints
a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Variant:
    settings: object  # uspx.recover.Settings
    method: str | None = None  # selection of the pruned checkpoint (None: extract's default)
    streaming: bool = False  # recovery one decoder layer at a time from the files


def variants() -> dict[str, Variant]:
    from uspx.recover import Settings

    return {
        "full KD": Variant(Settings(train="full", kd=1.0)),  # uspx recover's defaults
        "router KD": Variant(Settings(train="router", kd=1.0, router_kd=1.0)),
        "LoRA + KD": Variant(Settings(train="lora", kd=1.0)),
        "full KD + layer": Variant(Settings(train="full", kd=1.0, layer=1.0)),
        "full KD, no generated text": Variant(Settings(train="full", kd=1.0, generated=0)),
        "L0 masks + full KD": Variant(Settings(train="full", kd=1.0), method="l0"),
        "router layer-by-layer": Variant(Settings(train="router", router_kd=1.0, layer=1.0), streaming=True),
        "full layer-by-layer": Variant(Settings(train="full", router_kd=1.0, layer=1.0), streaming=True),
    }


def main() -> None:
    from uspx.engine import open_source
    from uspx.extract import extract
    from uspx.io import write_json
    from uspx.recover import recover
    from uspx.recover.run import run_source

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", default="python_dev,shell_user,docs_writer")
    ap.add_argument("--keeps", default="50%,25%")
    ap.add_argument("--variants", default="all", help="comma-separated names of variants(), or all")
    ap.add_argument("--steps", type=int, default=None, help="override every variant's step limit")
    ap.add_argument("--minutes", type=float, default=10.0, help="time budget per recovery")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_recover")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    chosen = variants() if args.variants == "all" else {k: v for k, v in variants().items() if k in args.variants.split(",")}
    started = time.perf_counter()
    rows = []
    for user in args.users.split(","):
        for keep in args.keeps.split(","):
            for name, v in chosen.items():
                settings = v.settings
                run = args.out / (f"{user}-{keep.strip('%')}" + (f"-{v.method}" if v.method else ""))
                if not (run / "report.json").exists():
                    extract("default", user, run, keep=keep, method=v.method, speed=False, progress=False)
                settings.max_minutes = args.minutes
                if args.steps is not None:
                    settings.steps = args.steps
                t0 = time.perf_counter()
                original = open_source(run_source(run), streaming=v.streaming, dtype="fp32")
                r = recover(run, original=original, settings=settings, dtype="fp32", progress=False,
                            out_dir=run / f"recover-{name.replace(' ', '_').replace('+', 'and').replace(',', '')}")
                h = r["history"]
                # the one-shot delta is the default selection's (the L0 variant's own pruned model is one-shot too)
                before, after = r["heldout"]["before"]["all"]["delta"], r["heldout"]["after"]["all"]["delta"]
                rows.append(dict(user=user, keep=keep, variant=name, settings=asdict(settings), method=v.method,
                                 streaming=v.streaming, one_shot=before, recovered=after, share=r["recovered_share"],
                                 tokens=h.get("tokens_seen", h.get("tokens")), steps=h.get("step"),
                                 best_step=h.get("best_step"), peak_rss_bytes=h.get("peak_rss_bytes"),
                                 train_seconds=round(h["seconds"], 1), wall_seconds=round(time.perf_counter() - t0, 1),
                                 stopped=h.get("stopped"), gap=r["overfitting_gap"]["after"],
                                 families=r["heldout"], elsewhere=r["elsewhere"]))
                print(f"{user:12s} {keep:>4s} {name:24s} {before:+.4f} -> {after:+.4f} "
                      f"({100 * (r['recovered_share'] or 0):.0f}% recovered, {h['seconds']:.0f} s)", flush=True)
    write_json(args.out / "results.json", dict(
        machine=dict(platform=platform.platform(), torch=torch.__version__, threads=args.threads),
        command="python bench/recover.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        seconds=round(time.perf_counter() - started, 1), rows=rows))
    print("\n| user | keep | variant | one-shot delta | recovered delta | gap recovered | tokens seen | training time | held-out - calibration | other families (mixed), after |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        other = ", ".join(f"{f} {v['delta']:+.2f}" for f, v in (r["elsewhere"] or {}).get("after", {}).items()
                          if f != "all" and v["delta"] is not None)
        print(f"| {r['user']} | {r['keep']} | {r['variant']} | {r['one_shot']:+.3f} | {r['recovered']:+.3f} | "
              f"{100 * (r['share'] or 0):.0f}% | {r['tokens']:,} | {r['train_seconds']:.0f} s | {r['gap']:+.3f} | {other} |")


if __name__ == "__main__":
    main()
