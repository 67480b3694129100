"""``uspx student RUN_DIR --base PATH``: distil the original of an extract run into a dense model the
user already has, export it, and compare it on text with every other candidate of the run.

    RUN_DIR/dense-NAME/work/          training checkpoints while it runs (a killed run resumes)
    RUN_DIR/dense-NAME/model/         the distilled base (stock ``from_pretrained``, LoRA merged), its
                                      tokenizer (the base's) and its record
    RUN_DIR/dense-NAME/dense.json     settings, training history, held-out comparison, sizes, speed

NAME is the base folder's name. How it trains: :mod:`uspx.student.distill`. How the candidates are
judged: :mod:`uspx.student.text` (nats per character beside nats per token), on the run's held-out
items, for the original, the base before and after distillation, the pruned MoE (and its recovery)
and every expert-built student of the run (``RUN_DIR/student-M``), each with its weight bytes and
prefill and decode speed.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

import uspx
from uspx.io import UspxError, atomic_folder, write_json
from uspx.progress import console
from uspx.recover.train import Settings
from uspx.workload import DEFAULT_MAX_LENGTH

REPORT = "dense.json"
FORMAT = "uspx-dense-student/1"


def dense_student(run_dir: str | Path, base: str | Path, *, settings: Settings | None = None, four_bit: bool = False,
                  workload=None, out_dir: str | Path | None = None, max_length: int = DEFAULT_MAX_LENGTH,
                  speed: bool = True, epsilon: float = 0.05, progress: bool = True) -> dict:
    """Distil ``run_dir``'s original into ``base``, export and compare it; returns (and writes) its report
    with uspx's verdict on every candidate (``epsilon``: the largest loss increase per family)."""
    from uspx.engine.batches import pad_id_of
    from uspx.models import load_model, model_fingerprint
    from uspx.recover.run import _finished, finished_run
    from uspx.recover.train import split_items
    from uspx.student.distill import check_settings, load_base, make_pairs, same_tokenizer

    settings = settings or Settings(train="lora", ce=1.0)
    check_settings(settings, four_bit)
    base = Path(base)
    run, record, _, source, plan_sha, wl = finished_run(run_dir, workload)
    out = Path(out_dir) if out_dir is not None else run / f"dense-{base.resolve().name}"
    student, s_tok = load_base(base, four_bit=four_bit)
    teacher = load_model(source)
    same = same_tokenizer(teacher.tokenizer, s_tok, teacher.model.config, student.config)
    key = dict(source=record["source_fingerprint"], plan=plan_sha, base=model_fingerprint(base), four_bit=four_bit,
               workload=wl.fingerprint, max_length=max_length, settings=asdict(settings))
    t_pad, s_pad = pad_id_of(teacher.tokenizer), pad_id_of(s_tok)
    console.rule(f"uspx student --base: {teacher.label} -> {base.name} ({'same' if same else 'another'} tokenizer, "
                 f"{settings.train})")
    started = time.perf_counter()
    existing = _finished(out / "model", key)
    if existing is None:
        pairs = make_pairs(wl.part("calibration"), teacher.tokenizer, s_tok, max_length, same)
        train_items, val_items = split_items([p.student.item for p in pairs], settings.val_fraction, settings.seed)
        model, history, aligned = _train(teacher, student, s_tok, pairs, train_items, val_items, settings, out, key,
                                         same=same, four_bit=four_bit, base=base, pads=(t_pad, s_pad),
                                         max_length=max_length, progress=progress)
        _export(model, out, key, history=history, aligned=aligned, base=base, run=run, record=record, same=same,
                s_tok=s_tok)
        del model, student
        existing = _finished(out / "model", key)
    seconds = round(time.perf_counter() - started, 1)
    heldout, sizes, speeds, tasks = _measure(teacher, base, out / "model", run, wl, max_length, speed=speed)
    result = dict(
        format=FORMAT, uspx_version=uspx.__version__, run=str(run), source=str(source), base=str(base),
        model=str(out / "model"), tokenizer="same" if same else "different",
        objectives=_objectives(settings, same), settings=asdict(settings), four_bit=four_bit,
        history=existing["recovered"]["history"], seconds=seconds, heldout=heldout, sizes=sizes, speed=speeds,
        aligned_share=existing.get("aligned_share"),
        acceptance={name: _acceptance(fams, epsilon) for name, fams in heldout.items()}, tasks=tasks,
    )
    write_json(out / REPORT, result)
    _print(result)
    return result


def _acceptance(families: dict, epsilon: float) -> dict:
    """uspx's one verdict on a candidate judged on text. The delta it checks is per token of the
    original (the per-character delta times the original's characters per token), so a candidate
    with another tokenizer meets the same epsilon as a pruned model, and with one tokenizer it is
    uspx eval's delta."""
    from uspx.evaluate.run import acceptance

    rows = {f: dict(delta=r["delta_per_teacher_token"], tokens=r["teacher_tokens"], items=r["items"])
            for f, r in families.items() if f != "all"}
    return acceptance(rows, {f: epsilon for f in rows}, None)


def _objectives(settings: Settings, same: bool) -> str:
    kd = (f"{settings.kd:g} x token KD (tau {settings.tau:g})" if same else
          f"{settings.kd:g} x ULD at aligned positions (tau {settings.tau:g})")
    gen = f", {settings.generated} continuations of the original per calibration prompt" if settings.generated else ""
    return f"{kd} + {settings.ce:g} x cross-entropy on completions{gen}"


def _train(teacher, student, s_tok, pairs, train_items, val_items, settings, out: Path, key: dict, *, same: bool,
           four_bit: bool, base: Path, pads: tuple[int, int], max_length: int, progress: bool):
    """Distil; returns the merged model in memory, its training history, and how many of the
    student's training targets had an aligned teacher position (all of them with one tokenizer)."""
    from uspx.recover.train import check_work
    from uspx.student.distill import distill, generated_workload, make_pairs, merged

    work = out / "work"
    check_work(work, key)  # before generating: it drops a cache that no checkpoint of this key vouches for
    out.mkdir(parents=True, exist_ok=True)
    keep = {e.index for e in train_items}
    train_pairs = [p for p in pairs if p.student.item.index in keep]
    if settings.generated:
        gen = generated_workload(teacher.model, teacher.tokenizer, [p.teacher.item for p in train_pairs], settings,
                                 work / "generated.json")
        train_pairs += make_pairs(gen, teacher.tokenizer, s_tok, max_length, same)
    for i, p in enumerate(train_pairs):  # each pair's index: its place in the training list
        p.student.item = copy.copy(p.student.item)
        p.student.item.index = i
    targets = sum(len(p.student.item.input_ids) - max(p.student.item.completion_start, 1) for p in train_pairs)
    aligned = sum(len(p.aligned) for p in train_pairs)
    trained, history = distill(teacher.model, student, train_pairs, val_items, settings, work, key, same=same,
                               teacher_pad=pads[0], student_pad=pads[1], progress=progress)
    return (merged(trained, settings, base, four_bit), asdict(history),
            dict(aligned=aligned, targets=targets, share=aligned / targets if targets else None))


def _export(model: torch.nn.Module, out: Path, key: dict, *, history: dict, aligned: dict, base: Path, run: Path,
            record: dict, same: bool, s_tok) -> None:
    """Round to the base's stored precision, save with the base's tokenizer, reload with stock
    transformers and compare logits, then put the folder in place atomically."""
    from uspx.models import model_fingerprint
    from uspx.prune.export import RECORD
    from uspx.prune.files import weight_files
    from uspx.recover.run import save_model

    stored = weight_files(base).main_float_dtype()
    with torch.no_grad():  # what the file will hold, so the evaluation measures the export itself
        for p in model.parameters():
            p.copy_(p.to(stored).to(p.dtype))
    with atomic_folder(out / "model") as tmp:
        save_model(model, tmp, stored, base)
        check = _verify_reload(model, tmp, s_tok)
        write_json(tmp / RECORD, dict(
            format=FORMAT, uspx_version=uspx.__version__, base=str(base), base_fingerprint=key["base"],
            source_fingerprint=record["source_fingerprint"], run=str(run), tokenizer="same" if same else "different",
            verification=check, recovered=dict(key=key, history=history), aligned_share=aligned,
            fingerprint=model_fingerprint(tmp), status="written"))
    shutil.rmtree(out / "work", ignore_errors=True)


def _verify_reload(model: torch.nn.Module, folder: Path, tokenizer) -> dict:
    """Stock ``AutoModelForCausalLM.from_pretrained`` of ``folder`` gives the trained model's logits
    (within 1e-4) on a few texts; otherwise nothing is written."""
    from transformers import AutoModelForCausalLM

    from uspx.engine.batches import make_batches
    from uspx.engine.forward import logits
    from uspx.workload import EncodedItem

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True).eval()
    texts = ["def main():\n    return 0\n", "The quick brown fox jumps over the lazy dog."]
    items = [EncodedItem(i, str(i), "check", "check", tokenizer.encode(t, add_special_tokens=False), 0)
             for i, t in enumerate(texts)]
    items = [e for e in items if len(e.input_ids) >= 2]
    diff = 0.0
    for batch in make_batches(items, len(items)):
        diff = max(diff, float((logits(reloaded, batch).float() - logits(model, batch).float()).abs().max()))
    if not diff <= 1e-4:
        raise UspxError(f"the reloaded checkpoint differs from the trained model by {diff:.3g}; nothing was written")
    return dict(max_abs_logit_diff=diff, reloaded_with="AutoModelForCausalLM.from_pretrained (fp32)",
                against="the trained model in memory")


def _candidates(base: Path, model: Path, run: Path) -> dict[str, Path]:
    """Every candidate of the run that exists, by name."""
    from uspx.prune.export import RECORD

    rows = {"dense base (not distilled)": base, "dense student": model, "pruned MoE": run / "model"}
    if (run / "recover" / "model" / RECORD).exists():
        rows["pruned MoE, recovered"] = run / "recover" / "model"
    for folder in sorted(run.glob("student-*")):
        if (folder / "model" / RECORD).exists():
            rows[f"expert-built student (M={folder.name.split('-', 1)[1]})"] = folder / "model"
    return rows


def _measure(teacher, base: Path, model: Path, run: Path, wl, max_length: int, *, speed: bool):
    """Held-out comparison on text, weight bytes, speed and task checks of the original and every
    candidate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from uspx.engine.batches import pad_id_of
    from uspx.evaluate.metrics import Runner
    from uspx.evaluate.speed import measure
    from uspx.prune.files import weight_files
    from uspx.student.text import compare_text, encode_scored, text_losses

    part = wl.part("heldout")
    if not part.items:
        raise UspxError(f"{wl.source}: no held-out items to compare the candidates on")
    t_scored = encode_scored(part, teacher.tokenizer, max_length)
    t_losses = text_losses(teacher.model, t_scored, pad_id_of(teacher.tokenizer))
    heldout, sizes, speeds, tasks = {}, {"original": weight_files(teacher.source).tensor_bytes}, {}, {}
    checked = _Checked(teacher, part, max_length)
    if speed:
        speeds["original"] = measure({"m": Runner(teacher.model)}, [s.item.input_ids for s in t_scored])["m"]
    for name, folder in _candidates(base, model, run).items():
        cand = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        same = tok.get_vocab() == teacher.tokenizer.get_vocab()
        scored = t_scored if same else encode_scored(part, tok, max_length)
        heldout[name] = compare_text(t_losses, text_losses(cand, scored, pad_id_of(tok)), same)
        sizes[name] = weight_files(folder).tensor_bytes
        if speed:
            speeds[name] = measure({"m": Runner(cand)}, [s.item.input_ids for s in scored])["m"]
        if checked.items:
            tasks[name] = checked.report(cand, tok)
        del cand
    return heldout, sizes, speeds, tasks


class _Checked:
    """The held-out items with checks, answered by the original once and by each candidate with its
    own tokenizer (the answer is text, so models of any tokenizer are judged alike), greedily, as
    ``uspx eval`` answers them; ``tests`` checks run in the sandbox."""

    def __init__(self, teacher, part, max_length: int):
        from uspx.evaluate.tasks import TaskSettings, checked, generate_answers
        from uspx.virtual.sandbox import run_python

        self.items, self.settings, self.max_length = checked(part.items), TaskSettings(), max_length
        self.families = sorted({i.family for i in self.items})
        self.teacher = (generate_answers(teacher.model, teacher.tokenizer, self.items, self.settings, max_length,
                                         run_python) if self.items else None)

    def report(self, model, tokenizer) -> dict:
        """pass@1 of the original and the candidate per family, and their paired difference."""
        from uspx.evaluate.tasks import family_report, generate_answers
        from uspx.virtual.sandbox import run_python

        answers = generate_answers(model, tokenizer, self.items, self.settings, self.max_length, run_python)
        return family_report(self.items, {"teacher": self.teacher, "candidate": answers}, self.settings.pass_k,
                             self.families, self.settings.seed)


def _print(r: dict) -> None:
    from rich.table import Table

    h = r["history"]
    console.print(f"trained {h['step']} steps ({h['seconds']:.0f} s); best validation loss {h['best_val']:.4f} "
                  f"at step {h['best_step']}; stopped: {h['stopped']}; objectives: {r['objectives']}")
    t = Table(title="held-out loss delta vs the original (all families)")
    for col in ("model", "nats/char", "nats/teacher token", "weights", "verdict"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for name, fams in r["heldout"].items():
        row = fams["all"]
        cell = lambda v: "" if v is None else f"{v:+.4f}"  # noqa: E731
        t.add_row(name, cell(row["delta_per_char"]), cell(row["delta_per_teacher_token"]),
                  f"{r['sizes'][name] / 2**20:.2f} MiB", r["acceptance"][name]["verdict"])
    console.print(t)
    for name, fams in (r.get("tasks") or {}).items():
        row = fams["all"]
        console.print(f"checked items, {name}: pass@1 {row['candidate']['pass@1']:.3f} against the original's "
                      f"{row['teacher']['pass@1']:.3f} ({row['items']} items)")

