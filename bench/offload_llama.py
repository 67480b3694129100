"""Pruning against offload, predicted and measured: ``uspx plan --gpu``'s speed model against
llama.cpp's own ``llama-bench`` on this machine's CPU, and against published GPU figures.

    python bench/make_gpt_oss_20b.py                      # the 12.8 GiB MXFP4 stand-in (random weights)
    python bench/offload_llama.py --llama-cpp /path/to/llama.cpp

1. The gpt-oss-20b-shaped stand-in is converted to GGUF by llama.cpp's converter (MXFP4 experts
   kept) and pruned in place to half its experts (``uspx prune-gguf``, 16 of 32 per layer).
2. ``llama-bench`` measures decode (``-n``) and prefill (``-p``) tokens per second of both files on
   the CPU (no GPU here). The speed model predicts both from the config, with system memory's
   bandwidth measured here (``uspx plan --ram measure``'s reading) and with the bandwidth llama.cpp
   itself reaches (the full model's measured bytes per second).
3. The same model on the published GPU setups of gpt-oss-20b (an 8 GB RTX 2080 with ``--n-cpu-moe
   12``, every expert on the CPU, the whole model on a 20 GB GPU).

The stand-in's tokenizer is the bundled teacher's (llama.cpp's converter needs a BPE tokenizer; its
random weights make the text meaningless, and speed does not depend on it). Writes
``<out>/results.json`` and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# gpt-oss-20b in llama.cpp as published (tok/s decode): setting -> (GPU preset, --n-cpu-moe, tok/s)
PUBLISHED = [
    ("RTX 2080 8 GB, --n-cpu-moe 12", "rtx2080", 12, 36.0),
    ("RTX 2080 8 GB, every expert on the CPU", "rtx2080", 24, 20.0),
    # the card behind this figure is not named in the report: two 20 GB cards, 360 and 640 GB/s
    ("20 GB GPU (as an RTX 4000 Ada), whole model on the GPU", "rtx4000ada", 0, 94.0),
    ("20 GB GPU (as an RTX A4500), whole model on the GPU", "a4500", 0, 94.0),
]


def stage(model: Path, work: Path) -> Path:
    """The stand-in's weights and config with the bundled teacher's tokenizer, by links."""
    from uspx.models.loading import BUNDLED_TEACHER

    work.mkdir(parents=True, exist_ok=True)
    for f in list(model.glob("*.safetensors")) + [model / "model.safetensors.index.json", model / "config.json"]:
        if not (work / f.name).exists():
            (work / f.name).symlink_to(f.resolve())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(BUNDLED_TEACHER / name, work / name)
    return work


def bench(exe: Path, files: dict[str, Path], threads: int, n_gen: int, n_prompt: int, rounds: int) -> dict:
    """llama-bench's decode (``-n``) and prefill (``-p``) tokens per second of each file, one
    repetition at a time with the files alternating, so that load from other jobs on a shared
    machine hits every file alike; the best round counts (the least disturbed), the median beside it."""
    import statistics

    env = dict(os.environ, LD_LIBRARY_PATH=str(exe.parent))
    samples: dict[str, dict[str, list[float]]] = {n: {"decode": [], "prefill": []} for n in files}
    for _ in range(rounds):
        for name, gguf in files.items():
            for kind, flags in (("decode", ["-p", "0", "-n", str(n_gen)]), ("prefill", ["-p", str(n_prompt), "-n", "0"])):
                res = subprocess.run([str(exe), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json", *flags],
                                     capture_output=True, text=True, env=env, check=True)
                samples[name][kind].append(float(json.loads(res.stdout)[0]["avg_ts"]))
    return {n: {k: dict(tokens_per_s=max(v), median=statistics.median(v), samples=v) for k, v in by.items()}
            for n, by in samples.items()}


def gguf_bytes(path: Path) -> dict:
    import gguf

    by: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        by[t.tensor_type.name] = by.get(t.tensor_type.name, 0) + int(t.n_bytes)
    return by


def main() -> None:
    from uspx.io import write_json
    from uspx.llamacpp import program
    from uspx.plan import speed as sp
    from uspx.plan.memory import estimate
    from uspx.prune.gguf_export import export_gguf
    from uspx.prune.gguf_file import prune_gguf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", required=True)
    ap.add_argument("--model", type=Path, default=REPO / "data" / "gpt-oss-20b-synthetic")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-gen", type=int, default=16)
    ap.add_argument("--n-prompt", type=int, default=32)
    ap.add_argument("--reps", type=int, default=4, help="rounds, the files alternating")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench_offload")
    ap.add_argument("--measured", type=Path, default=None,
                    help="a results.json of an earlier run: predict again against its measurements")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    full, pruned = args.out / "full.gguf", args.out / "pruned-50.gguf"
    if not full.exists():
        t = time.perf_counter()
        export_gguf(stage(args.model, args.out / "stage20b"), full, llama_cpp=args.llama_cpp)
        print(f"converted in {time.perf_counter() - t:.0f} s", flush=True)
    config = json.loads((args.model / "config.json").read_text())
    n_exp, layers = int(config["num_local_experts"]), int(config["num_hidden_layers"])
    if not pruned.exists():
        prune_gguf(full, {l: list(range(n_exp // 2)) for l in range(layers)}, pruned, num_experts=n_exp)

    ram = sp.measure_cpu_bandwidth()
    exe = program("llama-bench", args.llama_cpp)
    if args.measured is not None:  # predictions again on measurements already made
        prior = json.loads(args.measured.read_text())
        measured, ram = prior["measured"], prior["ram_bandwidth_measured"]
    else:
        measured = bench(exe, {"full": full, "pruned 50%": pruned}, args.threads, args.n_gen, args.n_prompt, args.reps)
    est_full = estimate(args.model, None, context=0)
    tb = sp.token_bytes(est_full)
    per_token = tb.non_expert + tb.experts_per_layer * tb.moe_layers
    # the bandwidth llama.cpp itself reaches on this machine: the full model's bytes per token x tok/s
    reached = per_token * measured["full"]["decode"]["tokens_per_s"]
    rows = {}
    for name, keep in (("full", n_exp), ("pruned 50%", n_exp // 2)):
        est = estimate(args.model, None, context=0, experts_per_layer=keep)
        for label, bw, threads in (("measured RAM bandwidth", ram, None),
                                   ("llama.cpp's full-model bandwidth", reached, None),
                                   (f"{args.threads} threads x the per-thread rates", ram, args.threads)):
            hw = sp.Hardware(cpu_bandwidth=bw, cpu_flops=sp.CPU_PRESETS["ddr4-2ch"]["tflops"] * 1e12,
                             cpu_threads=threads)
            pl = sp.best_placement(est, hw, ubatch=args.n_prompt)
            rows.setdefault(name, {})[label] = dict(decode=pl.decode_tokens_per_s, prefill=pl.prefill_tokens_per_s,
                                                    bytes_per_token=pl.read_cpu)

    published = []
    for label, gpu, ncmoe, tps in PUBLISHED:
        hw = sp.hardware(gpu)
        pl = sp.place(estimate(args.model, None, context=4096), hw, ncmoe)
        published.append(dict(setting=label, preset=gpu, n_cpu_moe=ncmoe, published=tps,
                              predicted=pl.decode_tokens_per_s, error=pl.decode_tokens_per_s / tps - 1, fits=pl.fits))

    write_json(args.out / "results.json", dict(
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), threads=args.threads),
        seconds=round(time.perf_counter() - started, 1), ram_bandwidth_measured=ram, llama_cpp_bandwidth=reached,
        files={n: dict(path=str(f), bytes=f.stat().st_size, by_type=gguf_bytes(f)) for n, f in
               (("full", full), ("pruned 50%", pruned))},
        planner_bytes_per_token=per_token, measured=measured, predicted=rows, published=published))
    print(f"\nsystem memory read here: {ram / 1e9:.1f} GB/s; llama.cpp's full-model decode reads "
          f"{reached / 1e9:.1f} GB/s ({per_token / 1e9:.2f} GB per token by the planner)\n")
    print("| model | file GiB | decode tok/s measured | predicted (RAM bw) | error | predicted (llama.cpp bw) | error "
          "| predicted (threads) | error | prefill tok/s measured | predicted (threads) | error |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, f in (("full", full), ("pruned 50%", pruned)):
        m, p = measured[name], rows[name]
        a, b = p["measured RAM bandwidth"], p["llama.cpp's full-model bandwidth"]
        c = p[f"{args.threads} threads x the per-thread rates"]
        print(f"| {name} | {f.stat().st_size / 2**30:.2f} | {m['decode']['tokens_per_s']:.2f} (median {m['decode']['median']:.2f}) | "
              f"{a['decode']:.2f} | {a['decode'] / m['decode']['tokens_per_s'] - 1:+.0%} | {b['decode']:.2f} | "
              f"{b['decode'] / m['decode']['tokens_per_s'] - 1:+.0%} | {c['decode']:.2f} | "
              f"{c['decode'] / m['decode']['tokens_per_s'] - 1:+.0%} | {m['prefill']['tokens_per_s']:.2f} | "
              f"{c['prefill']:.2f} | {c['prefill'] / m['prefill']['tokens_per_s'] - 1:+.0%} |")
    print("\n| published setting | preset | --n-cpu-moe | published tok/s | predicted | error |")
    print("|---|---|---:|---:|---:|---:|")
    for r in published:
        print(f"| {r['setting']} | {r['preset']} | {r['n_cpu_moe']} | {r['published']:.0f} | {r['predicted']:.1f} | "
              f"{r['error']:+.0%} |")


if __name__ == "__main__":
    main()
