"""Benchmark: extraction on a gpt-oss-20b-shaped checkpoint on a machine that cannot hold it.

    python bench/stream_20b.py                      # data/gpt-oss-20b-synthetic -> runs/stream_20b
    python bench/stream_20b.py --model /tmp/tiny --seqs 2 --len 16 --keep 4   # smoke test

Stages, all in this process (peak RSS is this process's): predict the streaming peak memory;
streaming trace of a synthetic workload (random token ids: the weights are random, so text would
mean nothing) with norms, router logits and reconstruction sums; local scores; a uniform MXFP4
plan keeping ``--keep`` experts per layer; pruning on disk; verification (streamed pruned model vs
streamed original restricted to the kept set). Then, in a child process under an address-space
limit (so it cannot take a shared machine down), the standard load:
``AutoModelForCausalLM.from_pretrained(dir, quantization_config=Mxfp4Config(dequantize=True))``.
Writes ``<out>/bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30


def peak_rss() -> int:
    """Peak resident set of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


STANDARD_LOAD = r"""
import json, resource, sys, time, traceback
t0 = time.perf_counter()
out = {}
try:
    from transformers import AutoModelForCausalLM, Mxfp4Config
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=Mxfp4Config(dequantize=True))
    out["result"] = "loaded"
    out["dtype"] = str(next(model.parameters()).dtype)
except BaseException as exc:  # MemoryError, or torch's RuntimeError from its allocator
    out["result"] = "failed"
    out["error_type"] = type(exc).__name__
    out["error"] = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    out["where"] = traceback.format_exc().strip().splitlines()[-3][:300]
out["seconds"] = round(time.perf_counter() - t0, 1)
out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("RESULT " + json.dumps(out), flush=True)
"""


def standard_load(model: Path, limit: int, timeout: int) -> dict:
    """Load the whole model the standard way in a child limited to ``limit`` bytes of address space."""
    def limit_child() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", STANDARD_LOAD, str(model)], capture_output=True, text=True,
                              timeout=timeout, preexec_fn=limit_child)
    except subprocess.TimeoutExpired:
        return dict(result="timeout", seconds=timeout, limit_bytes=limit)
    res: dict = dict(limit_bytes=limit, returncode=proc.returncode, wall_seconds=round(time.perf_counter() - t0, 1))
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if lines:
        res.update(json.loads(lines[-1][len("RESULT "):]))
    else:  # killed (signal) before it could report
        res.update(result=f"killed (return code {proc.returncode})", stderr_tail=proc.stderr[-800:])
    return res


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch

    from uspx.io import sha256_json, write_json
    from uspx.plan import select_experts
    from uspx.stream import predict_peak_memory, prune_mxfp4_checkpoint
    from uspx.stream.checkpoint import Checkpoint
    from uspx.stream.folder import trace_streaming
    from uspx.stream.pipeline import tensor_bytes
    from uspx.stream.score import score_streaming
    from uspx.stream.verify import verify_pruned
    from uspx.workload import EncodedItem

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REPO / "data" / "gpt-oss-20b-synthetic")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "stream_20b")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--len", type=int, default=256, dest="length")
    ap.add_argument("--keep", type=int, default=16, help="experts kept per layer")
    ap.add_argument("--method", default="reap")
    ap.add_argument("--verify-seqs", type=int, default=2)
    ap.add_argument("--verify-len", type=int, default=32)
    ap.add_argument("--as-limit-gib", type=float, default=22.0, help="address-space limit of the standard-load child")
    ap.add_argument("--skip-standard", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="delete --out first (else a killed run resumes)")
    args = ap.parse_args(argv)

    if args.fresh:
        shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    config = Checkpoint(args.model).config
    vocab = int(config["vocab_size"])
    n_tokens = args.seqs * args.length
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, vocab, (args.length,), generator=gen).tolist() for _ in range(args.seqs)]
    items = [EncodedItem(i, f"random-{i}", "random", "calibration", s, 0) for i, s in enumerate(seqs)]
    workload = dict(source="synthetic: random token ids, seed 0", fingerprint=sha256_json(seqs), items=len(items),
                    families=["random"])
    summary = dict(items=len(items), families={"random": len(items)}, splits={"calibration": len(items)})
    mem = psutil.virtual_memory()
    res: dict = dict(
        machine=dict(cpus=os.cpu_count(), memory_bytes=mem.total, available_at_start=mem.available, gpu=torch.cuda.is_available(),
                     platform=platform.platform(), torch=torch.__version__, load_average_at_start=os.getloadavg()),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        model=str(args.model), checkpoint_bytes=sum(f.stat().st_size for f in args.model.glob("*.safetensors")),
        workload=dict(sequences=args.seqs, length=args.length, tokens=n_tokens),
    )
    # the trace records router logits, norms and reconstruction; verification adds the lm_head phase
    res["predicted"] = predict_peak_memory(config, n_tokens, max_seq_len=args.length)
    res["predicted_verify"] = predict_peak_memory(config, args.verify_seqs * args.verify_len, max_seq_len=args.verify_len,
                                                  head_tokens=256, dtype=torch.float32, record_logits=False,
                                                  decoded_experts=args.keep)  # both passes decode kept experts only
    res["rss_after_imports_bytes"] = psutil.Process().memory_info().rss
    print(f"predicted streaming peak: {res['predicted']['total'] / GIB:.2f} GiB (trace), "
          f"{res['predicted_verify']['total'] / GIB:.2f} GiB (verify)", file=sys.stderr, flush=True)
    phases: dict = {}

    def phase(name: str, t0: float) -> None:
        phases[name] = dict(seconds=round(time.perf_counter() - t0, 1), peak_rss_bytes_so_far=peak_rss())
        print(f"{name}: {phases[name]['seconds']} s, peak RSS so far {peak_rss() / GIB:.2f} GiB", file=sys.stderr, flush=True)
        res["phases"] = phases
        write_json(args.out / "bench.json", res)

    t0 = time.perf_counter()
    manifest = trace_streaming(args.model, items, args.out / "trace", workload=workload, summary=summary,
                               split="calibration", max_length=args.length, logits=True, norms=True,
                               reconstruction=True, items_per_shard=4)
    res["trace"] = dict(manifest.get("streaming", {}), rows=manifest["summary"]["rows"],
                        trace_bytes=sum(f.stat().st_size for f in (args.out / "trace").glob("*.parquet")))
    phase("trace", t0)

    t0 = time.perf_counter()
    table = score_streaming(args.model, args.out / "trace", args.out / "scores",
                            ["frequency", "reap", "ean", "reconstruction"], progress=False)
    phase("score", t0)

    t0 = time.perf_counter()
    plan = select_experts(table.method(args.method), keep=args.keep, config=args.model, dtype="mxfp4")
    plan.save(args.out / "plan.json")
    phase("select", t0)

    t0 = time.perf_counter()
    pruned = prune_mxfp4_checkpoint(args.model, plan.kept_set(), args.out / "pruned")
    phase("prune", t0)

    t0 = time.perf_counter()
    vseqs = [torch.randint(0, vocab, (args.verify_len,), generator=gen).tolist() for _ in range(args.verify_seqs)]
    res["verification"] = verify_pruned(args.model, pruned, plan.kept_set(), vseqs)
    phase("verify", t0)

    original, actual = tensor_bytes(args.model), tensor_bytes(pruned)
    predicted = plan.sizes["fixed_weights"] + plan.sizes["kept_experts"]
    removed = sum(plan.num_experts - len(v) for v in plan.kept.values())
    res["sizes"] = dict(
        original_tensor_bytes=original, pruned_tensor_bytes=actual, plan_predicted_bytes=predicted,
        relative_error=(actual - predicted) / predicted, experts_removed=removed,
        saved_per_expert_bytes=(original - actual) / removed,
        original_file_bytes=sum(f.stat().st_size for f in args.model.glob("*.safetensors")),
        pruned_file_bytes=sum(f.stat().st_size for f in Path(pruned).glob("*.safetensors")),
        pruned_quantization_config=json.loads((Path(pruned) / "config.json").read_text()).get("quantization_config"),
    )
    res["peak_rss_bytes"] = peak_rss()
    res["predicted_vs_measured"] = dict(
        trace_predicted=res["predicted"]["total"], trace_measured=phases["score"]["peak_rss_bytes_so_far"],
        verify_predicted=res["predicted_verify"]["total"], overall_measured=res["peak_rss_bytes"])
    spl = res["trace"].get("seconds_per_layer") or []
    if spl:
        res["trace"]["seconds_per_layer_median"] = float(np.median(spl))
        res["trace"]["load_seconds_per_layer_median"] = float(np.median(res["trace"]["load_seconds_per_layer"]))
    write_json(args.out / "bench.json", res)

    if not args.skip_standard:
        avail = psutil.virtual_memory().available
        # never more than what is free now minus 2 GiB: the limit must protect the other users
        limit = int(min(args.as_limit_gib * GIB, avail - 2 * GIB))
        print(f"standard load under RLIMIT_AS {limit / GIB:.1f} GiB ...", file=sys.stderr, flush=True)
        res["standard_load"] = standard_load(args.model, limit, timeout=1800)
        res["standard_load"]["available_before_bytes"] = avail
        write_json(args.out / "bench.json", res)
    print(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
