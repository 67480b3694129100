"""``uspx eval``: does the candidate keep the user's quality?

Per task family on held-out items: loss on completion tokens and its delta to the teacher, perplexity
ratio, top-1 agreement, KL(teacher || candidate); size; prefill and decode speed of both models in
one run; and the acceptance verdict: delta loss <= epsilon_t for every family, and the memory fit
when a budget is given.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

import uspx
from uspx.evaluate import speed as speed_mod
from uspx.evaluate.metrics import Runner, compare, compare_layerwise, summarise
from uspx.io import FingerprintMismatch, UspxError, read_json, write_json
from uspx.models import LoadedModel, adapter_for, load_model
from uspx.prune.export import RECORD
from uspx.prune.files import check_config, weight_files
from uspx.prune.kept import KeptLike, resolve_kept
from uspx.engine.batches import pad_id_of
from uspx.workload import Workload, default_max_length, encode, load_workload

FORMAT = "uspx-eval/1"
FILENAME = "evaluation.json"


def evaluate(
    teacher: str | Path | LoadedModel,
    candidate: str | Path | LoadedModel | None,
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
    streaming: bool = False,
    dtype: str = "auto",
) -> dict:
    """Compare ``candidate`` with ``teacher`` on ``workload``'s ``split``; returns (and writes to
    ``out``, a folder or a .json path) the evaluation.

    ``candidate`` is an exported folder or a loaded model; with ``kept`` (a kept set, plan or plan
    file) it is restricted to those experts first, and ``candidate=None`` means the teacher itself.
    ``epsilon`` is the largest acceptable loss delta (nats per token), one for every family or one per
    family (key ``"*"`` for the rest). ``memory_budget`` adds the memory-fit rule: candidate weights
    plus the KV cache for ``context`` tokens must fit. ``streaming`` runs both models a decoder layer
    at a time from their files (computing in ``dtype``; no KL and no speed then).
    """
    t = _load(teacher, trust_remote_code, streaming, dtype)
    c = t if candidate is None else _load(candidate, trust_remote_code, streaming, dtype)
    if t.tokenizer is None:
        raise UspxError(f"{t.source}: no tokenizer files; uspx needs one to read a text workload")
    _check_same_vocabulary(t, c)
    export_record = _check_lineage(t, c)
    ks = resolve_kept(kept) if kept is not None else None
    if ks is not None:
        adapter_for(c.model).validate_kept(ks.kept, allow_missing=True)  # fewer than top-k: refused

    wl = workload if isinstance(workload, Workload) else load_workload(workload)
    part = wl.part(split)
    if not part.items:
        raise UspxError(f"{wl.source}: the {split!r} split is empty; nothing to evaluate on")
    max_length = max_length or default_max_length(t.model.config)
    items = encode(part, t.tokenizer, max_length)
    eps = _epsilons(epsilon, part.families)

    t_run = Runner(t.model)
    c_run = Runner(c.model, (lambda: adapter_for(c.model).restrict(ks.kept)) if ks else contextlib.nullcontext)
    if streaming:
        speed = False  # a layer-at-a-time run says nothing about how fast the model generates
        stats = compare_layerwise(_layer_source(t, dtype), _layer_source(c, dtype, ks), items, pad_id_of(t.tokenizer),
                                  progress, ks.kept if ks else None)
    else:
        stats = compare(t_run, c_run, items, batch_size, pad_id_of(t.tokenizer), progress)
    fam = np.array([e.family for e in items])
    families = {f: summarise(stats, np.flatnonzero(fam == f)) for f in part.families}

    result = {
        "format": FORMAT,
        "uspx_version": uspx.__version__,
        "teacher": {"source": t.source, "fingerprint": t.fingerprint, "label": t.label},
        "candidate": {
            "source": c.source, "fingerprint": c.fingerprint, "label": c.label,
            "kind": "restricted" if ks else ("export" if export_record else "model"),
            "kept": {str(l): v for l, v in ks.kept.items()} if ks else None,
            "plan": ks.plan_path if ks else None,
            "export": {k: export_record.get(k) for k in ("source", "kept", "physical", "dtype", "plan")}
            if export_record else None,
        },
        "workload": {"source": wl.source, "fingerprint": wl.fingerprint, "split": split, "items": len(items),
                     "families": part.families, "truncated": part.summary.truncated},
        "settings": {"max_length": max_length, "batch_size": batch_size, "dtype": dtype if streaming else "float32",
                     "streaming": streaming,
                     "epsilon": eps, "context": context, "kv_dtype": kv_dtype,
                     "loss": "token-weighted mean next-token cross-entropy on completion tokens (nats), "
                             "as uspx.score.loss defines it"},
        "families": families,
        "overall": summarise(stats, np.arange(len(items))),
        # per item, in the workload's order: paired comparisons between candidates need these
        "items": [dict(id=e.id, family=e.family, tokens=int(stats.tokens[i]),
                       loss_teacher=float(stats.nll_teacher[i] / stats.tokens[i]) if stats.tokens[i] else None,
                       loss_candidate=float(stats.nll_candidate[i] / stats.tokens[i]) if stats.tokens[i] else None)
                  for i, e in enumerate(items)],
        "size": _sizes(t, c, ks),
    }
    result["memory"] = _memory(c, result["size"]["candidate"], memory_budget, context, kv_dtype)
    if speed:
        result["speed"] = speed_mod.measure({"teacher": t_run, "candidate": c_run}, [e.input_ids for e in items],
                                            new_tokens=decode_tokens)
        _speedups(result["speed"], restricted=ks is not None)
    result["acceptance"] = _acceptance(families, eps, result["memory"])
    if out is not None:
        path = Path(out)
        write_json(path if path.suffix == ".json" else path / FILENAME, result)  # atomic
    return result


# ----- inputs ------------------------------------------------------------------------------------
def _load(model: str | Path | LoadedModel, trust_remote_code: bool, streaming: bool = False,
          dtype: str = "auto") -> LoadedModel:
    """fp32 for both sides: loss deltas of a bf16 export then measure pruning, not rounding.
    ``streaming``: the model's skeleton only (no weights); the engine reads them a layer at a time."""
    if isinstance(model, LoadedModel):
        if streaming:
            raise UspxError("a layer-by-layer evaluation reads the model folder; pass its path, not a loaded model")
        return model
    from uspx.models.loading import resolve_model_path

    path = resolve_model_path(model)
    check_config(path)
    weight_files(path)  # truncated / corrupt weight files fail here, named
    if streaming:
        from uspx.engine import open_source

        opened = open_source(path, streaming=True, dtype=dtype)
        return LoadedModel(opened.source.model, opened.tokenizer, opened.path, opened.fingerprint, opened.label)
    try:
        return load_model(path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except UspxError:
        raise
    except Exception as exc:
        raise UspxError(f"{path}: cannot load the model: {exc}") from None


def _layer_source(lm: LoadedModel, dtype: str, ks=None):
    """A layer-by-layer source over ``lm``'s folder (only the kept experts decoded when restricted)."""
    from uspx.engine import FromCheckpoint, compute_dtype

    return FromCheckpoint(lm.source, compute_dtype(dtype), experts=ks.kept if ks else None)


def _check_same_vocabulary(t: LoadedModel, c: LoadedModel) -> None:
    """Token ids are compared position by position: both models must share one tokenizer."""
    tv, cv = int(t.model.config.vocab_size), int(c.model.config.vocab_size)
    if tv != cv:
        raise UspxError(f"teacher ({t.source}) and candidate ({c.source}) have different vocabularies ({tv} vs {cv})")
    if c.tokenizer is not None and c.tokenizer is not t.tokenizer and c.tokenizer.get_vocab() != t.tokenizer.get_vocab():
        raise UspxError(f"teacher ({t.source}) and candidate ({c.source}) use different tokenizers")


def _check_lineage(t: LoadedModel, c: LoadedModel) -> dict | None:
    """An export records its source; evaluating it against another teacher is a mistake."""
    rec_path = Path(c.source) / RECORD
    if c is t or not rec_path.exists():
        return None
    rec = read_json(rec_path)
    if isinstance(rec, dict) and rec.get("source_fingerprint") not in (None, t.fingerprint):
        raise FingerprintMismatch(
            f"{c.source} was exported from another model (fingerprint {str(rec['source_fingerprint'])[:12]}), "
            f"not from the teacher {t.source} ({t.fingerprint[:12]})"
        )
    return rec if isinstance(rec, dict) else None


def _epsilons(epsilon: float | Mapping[str, float], families: list[str]) -> dict[str, float]:
    if not isinstance(epsilon, Mapping):
        return {f: float(epsilon) for f in families}
    missing = [f for f in families if f not in epsilon and "*" not in epsilon]
    if missing:
        raise UspxError(f"epsilon has no threshold for families {missing} (add them, or a '*' default)")
    return {f: float(epsilon.get(f, epsilon.get("*"))) for f in families}


# ----- size, memory, speed -------------------------------------------------------------------------
def _disk(lm: LoadedModel) -> dict:
    wf = weight_files(lm.source)
    return {"parameter_bytes": wf.tensor_bytes, "file_bytes": wf.file_bytes, "dtype": str(wf.main_float_dtype())[6:]}


def _sizes(t: LoadedModel, c: LoadedModel, ks) -> dict:
    teacher = _disk(t)
    if ks is None:
        cand = _disk(c)
    else:
        # Mask-only: nothing on disk yet; the size a physical export would take, in the checkpoint's
        # precision (non-uniform sets export padded to the largest count).
        adapter = adapter_for(c.model)
        base = _disk(c)
        in_memory = next(c.model.parameters()).element_size()
        scale = torch.empty((), dtype=getattr(torch, base["dtype"])).element_size() / in_memory
        width = max(len(v) for v in ks.kept.values())
        dropped = sum(
            (l.num_experts - len(ks.kept.get(l.index, range(l.num_experts)))) * adapter.bytes_per_expert(l)
            for l in adapter.layers
        )
        padded = sum(
            (l.num_experts - max(width, len(ks.kept.get(l.index, ())))) * adapter.bytes_per_expert(l)
            for l in adapter.layers
        )
        cand = {"parameter_bytes": int(base["parameter_bytes"] - dropped * scale),
                "padded_parameter_bytes": int(base["parameter_bytes"] - padded * scale),
                "file_bytes": None, "dtype": base["dtype"], "note": "mask-only: size a physical export would take"}
    return {"teacher": teacher, "candidate": cand,
            "ratio": cand["parameter_bytes"] / teacher["parameter_bytes"]}


def _memory(c: LoadedModel, size: dict, budget: int | str | None, context: int, kv_dtype: str) -> dict | None:
    if budget is None:
        return None
    from uspx.plan import memory as mem

    budget_bytes = mem.parse_size(budget)
    weights = int(size.get("padded_parameter_bytes") or size["parameter_bytes"])
    kv = mem.kv_cache_bytes(mem.count_params(c.model.config), context, kv_dtype)
    return {"budget_bytes": budget_bytes, "weights_bytes": weights, "kv_bytes": kv, "context": context,
            "kv_dtype": kv_dtype, "total_bytes": weights + kv, "fits": weights + kv <= budget_bytes}


def _speedups(sp: dict, restricted: bool) -> None:
    if "teacher" not in sp:
        return
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        sp[key.replace("tokens_per_s", "speedup")] = sp["candidate"][key] / sp["teacher"][key]
    if restricted:
        sp["note"] = ("mask-only candidate: same shapes and compute as the teacher plus a routing hook, "
                      "so no speed gain is expected; export it to measure the smaller model")


# ----- verdict -----------------------------------------------------------------------------------
def _acceptance(families: dict, eps: dict[str, float], memory: dict | None) -> dict:
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
    if memory is not None:
        ok = memory["fits"]
        checks.append({"rule": "memory_fit", "value": memory["total_bytes"], "threshold": memory["budget_bytes"], "ok": ok})
        reasons.append(f"memory: weights {memory['weights_bytes']} + KV {memory['kv_bytes']} = {memory['total_bytes']} "
                       f"bytes {'<=' if ok else '>'} budget {memory['budget_bytes']}")
    verdict = "pass" if all(c["ok"] for c in checks) else "fail"
    return {"verdict": verdict, "rule": "acceptance: delta loss per family <= epsilon_t, and memory "
            "fit when a budget is given", "reasons": reasons, "checks": checks}
