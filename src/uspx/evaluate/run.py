"""``uspx eval``: does the candidate keep the user's quality?

Per task family on held-out items: loss on completion tokens and its delta to the teacher, perplexity
ratio, top-1 agreement, KL(teacher || candidate); size; prefill and decode speed of both models in
one run; on items that carry a check (:mod:`uspx.evaluate.tasks`), task success of both models
from their generations, compared item by item; and the acceptance verdict: delta loss <= epsilon_t
for every family, pass@1 drop <= the largest allowed per checked family when one is given, and the
memory fit when a budget is given.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

import uspx
from uspx.evaluate import speed as speed_mod
from uspx.engine import FromCheckpoint, Opened, WeightSource, dtype_name, open_source
from uspx.evaluate.checks import LOOP_MAX_PERIOD, LOOP_MIN_REPEATS, LOOP_MIN_SPAN, LOOP_TAIL, ProgramRunner
from uspx.evaluate.metrics import ItemStats, Runner, compare, summarise
from uspx.evaluate.tasks import (DEFAULT_MAX_NEW_TOKENS, TaskSettings, ToolGeneration, checked, family_report,
                                 generate_answers, generate_with_tools, item_rows, task_lines, write_items)
from uspx.io import FingerprintMismatch, UspxError, read_json, write_json
from uspx.models import LoadedModel, adapter_for
from uspx.models.loading import resolve_model_path
from uspx.prune.export import RECORD
from uspx.prune.files import check_config, weight_files
from uspx.prune.kept import KeptLike, resolve_kept
from uspx.engine.batches import pad_id_of
from uspx.workload import Workload, default_max_length, encode, load_workload

FORMAT = "uspx-eval/1"
FILENAME = "evaluation.json"
ITEMS_SUFFIX = ".items.jsonl"  # per checked item, beside the evaluation: evaluation.items.jsonl


def evaluate(
    teacher: str | Path | LoadedModel | Opened,
    candidate: str | Path | LoadedModel | Opened | None,
    workload: str | Path | Workload,
    *,
    split: str = "heldout",
    kept: KeptLike | None = None,
    max_length: int | None = None,
    batch_size: int = 8,
    epsilon: float | Mapping[str, float] = 0.05,
    memory_budget: int | str | None = None,
    context: int = 2048,
    kv_dtype: str = "bf16",
    speed: bool = True,
    decode_tokens: int = 32,
    out: str | Path | None = None,
    progress: bool = False,
    trust_remote_code: bool = False,
    dtype: str = "auto",
    samples: int = 1,
    temperature: float = 0.0,
    pass_k: Sequence[int] | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    seed: int = 0,
    max_pass_drop: float | Mapping[str, float] | None = None,
    sandbox: ProgramRunner | None = None,
    virtual_experts: ToolGeneration | None = None,
) -> dict:
    """Compare ``candidate`` with ``teacher`` on ``workload``'s ``split``; returns (and writes to
    ``out``, a folder or a .json path) the evaluation.

    ``teacher`` is a model folder, a loaded model or an opened source (:func:`uspx.engine.open_source`:
    opened layer by layer, both models run a decoder layer at a time with the same numbers); a
    candidate given as a folder is opened the way the teacher was. ``candidate`` is an exported folder
    or a loaded model; with ``kept`` (a kept set, plan or plan file) it is restricted to those experts
    first, and ``candidate=None`` means the teacher itself. ``epsilon`` is the largest acceptable loss
    delta (nats per token), one for every family or one per family (key ``"*"`` for the rest).
    ``memory_budget`` adds the memory-fit rule: candidate weights plus the KV cache for ``context``
    tokens must fit. Both models compute in ``dtype`` (``auto``: the teacher checkpoint's stored type).

    Checked items are answered by both models, greedily or ``samples`` draws at ``temperature``
    (``seed``) for pass@k, k in ``pass_k`` (default 1 and ``samples``); ``max_pass_drop`` (one value,
    or per family with ``"*"``) adds the pass@1-drop rule. ``tests`` run only through ``sandbox``
    (:func:`uspx.virtual.sandbox.run_python`); ``virtual_experts`` (``(model, tokenizer, prompt,
    max_new_tokens) -> .text, .calls``) answers them once more with tools (docs/tasks.md).
    """
    t = _open(teacher, None, dtype, trust_remote_code)
    c = t if candidate is None else _open(candidate, t, dtype, trust_remote_code)
    if t.tokenizer is None:
        raise UspxError(f"{t.path}: no tokenizer files; uspx needs one to read a text workload")
    _check_same_vocabulary(t, c)
    export_record = _check_lineage(t, c)
    ks = resolve_kept(kept) if kept is not None else None
    if ks is not None:
        c.source.adapter.validate_kept(ks.kept, allow_missing=True)  # fewer than top-k: refused

    wl = load_workload(workload)
    if not (part := wl.part(split)).items:
        raise UspxError(f"{wl.source}: the {split!r} split is empty; nothing to evaluate on")
    max_length = max_length or default_max_length(t.source.config)
    items = encode(part, t.tokenizer, max_length)
    eps = _per_family(epsilon, part.families, "epsilon")
    tasks = checked(part.items)
    settings = TaskSettings(samples, float(temperature), tuple(pass_k or sorted({1, samples})), max_new_tokens,
                            seed, batch_size)
    drops = _check_tasks(tasks, wl.source, sandbox, max_pass_drop)

    c_source = _restricted_source(c, ks)
    restrict = (lambda: c_source.adapter.restrict(ks.kept)) if ks else contextlib.nullcontext
    stats = compare(t.source, c_source, items, batch_size, pad_id_of(t.tokenizer), progress, restrict)
    result = _result({"source": t.path, "fingerprint": t.fingerprint, "label": t.label},
                     _candidate_record(c, ks, export_record), wl, part, split, items, stats,
                     {"max_length": max_length, "batch_size": batch_size, "dtype": dtype_name(t.source.dtype),
                      "streaming": t.streaming or c.streaming, "epsilon": eps, "context": context, "kv_dtype": kv_dtype})
    result["size"] = _sizes(t, c, ks)
    result["memory"] = _memory(c, result["size"]["candidate"], memory_budget, context, kv_dtype)
    rows = _tasks(result, t, c, ks, tasks, settings, max_length, dtype, sandbox, virtual_experts) if tasks else []
    if speed:
        result["speed"] = _speed(t, c, restrict, items, decode_tokens, dtype)
        _speedups(result["speed"], restricted=ks is not None)
    result["acceptance"] = acceptance(result["families"], eps, result["memory"], result.get("tasks"), drops)
    if out is not None:
        _write(Path(out), result, rows)
    return result


def _result(teacher: dict, candidate: dict, wl: Workload, part: Workload, split: str, items: list,
            stats: ItemStats, settings: dict) -> dict:
    """The record every evaluation starts with (``uspx eval``, and on GGUF files): the two models,
    the workload, the settings, and the loss metrics per family, overall and per item."""
    fam = np.array([e.family for e in items])
    return {
        "format": FORMAT,
        "uspx_version": uspx.__version__,
        "teacher": teacher,
        "candidate": candidate,
        "workload": {"source": wl.source, "fingerprint": wl.fingerprint, "split": split, "items": len(items),
                     "families": part.families, "truncated": part.summary.truncated},
        "settings": {**settings, "loss": "token-weighted mean next-token cross-entropy on completion tokens "
                                         "(nats), as uspx.engine.losses defines it"},
        "families": {f: summarise(stats, np.flatnonzero(fam == f)) for f in part.families},
        "overall": summarise(stats, np.arange(len(items))),
        # per item, in the workload's order: paired comparisons between candidates need these
        "items": [dict(id=e.id, family=e.family, tokens=int(stats.tokens[i]),
                       loss_teacher=float(stats.nll_teacher[i] / stats.tokens[i]) if stats.tokens[i] else None,
                       loss_candidate=float(stats.nll_candidate[i] / stats.tokens[i]) if stats.tokens[i] else None)
                  for i, e in enumerate(items)],
    }


def _check_tasks(tasks: list, source: str, sandbox: ProgramRunner | None,
                 max_pass_drop: float | Mapping[str, float] | None) -> dict[str, float] | None:
    """Refuse what cannot run before any generation: tests without the sandbox, a pass-drop rule
    without checked items; the largest allowed drop per checked family."""
    if any(i.checks.tests for i in tasks) and sandbox is None:
        raise UspxError(f"{source}: 'tests' checks run only in uspx's sandbox; pass "
                        "sandbox=uspx.virtual.sandbox.run_python (`uspx eval` does)")
    if max_pass_drop is None:
        return None
    if not tasks:
        raise UspxError("a largest pass-rate drop needs items with checks ('answer', 'regex', 'json' or 'tests') "
                        "in the evaluated split; this one has none")
    return _per_family(max_pass_drop, sorted({i.family for i in tasks}), "max pass drop (checked families)")


def _candidate_record(c: Opened, ks, export_record: dict | None) -> dict:
    return {
        "source": c.path, "fingerprint": c.fingerprint, "label": c.label,
        "kind": "restricted" if ks else ("export" if export_record else "model"),
        "kept": {str(l): v for l, v in ks.kept.items()} if ks else None,
        "plan": ks.plan_path if ks else None,
        "export": {k: export_record.get(k) for k in ("source", "kept", "physical", "dtype", "plan")}
        if export_record else None,
    }


def _write(out: Path, result: dict, rows: list[dict]) -> None:
    """evaluation.json (or the .json path given) and, for checked items, NAME.items.jsonl beside it."""
    path = out if out.suffix == ".json" else out / FILENAME
    if rows:
        write_items(path.with_name(path.stem + ITEMS_SUFFIX), rows)
    write_json(path, result)  # atomic


# ----- inputs ------------------------------------------------------------------------------------
def _open(model: str | Path | LoadedModel | Opened, like: Opened | None, dtype: str,
          trust_remote_code: bool) -> Opened:
    """``model`` as an opened source; a folder is checked first (a truncated or corrupt weight file
    fails here, named) and opened as ``like`` was (layer by layer, device)."""
    if isinstance(model, (Opened, LoadedModel)):
        return open_source(model)
    path = resolve_model_path(model)
    check_config(path)
    weight_files(path)
    streaming = like is not None and like.streaming
    try:
        return open_source(path, streaming=streaming, dtype=dtype, trust_remote_code=trust_remote_code,
                           device=str(like.source.device) if streaming else None)
    except UspxError:
        raise
    except Exception as exc:
        raise UspxError(f"{path}: cannot load the model: {exc}") from None


def _restricted_source(c: Opened, ks) -> WeightSource:
    """A candidate read layer by layer and restricted to a kept set decodes only the kept experts
    (quantized experts outside it cost no memory)."""
    if ks is None or c.source.resident:
        return c.source
    return FromCheckpoint(c.path, c.source.dtype, experts=ks.kept, device=c.source.device)


def _check_same_vocabulary(t: Opened, c: Opened) -> None:
    """Token ids are compared position by position: both models must share one tokenizer."""
    tv, cv = int(t.source.config.vocab_size), int(c.source.config.vocab_size)
    if tv != cv:
        raise UspxError(f"teacher ({t.path}) and candidate ({c.path}) have different vocabularies ({tv} vs {cv})")
    if c.tokenizer is not None and c.tokenizer is not t.tokenizer and c.tokenizer.get_vocab() != t.tokenizer.get_vocab():
        raise UspxError(f"teacher ({t.path}) and candidate ({c.path}) use different tokenizers")


def _check_lineage(t: Opened, c: Opened) -> dict | None:
    """An export records its source; evaluating it against another teacher is a mistake."""
    rec_path = Path(c.path) / RECORD
    if c is t or not rec_path.exists():
        return None
    rec = read_json(rec_path)
    if isinstance(rec, dict) and rec.get("source_fingerprint") not in (None, t.fingerprint):
        raise FingerprintMismatch(
            f"{c.path} was exported from another model (fingerprint {str(rec['source_fingerprint'])[:12]}), "
            f"not from the teacher {t.path} ({t.fingerprint[:12]})"
        )
    return rec if isinstance(rec, dict) else None


def _per_family(value: float | Mapping[str, float], families: list[str], what: str) -> dict[str, float]:
    """A threshold per family: one number for all, or a mapping with an optional ``"*"`` default."""
    if not isinstance(value, Mapping):
        return {f: float(value) for f in families}
    missing = [f for f in families if f not in value and "*" not in value]
    if missing:
        raise UspxError(f"{what} has no threshold for families {missing} (add them, or a '*' default)")
    return {f: float(value.get(f, value.get("*"))) for f in families}


# ----- task success ------------------------------------------------------------------------------
LOOP_RULE = (f"a generation loops when it ends, but for at most {LOOP_TAIL} final tokens, in one cycle of 1 to "
             f"{LOOP_MAX_PERIOD} tokens repeated at least {LOOP_MIN_REPEATS} times over a stretch of at least "
             f"{LOOP_MIN_SPAN} tokens")


def _tasks(result: dict, t: Opened, c: Opened, ks, items: list, settings: TaskSettings, max_length: int,
           dtype: str, runner: ProgramRunner | None, tools: ToolGeneration | None) -> list[dict]:
    """Both models answer the checked items (whole models: generation needs one); the summary per
    family goes to ``result["tasks"]``, the per-item records are returned."""
    models, skipped = _whole(t, c, dtype, "generated")
    head = {"settings": {**{k: getattr(settings, k) for k in ("samples", "temperature", "max_new_tokens", "seed")},
                         "pass_k": list(settings.pass_k),
                         "decoding": "greedy" if settings.temperature == 0 else f"sampled at temperature "
                                                                               f"{settings.temperature:g}",
                         "virtual_experts": tools is not None},
            "loop_rule": LOOP_RULE, "items": len(items)}
    if skipped:
        result["tasks"] = {**head, "skipped": skipped}
        return []
    restrict = (lambda: adapter_for(models["candidate"]).restrict(ks.kept)) if ks else contextlib.nullcontext
    answers = {"teacher": generate_answers(models["teacher"], t.tokenizer, items, settings, max_length, runner)}
    same = c is t and ks is None
    answers["candidate"] = answers["teacher"] if same else generate_answers(
        models["candidate"], t.tokenizer, items, settings, max_length, runner, restrict)
    if tools is not None:
        answers["teacher_tools"] = generate_with_tools(tools, models["teacher"], t.tokenizer, items, settings, runner)
        answers["candidate_tools"] = answers["teacher_tools"] if same else generate_with_tools(
            tools, models["candidate"], t.tokenizer, items, settings, runner, restrict)
    report = family_report(items, answers, settings.pass_k, sorted({i.family for i in items}), settings.seed)
    result["tasks"] = {**head, "families": {f: r for f, r in report.items() if f != "all"}, "overall": report["all"]}
    return item_rows(items, answers)


def _whole(t: Opened, c: Opened, dtype: str,
           what: str) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """Both models loaded whole, by name: each itself when resident, else from its folder when its
    weights fit in the memory available now; and for those that are not, why they are not ``what``."""
    import psutil

    models, skipped = {}, {}
    for name, side in (("teacher", t), ("candidate", c)):
        if side.source.resident:
            models[name] = side.source.model
            continue
        # its size once loaded: every parameter in the compute precision (MXFP4 experts decoded)
        item = torch.empty((), dtype=side.source.dtype).element_size()
        need = sum(p.numel() for p in side.source.model.parameters()) * item
        free = psutil.virtual_memory().available
        if need > 0.8 * free:
            skipped[name] = (f"not {what}: {side.path} is read a layer at a time and its weights "
                             f"({need / 2**30:.1f} GiB) do not fit the memory available ({free / 2**30:.1f} GiB)")
        else:
            models[name] = open_source(side.path, dtype=dtype).source.model
    return models, skipped


# ----- size, memory, speed -------------------------------------------------------------------------
def _disk(opened: Opened) -> dict:
    wf = weight_files(opened.path)
    return {"parameter_bytes": wf.tensor_bytes, "file_bytes": wf.file_bytes, "dtype": str(wf.main_float_dtype())[6:]}


def _sizes(t: Opened, c: Opened, ks) -> dict:
    teacher, base = _disk(t), _disk(c)
    cand = base
    if ks is not None:
        # Mask-only: nothing on disk yet; the size a physical export would take, in the checkpoint's
        # precision (non-uniform sets export padded to the largest count).
        adapter = c.source.adapter
        in_memory = torch.empty((), dtype=c.source.dtype).element_size()
        scale = torch.empty((), dtype=getattr(torch, base["dtype"])).element_size() / in_memory
        width = max(len(v) for v in ks.kept.values())

        def beyond(count) -> float:  # bytes of every layer's experts past count(layer) of them, as stored
            return sum((l.num_experts - count(l)) * adapter.bytes_per_expert(l) for l in adapter.layers) * scale

        dropped = beyond(lambda l: len(ks.kept.get(l.index, range(l.num_experts))))
        padded = beyond(lambda l: max(width, len(ks.kept.get(l.index, ()))))
        cand = {"parameter_bytes": int(base["parameter_bytes"] - dropped),
                "padded_parameter_bytes": int(base["parameter_bytes"] - padded),
                "file_bytes": None, "dtype": base["dtype"], "note": "mask-only: size a physical export would take"}
    return {"teacher": teacher, "candidate": cand,
            "ratio": cand["parameter_bytes"] / teacher["parameter_bytes"]}


def _memory(c: Opened, size: dict, budget: int | str | None, context: int, kv_dtype: str) -> dict | None:
    if budget is None:
        return None
    from uspx.plan import memory as mem

    budget_bytes = mem.parse_size(budget)
    weights = int(size.get("padded_parameter_bytes") or size["parameter_bytes"])
    kv = mem.kv_cache_bytes(mem.count_params(c.source.config), context, kv_dtype)
    return {"budget_bytes": budget_bytes, "weights_bytes": weights, "kv_bytes": kv, "context": context,
            "kv_dtype": kv_dtype, "total_bytes": weights + kv, "fits": weights + kv <= budget_bytes}


def _speed(t: Opened, c: Opened, restrict, items, decode_tokens: int, dtype: str) -> dict:
    """Prefill and decode speed of both models, loaded whole: a model read a layer at a time is
    loaded whole for this only when its weights fit in the memory available now."""
    models, skipped = _whole(t, c, dtype, "measured")
    runners = {name: Runner(model, restrict if name == "candidate" else contextlib.nullcontext)
               for name, model in models.items()}
    result = speed_mod.measure(runners, [e.input_ids for e in items], new_tokens=decode_tokens) if runners else {}
    return {**result, **({"skipped": skipped} if skipped else {})}


def _speedups(sp: dict, restricted: bool) -> None:
    if "teacher" not in sp or "candidate" not in sp:
        return
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        sp[key.replace("tokens_per_s", "speedup")] = sp["candidate"][key] / sp["teacher"][key]
    if restricted:
        sp["note"] = ("mask-only candidate: same shapes and compute as the teacher plus a routing hook, "
                      "so no speed gain is expected; export it to measure the smaller model")


# ----- verdict -----------------------------------------------------------------------------------
def print_verdict(result: dict, *, rule: bool = False) -> None:
    """An evaluation's task success (where items had checks) and its verdict with the reasons, as
    ``uspx eval`` and ``uspx extract`` print them; ``rule``: name the acceptance rule too."""
    from uspx.progress import console

    for line in task_lines(result["tasks"]) if result.get("tasks") else []:
        console.print(line, markup=False, highlight=False)
    acc = result["acceptance"]
    failed = ", ".join(acc.get("failed_rules") or [])
    parts = ([acc["rule"]] if rule else []) + ([f"failed: {failed}"] if failed else [])
    detail = f" ({'; '.join(parts)})" if parts else ""
    console.print(f"verdict: [bold]{acc['verdict']}[/]{detail}")
    for reason in acc["reasons"]:
        console.print(f"  {reason}")


def acceptance(families: dict, eps: dict[str, float], memory: dict | None, tasks: dict | None = None,
                drops: dict[str, float] | None = None) -> dict:
    """The one verdict: every rule's check, the reasons in words, and the rules that failed."""
    reasons, checks = [], []
    for f, row in families.items():
        d = row["delta"]
        ok = d is not None and math.isfinite(d) and d <= eps[f]
        checks.append({"rule": "delta_loss", "family": f, "value": d, "threshold": eps[f], "ok": ok})
        if d is None:
            reasons.append(f"{f}: no scored tokens in this split, so its loss cannot be checked")
        else:
            reasons.append(f"{f}: delta loss {d:+.4f} nats/token {'<=' if ok else '>'} epsilon {eps[f]:g}"
                           f" ({row['tokens']} tokens, {row['items']} items)")
    for f, limit in (drops or {}).items():
        row = ((tasks or {}).get("families") or {}).get(f)
        if row is None:  # generation was skipped (a model too large to load whole)
            checks.append({"rule": "pass_drop", "family": f, "value": None, "threshold": limit, "ok": False})
            reasons.append(f"{f}: pass@1 not measured ({'; '.join((tasks or {}).get('skipped', {}).values())})")
            continue
        before, after = row["teacher"]["pass@1"], row["candidate"]["pass@1"]
        drop = before - after
        ok = drop <= limit + 1e-12  # pass rates are ratios of item counts: equal drops must pass
        checks.append({"rule": "pass_drop", "family": f, "value": drop, "threshold": limit, "ok": ok})
        reasons.append(f"{f}: pass@1 {before:.3f} -> {after:.3f}, drop {drop:+.3f} {'<=' if ok else '>'} "
                       f"max drop {limit:g} ({row['items']} checked items)")
    if memory is not None:
        ok = memory["fits"]
        checks.append({"rule": "memory_fit", "value": memory["total_bytes"], "threshold": memory["budget_bytes"], "ok": ok})
        reasons.append(f"memory: weights {memory['weights_bytes']} + KV {memory['kv_bytes']} = {memory['total_bytes']} "
                       f"bytes {'<=' if ok else '>'} budget {memory['budget_bytes']}")
    failed = list(dict.fromkeys(c["rule"] for c in checks if not c["ok"]))
    rule = "acceptance: delta loss per family <= epsilon_t"
    rule += ", pass@1 drop per checked family <= its largest allowed drop" if drops else ""
    return {"verdict": "fail" if failed else "pass", "failed_rules": failed,
            "rule": rule + ", and memory fit when a budget is given", "reasons": reasons, "checks": checks}
