"""Benchmark: ``uspx extract --streaming`` on checkpoints at real layer shapes, on a machine that
cannot hold the model, with this process's memory sampled all along.

    python bench/stream_20b.py                          # gpt-oss-20b stand-in -> runs/stream_20b
    python bench/stream_20b.py --family qwen3_moe       # Qwen3-30B-A3B layers (4 of 48) -> runs/stream_qwen3
    python bench/stream_20b.py --scale tiny --out /tmp/smoke --skip-standard   # smoke test, seconds

The checkpoint (random weights, the real config, tensor names, shapes and dtypes) is written on
first use: ``data/gpt-oss-20b-synthetic`` (``write_gpt_oss``, 12.8 GiB, MXFP4 experts) or
``data/qwen3-30b-a3b-4layers-synthetic`` (``write_qwen3_moe``, bf16, one tensor per expert). A
character tokenizer is saved into the folder and a workload of random printable text is written
(the weights are random, so no text means more than any other): ``--cal-items`` calibration items
of ``--cal-len`` characters (one token each), ``--heldout-items`` held-out items of
``--heldout-len``.

Then, in this process: the peak memory ``predict_peak_memory`` gives for each stage;
``uspx.extract.extract(open_source(model, streaming=True), method=--method, keep=--keep)`` (trace with the
reconstruction sums, score, select, prune on disk, verification layer by layer in float32, held-out
evaluation layer by layer) while a thread samples this process's RSS every 0.2 s with the stage,
the model (original / restricted original / export) and the decoder layer running; ru_maxrss
after each stage. Last, unless ``--skip-standard``, a child process under an address-space limit
(so that it cannot take a shared machine down) loads the whole model the standard way,
``AutoModelForCausalLM.from_pretrained`` (MXFP4 dequantized for gpt-oss).

Writes ``<out>/bench.json`` (and ``<out>/rss.jsonl``, every sample); the extraction itself goes to
``<out>/extract``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

from uspx.testing import CHARS, char_tokenizer  # one token per printable character

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30
FAMILIES = {
    "gpt_oss": dict(model=REPO / "data" / "gpt-oss-20b-synthetic", out=REPO / "runs" / "stream_20b", keep=16),
    "qwen3_moe": dict(model=REPO / "data" / "qwen3-30b-a3b-4layers-synthetic", out=REPO / "runs" / "stream_qwen3",
                      keep=64),
}


def ru_maxrss() -> int:
    """Peak resident set of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def ensure_checkpoint(family: str, path: Path, scale: str, layers: int) -> dict:
    """Write the random checkpoint unless a complete one is there; add the tokenizer. Returns timings."""
    from uspx.models import synthetic

    info: dict = {}
    complete = (path / "config.json").exists() and (
        (path / "model.safetensors.index.json").exists() or (path / "model.safetensors").exists())
    if not complete:
        t0 = time.perf_counter()
        say = lambda msg: print(f"  {msg}", file=sys.stderr, flush=True)  # noqa: E731
        if family == "gpt_oss":
            synthetic.write_gpt_oss(path, scale, progress=say)
        else:
            synthetic.write_qwen3_moe(path, layers, scale="tiny" if scale == "tiny" else "30b-a3b", progress=say)
        info["write_seconds"] = round(time.perf_counter() - t0, 1)
    if not (path / "tokenizer.json").exists():
        char_tokenizer().save_pretrained(path)
    return info


def write_workload(path: Path, args) -> dict:
    """Random printable text, one token per character: calibration and held-out items."""
    rng = random.Random(args.seed)
    rows = [dict(text="".join(rng.choice(CHARS) for _ in range(n)), family="random", split=split, id=f"{split}-{i}")
            for split, count, n in (("calibration", args.cal_items, args.cal_len),
                                    ("heldout", args.heldout_items, args.heldout_len))
            for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dict(path=str(path), calibration_items=args.cal_items, calibration_tokens=args.cal_items * args.cal_len,
                heldout_items=args.heldout_items, heldout_tokens=args.heldout_items * args.heldout_len,
                text="random printable ASCII, one token per character", seed=args.seed)


class Where:
    """What is running now (stage, model, layer), kept current by wrappers around uspx's functions."""

    def __init__(self) -> None:
        self.stage, self.model, self.layer = "setup", None, None
        self.layers: list[dict] = []  # one entry per decoder layer materialised: stage, model, index, seconds
        self.stage_maxrss: dict[str, int] = {}
        self.stage_seconds: dict[str, float] = {}

    def snapshot(self) -> tuple:
        return self.stage, self.model, self.layer

    @contextmanager
    def in_stage(self, name: str):
        outer = self.stage
        self.stage = name
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[name] = round(self.stage_seconds.get(name, 0.0) + time.perf_counter() - t0, 2)
            self.stage_maxrss[name] = ru_maxrss()
            print(f"[{time.strftime('%H:%M:%S')}] {name} done: {self.stage_seconds[name]:.1f} s, "
                  f"ru_maxrss {ru_maxrss() / GIB:.2f} GiB", file=sys.stderr, flush=True)
            self.stage = outer


def instrument(where: Where, original: Path) -> None:
    """Wrap the stages extract() calls and the weight source's layer loads to tag RSS samples."""
    import uspx.evaluate
    import uspx.plan
    import uspx.prune
    import uspx.score
    import uspx.trace
    from uspx.engine import source as source_mod

    export_mod = sys.modules["uspx.prune.export"]

    def staged(module, attr: str, name: str) -> None:
        fn = getattr(module, attr)

        def wrapper(*a, **k):
            with where.in_stage(name):
                return fn(*a, **k)

        setattr(module, attr, wrapper)

    staged(uspx.trace, "trace", "trace")
    staged(uspx.score, "score", "score")
    staged(uspx.plan, "select_experts", "select")
    staged(uspx.prune, "export", "export")  # prune + verify, below
    staged(export_mod, "write_layout", "prune")
    staged(export_mod, "_verify", "verify")
    staged(uspx.evaluate, "evaluate", "evaluate")

    cls = source_mod.FromCheckpoint

    def model_of(src) -> str:
        kind = "original" if Path(src.path).resolve() == original.resolve() else "export"
        restricted = " restricted" if src.experts is not None else ""
        return f"{kind}{restricted} {str(src.dtype).replace('torch.', '')}"

    def tagged(attr: str, what):
        fn = getattr(cls, attr)

        @contextmanager
        def wrapper(self, *a):
            before = where.snapshot()
            where.model, where.layer = model_of(self), what(*a)
            rss0, t0 = ru_maxrss(), time.perf_counter()
            try:
                with fn(self, *a) as value:
                    yield value
            finally:
                seconds = time.perf_counter() - t0
                where.layers.append(dict(stage=where.stage, model=where.model, layer=where.layer,
                                         seconds=round(seconds, 2), maxrss_before=rss0, maxrss_after=ru_maxrss(),
                                         rss_after=psutil.Process().memory_info().rss))
                if isinstance(where.layer, int):
                    print(f"[{time.strftime('%H:%M:%S')}]   {where.stage} {where.model} layer {where.layer}: "
                          f"{seconds:.1f} s, RSS {psutil.Process().memory_info().rss / GIB:.2f} GiB, "
                          f"ru_maxrss {ru_maxrss() / GIB:.2f} GiB", file=sys.stderr, flush=True)
                _, where.model, where.layer = before

        setattr(cls, attr, wrapper)

    tagged("layer", lambda index: int(index))
    tagged("embedding", lambda: "embedding")
    tagged("head", lambda: "head")


class Sampler(threading.Thread):
    """This process's RSS every ``period`` seconds, tagged with ``where``; written as JSON lines."""

    def __init__(self, where: Where, path: Path, period: float = 0.2):
        super().__init__(daemon=True)
        self.where, self.period, self.path = where, period, path
        self.stop = threading.Event()
        self.samples: list[tuple] = []

    def run(self) -> None:
        proc, t0 = psutil.Process(), time.perf_counter()
        with open(self.path, "w") as fh:
            while not self.stop.is_set():
                stage, model, layer = self.where.snapshot()
                rss = proc.memory_info().rss
                row = (round(time.perf_counter() - t0, 2), rss, stage, model, layer)
                self.samples.append(row)
                fh.write(json.dumps(dict(zip(("t", "rss", "stage", "model", "layer"), row))) + "\n")
                self.stop.wait(self.period)


def summarise_samples(samples: list[tuple], layers: list[dict]) -> dict:
    """Peak RSS per stage and per (stage, model, layer): the sampled maximum, or ru_maxrss when it
    rose during that layer (then it is that layer's exact peak)."""
    per_stage: dict[str, int] = {}
    per_layer: dict[tuple, int] = {}
    for _, rss, stage, model, layer in samples:
        per_stage[stage] = max(per_stage.get(stage, 0), rss)
        if layer is not None:
            key = (stage, model, layer)
            per_layer[key] = max(per_layer.get(key, 0), rss)
    rows = []
    for entry in layers:
        key = (entry["stage"], entry["model"], entry["layer"])
        exact = entry["maxrss_after"] if entry["maxrss_after"] > entry["maxrss_before"] else None
        rows.append(dict(entry, sampled_peak_rss=per_layer.get(key), exact_peak_rss=exact,
                         peak_rss=max(per_layer.get(key, 0), exact or 0) or None))
    return dict(sampled_peak_per_stage=per_stage, layers=rows, samples=len(samples))


STANDARD_LOAD = r"""
import json, resource, sys, time, traceback
t0 = time.perf_counter()
out = {}
try:
    from transformers import AutoModelForCausalLM
    kw = {}
    if json.load(open(sys.argv[1] + "/config.json")).get("quantization_config"):
        from transformers import Mxfp4Config
        kw["quantization_config"] = Mxfp4Config(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], **kw)
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
        res.update(result=f"killed (return code {proc.returncode})")
    errors = [l for l in proc.stderr.splitlines() if "allocate" in l or "Error" in l]
    if errors:
        res["stderr_errors"] = errors[:6]
    return res


def predictions(model: Path, args, workload: dict, verify_tokens: int) -> dict:
    """predict_peak_memory per stage, with the arguments each stage's run corresponds to."""
    import torch

    from uspx.engine.memory import predict_peak_memory
    from uspx.plan.memory import load_config
    from uspx.plan.streaming import streaming_plan

    config = load_config(model)
    cal, held = workload["calibration_tokens"], workload["heldout_tokens"]
    out = dict(
        # trace: every calibration token, bf16, ids + weights (no router logits), reconstruction sums
        trace=predict_peak_memory(config, cal, max_seq_len=args.cal_len, record_logits=False),
        # verification: the restricted original and the export, both float32, kept experts decoded only;
        # a joint cut (--budget) is verified layer by layer on the original's inputs, side by side
        verify=predict_peak_memory(config, verify_tokens, dtype=torch.float32, max_seq_len=verify_tokens,
                                   record_logits=False, head_tokens=verify_tokens, decoded_experts=args.keep,
                                   paired=args.budget is not None),
        # evaluation: teacher (every expert) and export side by side, bf16, two hidden streams, both
        # LM heads on every target position
        evaluate=predict_peak_memory(config, held, max_seq_len=args.heldout_len, record_logits=False,
                                     head_tokens=held, paired=True),
        # what `uspx plan MODEL --streaming --tokens N --seq-len T` prints
        plan_cli=streaming_plan(model, cal, seq_len=args.cal_len),
    )
    out["overall"] = max(out[k]["total"] for k in ("trace", "verify", "evaluate"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=sorted(FAMILIES), default="gpt_oss")
    ap.add_argument("--scale", choices=["full", "tiny"], default="full",
                    help="full: the real layer shapes; tiny: the same layout at toy size (smoke test)")
    ap.add_argument("--layers", type=int, default=4, help="qwen3_moe: decoder layers written (Qwen3-30B-A3B has 48)")
    ap.add_argument("--model", type=Path, help="model folder (default: data/<family's stand-in>)")
    ap.add_argument("--out", type=Path, help="results folder (default: runs/stream_20b or runs/stream_qwen3)")
    ap.add_argument("--cal-items", type=int, default=8)
    ap.add_argument("--cal-len", type=int, default=256, help="characters (= tokens) per calibration item")
    ap.add_argument("--heldout-items", type=int, default=4)
    ap.add_argument("--heldout-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=int, help="experts kept per layer (default: half: 16 of 32, 64 of 128)")
    ap.add_argument("--budget", help="a byte budget instead of --keep (e.g. 8GiB): extract's default joint cut "
                                     "(fewer and narrower experts, fewer heads), with the whole-experts cut beside it")
    ap.add_argument("--context", type=int, default=4096, help="with --budget: the context the budget holds")
    ap.add_argument("--method", default="reconstruction")
    ap.add_argument("--as-limit-gib", type=float, default=22.0, help="address-space limit of the standard-load child")
    ap.add_argument("--skip-standard", action="store_true")
    ap.add_argument("--progress", action="store_true", help="uspx's progress bars (noisy in a log file)")
    ap.add_argument("--fresh", action="store_true", help="delete --out first (else a killed run resumes)")
    args = ap.parse_args(argv)

    import torch

    from uspx.engine import open_source
    from uspx.extract import extract
    from uspx.io import read_json, write_json
    from uspx.prune.verify import DEFAULT_PROMPTS, MAX_PROMPT_TOKENS

    fam = FAMILIES[args.family]
    tiny = args.scale == "tiny"
    if args.model is None:
        args.model = fam["model"] if not tiny else Path(f"/tmp/uspx-bench-{args.family}-tiny")
    args.out = args.out or (fam["out"] if not tiny else Path(f"/tmp/uspx-bench-{args.family}-tiny-run"))
    if args.keep is None and args.budget is None:
        args.keep = fam["keep"] if not tiny else 4
    if args.fresh:
        shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)

    mem = psutil.virtual_memory()
    res: dict = dict(
        machine=dict(cpus=os.cpu_count(), memory_bytes=mem.total, available_at_start=mem.available,
                     swap_bytes=psutil.swap_memory().total, gpu=torch.cuda.is_available(),
                     platform=platform.platform(), processor=platform.processor() or platform.machine(),
                     torch=torch.__version__, torch_threads=torch.get_num_threads(),
                     transformers=__import__("transformers").__version__, load_average_at_start=os.getloadavg()),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        malloc_env={k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},  # glibc allocator tuning
        family=args.family, model=str(args.model), keep=args.keep, budget=args.budget, method=args.method,
    )
    res["checkpoint"] = ensure_checkpoint(args.family, args.model, "tiny" if tiny else "20b", args.layers)
    res["checkpoint"].update(
        file_bytes=sum(f.stat().st_size for f in args.model.glob("*.safetensors")),
        shards=len(list(args.model.glob("*.safetensors"))), config=read_json(args.model / "config.json"))
    res["workload"] = write_workload(args.out / "workload.jsonl", args)

    tok = char_tokenizer()
    verify_tokens = sum(min(len(tok.encode(p, add_special_tokens=False)), MAX_PROMPT_TOKENS) for p in DEFAULT_PROMPTS)
    res["predicted"] = predictions(args.model, args, res["workload"], verify_tokens)
    res["rss_after_imports_bytes"] = psutil.Process().memory_info().rss
    print(f"predicted peak: trace {res['predicted']['trace']['total'] / GIB:.2f} GiB, verify "
          f"{res['predicted']['verify']['total'] / GIB:.2f} GiB, evaluate {res['predicted']['evaluate']['total'] / GIB:.2f}"
          f" GiB; `uspx plan --streaming` {res['predicted']['plan_cli']['total'] / GIB:.2f} GiB",
          file=sys.stderr, flush=True)
    write_json(args.out / "bench.json", res)

    where = Where()
    instrument(where, args.model)
    sampler = Sampler(where, args.out / "rss.jsonl")
    sampler.start()
    t0 = time.perf_counter()
    error = None
    try:
        with where.in_stage("extract"):
            report = extract(open_source(args.model, streaming=True, dtype="bf16"), args.out / "workload.jsonl",
                             args.out / "extract", keep=args.keep, budget=args.budget, context=args.context,
                             method=args.method, dtype="bf16", speed=False, progress=args.progress)
    except BaseException as exc:  # keep what was measured; the traceback goes to the log
        import traceback

        traceback.print_exc()
        error, report = f"{type(exc).__name__}: {exc}", None
    finally:
        sampler.stop.set()
        sampler.join()
    res["extract_wall_seconds"] = round(time.perf_counter() - t0, 1)
    res["error"] = error
    res["ru_maxrss_bytes"] = ru_maxrss()
    res["ru_maxrss_after_stage"] = where.stage_maxrss
    res["stage_seconds_measured"] = where.stage_seconds
    res["rss"] = summarise_samples(sampler.samples, where.layers)

    manifest_path = args.out / "extract" / "trace" / "manifest.json"
    if manifest_path.exists():
        streaming = read_json(manifest_path).get("streaming") or {}
        spl = streaming.get("seconds_per_layer") or []
        res["trace_seconds_per_layer"] = spl
        if spl:
            import numpy as np

            res["trace_seconds_per_layer_stats"] = dict(median=float(np.median(spl)), min=min(spl), max=max(spl),
                                                        n=len(spl), first_layer=streaming.get("first_layer"))
    if report is not None:
        res["report"] = dict(seconds=report["seconds"], size=report["size"], verification=report["verification"],
                             quality=report["quality"], acceptance=report["acceptance"], counts=report["counts"],
                             shape=report["shape"], units=report["units"], whole_experts=report.get("whole_experts"))
        pruned = args.out / "extract" / "model"
        res["pruned_config"] = {k: v for k, v in read_json(pruned / "config.json").items()
                                if k in ("num_local_experts", "num_experts", "quantization_config", "intermediate_size",
                                         "num_attention_heads", "num_key_value_heads")}
    measured_by_stage = {}
    for stage, pred in (("trace", "trace"), ("verify", "verify"), ("evaluate", "evaluate")):
        rows = [r for r in res["rss"]["layers"] if r["stage"] == stage]
        peak = max([r["peak_rss"] or 0 for r in rows] + [res["rss"]["sampled_peak_per_stage"].get(stage, 0)])
        measured_by_stage[stage] = dict(predicted=res["predicted"][pred]["total"], measured=peak,
                                        layers_over_prediction=[(r["model"], r["layer"]) for r in rows
                                                                if (r["peak_rss"] or 0) > res["predicted"][pred]["total"]])
    res["predicted_vs_measured"] = dict(by_stage=measured_by_stage, overall_predicted=res["predicted"]["overall"],
                                        overall_measured_ru_maxrss=res["ru_maxrss_bytes"])
    write_json(args.out / "bench.json", res)
    if error is not None:
        print(f"extract failed: {error}", file=sys.stderr)
        return 1

    if not args.skip_standard:
        avail = psutil.virtual_memory().available
        # never more than what is free now minus 2 GiB: the limit must protect the other users
        limit = int(min(args.as_limit_gib * GIB, avail - 2 * GIB))
        print(f"standard load under RLIMIT_AS {limit / GIB:.1f} GiB ...", file=sys.stderr, flush=True)
        res["standard_load"] = standard_load(args.model, limit, timeout=1800)
        res["standard_load"]["available_before_bytes"] = avail
        write_json(args.out / "bench.json", res)
    summary = {k: res[k] for k in ("predicted_vs_measured", "trace_seconds_per_layer_stats", "report", "standard_load")
               if k in res}
    print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
