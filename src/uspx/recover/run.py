"""``uspx recover RUN_DIR``: heal what pruning cost. The pruned checkpoint of an ``uspx extract`` run
learns from the original on the user's calibration items (distillation; see ``recover.objectives``),
and the recovered checkpoint is written, verified and evaluated against the original on held-out
items, before and after.

    RUN_DIR/recover/work/            checkpoints of the training while it runs (a killed run resumes)
    RUN_DIR/recover/model/           the recovered checkpoint (stock ``from_pretrained``), with its record
    RUN_DIR/recover/recover.json     settings, training history, evaluation before and after
"""

from __future__ import annotations

import copy
import hashlib
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

import uspx
from uspx.io import FingerprintMismatch, UspxError, atomic_folder, read_json, write_json
from uspx.progress import console
from uspx.prune.export import FORMAT
from uspx.recover.train import Settings, train
from uspx.workload import DEFAULT_MAX_LENGTH

REPORT = "recover.json"


def recover(run_dir: str | Path, *, original=None, workload=None, settings: Settings | None = None,
            out_dir: str | Path | None = None, others: str | Path | None = None, max_length: int = DEFAULT_MAX_LENGTH,
            epsilon: float = 0.05, dtype: str = "auto", progress: bool = True, sandbox=None,
            start: str | Path | None = None) -> dict:
    """Recover the pruned model of ``run_dir``; returns (and writes) the recovery report.

    ``original`` is the run's original model, opened (:func:`uspx.engine.open_source`; default: its
    folder loaded whole). Opened layer by layer, recovery trains one decoder layer at a time
    (:mod:`uspx.recover.layers`: layer output and router matching, ``--train router`` or ``full``),
    for models larger than memory; loaded whole, it distils the whole pruned model. ``workload``
    defaults to the run's own (its fingerprint must match the run's). ``others`` is a workload whose
    held-out items measure what the specialisation costs elsewhere (default: the bundled ``mixed``
    workload when the model is the bundled teacher). An MXFP4 checkpoint keeps its expert blocks
    as they are: the rest of the model trains, and only those tensors are rewritten. ``sandbox``
    runs the ``tests`` checks of held-out items (:func:`uspx.evaluate.evaluate`). ``start``: a
    checkpoint of the pruned model's shapes that training starts from instead of the pruned model
    (a warm start); "before" is still the pruned model.
    """
    from uspx.engine import dtype_name, open_source
    from uspx.models import model_fingerprint
    from uspx.prune.export import RECORD
    from uspx.prune.files import weight_files

    settings = settings or Settings()
    run, record, report, source, plan_sha, wl = finished_run(run_dir, workload)
    original = open_source(original if original is not None else source, dtype=dtype)
    if original.fingerprint != record["source_fingerprint"]:
        raise FingerprintMismatch(f"{original.path} is not the model {run} was extracted from")
    layered = original.streaming
    pruned = run / "model"
    mxfp4 = weight_files(pruned).is_mxfp4()
    out = Path(out_dir) if out_dir is not None else run / "recover"
    kept = {int(l): sorted(v + record.get("padding", {}).get(l, [])) for l, v in record["kept"].items()}
    key = dict(source=record["source_fingerprint"], pruned=record["fingerprint"], plan=plan_sha,
               workload=wl.fingerprint, max_length=max_length, settings=asdict(settings),
               **({"streaming": dtype_name(original.source.dtype)} if layered else {}),
               **({"start": model_fingerprint(start)} if start is not None else {}))
    init = Path(start) if start is not None else pruned

    how = f"{settings.train}, {settings.steps} steps at most" + (" per layer, layer by layer" if layered else "")
    console.rule(f"uspx recover: {pruned} ({how})")
    started = time.perf_counter()
    existing = _finished(out / "model", key)
    if existing is None:
        trainer = _train_layers if layered else _train_whole
        history, write, verify = trainer(original, init, kept, wl, settings, out / "work", key, max_length, mxfp4,
                                         progress)
        with atomic_folder(out / "model") as tmp:
            write(tmp)
            check = verify(tmp)
            new_record = {**record, "format": FORMAT, "uspx_version": uspx.__version__, "verification": check,
                          "recovered": dict(key=key, pruned=str(pruned), history=history),
                          "fingerprint": model_fingerprint(tmp), "status": "written"}
            write_json(tmp / RECORD, new_record)
        shutil.rmtree(out / "work")  # the checkpoints: the model holds the result now
    else:
        history = existing["recovered"]["history"]
    train_seconds = round(time.perf_counter() - started, 1)
    result = dict(
        format="uspx-recover/1", uspx_version=uspx.__version__, run=str(run), pruned=str(pruned),
        model=str(out / "model"), source=str(source), settings=asdict(settings), streaming=layered,
        experts=("kept in MXFP4 as exported (frozen)" if mxfp4 else "trained" if settings.train != "router"
                 else "frozen"),
        history=history, train_seconds=history.get("seconds"), seconds=train_seconds,
        **_quality(original, pruned, out / "model", wl, source, others, max_length, epsilon, dtype, sandbox),
    )
    write_json(out / REPORT, result)
    _print(result)
    return result


def _quality(original, pruned: Path, recovered: Path, wl, source: Path, others, max_length: int, epsilon: float,
             dtype: str, sandbox=None) -> dict:
    """Held-out and calibration deltas before and after, and the cost elsewhere."""
    from uspx.evaluate import evaluate
    from uspx.workload import load_workload

    def quality(candidate, part, split):
        return evaluate(original, candidate, part, split=split, max_length=max_length, epsilon=epsilon, speed=False,
                        dtype=dtype, sandbox=sandbox)

    before, after = quality(pruned, wl, "heldout"), quality(recovered, wl, "heldout")
    cal_before, cal_after = quality(pruned, wl, "calibration"), quality(recovered, wl, "calibration")
    others_wl = default_others(source, others)
    elsewhere = None
    if others_wl is not None:
        o = load_workload(others_wl)
        elsewhere = dict(workload=o.source, before=_families(quality(pruned, o, "heldout")),
                         after=_families(quality(recovered, o, "heldout")))
    share, gap = _recovered_share(before, after)
    return dict(
        heldout=dict(before=_families(before), after=_families(after)),
        heldout_items=after["items"],  # the recovered model's per-item losses (uspx eval's "items")
        recovered_share=share, gap=gap,
        calibration=dict(before=_families(cal_before), after=_families(cal_after)),
        overfitting_gap=dict(before=_gap(cal_before, before), after=_gap(cal_after, after)),
        elsewhere=elsewhere, acceptance=after["acceptance"],
    )


def run_source(run_dir: str | Path) -> Path:
    """The original model folder a finished ``uspx extract`` run was made from."""
    from uspx.prune.export import RECORD

    path = Path(run_dir) / "model" / RECORD
    if not path.exists():
        raise UspxError(f"{run_dir}: not a finished `uspx extract` run ({path.name} is missing)")
    return Path(read_json(path)["source"])


def finished_run(run_dir: str | Path, workload=None):
    """(run, export record, report, source path, plan sha256, workload) of a finished ``uspx extract``
    run, after checking that nothing changed since: the original, the export, the plan and the workload
    (``workload`` defaults to the run's own; another one is refused)."""
    from uspx.models import model_fingerprint
    from uspx.prune.export import RECORD
    from uspx.workload import load_workload

    run = Path(run_dir)
    pruned = run / "model"
    for need in (pruned / RECORD, run / "plan.json", run / "report.json"):
        if not need.exists():
            raise UspxError(f"{run}: not a finished `uspx extract` run ({need.name} is missing)")
    record, report = read_json(pruned / RECORD), read_json(run / "report.json")
    source = Path(record["source"])
    if model_fingerprint(source) != record["source_fingerprint"]:
        raise UspxError(f"{source} changed since {pruned} was exported from it; run the extraction again")
    if model_fingerprint(pruned) != record["fingerprint"]:
        raise UspxError(f"{pruned}: its weights or config changed since uspx exported them")
    plan_sha = hashlib.sha256((run / "plan.json").read_bytes()).hexdigest()
    if record.get("plan_sha256") not in (None, plan_sha):
        raise UspxError(f"{run / 'plan.json'} is not the plan {pruned} was exported from")
    wl = load_workload(workload or report["workload"]["source"])
    if wl.fingerprint != report["workload"]["fingerprint"]:
        raise UspxError(f"{wl.source} is not the workload {run} was extracted for")
    return run, record, report, source, plan_sha, wl


def default_others(source: Path, others):
    """The workload that shows what specialising costs elsewhere: the user's choice, else the bundled
    ``mixed`` one for the bundled teacher."""
    from uspx.models.loading import BUNDLED_TEACHER

    return others if others is not None else ("mixed" if source == BUNDLED_TEACHER else None)


def _train_whole(original, pruned, kept, wl, settings, work, key, max_length, mxfp4, progress):
    """Train the pruned model in memory; returns (history, write(folder), verify(folder))."""
    from uspx.engine.batches import pad_id_of
    from uspx.engine.checkpoint import write_replacing
    from uspx.models import adapter_for, load_model
    from uspx.prune.export import RECORD
    from uspx.prune.files import weight_files
    from uspx.recover.train import expert_parameter_names
    from uspx.workload import encode

    teacher = original.loaded()
    student = load_model(pruned, with_tokenizer=False).model
    items = encode(wl.part("calibration"), teacher.tokenizer, max_length)
    student, history = train(teacher.model, student, kept, items, settings, work, key,
                             pad_id=pad_id_of(teacher.tokenizer), progress=progress, frozen_experts=mxfp4)
    stored = weight_files(pruned).main_float_dtype()
    with torch.no_grad():  # what the file will hold, so the evaluation measures the export itself
        for p in student.parameters():
            p.copy_(p.to(stored).to(p.dtype))

    def write(tmp: Path) -> None:
        if mxfp4:  # the expert blocks stay byte for byte; every other tensor is the trained one
            experts = expert_parameter_names(student, adapter_for(student))
            names = _stored_names(pruned)
            write_replacing(pruned, tmp, {names[n]: p for n, p in student.named_parameters() if n not in experts},
                            skip_files=(RECORD,))
        else:
            save_model(student, tmp, stored, pruned)

    return asdict(history), write, lambda tmp: verify_reload(student, tmp, teacher.tokenizer)


def save_model(model: torch.nn.Module, folder: Path, dtype: torch.dtype, tokenizer_from: Path) -> None:
    """``save_pretrained`` in ``dtype``, with the tokenizer files of ``tokenizer_from``."""
    from uspx.prune.files import copy_tokenizer

    # a copy: casting the model itself would round its rotary tables too, which are not saved
    copy.deepcopy(model).to(dtype).save_pretrained(folder)
    copy_tokenizer(tokenizer_from, folder)


def verify_reload(model: torch.nn.Module, folder: Path, tokenizer) -> dict:
    """Reload ``folder`` with stock ``from_pretrained`` and compare its logits with ``model``'s; an
    error (nothing is put in place) past 1e-4."""
    from uspx.engine import InMemory
    from uspx.models import load_model
    from uspx.prune.verify import compare_logits, verification_items

    reloaded = load_model(folder, with_tokenizer=False).model
    check = compare_logits(InMemory(model), {}, InMemory(reloaded),
                           verification_items(tokenizer, None, int(model.config.vocab_size)))
    if not check["max_abs_logit_diff"] <= 1e-4:
        raise UspxError(f"the reloaded checkpoint differs from the trained model by "
                        f"{check['max_abs_logit_diff']:.3g}; nothing was written")
    return {**check, "reloaded_with": "AutoModelForCausalLM.from_pretrained (fp32)",
            "against": "the trained model in memory"}


def _train_layers(original, pruned, kept, wl, settings, work, key, max_length, mxfp4, progress):
    """Train the pruned model layer by layer from the files; returns (history, write(folder), verify(folder))."""
    from uspx.engine.batches import pad_id_of
    from uspx.engine.checkpoint import Checkpoint, write_replacing
    from uspx.prune.export import RECORD
    from uspx.recover.layers import train_layers
    from uspx.workload import encode

    if original.tokenizer is None:
        raise UspxError(f"{original.path}: no tokenizer files; recovery needs one to read the workload")
    items = encode(wl.part("calibration"), original.tokenizer, max_length)
    source = original.source
    trained, history = train_layers(source, pruned, kept, items, settings, work, key, dtype=source.dtype,
                                    device=source.device, pad_id=pad_id_of(original.tokenizer),
                                    frozen_experts=mxfp4, progress=progress)

    def write(tmp: Path) -> None:
        write_replacing(pruned, tmp, trained, skip_files=(RECORD,))

    def verify(tmp: Path) -> dict:
        """Read every tensor back: the trained ones as trained (in the stored precision), every other
        tensor byte for byte the pruned checkpoint's."""
        old, new = Checkpoint(pruned), Checkpoint(tmp)
        if set(old.weight_map) != set(new.weight_map):
            raise UspxError(f"the recovered checkpoint's tensors differ from {pruned}'s; nothing was written")
        worst = 0.0
        for name in old.weight_map:
            a = new.get(name)
            want = trained[name].to(a.dtype) if name in trained else old.get(name)
            if a.dtype != want.dtype or not torch.equal(a, want):
                raise UspxError(f"{tmp}: tensor {name} was not written as intended; nothing was written")
            if name in trained:
                worst = max(worst, float((a.float() - trained[name].float()).abs().max()))
        return dict(reloaded_with="every tensor read back from the safetensors files",
                    against="the trained tensors and the pruned checkpoint", tensors=len(old.weight_map),
                    replaced=sorted(trained), max_abs_rounding=worst)

    return asdict(history), write, verify


def _stored_names(folder: Path) -> dict[str, str]:
    """Model parameter name -> the stored tensor it is loaded from (one-to-one tensors only)."""
    from uspx.engine import FromCheckpoint

    layout = FromCheckpoint(folder, torch.float32)  # the skeleton only
    out: dict[str, str] = {}
    for name in layout.ckpt.weight_map:
        out.setdefault(layout.target_of(name), name)
    return out


def _finished(model_dir: Path, key: dict) -> dict | None:
    """The record of this very recovery when ``model_dir`` holds it; None when empty; else an error."""
    from uspx.prune.export import RECORD

    if not model_dir.exists():
        return None
    rec = read_json(model_dir / RECORD) if (model_dir / RECORD).exists() else {}
    if (rec.get("recovered") or {}).get("key") != key:
        raise UspxError(f"{model_dir} holds a recovery of another plan, model or settings (or other files); "
                        "delete it or choose another output folder")
    return rec


def _recovered_share(before: dict, after: dict) -> tuple[float | None, dict]:
    """The share of the one-shot loss gap that recovery closed, and the gap with its interval.

    A share of a gap means something only where the gap is surely there: its 95% interval (a
    paired bootstrap over held-out items, token-weighted) must lie above zero; otherwise None.
    """
    from uspx.evaluate.stats import paired_bootstrap

    rows = [r for r in before["items"] if r["tokens"]]
    ci = paired_bootstrap([r["loss_candidate"] - r["loss_teacher"] for r in rows], [r["tokens"] for r in rows])
    gap_before, gap_after = before["overall"]["delta"], after["overall"]["delta"]
    share = (1 - gap_after / gap_before) if ci and ci[0] > 0 and gap_after is not None else None
    return share, dict(before=gap_before, before_ci95=list(ci) if ci else None, after=gap_after,
                       interval="95% paired bootstrap over held-out items of the one-shot loss delta "
                                "(token-weighted)")


def _families(ev: dict) -> dict:
    return {f: dict(delta=row["delta"], top1_agreement=row["top1_agreement"], kl=row["kl"], tokens=row["tokens"])
            for f, row in {**ev["families"], "all": ev["overall"]}.items()}


def _gap(calibration: dict, heldout: dict) -> float | None:
    """Held-out delta minus calibration delta: how much better the model does on what it trained on."""
    c, h = calibration["overall"]["delta"], heldout["overall"]["delta"]
    return None if c is None or h is None else h - c


def _print(r: dict) -> None:
    from rich.table import Table

    h = r["history"]
    if r["streaming"]:
        worst = max(h["layers"], key=lambda x: x["val_before"], default=None)
        what = "the routers of" if r["settings"]["train"] == "router" else "every kept weight of"
        console.print(f"trained {what} {len(h['layers'])} layers one at a time ({h['seconds']:.0f} s, "
                      f"peak memory {h['peak_rss_bytes'] / 2**30:.2f} GiB)" +
                      (f"; hardest layer {worst['layer']}: validation loss {worst['val_before']:.4f} -> "
                       f"{worst['val_after']:.4f}" if worst else ""))
    else:
        console.print(f"trained {h['step']} steps ({h['tokens_seen']} tokens, {h['seconds']:.0f} s); best validation "
                      f"loss {h['best_val']:.4f} at step {h['best_step']}; stopped: {h['stopped']}")
    t = Table(title="held-out loss delta vs the original (nats per target token)")
    for col in ("family", "pruned", "recovered", "top-1 agree (recovered)"):
        t.add_column(col, justify="right" if col != "family" else "left")
    for fam, b in r["heldout"]["before"].items():
        a = r["heldout"]["after"][fam]
        t.add_row(fam, f"{b['delta']:+.4f}", f"{a['delta']:+.4f}", f"{a['top1_agreement']:.3f}")
    console.print(t)
    gap = r.get("gap") or {}
    ci = gap.get("before_ci95")
    shown = f" (one-shot delta {gap['before']:+.4f}, 95% interval [{ci[0]:+.4f}, {ci[1]:+.4f}])" if ci else ""
    if r["recovered_share"] is not None:
        console.print(f"recovered {100 * r['recovered_share']:.0f}% of the loss pruning cost on held-out items{shown}; "
                      f"held-out minus calibration delta {r['overfitting_gap']['after']:+.4f} "
                      f"(before {r['overfitting_gap']['before']:+.4f})")
    elif gap.get("before") is not None:
        what = ("pruning lowered the held-out loss, so there is no cost to share out" if ci and ci[1] < 0 else
                "the pruning cost is too small to tell from zero, so no share of it is given")
        console.print(f"{what}{shown or ' (one-shot delta %+.4f)' % gap['before']}; "
                      f"held-out delta after recovery {gap['after']:+.4f}")
    if r["elsewhere"]:
        cost = {f: v["delta"] for f, v in r["elsewhere"]["after"].items()}
        console.print(f"on {r['elsewhere']['workload']} (other families): " +
                      ", ".join(f"{f} {d:+.3f}" for f, d in cost.items() if d is not None))
    acc = r["acceptance"]
    console.print(f"verdict (recovered model): [bold]{acc['verdict']}[/] ({acc['rule']})")
