"""Cost of tracing: plain forward vs traced forward on the same model, tokens and batches, one process.

    python bench/trace_overhead.py [--model default] [--workload mixed] [--repeats 5]

Prints the median CPU time (process time: what this process computed, all threads summed, so other
jobs on a shared machine disturb it far less than wall time) and wall time of each variant over
interleaved repeats, and their ratios to the plain forward:
a plain forward without the LM head (the decoder stack only, which is what ``uspx trace`` runs),
hooks only (ids + weights), + router logits, + expert output norms, and the whole ``uspx trace``
(rows built and Parquet shards written), without and with expert output norms, against a plain
forward loop over the same batches. The last lines give both traces against the headless forward.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from uspx.models import adapter_for, load_model
from uspx.trace import RoutingRecorder, trace
from uspx.engine.batches import make_batches, pad_id_of
from uspx.workload import encode, load_workload


TRACE = "uspx trace (ids + weights, Parquet written)"
TRACE_NORMS = "uspx trace + expert norms (Parquet written)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--workload", default="mixed")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--items", type=int, default=64, help="Use the first N workload items.")
    ap.add_argument("--threads", type=int, default=1, help="Torch threads (1: least disturbed by other jobs).")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    adapter = adapter_for(lm.model)
    wl = load_workload(args.workload)
    wl.items = wl.items[: args.items]
    items = encode(wl, lm.tokenizer, args.max_length)
    groups = [(b.items, b.input_ids, b.attention_mask)
              for b in make_batches(items, args.batch_size, pad_id_of(lm.tokenizer), by_length=False)]
    n_tokens = sum(len(e.input_ids) for e in items)

    def plain() -> None:
        for _, ids, mask in groups:
            lm.model(input_ids=ids, attention_mask=mask)

    def base_only() -> None:  # what ``uspx trace`` runs: the decoder stack, no LM head
        for _, ids, mask in groups:
            lm.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)

    def hooked(**kw):
        def run() -> None:
            with RoutingRecorder(adapter, **kw) as rec:
                for _, ids, mask in groups:
                    rec.clear()
                    lm.model(input_ids=ids, attention_mask=mask)
        return run

    tmp = Path(tempfile.mkdtemp())

    def full_trace(**kw):
        def run() -> None:
            out = tmp / "t"
            shutil.rmtree(out, ignore_errors=True)
            trace(lm, wl, out, batch_size=args.batch_size, max_length=args.max_length, progress=False, **kw)
        return run

    variants = {
        "plain forward": plain,
        "plain forward, no LM head": base_only,
        "hooks: ids + weights": hooked(),
        "hooks: + router logits": hooked(logits=True),
        "hooks: + expert norms": hooked(norms=True),
        TRACE: full_trace(),
        TRACE_NORMS: full_trace(norms=True),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        plain()  # warm-up
        for _ in range(args.repeats):
            for name, fn in variants.items():  # interleaved so drift on a shared machine hits all alike
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    shutil.rmtree(tmp, ignore_errors=True)

    base = statistics.median(times["plain forward"])
    cpu_base = statistics.median(cpu["plain forward"])
    print(f"model: {lm.label}; workload: {wl.source}; {len(items)} items, {n_tokens} tokens, "
          f"batch {args.batch_size}; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats}")
    print(f"{'variant':48s} {'cpu s':>8s} {'ratio':>6s} {'wall s':>8s} {'ratio':>6s} {'tok/s':>7s}")
    for name in variants:
        c, w = statistics.median(cpu[name]), statistics.median(times[name])
        print(f"{name:48s} {c:8.3f} {c / cpu_base:6.3f} {w:8.3f} {w / base:6.3f} {n_tokens / w:7.0f}")
    # the trace runs the decoder stack only (no LM head), so its fair baseline is the headless forward
    c0, w0 = statistics.median(cpu["plain forward, no LM head"]), statistics.median(times["plain forward, no LM head"])
    for name in (TRACE, TRACE_NORMS):
        print(f"{name} / plain forward without the LM head: cpu {statistics.median(cpu[name]) / c0:.3f}, "
              f"wall {statistics.median(times[name]) / w0:.3f}")


if __name__ == "__main__":
    main()
