"""``uspx extract``: the whole job in one call, each stage leaving its artifact in ``out_dir``.

    out_dir/trace/            routing on the user's calibration prompts (uspx trace)
    out_dir/scores/           importance of every (layer, expert)     (uspx score)
    out_dir/plan.json         kept set under the budget                (uspx select)
    out_dir/model/            pruned checkpoint, verified             (uspx prune)
    out_dir/evaluation.json   quality on the held-out prompts         (uspx eval)
    out_dir/whole_experts/    the cut of whole experts only at the same budget, exported and
                              evaluated beside the joint cut (plan, model, evaluation)
    out_dir/report.json       the summary printed at the end

Under a byte budget the cut is joint by default: the shape (experts per layer, channels per expert,
KV groups and query heads) that keeps the most of the user's reconstruction value
(``uspx.plan.joint``), which at equal bytes costs far less than dropping whole experts. It needs
channel and head scores, which the engine measures whole or layer by layer; ``--keep``, a
non-uniform plan, a score method without unit scores, or a family whose narrower experts are cut
from a model in memory (all but gpt-oss) opened layer by layer, cuts whole experts, and says so.

Re-running with the same arguments resumes: a finished trace, scores and export are reused (their
fingerprints are checked), an interrupted trace continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from uspx.dist import current, solo
from uspx.io import UspxError, read_json, write_json
from uspx.models import LoadedModel
from uspx.progress import Clock, console
from uspx.workload import DEFAULT_MAX_LENGTH, Workload, load_workload

if TYPE_CHECKING:  # imported when run: torch stays unloaded until a stage needs it
    from uspx.engine import Opened
    from uspx.plan.select import Plan
    from uspx.score import ScoreTable

QUALITY_COLUMNS = {"loss_teacher": "teacher", "loss_candidate": "pruned", "delta": "delta",
                   "top1_agreement": "top-1 agree", "kl": "KL"}


def checkpoint_dtype(model_dir: str | Path) -> str:
    """The precision of the checkpoint on disk, in the planner's names (what an export will keep).

    Read from the weight files, not the config: a model loaded for computation in fp32 still
    exports in its stored precision.
    """
    import torch

    from uspx.prune import weight_files

    files = weight_files(model_dir)
    if files.is_mxfp4():
        return "mxfp4"
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(files.main_float_dtype(), "fp32")


def experts_kept(opened: Opened, keep: str | int | float | None, budget: str | int | None, context: int,
                 kv_dtype: str) -> int:
    """Experts kept per layer: ``keep`` (a count or a share) or what fits ``budget`` (weights and
    the KV cache of ``context`` tokens, counted as :func:`extract` counts them)."""
    from uspx.plan import fit_experts
    from uspx.score.keep import parse_keep

    if (keep is None) == (budget is None):
        raise UspxError("give exactly one of --keep (e.g. 50%) or --budget (e.g. 8GiB)")
    if keep is not None:
        return parse_keep(keep, opened.source.adapter.num_experts)
    return fit_experts(Path(opened.path), budget, context=context, dtype=checkpoint_dtype(opened.path),
                       kv_dtype=kv_dtype).require().experts_per_layer


def extract(
    model: str | Path | LoadedModel | Opened = "default",
    workload: str | Path | Workload = "python_dev",
    out_dir: str | Path = "runs/extract",
    *,
    budget: str | int | None = None,
    keep: str | int | float | None = None,
    context: int = 4096,
    kv_dtype: str = "bf16",
    method: str | None = None,
    uniform: bool = True,
    solver: str = "lagrangian",
    epsilon: float = 0.05,
    batch_size: int = 8,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_tokens: int | None = None,
    speed: bool = True,
    progress: bool = True,
    trust_remote_code: bool = False,
    dtype: str = "auto",
    sequential: bool = False,
    recover: bool = False,
    recover_steps: int | None = None,
    eval_workload: str | Path | Workload | None = None,
    tool_families: list[str] | None = None,
    units: str | list[str] | None = None,
    compare: bool = True,
    tasks: dict | None = None,
) -> dict:
    """Trace, score, select, prune, verify, export and evaluate, for one user's workload.

    ``eval_workload``: evaluate on every item of this other workload instead of the held-out split
    of ``workload`` (calibrate on one set of prompts, judge on another). ``tool_families``: for
    ``method="capability"``, the families whose work goes to tools (virtual experts).
    ``units``: the unit types cut (``"experts"``, or any of ``experts,channels,heads``); None is the
    joint cut where it can be made (see the module doc). ``compare``: with a joint cut, also export
    and evaluate the whole-experts cut at the same budget, and report its cost beside it.
    ``tasks``: options of the task checks of evaluated items (:func:`uspx.evaluate.evaluate`'s
    ``samples``, ``temperature``, ``pass_k``, ``max_new_tokens``, ``seed``, ``max_pass_drop``);
    their ``tests`` run in the sandbox (:func:`uspx.virtual.sandbox.run_python`).

    ``model`` is opened once (:func:`uspx.engine.open_source`; a folder or a loaded model is
    opened whole, computing in ``dtype``) and that source goes through every stage. A source opened
    layer by layer never loads the whole model: every stage runs a decoder layer at a time from the
    safetensors files, with the local score methods; the export slices the files in their stored
    precision either way (MXFP4 stays MXFP4). ``dtype`` is also the precision the pruned model is
    evaluated in. ``sequential`` scores each
    layer with the layers before it already pruned to the kept count (local methods). ``recover``
    then distills the pruned model from the original (``uspx.recover``), and the verdict is the
    recovered model's.
    """
    from uspx.engine import open_source
    from uspx.score.api import REGISTRY
    from uspx.trace import trace

    # every argument is checked before any work: a typo must not cost a trace
    method = check_arguments(model, budget=budget, keep=keep, method=method, tool_families=tool_families,
                             sequential=sequential, dtype=dtype)
    wl, eval_wl, eval_split = _workloads(workload, eval_workload)
    opened = open_source(model, dtype=dtype, trust_remote_code=trust_remote_code)
    units = cut_units(opened, units, budget=budget, method=method, uniform=uniform, sequential=sequential)
    out = Path(out_dir)
    clock = Clock(say=True)
    console.rule(f"uspx extract{' (layer by layer)' if opened.streaming else ''}: {opened.label} for {wl.source}")
    # the reconstruction sums come out of the tracing pass itself: no second pass over the model
    trace(opened, wl, out / "trace", split="calibration", batch_size=batch_size, max_length=max_length,
          norms=REGISTRY[method].norms, reconstruction=method == "reconstruction" and not sequential,
          progress=progress)
    clock.done("trace")
    d = current()
    if d.active and not d.main:  # the trace was split across the processes; the rest is rank 0's
        d.barrier()
        return read_json(out / "report.json")
    try:
        with solo():
            table = _scores(opened, wl, out, method, units, budget=budget, keep=keep, context=context,
                            kv_dtype=kv_dtype, sequential=sequential, max_tokens=max_tokens, batch_size=batch_size,
                            progress=progress, tool_families=tool_families)
            clock.done("score")
            plan = _select(opened, table, out / "plan.json", method, units, budget=budget, keep=keep, context=context,
                           kv_dtype=kv_dtype, uniform=uniform, solver=solver)
            clock.done("select")
            ev = dict(eval_wl=eval_wl, eval_split=eval_split, budget=budget, context=context, kv_dtype=kv_dtype,
                      epsilon=epsilon, batch_size=batch_size, max_length=max_length, progress=progress,
                      trust_remote_code=trust_remote_code, dtype=dtype, tasks=tasks or {})
            record, evaluation = _export_and_evaluate(opened, out, speed=speed, **ev)
            clock.done("prune + verify + export + evaluate")
            report = _report(opened, wl, eval_wl, eval_split, out, plan, record, evaluation, clock.seconds,
                             method=method, budget=budget, keep=keep, context=context)
            if compare and units != ["experts"]:
                report["whole_experts"] = _whole_experts(opened, table, out / "whole_experts", method, solver=solver, **ev)
                clock.done("whole-experts cut at the same budget")
            write_json(out / "report.json", report)
            print_report(report)
            if recover:
                recover_run(report, out, wl, opened, steps=recover_steps, max_length=max_length, epsilon=epsilon,
                            dtype=dtype, progress=progress)
            return report
    finally:
        d.barrier()


def check_arguments(model: str | Path | LoadedModel | Opened, *, budget: str | int | None,
                    keep: str | int | float | None, method: str | None, tool_families: list[str] | None,
                    sequential: bool, dtype: str) -> str:
    """The score method :func:`extract` will use, once every argument that needs no model pass is
    checked (a folder or a loaded model runs whole; a source opened layer by layer allows the local
    methods only)."""
    from uspx.engine import Opened, compute_dtype
    from uspx.plan import parse_size
    from uspx.plan.select import parse_keep
    from uspx.score import DEFAULT_METHOD
    from uspx.score.api import LOCAL_METHODS, METHODS, SEQUENTIAL_METHODS

    if (budget is None) == (keep is None):
        raise UspxError("give exactly one of --budget (e.g. 8GiB) or --keep (e.g. 50%)")
    method = method or DEFAULT_METHOD
    if method not in METHODS:
        raise UspxError(f"unknown score method {method!r}; choose from {', '.join(METHODS)}")
    if method == "capability" and not tool_families:
        raise UspxError("--method capability needs the families handed to tools (--tool-families, e.g. arith)")
    if (sequential or isinstance(model, Opened) and model.streaming) and method not in LOCAL_METHODS:
        raise UspxError(f"method {method!r} needs the whole model; a layer-by-layer run scores with "
                        f"{', '.join(LOCAL_METHODS)}")
    if sequential and method not in SEQUENTIAL_METHODS:
        raise UspxError(f"method {method!r} is not scored sequentially; --sequential scores with "
                        f"{', '.join(SEQUENTIAL_METHODS)}")
    if budget is not None:
        parse_size(budget)
    compute_dtype(dtype)
    if keep is not None:
        from uspx.models import adapter_class
        from uspx.models.loading import resolve_model_path
        from uspx.plan.memory import load_config

        folder = model.path if isinstance(model, Opened) else model.source if isinstance(model, LoadedModel) else None
        cfg = load_config(Path(folder) if folder is not None else resolve_model_path(model))
        parse_keep(keep, adapter_class(cfg.model_type).config_num_experts(cfg))
    return method


def _workloads(workload: str | Path | Workload,
               eval_workload: str | Path | Workload | None) -> tuple[Workload, Workload, str]:
    """The calibration workload, the one to evaluate on, and the split of it that is evaluated."""
    wl = load_workload(workload)
    eval_wl, eval_split = (wl, "heldout") if eval_workload is None else (load_workload(eval_workload), "all")
    if not wl.part("calibration").items or not wl.part("heldout").items:
        raise UspxError(f"{wl.source}: needs both calibration and held-out items (split {wl.summary.splits})")
    return wl, eval_wl, eval_split


def cut_units(opened: Opened, units: str | list[str] | None, *, budget: str | int | None, method: str,
              uniform: bool, sequential: bool) -> list[str]:
    """The unit types :func:`extract` cuts. Given ones are checked; by default experts, channels
    and heads (heads where the family's attention allows it), unless the run cannot make that cut,
    which is then said."""
    from uspx.score.units import METHODS as UNIT_METHODS, parse_units

    why = [text for bad, text in (
        (budget is None, "--keep counts whole experts"),
        (not uniform, "a non-uniform plan counts whole experts"),
        (sequential, "sequential scores rank whole experts"),
        (opened.streaming and not opened.source.adapter.cuts_on_disk,
         f"{opened.source.adapter.family}: narrower experts are cut from the model in memory, not layer by layer"),
        (method not in UNIT_METHODS, f"method {method!r} has no channel or head scores "
                                     f"(they have {', '.join(UNIT_METHODS)})"),
    ) if bad]
    if units is not None:
        chosen = parse_units(units)
        if chosen != ["experts"] and why:
            raise UspxError(f"cannot cut {', '.join(chosen)}: {'; '.join(why)}")
        return chosen
    if why:
        console.print(f"cutting whole experts only: {'; '.join(why)}")
        return ["experts"]
    return ["experts", "channels"] + (["heads"] if opened.source.adapter.heads_prunable else [])


def _scores(opened: Opened, wl: Workload, out: Path, method: str, units: list[str], *, budget: str | int | None,
            keep: str | int | float | None, context: int, kv_dtype: str, sequential: bool, max_tokens: int | None,
            batch_size: int, progress: bool, tool_families: list[str] | None) -> ScoreTable:
    """The score table in ``out/scores`` (and the unit table beside it when ``units`` go inside the
    layers): reused when it was scored the same way, else scored."""
    from uspx.score import load_scores, score
    from uspx.score.api import KEEP_METHODS

    scores_dir = out / "scores"
    table = None
    if (scores_dir / "scores.json").exists():
        table = load_scores(scores_dir)
        table.check(model=opened.fingerprint, workload=wl.fingerprint)
        if method not in table.methods or not _has_units(scores_dir, units, method):
            table = None
    n_keep = None
    if sequential or method in KEEP_METHODS:  # the count every layer will keep, known before scoring
        n_keep = experts_kept(opened, keep, budget, context, kv_dtype)
    if table is not None and (table.meta["options"].get("sequential") or {}).get("keep") != (n_keep if sequential else None):
        table = None  # scored the other way (one pass vs sequential, or another count)
    if table is None:
        table = score(opened, out / "trace", wl, scores_dir, methods=[method], max_tokens=max_tokens,
                      batch_size=batch_size, progress=progress, sequential=n_keep if sequential else None,
                      keep=n_keep if method in KEEP_METHODS else None, tool_families=tool_families,
                      units=units, unit_methods=[method] if units != ["experts"] else None)
    return table


def _has_units(scores_dir: Path, units: list[str], method: str) -> bool:
    """Whether ``scores_dir`` holds ``method``'s scores of every unit type in ``units``."""
    from uspx.score.units import PARQUET, load_units

    if units == ["experts"]:
        return True
    if not (scores_dir / PARQUET).exists():
        return False
    table = load_units(scores_dir)
    kinds = {"channels": "channel", "heads": "kv_group"}
    return method in table.methods() and all(table.layers(kinds[u]) for u in units if u in kinds)


def _select(opened: Opened, table: ScoreTable, path: Path, method: str, units: list[str], *,
            budget: str | int | None, keep: str | int | float | None, context: int, kv_dtype: str, uniform: bool,
            solver: str) -> Plan:
    """The kept set (and, with units inside the layers, the shape) under the budget, saved to ``path``."""
    from uspx.plan.joint import select_plan

    plan = select_plan(table, path.parent / "scores" if units != ["experts"] else None, Path(opened.path),
                       units=units, method=method, budget=budget, keep=keep, dtype=checkpoint_dtype(opened.path),
                       context=context if budget is not None else 0, kv_dtype=kv_dtype, uniform=uniform,
                       solver=solver, model_fingerprint=opened.fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    plan.save(path)
    console.print(plan)
    return plan


def _export_and_evaluate(opened: Opened, out: Path, *, eval_wl: Workload, eval_split: str, budget: str | int | None,
                         context: int, kv_dtype: str, epsilon: float, batch_size: int, max_length: int, speed: bool,
                         progress: bool, trust_remote_code: bool, dtype: str, tasks: dict) -> tuple[dict, dict]:
    """The pruned checkpoint in ``out/model`` (verified) and its evaluation against the original
    (with the task checks of the evaluated items, their tests in the sandbox)."""
    from uspx.evaluate import evaluate
    from uspx.prune import export
    from uspx.virtual.sandbox import run_python

    record = export(opened, out / "plan.json", out / "model", trust_remote_code=trust_remote_code)
    evaluation = evaluate(opened, out / "model", eval_wl, split=eval_split, max_length=max_length,
                          batch_size=batch_size, epsilon=epsilon, memory_budget=budget, context=context,
                          kv_dtype=kv_dtype, speed=speed, out=out / "evaluation.json", progress=progress, dtype=dtype,
                          sandbox=run_python, **tasks)
    return record, evaluation


def _whole_experts(opened: Opened, table: ScoreTable, out: Path, method: str, *, solver: str, **ev) -> dict:
    """The cut of whole experts only under the same budget, exported and evaluated like the joint
    one (in ``out``): what the joint cut is measured against."""
    try:
        plan = _select(opened, table, out / "plan.json", method, ["experts"], budget=ev["budget"], keep=None,
                       context=ev["context"], kv_dtype=ev["kv_dtype"], uniform=True, solver=solver)
    except UspxError as exc:  # whole experts cannot get down to the budget: that is the comparison
        return dict(fits=False, reason=str(exc))
    record, evaluation = _export_and_evaluate(opened, out, speed=False, **ev)
    return dict(fits=True, shape=_shape(plan, record), plan_bytes=plan.predicted_bytes,
                written_bytes=record["size"]["actual_bytes"], overall_delta=evaluation["overall"]["delta"],
                quality={f: {k: v.get(k) for k in QUALITY_COLUMNS} for f, v in evaluation["families"].items()},
                verdict=evaluation["acceptance"]["verdict"], model=str(out / "model"))


def _shape(plan: Plan, record: dict) -> dict:
    """Experts per layer, channels per expert and the head layout of the export."""
    counts = sorted(set(plan.counts.values()))
    ch, heads = record.get("channels") or {}, record.get("heads") or {}
    return dict(experts=counts[0] if len(counts) == 1 else counts, num_experts=plan.num_experts,
                width=ch.get("width"), original_width=ch.get("original_width"),
                kv_groups=heads.get("kv_groups"), heads_per_group=heads.get("heads_per_group"),
                original_kv_groups=heads.get("original_kv_groups"),
                original_heads_per_group=heads.get("original_heads_per_group"))


def _report(opened: Opened, wl: Workload, eval_wl: Workload, eval_split: str, out: Path, plan: Plan, record: dict,
            evaluation: dict, seconds: dict[str, float], *, method: str, budget: str | int | None,
            keep: str | int | float | None, context: int) -> dict:
    return dict(
        model=dict(source=opened.path, label=opened.label, fingerprint=opened.fingerprint),
        workload=dict(source=wl.source, fingerprint=wl.fingerprint, summary=wl.summary.__dict__),
        evaluated_on=dict(source=eval_wl.source, fingerprint=eval_wl.fingerprint, split=eval_split),
        method=method, budget=budget, keep=keep, context=context, streaming=opened.streaming,
        units=plan.settings.get("units", ["experts"]), shape=_shape(plan, record),
        kept={str(k): v for k, v in plan.kept.items()},
        counts={str(k): len(v) for k, v in plan.kept.items()},
        size=dict(record["size"], plan_bytes=plan.predicted_bytes, precision=record["dtype"]),
        verification=record["verification"],
        quality={f: {k: v.get(k) for k in QUALITY_COLUMNS} for f, v in evaluation["families"].items()},
        overall_delta=evaluation["overall"]["delta"], tasks=evaluation.get("tasks"),
        acceptance=evaluation["acceptance"],
        speed=evaluation.get("speed"),
        seconds=seconds,
        artifacts=dict(trace=str(out / "trace"), scores=str(out / "scores"), plan=str(out / "plan.json"),
                       model=str(out / "model"), evaluation=str(out / "evaluation.json")),
    )


def run_epsilon(report: dict) -> float:
    """A finished run's loss bound: the largest delta_loss threshold its acceptance applied (the
    default epsilon when its report names none)."""
    checks = (report.get("acceptance") or {}).get("checks", [])
    bounds = [c["threshold"] for c in checks if c.get("rule") == "delta_loss"]
    return float(max(bounds)) if bounds else 0.05


def recover_run(report: dict, out: Path, wl: Workload, opened: Opened, *, max_length: int, epsilon: float,
                dtype: str, progress: bool, steps: int | None = None, settings=None,
                start: Path | None = None) -> None:
    """Distil the pruned model from the original (``settings``, by default every kept weight, whole
    or one decoder layer at a time, for ``steps`` at most), starting from ``start`` when given; the
    report then holds the recovered model's verdict."""
    from uspx.recover import Settings, recover as run_recover
    from uspx.virtual.sandbox import run_python

    settings = settings or Settings(train="full", **({} if steps is None else {"steps": steps}))
    res = run_recover(out, original=opened, workload=wl, settings=settings, max_length=max_length, epsilon=epsilon,
                      dtype=dtype, progress=progress, sandbox=run_python, start=start)
    report["recovered"] = dict(model=res["model"], heldout=res["heldout"]["after"], share=res["recovered_share"],
                               history={k: v for k, v in res["history"].items() if not isinstance(v, list)})
    report["acceptance"] = res["acceptance"]
    report["seconds"]["recover"] = res["seconds"]
    write_json(out / "report.json", report)


def print_report(report: dict) -> None:
    from rich.table import Table

    from uspx.plan import format_bytes

    console.rule("what was kept")
    console.print(f"method {report['method']}; {describe_shape(report['shape'])}")
    size = report["size"]
    console.print(
        f"size: predicted {format_bytes(size.get('predicted_bytes') or 0)}, written "
        f"{format_bytes(size.get('actual_bytes') or 0)} "
        f"(original {format_bytes(size.get('source_tensor_bytes') or 0)}); "
        f"reloaded export vs restricted model: max |logit diff| {report['verification']['max_abs_logit_diff']:.2e}"
    )
    t = Table(title="held-out quality per family (loss in nats per completion token)")
    t.add_column("family")
    for col in QUALITY_COLUMNS.values():
        t.add_column(col, justify="right")
    for fam, q in report["quality"].items():
        t.add_row(fam, *(f"{q[k]:.4f}" if q.get(k) is not None else "-" for k in QUALITY_COLUMNS))
    console.print(t)
    alt = report.get("whole_experts")
    if alt and not alt["fits"]:
        console.print(f"whole experts only cannot reach this budget: {alt['reason']}")
    elif alt:
        console.print(f"whole experts only at the same budget: {describe_shape(alt['shape'])}, "
                      f"{format_bytes(alt['written_bytes'])}; held-out delta {alt['overall_delta']:+.4f} against "
                      f"{report['overall_delta']:+.4f} for this cut ({alt['verdict']})")
        if alt["overall_delta"] < report["overall_delta"]:  # the value estimate assumes removals add
            console.print(f"[yellow]whole experts cost less here: their model is {alt['model']} "
                          "(or run again with --units experts)")
    from uspx.evaluate.run import print_verdict

    print_verdict(report, rule=True)


def describe_shape(shape: dict) -> str:
    """The shape in words: experts per layer, channels per expert and the head layout kept."""
    experts = shape["experts"]
    out = f"{experts} of {shape['num_experts']} experts per layer"
    if shape.get("width") is not None:
        out += f", {shape['width']} of {shape['original_width']} channels each"
    if shape.get("kv_groups") is not None:
        out += (f", {shape['kv_groups']} of {shape['original_kv_groups']} KV groups x {shape['heads_per_group']} "
                f"of {shape['original_heads_per_group']} query heads")
    return out
