"""``uspx student RUN_DIR --experts-per-layer M``: a dense model from the user's own experts,
distilled from the original, measured against the original and the pruned MoE of the same run.

    RUN_DIR/student-M/work/          training checkpoints while it runs (a killed run resumes)
    RUN_DIR/student-M/model/         the student (stock ``from_pretrained``), with its record
    RUN_DIR/student-M/student.json   construction, training history, evaluations and sizes

The M experts of each layer are the run's best by its own scores; their fixed weights come from
the user's calibration tokens (see ``uspx.student.build``). Distillation is ``uspx recover``'s
training loop with its losses (token KD with temperature, optional layer matching of every MoE
layer's output and cross-entropy), every weight of the student trained, early-stopped on a
validation slice of the calibration items. The student keeps the original's hidden size, so
layer outputs are compared directly, with no learned map between widths. ``group_lasso`` adds
``lambda * sum_g ||W_g||_2`` over each layer's channel blocks (one block per source expert) as a
proximal step after each update, which sets whole blocks exactly to zero; the report counts them.
"""

from __future__ import annotations

import copy
import hashlib
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

import uspx
from uspx.io import UspxError, atomic_folder, write_json
from uspx.workload import DEFAULT_MAX_LENGTH
from uspx.progress import console
from uspx.recover.train import Settings

REPORT = "student.json"


def student(run_dir: str | Path, *, experts_per_layer: int, weighting: str = "routed",
            settings: Settings | None = None, group_lasso: float = 0.0, workload=None,
            out_dir: str | Path | None = None, others: str | Path | None = None, max_length: int = DEFAULT_MAX_LENGTH,
            epsilon: float = 0.05, speed: bool = True, progress: bool = True) -> dict:
    """Build, distill, export and evaluate the dense student of ``run_dir``; returns (and writes) its report."""
    from uspx.engine.batches import pad_id_of
    from uspx.models import adapter_for, load_model
    from uspx.prune.files import weight_files
    from uspx.recover.run import _families, _finished, _gap, finished_run
    from uspx.score.table import load_scores
    from uspx.student.build import build_student, choose_experts, routing_stats
    from uspx.workload import encode

    settings = _checked(settings, weighting, group_lasso)
    run, record, report, source, plan_sha, wl = finished_run(run_dir, workload)
    out = Path(out_dir) if out_dir is not None else run / f"student-{experts_per_layer}"
    scores_dir, method = run / "scores", report["method"]
    ranking = dict(zip(*load_scores(scores_dir).matrix(method)))  # layer -> [E] scores

    teacher = load_model(source)
    adapter = adapter_for(teacher.model)
    if not 1 <= experts_per_layer <= adapter.num_experts:
        raise UspxError(f"--experts-per-layer must lie in 1..{adapter.num_experts}, not {experts_per_layer}")
    adapter.student_config(adapter.config, adapter.expert_width())  # a family that cannot hold a student fails before any work
    items = encode(wl.part("calibration"), teacher.tokenizer, max_length)
    pad = pad_id_of(teacher.tokenizer)
    scores_sha = hashlib.sha256((scores_dir / "scores.parquet").read_bytes()).hexdigest()
    key = dict(source=record["source_fingerprint"], plan=plan_sha, scores=scores_sha,
               workload=wl.fingerprint, max_length=max_length, experts_per_layer=experts_per_layer,
               weighting=weighting, group_lasso=group_lasso, settings=asdict(settings))

    console.rule(f"uspx student: {experts_per_layer} experts per layer of {teacher.label} -> one dense MLP each")
    started = time.perf_counter()
    stats = routing_stats(teacher.model, items, pad, progress=progress)
    choice = choose_experts(ranking, stats, experts_per_layer, weighting)
    built = build_student(teacher.model, choice)
    files = weight_files(source)
    stored = torch.bfloat16 if files.is_mxfp4() else files.main_float_dtype()  # merged experts cannot stay MXFP4
    existing = _finished(out / "model", key)
    if existing is None:
        history, zeros = _distill(
            teacher, built, choice, items, pad, settings, out, key, stored=stored, source=source, record=record,
            run=run, weighting=weighting, group_lasso=group_lasso, experts_per_layer=experts_per_layer,
            progress=progress)
    else:
        history, zeros = existing["recovered"]["history"], existing.get("group_lasso_zeros")
    seconds = round(time.perf_counter() - started, 1)
    rows, cal, elsewhere = _measure(teacher, built, wl, run, out, source, others, stored,
                                    max_length=max_length, epsilon=epsilon, speed=speed)
    result = dict(
        format="uspx-student/1", uspx_version=uspx.__version__, run=str(run), source=str(source),
        model=str(out / "model"), experts_per_layer=experts_per_layer, weighting=weighting, method=method,
        experts={str(l): v for l, v in choice.experts.items()}, weights={str(l): v for l, v in choice.weights.items()},
        settings=asdict(settings), group_lasso=group_lasso, group_lasso_zeros=zeros, history=history, seconds=seconds,
        heldout={name: _families(ev) for name, ev in rows.items()},
        sizes={name: ev["size"]["candidate"] for name, ev in rows.items()},
        speed={name: ev.get("speed") for name, ev in rows.items() if ev.get("speed")},
        overfitting_gap=_gap(cal, rows["student"]), elsewhere=elsewhere, acceptance=rows["student"]["acceptance"],
        stats_tokens=stats.tokens,
    )
    write_json(out / REPORT, result)
    _print(result)
    return result


def _checked(settings: Settings | None, weighting: str, group_lasso: float) -> Settings:
    """The training settings (every weight trained by default), refusing what a student cannot do."""
    from uspx.student.build import WEIGHTINGS

    settings = settings or Settings(train="full")
    if settings.train != "full":
        raise UspxError("a student trains every weight (--train full); its one expert per layer has no router to train")
    if settings.router_kd:
        raise UspxError("router KD has nothing to match in a student (one expert per layer); leave it 0")
    if weighting not in WEIGHTINGS:
        raise UspxError(f"--weights must be one of {', '.join(WEIGHTINGS)}, not {weighting!r}")
    if group_lasso < 0:
        raise UspxError("--group-lasso must be >= 0")
    return settings


def _distill(teacher, built, choice, items, pad: int, settings: Settings, out: Path, key: dict, *,
             stored: torch.dtype, source, record: dict, run: Path, weighting: str, group_lasso: float,
             experts_per_layer: int, progress: bool) -> tuple[dict, dict | None]:
    """Train a copy of the built student against the teacher, round it to the stored dtype, write it
    to ``out/model`` with its record (atomically) and drop the training checkpoints; returns
    (training history, group-lasso zero count or None)."""
    from uspx.models import adapter_for, model_fingerprint
    from uspx.prune.export import RECORD
    from uspx.recover.run import save_model, verify_reload
    from uspx.recover.train import train
    from uspx.student.build import channel_groups, group_lasso_step, group_norms

    adapter = adapter_for(teacher.model)
    zeros = None
    model = copy.deepcopy(built)  # the built student stays as it is, for its own evaluation
    groups = channel_groups(model, experts_per_layer) if group_lasso else None
    after_step = (lambda lr: group_lasso_step(groups, lr * group_lasso)) if groups else None
    kept = {l.index: choice.experts[l.index] for l in adapter.layers}  # the layers layer matching compares
    model, history = train(teacher.model, model, kept, items, settings, out / "work", key, pad_id=pad,
                           progress=progress, after_step=after_step)
    with torch.no_grad():  # what the file will hold, so the evaluation measures the export itself
        for p in model.parameters():
            p.copy_(p.to(stored).to(p.dtype))
    if groups:
        norms = group_norms(channel_groups(model, experts_per_layer))
        zeros = dict(groups=len(norms), zero=int((norms == 0).sum()),
                     channels_per_group=adapter_for(model).expert_width() // experts_per_layer)
    with atomic_folder(out / "model") as tmp:
        save_model(model, tmp, stored, source)
        check = verify_reload(model, tmp, teacher.tokenizer)
        new_record = dict(format="uspx-student/1", uspx_version=uspx.__version__, source=str(source),
                          source_fingerprint=record["source_fingerprint"], family=adapter.family, run=str(run),
                          experts={str(l): v for l, v in choice.experts.items()},
                          weights={str(l): v for l, v in choice.weights.items()}, weighting=weighting,
                          verification=check, group_lasso_zeros=zeros,
                          recovered=dict(key=key, history=asdict(history)),
                          fingerprint=model_fingerprint(tmp), status="written")
        write_json(tmp / RECORD, new_record)
    shutil.rmtree(out / "work")
    return asdict(history), zeros


def _measure(teacher, built, wl, run: Path, out: Path, source, others, stored: torch.dtype, *, max_length: int,
             epsilon: float, speed: bool) -> tuple[dict[str, dict], dict, dict | None]:
    """Held-out evaluations of the built and trained students and of the run's pruned (and recovered)
    MoE, the student's calibration evaluation, and both models on the other users' workload."""
    from uspx.evaluate import evaluate
    from uspx.prune.export import RECORD
    from uspx.recover.run import _families, default_others, save_model
    from uspx.workload import load_workload

    def quality(candidate, part, split, measure=False):
        return evaluate(teacher, candidate, part, split=split, max_length=max_length, epsilon=epsilon,
                        speed=measure and speed)

    with tempfile.TemporaryDirectory(prefix=".built-", dir=out) as folder:  # evaluated from its files as the others
        save_model(built, Path(folder), stored, source)
        rows = {"student (built, not trained)": quality(Path(folder), wl, "heldout")}
    rows["student"] = quality(out / "model", wl, "heldout", measure=True)
    rows["pruned MoE"] = quality(run / "model", wl, "heldout", measure=True)
    if (run / "recover" / "model" / RECORD).exists():
        rows["pruned MoE, recovered"] = quality(run / "recover" / "model", wl, "heldout", measure=True)
    cal = quality(out / "model", wl, "calibration")
    others_wl = default_others(source, others)
    elsewhere = None
    if others_wl is not None:
        o = load_workload(others_wl)
        elsewhere = dict(workload=o.source, student=_families(quality(out / "model", o, "heldout")),
                         pruned=_families(quality(run / "model", o, "heldout")))
    return rows, cal, elsewhere


def _print(r: dict) -> None:
    from rich.table import Table

    h = r["history"]
    console.print(f"trained {h['step']} steps ({h['tokens_seen']} tokens, {h['seconds']:.0f} s); best validation "
                  f"loss {h['best_val']:.4f} at step {h['best_step']}; stopped: {h['stopped']}")
    if r["group_lasso_zeros"]:
        z = r["group_lasso_zeros"]
        console.print(f"group lasso: {z['zero']} of {z['groups']} channel blocks ({z['channels_per_group']} channels "
                      "each) are exactly zero")
    t = Table(title="held-out loss delta vs the original (nats per target token)")
    for col in ("model", "delta", "top-1 agree", "weights"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for name, fams in r["heldout"].items():
        size = r["sizes"].get(name, {})
        t.add_row(name, f"{fams['all']['delta']:+.4f}", f"{fams['all']['top1_agreement']:.3f}",
                  f"{size['parameter_bytes'] / 2**20:.2f} MiB" if size else "")
    console.print(t)
    console.print(f"verdict (student): [bold]{r['acceptance']['verdict']}[/] ({r['acceptance']['rule']})")
