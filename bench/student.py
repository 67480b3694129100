"""Dense student vs pruned MoE vs the original, for one user of the bundled teacher.

    python bench/student.py [--user python_dev] [--keep 50%] [--minutes 10] [--threads 1]

In one run, on the same machine and data:

1. ``uspx extract default USER --keep K`` (the pruned MoE) and ``uspx recover`` on it (full KD, the
   default, under ``--minutes``);
2. the expert weighting, compared before any training: students of M experts per layer built with
   the ``routed`` and the ``router`` weights, held-out delta as built;
3. ``uspx student`` at M = top-k (equal active parameters per token with the pruned MoE) and at
   M = the pruned MoE's experts per layer (equal expert weight bytes), each under ``--minutes``;
4. for the original, the pruned MoE (one-shot and recovered) and both students: held-out delta
   per family, weight bytes, M_w + M_KV at ``--context`` (``uspx plan --student``), and, each in a
   fresh subprocess, prefill and decode tokens per second and peak RSS (load, a 256-token prompt,
   64 greedy tokens with the KV cache).

Writes ``<out>/results.json`` and prints Markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

SPEED = r"""
import json, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[2]))
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
g = torch.Generator().manual_seed(0)
prompt = torch.randint(3, model.config.vocab_size, (1, 256), generator=g)
with torch.no_grad():
    model(prompt[:, :16])  # warm-up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        model(prompt)
        times.append(time.perf_counter() - t0)
    best_prefill = min(times)
    t0 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False)
    decode = time.perf_counter() - t0 - best_prefill
print(json.dumps(dict(prefill_tokens_per_s=256 / best_prefill, decode_tokens_per_s=64 / decode,
                      peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
"""


def speed(folder: Path, threads: int) -> dict:
    res = subprocess.run([sys.executable, "-c", SPEED, str(folder), str(threads)], capture_output=True, text=True,
                         check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    from uspx.engine.batches import pad_id_of
    from uspx.evaluate import evaluate
    from uspx.extract import extract
    from uspx.io import write_json
    from uspx.models import load_model
    from uspx.models.loading import BUNDLED_TEACHER
    from uspx.plan.memory import estimate, student_estimate
    from uspx.recover import Settings, recover
    from uspx.recover.run import save_model
    from uspx.score.table import load_scores
    from uspx.student import student
    from uspx.student.build import build_student, choose_experts, routing_stats
    from uspx.workload import encode, load_workload

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--user", default="python_dev")
    ap.add_argument("--keep", default="50%")
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget of each recovery / student")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_student")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    run = args.out / f"{args.user}-{args.keep.strip('%')}"
    if not (run / "report.json").exists():
        extract("default", args.user, run, keep=args.keep, speed=False, progress=False)
    if not (run / "recover" / "recover.json").exists():
        recover(run, settings=Settings(max_minutes=args.minutes), progress=False)
    report = json.loads((run / "report.json").read_text())
    kept = len(next(iter(report["kept"].values())))
    teacher = load_model("default")
    top_k = int(teacher.model.config.num_experts_per_tok)
    wl = load_workload(args.user)

    # 2. the fixed weights, compared as built
    items = encode(wl.part("calibration"), teacher.tokenizer, 512)
    stats = routing_stats(teacher.model, items, pad_id_of(teacher.tokenizer))
    layers, values = load_scores(run / "scores").matrix(report["method"])
    weighting = {}
    for m in sorted({top_k, kept}):
        for w in ("routed", "router"):
            folder = args.out / "built" / f"m{m}-{w}"
            if not (folder / "config.json").exists():
                save_model(build_student(teacher.model, choose_experts(dict(zip(layers, values)), stats, m, w)),
                           folder, torch.bfloat16, BUNDLED_TEACHER)
            ev = evaluate(teacher, folder, wl, speed=False)
            weighting[f"M={m}, {w}"] = ev["overall"]["delta"]
            print(f"built M={m} {w:6s}: held-out delta {ev['overall']['delta']:+.4f}", flush=True)

    # 3. students distilled
    students = {}
    for m in sorted({top_k, kept}):
        out = run / f"student-{m}"
        if not (out / "student.json").exists():
            student(run, experts_per_layer=m, settings=Settings(max_minutes=args.minutes), speed=False, progress=False)
        students[m] = json.loads((out / "student.json").read_text())

    # 4. one table
    rec = json.loads((run / "recover" / "recover.json").read_text())
    models = {"original": BUNDLED_TEACHER, f"pruned MoE ({kept} of 16 experts)": run / "model",
              "pruned MoE, recovered": run / "recover" / "model"}
    models.update({f"dense student, M={m}": run / f"student-{m}" / "model" for m in students})
    rows = []
    for name, folder in models.items():
        if name == "original":
            delta, fams = 0.0, {}
        elif name.startswith("pruned MoE ("):
            delta, fams = rec["heldout"]["before"]["all"]["delta"], rec["heldout"]["before"]
        elif name == "pruned MoE, recovered":
            delta, fams = rec["heldout"]["after"]["all"]["delta"], rec["heldout"]["after"]
        else:
            s = students[int(name.split("M=")[1])]
            delta, fams = s["heldout"]["student"]["all"]["delta"], s["heldout"]["student"]
        m = int(name.split("M=")[1]) if "M=" in name else None
        # M_w + M_KV from the original's config: the pruned MoE keeps `kept` experts, a student M
        if name == "original":
            full = estimate(BUNDLED_TEACHER, "bf16", context=args.context)
            memory = dict(weights_bytes=full.weights_bytes, kv_bytes=full.kv_bytes, total_bytes=full.total_bytes,
                          active_params_per_token=full.active_params)
        else:
            st = student_estimate(BUNDLED_TEACHER, m or kept, "bf16", context=args.context)
            memory = st["dense_student"] if m else st["pruned_moe"]
        sp = speed(folder, args.threads)
        weight_bytes = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
        rows.append(dict(model=name, delta=delta, families={f: v["delta"] for f, v in fams.items()},
                         file_bytes=weight_bytes, memory_formula=memory, **sp,
                         elsewhere=(students[m]["elsewhere"]["student"] if m else None)))
        print(f"{name:32s} delta {delta:+.4f} prefill {sp['prefill_tokens_per_s']:.0f} tok/s "
              f"decode {sp['decode_tokens_per_s']:.1f} tok/s peak RSS {sp['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)

    write_json(args.out / "results.json", dict(
        machine=dict(platform=platform.platform(), torch=torch.__version__, threads=args.threads),
        command="python bench/student.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        seconds=round(time.perf_counter() - started, 1), weighting=weighting, rows=rows,
        students={m: dict(history={k: v for k, v in s["history"].items() if not isinstance(v, list)},
                          built=s["heldout"]["student (built, not trained)"]["all"]["delta"])
                  for m, s in students.items()},
        recovered=dict(history={k: v for k, v in rec["history"].items() if not isinstance(v, list)})))
    print("\n| model | held-out delta | weights on disk | M_w + M_KV (bf16, %d tokens) | active params / token | "
          "prefill tok/s | decode tok/s | peak RSS |" % args.context)
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mem = r["memory_formula"]
        print(f"| {r['model']} | {r['delta']:+.3f} | {r['file_bytes'] / 2**20:.1f} MiB | "
              f"{mem['total_bytes'] / 2**20:.1f} MiB | {mem['active_params_per_token']:,} | {r['prefill_tokens_per_s']:.0f} | "
              f"{r['decode_tokens_per_s']:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
