"""``uspx prune``: restrict a model to a kept set, or export a smaller checkpoint that loads with stock
``from_pretrained``.

The export slices the checkpoint on disk in its stored precision (``prune.slicing``: bf16, fp16,
fp32 and MXFP4 alike, the model never loaded whole), builds it in a hidden temporary folder next to
the target, verifies it there (logits of the reloaded export against the original restricted to the
kept set, and size against the plan's prediction), and only then renames it into place. A failure
at any step leaves no output folder, never a half-written one, and touches nothing that was there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

import uspx
from uspx.engine import FromCheckpoint, InMemory, Opened
from uspx.engine.source import freed_memory_returned
from uspx.io import UspxError, atomic_folder, check_fingerprints, read_json, write_json
from uspx.models import LoadedModel, Restriction, adapter_for, load_model, model_fingerprint
from uspx.models.loading import resolve_model_path
from uspx.prune.files import check_config, copy_tokenizer, weight_files
from uspx.prune.kept import KeptLike, resolve_kept
from uspx.prune.slicing import plan_layout, write_layout
from uspx.prune.verify import check_size, compare_layers, compare_logits, verification_items, within_tolerance

FORMAT = "uspx-export/1"
RECORD = "uspx_export.json"


def restrict_model(model: nn.Module | LoadedModel, kept: KeptLike) -> Restriction:
    """Route only among ``kept`` (mask-only, same shapes, gates renormalised); undo with ``remove()``
    or by leaving the ``with`` block. Layers missing from ``kept`` keep every expert."""
    net = model.model if isinstance(model, LoadedModel) else model
    return adapter_for(net).restrict(resolve_kept(kept).kept)


def export(
    model: str | Path | LoadedModel | Opened,
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
    banned experts are disabled in the checkpoint itself. ``model`` is a folder, a loaded model or an
    opened source (:func:`uspx.engine.open_source`); one opened layer by layer is verified layer by
    layer instead of loading the original and the export whole. ``predicted_bytes`` (or the plan's
    prediction) is compared with the exported tensor bytes.
    """
    if isinstance(model, Opened) and model.source.resident:
        model = model.loaded()  # verified whole, as a loaded model is
    layered = isinstance(model, Opened)  # only a source opened layer by layer is left opened
    src = (Path(model.path) if layered else Path(model.source) if isinstance(model, LoadedModel)
           else resolve_model_path(model))
    check_config(src)
    files = weight_files(src)  # a truncated or corrupt weight file fails here, named
    ks = resolve_kept(kept)
    fingerprint = model_fingerprint(src)
    if ks.plan is not None and getattr(ks.plan, "model_fingerprint", None):
        check_fingerprints({"model": fingerprint}, {"model": ks.plan.model_fingerprint}, f"plan {ks.plan_path or ''}".strip())
    joint = ks.plan is not None and bool(getattr(ks.plan, "channels", None) or getattr(ks.plan, "heads", None))
    if joint and not physical:
        raise UspxError("a plan with narrower experts or fewer heads exports physically: drop --mask-only")
    layout_source = FromCheckpoint(src, torch.float32)  # the skeleton only: no weights are read here
    adapter = layout_source.adapter
    if joint and not adapter.cuts_on_disk:
        if layered:
            raise UspxError(f"{adapter.family}: narrower experts or fewer heads are cut from the model loaded "
                            "whole; open it whole (drop --streaming) or cut whole experts only")
        from uspx.prune.shaped import export_shaped

        return export_shaped(_fp32_model(model, src, trust_remote_code), ks.plan, out_dir, plan_path=ks.plan_path,
                             plan_sha256=ks.plan_sha256, size_tolerance=size_tolerance)
    out = Path(out_dir)
    if out.resolve() == src.resolve():
        raise UspxError(f"{out}: the export must go to another folder than its source")
    existing = _existing_export(out, fingerprint, ks.kept, physical, ks.plan if joint else None)
    if existing is not None:
        return {**existing, "status": "up-to-date"}

    adapter.validate_kept(ks.kept, allow_missing=not physical)
    full = _full_kept(adapter, ks.kept)
    layout = export_layout(layout_source, ks.kept, ks.plan if joint else None, physical=physical)
    expected = predicted_bytes if predicted_bytes is not None else ks.predicted_weight_bytes()

    with atomic_folder(out) as tmp:
        with freed_memory_returned():  # tensors of every size pass through: hand each back when written
            written = write_layout(layout_source, layout, tmp)
        copy_tokenizer(src, tmp)
        verification = _verify(model, src, tmp, full, verify_prompts, trust_remote_code, ks.plan if joint else None)
        _require(verification, logit_tolerance)
        plan_dtype = (getattr(ks.plan, "settings", None) or {}).get("dtype") if predicted_bytes is None else None
        precision, size = _size(files, weight_files(tmp), expected, size_tolerance, plan_dtype, written)
        removed = sum(adapter.num_experts - len(v) for v in full.values())
        if not joint:
            size["saved_per_expert_bytes"] = (size["source_tensor_bytes"] - size["actual_bytes"]) / removed if removed else 0
        record = dict(
            format=FORMAT, uspx_version=uspx.__version__, source=str(src), source_fingerprint=fingerprint,
            family=adapter.family, model_type=layout_source.config.model_type, physical=physical,
            dtype=precision,
            kept={str(l): v for l, v in ks.kept.items()}, counts={str(l): len(v) for l, v in ks.kept.items()},
            padding={str(l): v for l, v in layout.fillers.items() if v},
            plan=ks.plan_path, plan_sha256=ks.plan_sha256,
            verification=verification, size=size, fingerprint=model_fingerprint(tmp), status="written",
        )
        if joint:
            record.update(_joint_record(ks.plan))
        write_json(tmp / RECORD, record)
        if out.exists():
            out.rmdir()  # only an empty folder reaches this point (see _existing_export)
    return record


def _require(verification: dict, tolerance: float) -> None:
    """Refuse an export that differs from the (masked, restricted) original beyond ``tolerance``."""
    verification["tolerance"] = tolerance
    if not within_tolerance(verification, tolerance):
        layers = verification.get("max_abs_hidden_diff")
        raise UspxError(
            f"export verification failed: logits of the reloaded export differ from the original restricted "
            f"to the kept experts by {verification['max_abs_logit_diff']:.3g}"
            + (f" (each layer on the original's inputs: largest difference {max(layers):.3g})" if layers else "")
            + f" (tolerance {tolerance:g}); nothing was written"
        )


def _size(files, new_files, expected: int | None, tolerance: float, plan_dtype: str | None,
          written: int) -> tuple[str, dict]:
    """The export's precision and its sizes, checked against ``expected`` tensor bytes."""
    precision = "mxfp4" if new_files.is_mxfp4() else str(new_files.main_float_dtype()).replace("torch.", "")
    size = check_size(new_files.tensor_bytes, expected, tolerance,
                      f" (plan sized for {plan_dtype}, checkpoint in {precision})" if plan_dtype else "")
    size.update(file_bytes=new_files.file_bytes, header_bytes=sum(new_files.headers.values()),
                source_file_bytes=files.file_bytes, source_tensor_bytes=files.tensor_bytes, written_tensor_bytes=written)
    return precision, size


def _verify(model: str | Path | LoadedModel | Opened, src: Path, exported: Path, kept: dict[int, list[int]], prompts,
            trust_remote_code: bool, joint=None) -> dict:
    """Reload the export and compare its logits with the original restricted to ``kept`` (float32):
    with stock ``from_pretrained`` both whole, or both layer by layer from their files when the
    original was opened layer by layer. With a ``joint`` plan the original is masked: what the plan
    drops inside the kept experts and the attention writes nothing."""
    from uspx.prune.shaped import layer_masker, masked_reference

    if isinstance(model, Opened):  # only a layer-by-layer source is left opened (see export)
        # the reference reads only the kept experts, in float32 whatever precision the run computes in
        reference, candidate = FromCheckpoint(src, torch.float32, experts=kept), FromCheckpoint(exported, torch.float32)
        if joint is not None:
            reference.edit = layer_masker(reference.adapter, joint)
        tokenizer, how = model.tokenizer, "layer by layer from the safetensors files (float32)"
    else:
        lm = _fp32_model(model, src, trust_remote_code)
        reloaded = load_model(exported, dtype=torch.float32, with_tokenizer=False)
        net = lm.model if joint is None else masked_reference(lm.model, joint)
        reference, candidate, tokenizer = InMemory(net), InMemory(reloaded.model), lm.tokenizer
        how = "AutoModelForCausalLM.from_pretrained (fp32)"
    items = verification_items(tokenizer, prompts, int(reference.config.vocab_size))
    compare = compare_logits if joint is None else compare_layers  # narrower matrices round differently
    return {**compare(reference, kept, candidate, items), "reloaded_with": how}


def _existing_export(out: Path, fingerprint: str, kept: dict[int, list[int]], physical: bool, joint=None) -> dict | None:
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
        and (joint is None or all(old.get(k) == v for k, v in _joint_record(joint).items()))
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
    """The source in fp32: exact for bf16/fp16 weights, so the comparison sees the stored values."""
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


def export_layout(source: FromCheckpoint, kept: dict[int, list[int]], plan=None, *, physical: bool = True):
    """The stored tensors (:class:`uspx.prune.slicing.Layout`) an export of ``kept`` writes from
    ``source``'s files: physically, every layer padded to the largest kept count, cut to a joint
    ``plan``'s channels and heads when given; mask-only, every expert kept in place."""
    from uspx.prune.shaped import plan_cut

    full = _full_kept(source.adapter, kept)
    width = max(len(v) for v in full.values()) if physical else source.adapter.num_experts
    return plan_layout(source, full, width, plan_cut(source.adapter, plan) if plan is not None else None)


def _joint_record(plan) -> dict:
    from uspx.io import sha256_json
    from uspx.prune.shaped import joint_fields

    # the kept channels and heads themselves are in the plan: the record holds their hash
    return {**joint_fields(plan), "cut_sha256": sha256_json({"channels": plan.channels, "heads": plan.heads})}
