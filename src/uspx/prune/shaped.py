"""Export a joint plan: fewer experts, narrower experts and dense MLPs, and fewer attention heads in
one checkpoint.

The experts go first, sliced on disk like any plan (``prune.export``, verified on its own); the
result is then cut to the plan's channels (``prune.channels.narrowed`` and ``narrowed_dense``) and query heads
(``prune.heads.narrowed_heads``) and written in the stored precision. The reference it must equal
is the original restricted to the kept experts, with the dropped channels of the kept experts and
the dropped query heads writing nothing (their down-projection and ``o_proj`` columns zeroed): the
masked model. The export is reloaded with stock ``from_pretrained`` and compared with it before it
is put in place.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from uspx.io import UspxError
from uspx.models import LoadedModel, adapter_for, load_model
from uspx.plan.select import Plan
from uspx.prune.channels import mask_expert_channels, masked, masked_dense, narrowed, narrowed_dense, save_verified
from uspx.prune.export import FORMAT, export
from uspx.prune.files import weight_files
from uspx.prune.heads import mask_query_heads, masked_heads, narrowed_heads
from uspx.prune.kept import resolve_kept
from uspx.prune.slicing import Cut
from uspx.prune.verify import check_size


def masked_reference(model: nn.Module, plan) -> nn.Module:
    """A copy of ``model`` whose units the joint ``plan`` drops inside the kept experts and attention
    write nothing (experts are restricted at comparison time)."""
    out = model
    if plan.channels and plan.channels.get("dense"):
        out = masked_dense(out, plan.channels["dense"])
    if plan.channels and plan.channels["kept"]:
        adapter = adapter_for(model)
        _check_width(plan.channels, adapter.expert_width())
        kept = {}
        for layer in adapter.layers:
            rows = torch.arange(plan.channels["width"]).repeat(layer.num_experts, 1)  # dropped experts: any
            for e, channels in zip(plan.kept[layer.index], plan.channels["kept"][layer.index]):
                rows[e] = torch.tensor(channels)
            kept[layer.index] = rows
        out = masked(out, kept)
    if plan.heads:
        out = masked_heads(out, _head_tensor(plan, model.config.num_hidden_layers))
    return out if out is not model else copy.deepcopy(model)


def plan_cut(adapter, plan):
    """The :class:`~uspx.prune.slicing.Cut` of a joint plan's channels and heads (experts in the
    plan's order), cut from the stored tensors."""
    ch = plan.channels or {}
    if ch.get("dense"):
        raise UspxError(f"{adapter.family}: narrower dense MLPs are cut from a model in memory, not from the files")
    if ch:
        _check_width(ch, adapter.expert_width())
    channels = {l: {e: torch.tensor(c, dtype=torch.long) for e, c in zip(plan.kept[l], lists)}
                for l, lists in (ch.get("kept") or {}).items()}
    heads, shape = {}, None
    if plan.heads:
        heads = dict(enumerate(_head_tensor(plan, adapter.config.num_hidden_layers)))
        g, r = plan.heads["kv_groups"], plan.heads["heads_per_group"]
        shape = (g * r, g, adapter.head_shape()[2])
    return Cut(channels, ch.get("width") or adapter.expert_width(), heads, shape)


def layer_masker(adapter, plan) -> Callable[[int, nn.Module], None]:
    """``edit(index, decoder_layer)`` (see :class:`uspx.engine.FromCheckpoint`): what the joint
    ``plan`` drops inside the kept experts and the attention of that layer writes nothing."""
    moe = {l.index: l for l in adapter.layers}
    width = adapter.expert_width()
    channels = (plan.channels or {}).get("kept") or {}

    def edit(index: int, module: nn.Module) -> None:
        with torch.no_grad():
            if index in moe and index in channels:
                mask_expert_channels(adapter, moe[index], width, dict(zip(plan.kept[index], channels[index])))
            if plan.heads:
                mask_query_heads(adapter, adapter.attention(module), plan.heads["kept"][index])

    return edit


def joint_fields(plan) -> dict:
    """What an export record says of a joint plan's channels and heads (the kept ids stay in the plan)."""
    return dict(
        channels=None if not plan.channels else {
            "width": plan.channels["width"], "original_width": plan.channels["original_width"],
            "group": plan.channels.get("group", 1),
            "dense": [{k: d[k] for k in ("path", "field", "width", "original_width")} for d in plan.channels.get("dense") or []]},
        heads=None if not plan.heads else {k: plan.heads[k] for k in plan.heads if k != "kept"})


def _check_width(channels: dict, width: int) -> None:
    if channels["original_width"] != width:
        raise UspxError(f"the plan narrows experts of {channels['original_width']} channels; "
                        f"this model's have {width}")


def _head_tensor(plan, layers: int) -> torch.Tensor:
    """[layers, kept heads]: the query heads the plan keeps in each of the model's ``layers``."""
    missing = [i for i in range(layers) if i not in plan.heads["kept"]]
    if missing:
        raise UspxError(f"the plan keeps no heads for layers {missing}")
    return torch.tensor([plan.heads["kept"][i] for i in range(layers)], dtype=torch.long)


def shaped(pruned: nn.Module, plan) -> nn.Module:
    """``pruned`` (already holding only the plan's experts, in its order) cut to the plan's channels
    and query heads."""
    out = pruned
    if plan.channels and plan.channels.get("dense"):
        out = narrowed_dense(out, plan.channels["dense"])
    if plan.channels and plan.channels["kept"]:
        out = narrowed(out, {l: torch.tensor(v, dtype=torch.long) for l, v in plan.channels["kept"].items()})
    if plan.heads:
        out = narrowed_heads(out, _head_tensor(plan, pruned.config.num_hidden_layers))
    return out


def export_shaped(lm: LoadedModel, plan, out_dir: str | Path, *, plan_path: str | None = None,
                  plan_sha256: str | None = None, size_tolerance: float = 0.02) -> dict:
    """Write ``lm`` (its fp32 copy) cut to the joint ``plan`` into ``out_dir`` (see the module doc)."""
    if not isinstance(plan, Plan) or not (plan.channels or plan.heads):
        raise UspxError("export_shaped needs a joint plan (one with channels or heads)")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.experts-", dir=out.parent) as tmp:
        experts_only = export(lm, plan.kept_set(), Path(tmp) / "experts")
        pruned = load_model(Path(tmp) / "experts", dtype=torch.float32, with_tokenizer=False).model
    narrow = shaped(pruned, plan)
    reference = masked_reference(lm.model, plan)
    stored = str(weight_files(lm.source).main_float_dtype()).replace("torch.", "")
    expected = resolve_kept(plan).predicted_weight_bytes()

    def size_of(folder: Path) -> dict:
        return check_size(weight_files(folder).tensor_bytes, expected, size_tolerance,
                          f" (plan sized for {plan.settings.get('dtype')}, checkpoint in {stored})")

    return save_verified(lm, narrow, reference, None, out, dict(
        format=FORMAT, model_type=lm.model.config.model_type, physical=True, dtype=stored,
        kept={str(l): v for l, v in plan.kept.items()}, counts={str(l): len(v) for l, v in plan.kept.items()},
        **joint_fields(plan), plan=plan_path, plan_sha256=plan_sha256,
        experts_verification=experts_only["verification"]), kept=plan.kept_set(), size_check=size_of)
