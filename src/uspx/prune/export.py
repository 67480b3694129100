"""``uspx prune``: restrict a model to a kept set, or export a smaller checkpoint that loads with stock
``from_pretrained``.

The export is built in a hidden temporary folder next to the target, verified there (logits against
the restricted original, size against the prediction), and only then renamed into place: a failure at
any step leaves no output folder, never a half-written one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

import uspx
from uspx.io import UspxError, check_fingerprints, read_json, write_json
from uspx.models import LoadedModel, Restriction, adapter_for, load_model, model_fingerprint
from uspx.models.loading import resolve_model_path
from uspx.prune.files import DTYPES, WeightFiles, check_config, copy_tokenizer, weight_files
from uspx.prune.kept import KeptLike, KeptSource, resolve_kept
from uspx.prune.verify import check_size, compare_logits, prompt_ids

FORMAT = "uspx-export/1"
RECORD = "uspx_export.json"


def restrict_model(model: nn.Module | LoadedModel, kept: KeptLike) -> Restriction:
    """Route only among ``kept`` (mask-only, same shapes, gates renormalised); undo with ``remove()``
    or by leaving the ``with`` block. Layers missing from ``kept`` keep every expert."""
    net = model.model if isinstance(model, LoadedModel) else model
    return adapter_for(net).restrict(resolve_kept(kept).kept)


def export(
    model: str | Path | LoadedModel,
    kept: KeptLike,
    out_dir: str | Path,
    *,
    physical: bool = True,
    verify_prompts: Sequence[str] | None = None,
    predicted_bytes: int | None = None,
    logit_tolerance: float = 1e-4,
    size_tolerance: float = 0.02,
    trust_remote_code: bool = False,
) -> dict:
    """Write the model restricted to ``kept`` into ``out_dir``; returns the export record.

    ``kept`` is a mapping layer -> expert ids, a :class:`~uspx.plan.Plan` or a plan file. With
    ``physical`` the dropped experts are removed (same count per layer; non-uniform sets are padded
    with never-routed experts where the family allows it); without it the model keeps its shapes and
    banned experts are disabled in the checkpoint itself. The checkpoint keeps the source's precision.
    ``predicted_bytes`` (or the plan's prediction) is compared with the exported tensor bytes.
    """
    src = Path(model.source) if isinstance(model, LoadedModel) else resolve_model_path(model)
    check_config(src)
    files = weight_files(src)  # a truncated or corrupt weight file fails here, named
    if files.is_mxfp4():
        raise UspxError(
            f"{src}: MXFP4 checkpoint; an in-memory export would dequantize it to bf16 and come out larger "
            "than the original. Use uspx.stream.prune.prune_mxfp4_checkpoint, which slices the blocks."
        )
    ks = resolve_kept(kept)
    fingerprint = model_fingerprint(src)
    if ks.plan is not None and getattr(ks.plan, "model_fingerprint", None):
        check_fingerprints({"model": fingerprint}, {"model": ks.plan.model_fingerprint}, f"plan {ks.plan_path or ''}".strip())
    out = Path(out_dir)
    existing = _existing_export(out, fingerprint, ks.kept, physical)
    if existing is not None:
        return {**existing, "status": "up-to-date"}

    lm = _fp32_model(model, src, trust_remote_code)
    adapter = adapter_for(lm.model)
    new_model, fillers = _build(adapter, ks, physical)
    _cast_like_source(new_model, files)
    expected = predicted_bytes if predicted_bytes is not None else ks.predicted_weight_bytes()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        new_model.save_pretrained(tmp)
        copy_tokenizer(src, tmp)
        del new_model  # the check below reloads from disk, the copy in memory is no longer needed
        ids = prompt_ids(lm.tokenizer, verify_prompts, int(lm.model.config.vocab_size))
        verification = compare_logits(lm.model, _full_kept(adapter, ks.kept), tmp, ids)
        if not verification["max_abs_logit_diff"] <= logit_tolerance:  # `not <=` also catches NaN
            raise UspxError(
                f"export verification failed: logits of the reloaded export differ from the restricted "
                f"model by {verification['max_abs_logit_diff']:.3g} (tolerance {logit_tolerance:g})"
            )
        written = weight_files(tmp)
        plan_dtype = (getattr(ks.plan, "settings", None) or {}).get("dtype") if predicted_bytes is None else None
        size = check_size(written.tensor_bytes, expected, size_tolerance,
                          f" (plan sized for {plan_dtype}, checkpoint in {written.main_float_dtype()})" if plan_dtype else "")
        size.update(file_bytes=written.file_bytes, header_bytes=sum(written.headers.values()),
                    source_file_bytes=files.file_bytes, source_tensor_bytes=files.tensor_bytes)
        record = dict(
            format=FORMAT, uspx_version=uspx.__version__, source=str(src), source_fingerprint=fingerprint,
            family=adapter.family, model_type=lm.model.config.model_type, physical=physical,
            dtype=str(files.main_float_dtype()).replace("torch.", ""),
            kept={str(l): v for l, v in ks.kept.items()}, counts={str(l): len(v) for l, v in ks.kept.items()},
            padding={str(l): v for l, v in fillers.items() if v},
            plan=ks.plan_path, plan_sha256=ks.plan_sha256,
            verification={**verification, "tolerance": logit_tolerance, "reloaded_with": "AutoModelForCausalLM.from_pretrained (fp32)"},
            size=size, fingerprint=model_fingerprint(tmp), status="written",
        )
        write_json(tmp / RECORD, record)
        if out.exists():
            out.rmdir()  # only an empty folder reaches this point (see _existing_export)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def _existing_export(out: Path, fingerprint: str, kept: dict[int, list[int]], physical: bool) -> dict | None:
    """The record when ``out`` already holds this very export; None when ``out`` is free; else an error."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise UspxError(f"{out} exists and is not a folder; refusing to overwrite it")
    if not any(out.iterdir()):
        return None
    if not (out / RECORD).exists():
        what = "another model" if (out / "config.json").exists() else "other files"
        raise UspxError(f"{out} already holds {what}; refusing to overwrite it (choose another folder or delete it)")
    old = read_json(out / RECORD)
    same = (
        isinstance(old, dict)
        and old.get("source_fingerprint") == fingerprint
        and old.get("kept") == {str(l): v for l, v in kept.items()}
        and old.get("physical") == physical
    )
    if not same:
        raise UspxError(
            f"{out} already holds a different export (from {old.get('source') if isinstance(old, dict) else '?'} "
            "or with another kept set); refusing to overwrite it (choose another folder or delete it)"
        )
    try:
        current = model_fingerprint(out)
    except Exception:  # unreadable config or weights: the folder was damaged after the export
        current = None
    if current != old.get("fingerprint"):
        raise UspxError(f"{out}: its weights or config changed since uspx exported them; refusing to overwrite it")
    return old


def _fp32_model(model: str | Path | LoadedModel, src: Path, trust_remote_code: bool) -> LoadedModel:
    """The source in fp32: exact for bf16/fp16 weights, so one copy serves pruning and verification."""
    if isinstance(model, LoadedModel) and all(
        p.dtype == torch.float32 for p in model.model.parameters() if p.is_floating_point()
    ):
        return model
    try:
        return load_model(src, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except UspxError:
        raise
    except Exception as exc:  # transformers' own errors for damaged folders
        raise UspxError(f"{src}: cannot load the model: {exc}") from None


def _full_kept(adapter, kept: dict[int, list[int]]) -> dict[int, list[int]]:
    """Layers the kept set leaves out keep every expert."""
    return {l.index: kept.get(l.index, list(range(l.num_experts))) for l in adapter.layers}


def _build(adapter, ks: KeptSource, physical: bool) -> tuple[nn.Module, dict[int, list[int]]]:
    if not physical:
        # Same shapes, banned experts dead in the checkpoint itself: loads and behaves restricted
        # without uspx (families with a router bias only).
        return adapter.pad_to_uniform(_full_kept(adapter, ks.kept), width=adapter.num_experts)
    adapter.validate_kept(ks.kept)  # every layer named, >= top-k each, ids in range
    if ks.uniform:
        return adapter.prune(ks.kept), {}
    return adapter.pad_to_uniform(ks.kept)


def _cast_like_source(model: nn.Module, files: WeightFiles) -> None:
    """Give every tensor the dtype it has in the source checkpoint (tensors saved under other names,
    e.g. fused experts saved per expert, take the checkpoint's main dtype). Exact: the fp32 values
    were read from exactly these dtypes."""
    tags = files.dtype_tags()
    main = files.main_float_dtype()
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            target = DTYPES.get(tags.get(name, ""), main)
            if target.is_floating_point and t.dtype != target:
                t.data = t.data.to(target)
