"""``uspx extract MODEL.gguf WORKLOAD``: the extract job on a GGUF file alone, without the Hugging
Face checkpoint, each stage leaving its artifact in ``out_dir``:

    out_dir/trace/               routing on the calibration prompts, recorded in llama.cpp
    out_dir/scores/              frequency, reap and ean of every (layer, expert)
    out_dir/plan.json            kept set under the budget or keep
    out_dir/model.gguf           the GGUF pruned in place (``uspx prune-gguf``), checked byte for byte
    out_dir/evaluation.json      the pruned file against the original on the held-out items, both run
                                 by llama.cpp (``uspx.evaluate.gguf``): uspx eval's metrics and verdict
    out_dir/report.json          the summary

Statistics come from llama.cpp itself (:mod:`uspx.trace.llama`): the model runs the user's
calibration prompts through llama.cpp's own graph, tokenised by the GGUF's own vocabulary, and its
evaluation callback gives each token's experts, gate weights and expert output norms. With
``imatrix`` an importance matrix of ``llama-imatrix`` stands in for the recording, and only
``frequency`` can be scored from it. Costs are the GGUF's own stored bytes per expert (whatever its
quantization); a byte budget also holds the KV cache of ``context`` tokens at llama.cpp's default
f16 cache. Scores that need the model in PyTorch (reconstruction, ablations, taylor, l0) need the
Hugging Face checkpoint: ``uspx extract MODEL_DIR``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from uspx.io import UspxError, read_json, record_path, sha256_json, write_json
from uspx.progress import Clock, console
from uspx.workload import DEFAULT_MAX_LENGTH, Workload, encode, load_workload

METHODS = ("frequency", "reap", "ean", "capability")
IMATRIX_METHODS = ("frequency",)
DEFAULT_METHOD = "reap"


def extract_gguf(model: str | Path, workload: str | Path | Workload, out_dir: str | Path, *,
                 budget: str | int | None = None, keep: str | int | float | None = None, context: int = 4096,
                 method: str | None = None, imatrix: str | Path | None = None, max_length: int = DEFAULT_MAX_LENGTH,
                 tool_families: list[str] | None = None, threads: int | None = None, n_gpu_layers: int = 0,
                 epsilon: float = 0.05, evaluate: bool = True, speed: bool = True, bootstrap: int = 200,
                 seed: int = 0, binding: str | None = None, progress: bool = True) -> dict:
    """Statistics, scores, selection and the pruned GGUF of ``model`` for ``workload`` (module doc);
    returns the report written to ``out_dir/report.json``."""
    from uspx.plan.select import select_experts
    from uspx.prune.gguf_file import read_model

    started = time.perf_counter()
    if (budget is None) == (keep is None):
        raise UspxError("give exactly one of --budget or --keep")
    method = method or (IMATRIX_METHODS[0] if imatrix else DEFAULT_METHOD)
    allowed = IMATRIX_METHODS if imatrix else METHODS
    if method not in allowed:
        raise UspxError(f"--method {method} is not computable from {'an imatrix' if imatrix else 'llama.cpp routing'} "
                        f"(choose from {', '.join(allowed)}); the Hugging Face checkpoint gives every method")
    if method == "capability" and not tool_families:
        raise UspxError("--method capability needs the families handed to tools (--tool-families, e.g. arith)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gm = read_model(model)
    wl = load_workload(workload)

    clock = Clock()
    if imatrix:
        table, stats = _imatrix_scores(gm, imatrix, out / "scores")
    else:
        trace_dir = _trace(gm, wl, out / "trace", max_length, threads, n_gpu_layers, binding, progress)
        clock.done("trace")
        table, stats = _trace_scores(gm, trace_dir, wl, out / "scores", tool_families, bootstrap, seed)
    clock.done("score")

    kv = gm.kv_bytes_per_token * context if budget is not None else 0
    plan = select_experts(table.method(method), budget=budget, keep=keep, top_k=gm.top_k,
                          fixed_bytes=gm.fixed_bytes + kv, uniform=True,
                          scores_fingerprint=sha256_json(table.meta), model_fingerprint=gm.fingerprint)
    plan.model_type = gm.arch
    plan.sizes.update(fixed_weights=gm.fixed_bytes, kv_cache=kv)  # the selection's fixed part held both
    plan.settings.update(context=context if budget is not None else 0, kv_dtype="f16 (llama.cpp's default cache)",
                         cost_source="the GGUF's stored bytes per expert")
    plan.save(out / "plan.json")
    clock.done("select")

    target = out / "model.gguf"
    pruned = _prune(gm, plan, target)
    clock.done("prune")

    evaluation, note = _evaluate(gm, target, wl, out, evaluate=evaluate, max_length=max_length, epsilon=epsilon,
                                 budget=budget, context=context, speed=speed, threads=threads, binding=binding,
                                 progress=progress)
    if evaluation is not None:
        clock.done("evaluate")

    report = dict(
        model=dict(source=gm.path, fingerprint=gm.fingerprint, arch=gm.arch, bytes=gm.file_bytes,
                   moe_layers=gm.moe_layers, num_experts=gm.num_experts, top_k=gm.top_k),
        workload=dict(source=wl.source, fingerprint=wl.fingerprint, items=len(wl.items)),
        statistics=stats, method=method, budget=plan.budget_bytes, keep=plan.keep, context=context,
        kept={str(l): v for l, v in sorted(plan.kept.items())}, counts={str(l): n for l, n in sorted(plan.counts.items())},
        size=dict(plan_bytes=plan.predicted_bytes, sizes=plan.sizes, source_bytes=pruned["source_bytes"],
                  written_bytes=pruned["bytes"]),
        check=pruned["check"], model_out=str(target), evaluation=evaluation, evaluation_note=note,
        seconds=dict(clock.seconds, total=round(time.perf_counter() - started, 2)),
        artifacts=dict(trace=None if imatrix else str(out / "trace"), scores=str(out / "scores"),
                       plan=str(out / "plan.json"), model=str(target),
                       evaluation=str(out / "evaluation.json") if evaluation else None),
    )
    write_json(out / "report.json", report)
    if progress:
        console.print(plan)
        console.print(f"pruned GGUF: {target} ({pruned['bytes']:,} bytes of {pruned['source_bytes']:,}); "
                      f"report: {out / 'report.json'}")
        if evaluation:
            o, verdict = evaluation["overall"], evaluation["acceptance"]
            console.print(f"held-out loss delta {o.get('delta', float('nan')):+.4f} nats per token, top-1 agreement "
                          f"{o.get('top1_agreement', float('nan')):.3f}: {verdict.get('verdict', verdict)}")
    return report


def _prune(gm, plan, target: Path) -> dict:
    """The pruned GGUF and its record; a finished run's file for the same plan and source is kept."""
    from uspx.prune.gguf_file import prune_gguf

    record = record_path(target)
    kept = {str(l): sorted(v) for l, v in plan.kept.items()}
    if target.exists() and record.exists():
        old = read_json(record)
        if old.get("kept") == kept and old.get("source_fingerprint") == gm.fingerprint:
            return old
    if target.exists():
        target.unlink()  # written for another plan (or its record lost): made again
    pruned = prune_gguf(gm.path, plan.kept_set(), target, num_experts=gm.num_experts)
    pruned["source_fingerprint"] = gm.fingerprint
    write_json(record, pruned)
    return pruned


def _evaluate(gm, target: Path, wl: Workload, out: Path, *, evaluate: bool, max_length: int, epsilon: float,
              budget, context: int, speed: bool, threads, binding, progress: bool) -> tuple[dict | None, str | None]:
    """The pruned file judged against the original in llama.cpp, or why it was not."""
    if not evaluate:
        return None, "not run (evaluate=False)"
    if not wl.part("heldout").items:
        return None, f"not run: {wl.source} has no held-out items"
    from uspx.trace.llama_runtime import GET_BINDING, binding_name

    try:
        binding_name(binding)
    except UspxError:  # an extract from an importance matrix alone runs nothing until here
        return None, f"not run: {GET_BINDING}"
    from uspx.evaluate.gguf import evaluate_gguf

    if progress:
        console.print(f"evaluating the pruned GGUF against {gm.path} on {len(wl.part('heldout').items)} "
                      "held-out items (both in llama.cpp)")
    ev = evaluate_gguf(gm.path, target, wl, split="heldout", max_length=max_length, epsilon=epsilon,
                       memory_budget=budget, context=context, speed=speed, threads=threads, binding=binding,
                       out=out / "evaluation.json")
    return dict(overall=ev["overall"], families=ev["families"], acceptance=ev["acceptance"], speed=ev.get("speed"),
                path=str(out / "evaluation.json")), None


def _trace(gm, wl: Workload, out: Path, max_length: int, threads, n_gpu_layers: int, binding, progress: bool) -> Path:
    """The calibration items' routing in llama.cpp, as a uspx trace folder (reused when complete)."""
    from uspx.trace.llama import record, write_trace
    from uspx.trace.llama_runtime import LlamaTokenizer, Runtime
    from uspx.trace.run import workload_info

    part = wl.part("calibration")
    if not part.items:
        raise UspxError(f"{wl.source}: no calibration items to record routing on")
    info = workload_info(part)
    manifest = out / "manifest.json"
    if manifest.exists():
        old = read_json(manifest)
        if old.get("complete") and old["model"]["fingerprint"] == gm.fingerprint and \
                old["workload"]["fingerprint"] == info["fingerprint"] and old["options"].get("max_length") == max_length:
            return out
    with Runtime(gm.path, n_ctx=8, binding=binding, vocab_only=True) as rt:
        encoded = encode(part, LlamaTokenizer(rt), max_length)
    keep = [e for e in encoded if e.input_ids]
    if len(keep) != len(encoded):
        raise UspxError(f"{wl.source}: {len(encoded) - len(keep)} calibration items tokenise to nothing")
    if progress:
        console.print(f"recording routing in llama.cpp: {len(encoded)} items, "
                      f"{sum(len(e.input_ids) for e in encoded):,} tokens")
    rec = record(gm, [e.input_ids for e in encoded], norms=True, n_threads=threads, n_gpu_layers=n_gpu_layers,
                 binding=binding)
    summary = dict(items=len(part.items), families={f: sum(1 for i in part.items if i.family == f) for f in part.families},
                   splits={"calibration": len(part.items)}, duplicates=part.summary.duplicates,
                   skipped_empty=part.summary.skipped_empty, truncated=part.summary.truncated,
                   truncated_tokens=part.summary.truncated_tokens)
    write_trace(gm, encoded, rec, out, info, summary, dict(split="calibration", max_length=max_length))
    return out


def _meta(gm, methods: list[str], workload: dict, trace: str | None, options: dict, prompts: int) -> dict:
    import uspx
    from uspx.score.table import FORMAT

    return dict(format=FORMAT, uspx_version=uspx.__version__, model=gm.info(), workload=workload, trace=trace,
                methods=methods, options=dict(options, units=["experts"], sequential=None),
                prompts=dict(trace=prompts, model=None, model_tokens=None, loss_tokens=None),
                method_source={m: "llama.cpp" for m in methods},
                cost_bytes="bytes of one expert in the GGUF as stored (every expert tensor's slice, router row included)")


def _trace_scores(gm, trace_dir: Path, wl: Workload, out: Path, tool_families, bootstrap: int, seed: int):
    """frequency, reap, ean (and capability with tool families) from the recorded trace, with
    bootstrap intervals over prompts: the same sums and ratios as ``uspx score`` on any trace."""
    import pyarrow as pa

    from uspx.score.bootstrap import estimate
    from uspx.score.methods import capability_factor
    from uspx.score.table import ScoreTable, build_table
    from uspx.score.trace_stats import stats_from_trace
    from uspx.trace import Trace

    trace = Trace(trace_dir)
    stats = stats_from_trace(trace, "all", norms=True)
    factors = {"frequency": [stats.frequency()], "reap": [stats.reap()], "ean": [stats.ean()]}
    if tool_families:
        factors["capability"] = [capability_factor(stats, wl.part("calibration"), tool_families)[0]]
    tables = []
    for name, fs in factors.items():
        est = estimate(fs, bootstrap, seed)
        tables.append(build_table(gm.moe_layers, gm.num_experts, name, est.value, stats.count.sum(0), est.ci_low,
                                  est.ci_high, [gm.expert_bytes] * len(gm.moe_layers), len(stats.samples)))
    man = trace.manifest
    meta = _meta(gm, list(factors), dict(man["workload"], split="calibration"), str(trace_dir),
                 dict(bootstrap=bootstrap, seed=seed, ci_level=0.95, bootstrap_unit="prompt",
                      tool_families=sorted(tool_families or [])), len(stats.samples))
    table = ScoreTable(pa.concat_tables(tables), meta)
    table.write(out)
    statistics = dict(source="llama.cpp evaluation callback", binding=man["options"]["runtime"]["binding"],
                      nodes=man["options"]["runtime"]["nodes"], prompts=len(stats.samples),
                      tokens=int(stats.tokens.sum()), seconds=man["summary"]["seconds_this_run"])
    return table, statistics


def _imatrix_scores(gm, path, out: Path):
    """frequency from an importance matrix's per-expert counts: one sample (the whole text), so no
    interval."""
    from uspx.score.table import ScoreTable, build_table
    from uspx.trace.llama import imatrix_experts, read_imatrix
    from uspx.trace.serving import file_digest

    im = read_imatrix(path)
    ex = imatrix_experts(im, gm)
    if ex.counts is None:
        raise UspxError(f"{path}: a legacy (.dat) imatrix keeps no per-expert counts, so no frequency; "
                        "make a GGUF imatrix (llama-imatrix's default output) on the same text")
    value = ex.counts / max(ex.tokens, 1)
    nan = np.full(value.shape, np.nan)
    table = build_table(gm.moe_layers, gm.num_experts, "frequency", value, ex.counts, nan, nan,
                        [gm.expert_bytes] * len(gm.moe_layers), 1)
    meta = _meta(gm, ["frequency"], dict(source=str(path), fingerprint=file_digest([Path(path)])[:16],
                                         datasets=im.datasets, split="all"), None,
                 dict(bootstrap=0, seed=0, ci_level=0.95, bootstrap_unit="none (one imatrix)",
                      imatrix=dict(chunks=im.chunk_count, chunk_size=im.chunk_size)), 1)
    t = ScoreTable(table, meta)
    t.write(out)
    return t, dict(source="llama-imatrix", file=str(path), datasets=im.datasets, tokens=ex.tokens,
                   chunks=im.chunk_count, chunk_size=im.chunk_size)
