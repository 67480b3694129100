"""``uspx extract --streaming``: the whole job for a gpt_oss checkpoint larger than memory.

    out_dir/trace/            streaming trace of the calibration prompts (with reconstruction sums)
    out_dir/scores/           local scores (frequency, reap, ean, reconstruction)
    out_dir/plan.json         kept set (sized as the checkpoint's precision: MXFP4 stays MXFP4)
    out_dir/model/            pruned checkpoint, written tensor by tensor (MXFP4 blocks sliced)
    out_dir/evaluation.json   held-out loss per family, original vs pruned, both streamed
    out_dir/report.json       the summary

Peak memory is that of one decoder layer plus the hidden states (``uspx plan --streaming``), never
the whole model. Re-running resumes: a finished trace, scores and pruned model are reused.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path


from uspx.io import UspxError, read_json, sha256_json, write_json
from uspx.models import model_fingerprint
from uspx.models.loading import resolve_model_path
from uspx.progress import console
from uspx.stream.checkpoint import INDEX_NAME, Checkpoint
from uspx.stream.folder import DTYPE_NAMES, trace_streaming
from uspx.stream.prune import prune_mxfp4_checkpoint
from uspx.stream.score import LOCAL_METHODS, score_streaming
from uspx.stream.verify import family_losses, stream_item_losses, verify_pruned

SIZE_TOLERANCE = 0.02  # the pruned checkpoint's tensors must be within 2% of the plan's prediction


def tensor_bytes(model_dir: str | Path) -> int:
    """Bytes of every tensor of a checkpoint (headers excluded): the index total, or the headers' sum."""
    path = Path(model_dir)
    if (path / INDEX_NAME).exists():
        total = read_json(path / INDEX_NAME).get("metadata", {}).get("total_size")
        if total:
            return int(total)
    ckpt = Checkpoint(path)
    total = sum(ckpt.spec(n).nbytes for n in ckpt.weight_map)
    ckpt.close()
    return total


def extract_streaming(
    model: str | Path,
    workload,
    out_dir: str | Path,
    *,
    budget: str | int | None = None,
    keep: str | int | float | None = None,
    context: int = 4096,
    kv_dtype: str = "bf16",
    method: str | None = None,
    max_length: int = 512,
    dtype: str = "bf16",
    verify_tokens: int = 64,
    evaluate: bool = True,
    epsilon: float = 0.05,
    progress: bool = True,
) -> dict:
    """Trace (streaming), score (local methods), select, prune on disk, verify and evaluate."""
    from transformers import AutoTokenizer

    from uspx.extract import checkpoint_dtype
    from uspx.plan import select_experts
    from uspx.score import DEFAULT_METHOD, load_scores
    from uspx.trace.run import workload_info
    from uspx.workload import Workload, encode, load_workload

    if (budget is None) == (keep is None):
        raise UspxError("give exactly one of --budget (e.g. 8GiB) or --keep (e.g. 50%)")
    method = method or (DEFAULT_METHOD if DEFAULT_METHOD in LOCAL_METHODS else "reap")
    if method not in LOCAL_METHODS:
        raise UspxError(f"method {method!r} needs the whole model; --streaming scores with {', '.join(LOCAL_METHODS)}")
    path = resolve_model_path(model)
    out = Path(out_dir)
    started = time.perf_counter()
    wl = workload if isinstance(workload, Workload) else load_workload(workload)
    if not wl.part("calibration").items or (evaluate and not wl.part("heldout").items):
        raise UspxError(f"{wl.source}: needs calibration{' and held-out' if evaluate else ''} items")
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise UspxError(f"{path}: no tokenizer files; uspx needs one to read a text workload")
    tokenizer = AutoTokenizer.from_pretrained(path)
    fingerprint = model_fingerprint(path)
    config = Checkpoint(path).config
    seconds: dict[str, float] = {}

    def stage(name: str) -> None:
        seconds[name] = round(time.perf_counter() - started - sum(seconds.values()), 2)
        console.print(f"[green]done[/] {name} ({seconds[name]:.1f} s)")

    console.rule(f"uspx extract --streaming: {path} for {wl.source}")
    calib = wl.part("calibration")
    encoded = encode(calib, tokenizer, max_length)
    trace_streaming(path, encoded, out / "trace", workload=workload_info(calib), summary=asdict(calib.summary),
                    split="calibration", max_length=max_length, norms=method in ("reap", "ean"),
                    reconstruction=method == "reconstruction", dtype=dtype, progress=progress)
    stage("trace")

    scores_dir = out / "scores"
    table = None
    if (scores_dir / "scores.json").exists():
        table = load_scores(scores_dir)
        table.check(model=fingerprint, workload=wl.fingerprint)
        if method not in table.methods:
            table = None
    if table is None:
        table = score_streaming(path, out / "trace", scores_dir, [method], workload=wl, dtype=dtype, progress=progress)
    stage("score")

    precision = checkpoint_dtype(path)
    plan = select_experts(
        table.method(method), budget=budget, keep=keep, config=path, dtype=precision,
        context=context if budget is not None else 0, kv_dtype=kv_dtype, uniform=True,
        scores_fingerprint=sha256_json(table.meta), model_fingerprint=fingerprint,
    )
    plan.save(out / "plan.json")
    console.print(plan)
    stage("select")

    pruned = out / "model"
    done = pruned / "uspx-prune.json"
    if not (done.exists() and read_json(done).get("plan") == sha256_json(plan.to_dict())):
        prune_mxfp4_checkpoint(path, plan.kept_set(), pruned)
        write_json(done, dict(plan=sha256_json(plan.to_dict()), source=str(path), source_fingerprint=fingerprint))
    stage("prune")

    sequences = _verify_sequences(encoded, verify_tokens)
    check = verify_pruned(path, pruned, plan.kept_set(), sequences)  # float32: see verify_pruned
    actual, original = tensor_bytes(pruned), tensor_bytes(path)
    # the plan sizes weights (+ KV cache and reserve under a budget): compare like with like
    predicted = plan.sizes.get("fixed_weights", 0) + plan.sizes.get("kept_experts", 0)
    size = dict(precision=precision, actual_bytes=actual, predicted_bytes=predicted, source_tensor_bytes=original,
                relative_error=(actual - predicted) / predicted if predicted else None,
                saved_bytes=original - actual,
                experts_removed=sum(plan.num_experts - len(v) for v in plan.kept.values()))
    size["saved_per_expert_bytes"] = size["saved_bytes"] / max(size["experts_removed"], 1)
    size_ok = size["relative_error"] is not None and abs(size["relative_error"]) <= SIZE_TOLERANCE
    stage("verify")

    evaluation = None
    if evaluate:
        held = encode(wl.part("heldout"), tokenizer, max_length)
        teacher = family_losses(held, *stream_item_losses(path, held, dtype=DTYPE_NAMES[dtype]))
        candidate = family_losses(held, *stream_item_losses(pruned, held, dtype=DTYPE_NAMES[dtype]))
        families = {}
        for fam, t in teacher.items():
            c = candidate[fam]
            delta = None if t["loss"] is None or c["loss"] is None else c["loss"] - t["loss"]
            families[fam] = dict(loss_teacher=t["loss"], loss_candidate=c["loss"], delta=delta, tokens=t["tokens"])
        worst = [f for f, v in families.items() if f != "all" and v["delta"] is not None and v["delta"] > epsilon]
        evaluation = dict(split="heldout", epsilon=epsilon, families=families,
                          acceptance=dict(verdict="reject" if worst else "accept",
                                          rule=f"loss delta <= {epsilon} nats per token in every family",
                                          reasons=[f"{f}: delta {families[f]['delta']:.4f} > {epsilon}" for f in worst]))
        write_json(out / "evaluation.json", evaluation)
        stage("evaluate")

    report = dict(
        streaming=True,
        model=dict(source=str(path), fingerprint=fingerprint),
        workload=dict(source=wl.source, fingerprint=wl.fingerprint, summary=wl.summary.__dict__),
        method=method, budget=budget, keep=keep, context=context, dtype=dtype,
        kept={str(k): v for k, v in plan.kept.items()},
        counts={str(k): len(v) for k, v in plan.kept.items()},
        size=dict(size, within_tolerance=size_ok, plan_bytes=plan.predicted_bytes),
        verification=dict(check, verify_sequences=len(sequences)),
        evaluation=evaluation,
        seconds=seconds,
        artifacts=dict(trace=str(out / "trace"), scores=str(scores_dir), plan=str(out / "plan.json"),
                       model=str(pruned), evaluation=str(out / "evaluation.json") if evaluate else None),
    )
    write_json(out / "report.json", report)
    _print(report)
    if not size_ok:
        raise UspxError(f"pruned checkpoint holds {actual} bytes of tensors, the plan predicted {predicted} "
                        f"({100 * (size['relative_error'] or 0):+.1f}%, tolerance {100 * SIZE_TOLERANCE:.0f}%)")
    return report


def _verify_sequences(encoded, verify_tokens: int) -> list[list[int]]:
    """Whole calibration prompts, cut to at most ``verify_tokens`` tokens in all (logits are V wide)."""
    out, left = [], max(1, verify_tokens)
    for e in encoded:
        if left <= 0:
            break
        out.append(list(e.input_ids[:left]))
        left -= len(out[-1])
    return out


def _print(report: dict) -> None:
    from uspx.plan import format_bytes

    size, ver = report["size"], report["verification"]
    counts = sorted(set(report["counts"].values()))
    console.rule("what was kept")
    console.print(f"method {report['method']}; experts kept per layer: {counts[0] if len(counts) == 1 else counts}")
    console.print(
        f"size ({size['precision']}): written {format_bytes(size['actual_bytes'])}, plan {format_bytes(size['predicted_bytes'])} "
        f"({100 * (size['relative_error'] or 0):+.2f}%), original {format_bytes(size['source_tensor_bytes'])}; "
        f"{format_bytes(size['saved_per_expert_bytes'])} saved per expert removed"
    )
    console.print(f"streamed pruned model vs original restricted to the kept set: max |logit diff| "
                  f"{ver['max_abs_logit_diff']:.2e} over {ver['tokens']} tokens ({ver['dtype']})")
    ev = report.get("evaluation")
    if ev:
        for fam, v in ev["families"].items():
            console.print(f"  {fam:10s} loss original {v['loss_teacher']:.4f}  pruned {v['loss_candidate']:.4f}  "
                          f"delta {v['delta']:+.4f}  ({v['tokens']} tokens)")
        console.print(f"verdict: [bold]{ev['acceptance']['verdict']}[/] ({ev['acceptance']['rule']})")
    console.print(json.dumps(report["seconds"]))
