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
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

import uspx
from uspx.io import UspxError, read_json, write_json
from uspx.progress import console
from uspx.recover.train import Settings, train

REPORT = "recover.json"


def recover(run_dir: str | Path, *, workload=None, settings: Settings | None = None, out_dir: str | Path | None = None,
            others: str | Path | None = None, max_length: int = 512, epsilon: float = 0.05,
            progress: bool = True) -> dict:
    """Recover the pruned model of ``run_dir``; returns (and writes) the recovery report.

    ``workload`` defaults to the run's own (its fingerprint must match the run's). ``others`` is a
    workload whose held-out items measure what the specialisation costs elsewhere (default: the
    bundled ``mixed`` workload when the model is the bundled teacher).
    """
    from uspx.evaluate import evaluate
    from uspx.models import load_model, model_fingerprint
    from uspx.models.loading import BUNDLED_TEACHER
    from uspx.prune.export import FORMAT, RECORD
    from uspx.prune.files import copy_tokenizer, weight_files
    from uspx.prune.verify import compare_logits, verification_items
    from uspx.engine import InMemory
    from uspx.engine.batches import pad_id_of
    from uspx.workload import Workload, encode, load_workload

    settings = settings or Settings()
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
    if weight_files(pruned).is_mxfp4():
        raise UspxError(f"{pruned}: MXFP4 checkpoint; recovery trains dense weights and would have to requantize "
                        "the experts, which uspx does not do yet")
    wl = workload if isinstance(workload, Workload) else load_workload(workload or report["workload"]["source"])
    if wl.fingerprint != report["workload"]["fingerprint"]:
        raise UspxError(f"{wl.source} is not the workload {run} was extracted for")
    out = Path(out_dir) if out_dir is not None else run / "recover"
    teacher = load_model(source)
    student = load_model(pruned, with_tokenizer=False).model
    kept = {int(l): sorted(v + record.get("padding", {}).get(l, [])) for l, v in record["kept"].items()}
    items = encode(wl.part("calibration"), teacher.tokenizer, max_length)
    key = dict(source=record["source_fingerprint"], pruned=record["fingerprint"], plan=plan_sha,
               workload=wl.fingerprint, max_length=max_length, settings=asdict(settings))

    console.rule(f"uspx recover: {pruned} ({settings.train}, {settings.steps} steps at most)")
    started = time.perf_counter()
    existing = _finished(out / "model", key)
    if existing is None:
        student, history = train(teacher.model, student, kept, items, settings, out / "work", key,
                                 pad_id=pad_id_of(teacher.tokenizer), progress=progress)
        stored = weight_files(pruned).main_float_dtype()
        with torch.no_grad():  # what the file will hold, so the evaluation measures the export itself
            for p in student.parameters():
                p.copy_(p.to(stored).to(p.dtype))
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".model.tmp-", dir=out))
        try:
            # a copy: casting the model itself would round its rotary tables too, which are not saved
            copy.deepcopy(student).to(stored).save_pretrained(tmp)
            copy_tokenizer(pruned, tmp)
            reloaded = load_model(tmp, with_tokenizer=False).model
            check = compare_logits(InMemory(student), {}, InMemory(reloaded),
                                   verification_items(teacher.tokenizer, None, int(student.config.vocab_size)))
            if not check["max_abs_logit_diff"] <= 1e-4:
                raise UspxError(f"the reloaded recovered checkpoint differs from the trained model by "
                                f"{check['max_abs_logit_diff']:.3g}; nothing was written")
            new_record = {**record, "format": FORMAT, "uspx_version": uspx.__version__,
                          "verification": {**check, "reloaded_with": "AutoModelForCausalLM.from_pretrained (fp32)",
                                           "against": "the trained model in memory"},
                          "recovered": dict(key=key, pruned=str(pruned), history=asdict(history)),
                          "fingerprint": model_fingerprint(tmp), "status": "written"}
            write_json(tmp / RECORD, new_record)
            os.replace(tmp, out / "model")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(out / "work")  # the checkpoints: the model holds the result now
        history = asdict(history)
    else:
        history = existing["recovered"]["history"]
    train_seconds = round(time.perf_counter() - started, 1)

    def quality(candidate, part, split):
        ev = evaluate(teacher, candidate, part, split=split, max_length=max_length, epsilon=epsilon, speed=False)
        return ev

    before = quality(pruned, wl, "heldout")
    after = quality(out / "model", wl, "heldout")
    cal_before, cal_after = quality(pruned, wl, "calibration"), quality(out / "model", wl, "calibration")
    others_wl = others if others is not None else ("mixed" if source == BUNDLED_TEACHER else None)
    elsewhere = None
    if others_wl is not None:
        o = load_workload(others_wl)
        elsewhere = dict(workload=o.source, before=_families(quality(pruned, o, "heldout")),
                         after=_families(quality(out / "model", o, "heldout")))
    gap_before, gap_after = before["overall"]["delta"], after["overall"]["delta"]
    result = dict(
        format="uspx-recover/1", uspx_version=uspx.__version__, run=str(run), pruned=str(pruned),
        model=str(out / "model"), source=str(source), settings=asdict(settings), history=history,
        train_seconds=history.get("seconds"), seconds=train_seconds,
        heldout=dict(before=_families(before), after=_families(after)),
        recovered_share=(1 - gap_after / gap_before) if gap_before and gap_before > 0 else None,
        calibration=dict(before=_families(cal_before), after=_families(cal_after)),
        overfitting_gap=dict(before=_gap(cal_before, before), after=_gap(cal_after, after)),
        elsewhere=elsewhere, acceptance=after["acceptance"],
    )
    write_json(out / REPORT, result)
    _print(result)
    return result


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
    console.print(f"trained {h['step']} steps ({h['tokens_seen']} tokens, {h['seconds']:.0f} s); best validation "
                  f"loss {h['best_val']:.4f} at step {h['best_step']}; stopped: {h['stopped']}")
    t = Table(title="held-out loss delta vs the original (nats per target token)")
    for col in ("family", "pruned", "recovered", "top-1 agree (recovered)"):
        t.add_column(col, justify="right" if col != "family" else "left")
    for fam, b in r["heldout"]["before"].items():
        a = r["heldout"]["after"][fam]
        t.add_row(fam, f"{b['delta']:+.4f}", f"{a['delta']:+.4f}", f"{a['top1_agreement']:.3f}")
    console.print(t)
    if r["recovered_share"] is not None:
        console.print(f"recovered {100 * r['recovered_share']:.0f}% of the loss pruning cost on held-out items; "
                      f"held-out minus calibration delta {r['overfitting_gap']['after']:+.4f} "
                      f"(before {r['overfitting_gap']['before']:+.4f})")
    if r["elsewhere"]:
        cost = {f: v["delta"] for f, v in r["elsewhere"]["after"].items()}
        console.print(f"on {r['elsewhere']['workload']} (other families): " +
                      ", ".join(f"{f} {d:+.3f}" for f, d in cost.items() if d is not None))
    acc = r["acceptance"]
    console.print(f"verdict (recovered model): [bold]{acc['verdict']}[/] ({acc['rule']})")
