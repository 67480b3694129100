"""Slice a checkpoint on disk to a kept set of experts, tensor by tensor, in its stored precision.

Which stored tensor holds which expert comes from the model class (transformers' own checkpoint
conversion names the parameter each stored tensor becomes): a stored tensor that becomes part of
a MoE layer's experts or router is either one expert's own (``...experts.<e>...`` in its name: kept
ones are renamed to their new index, the others dropped) or a fused tensor whose dim 0 holds the
experts one after the other (sliced; quantized blocks and scales alike, since each expert's bytes are
independent). Everything else is copied as stored. Nothing is dequantized or cast, so the pruned
file is the original minus the dropped experts.

Kept experts keep their order: new expert ``j`` is the ``j``-th smallest kept id. Where the plan
keeps fewer experts in some layers than the file holds per layer, filler experts pad the layer;
the family's adapter gives their values (so that the router can never pick them) or refuses.

A :class:`Cut` also narrows the kept experts to their channels and the attention to its kept heads:
the family's adapter names, per stored tensor, the dim and positions to keep, and those slices are
copied as stored (MXFP4 blocks and their scales byte for byte; an MXFP4 down projection only in
whole blocks of 32 channels).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from uspx.models.base import set_field
from uspx.models.tensorfiles import INDEX_NAME, TensorSpec, make_readable, write_safetensors
from uspx.engine.source import FromCheckpoint
from uspx.io import UspxError, read_json, write_json


@dataclass
class Cut:
    """Narrower experts and fewer attention heads, taken from the stored tensors (a joint plan)."""

    channels: dict[int, dict[int, torch.Tensor]]  # MoE layer -> original expert id -> its kept channels, sorted
    width: int  # channels per expert after the cut (the original width: experts stay whole)
    heads: dict[int, torch.Tensor]  # decoder layer -> kept query heads, sorted (empty: heads stay)
    head_shape: tuple[int, int, int] | None  # (query heads, KV groups, head dim) after the cut


Index = tuple[int, torch.Tensor]  # (dim, positions kept along it)


@dataclass
class _Slice:
    name: str  # new name
    spec: TensorSpec
    source: str  # stored name it comes from
    slots: list[int] | None = None  # fused: original expert id per new slot (None: copy as stored)
    rows_per_expert: int = 1
    fill: float | None = None  # per-expert tensor of a filler expert: every value this
    fillers: set[int] = field(default_factory=set)  # fused: original ids whose slots are fillers
    filler_value: float = 0.0
    index: Index | None = None  # copied as stored: only these positions
    expert_index: dict[int, Index] | None = None  # fused: per original expert id, the positions its slot keeps


@dataclass
class Layout:
    """What the sliced checkpoint holds: its config and, per stored file, the tensors to write."""

    config: dict
    files: dict[str, list[_Slice]]
    fillers: dict[int, list[int]]  # per layer: original ids used as never-routed fillers


def _narrowed(spec: TensorSpec, index: Index, name: str | None = None) -> TensorSpec:
    dim, positions = index
    shape = list(spec.shape)
    shape[dim] = len(positions)
    return TensorSpec(name or spec.name, tuple(shape), spec.dtype)


def _head_index(adapter, target: str, cut: Cut | None) -> Index | None:
    if cut is None or not cut.heads:
        return None
    found = re.search(adapter.layer_pattern, target)
    if found is None:
        return None
    heads = cut.heads[int(found.group(1))]
    n_heads, kv, hd = adapter.head_shape()
    groups = heads.div(n_heads // kv, rounding_mode="floor").unique_consecutive()
    return adapter.stored_head_index(target, heads, groups, hd)


def plan_layout(source: FromCheckpoint, kept: dict[int, list[int]], width: int, cut: Cut | None = None) -> Layout:
    """The layout of ``source`` cut to ``kept`` (every MoE layer named), ``width`` experts per layer,
    narrowed by ``cut`` when given."""
    adapter, ckpt = source.adapter, source.ckpt
    slots: dict[str, list[int]] = {}  # MoE layer module name -> original ids, in new order
    fillers: dict[int, list[int]] = {}
    per_expert = re.compile(adapter.per_expert_name)
    for layer in adapter.layers:
        ids = sorted(int(e) for e in kept[layer.index])
        spare = [e for e in range(layer.num_experts) if e not in set(ids)][: width - len(ids)]
        if spare and adapter.pad_mechanism is None:
            raise UspxError(
                f"{adapter.family}: a non-uniform plan needs never-routed filler experts (it keeps {len(ids)} experts in "
                f"layer {layer.index} but {width} per layer are exported), and this family's router has no "
                "per-expert bias to disable them; export a plan with the same count in every layer"
            )
        fillers[layer.index] = spare
        slots[layer.name] = sorted(ids + spare)
    if cut is not None and any(fillers.values()):
        raise UspxError("narrower experts need the same expert count in every layer")
    config = pruned_config_json(adapter, ckpt.config, width, cut)

    files: dict[str, list[_Slice]] = {}
    for name, file in sorted(ckpt.weight_map.items()):
        target = source.target_of(name)
        spec = ckpt.spec(name)
        layer = adapter.pruned_with_expert(target)
        out = files.setdefault(file, [])
        if layer is None:
            index = _head_index(adapter, target, cut)
            out.append(_Slice(name, spec if index is None else _narrowed(spec, index), name, index=index))
            continue
        order, dead = slots[layer.name], set(fillers[layer.index])
        fill = adapter.filler_value(target)
        per = per_expert.search(name)
        channels = None if cut is None else cut.channels.get(layer.index)
        if channels and (per is not None or not adapter.cuts_on_disk):
            raise UspxError(f"{adapter.family}: narrower experts are cut from a model in memory, not from the files")
        if per is not None:
            e = int(per.group(1))
            if e in order:
                new = name[: per.start()] + f".experts.{order.index(e)}." + name[per.end():]
                out.append(_Slice(new, spec, name, fill=fill if e in dead else None))
            continue
        n = layer.num_experts
        if not spec.shape or spec.shape[0] % n:
            raise UspxError(f"{ckpt.path}: {name} has {spec.shape[0] if spec.shape else 0} rows on dim 0, "
                            f"not a multiple of the {n} experts")
        rows = spec.shape[0] // n
        new_spec = TensorSpec(name, (width * rows, *spec.shape[1:]), spec.dtype)
        expert_index = None
        if channels and adapter.stored_channel_index(name, channels[order[0]]) is not None:
            if rows != 1:
                raise UspxError(f"{ckpt.path}: {name} holds {rows} rows per expert; uspx narrows [experts, ...] tensors")
            expert_index = {e: adapter.stored_channel_index(name, channels[e]) for e in order}
            new_spec = _narrowed(new_spec, expert_index[order[0]])
        out.append(_Slice(name, new_spec, name, slots=order, rows_per_expert=rows, fillers=dead,
                          filler_value=fill if dead else 0.0, expert_index=expert_index))
    return Layout(config, files, fillers)


def pruned_config_json(adapter, stored: dict, width: int, cut: Cut | None = None) -> dict:
    """The stored config.json with only what pruning changes: the expert count, under every name the
    config class accepts for it (qwen3_moe reads ``num_experts`` as ``num_local_experts``), and
    whatever else the family's own ``pruned_config`` changes (it also checks the count: deepseek's
    groups). Everything else, the declared dtype and the quantization config included, stays as it
    was written, so the export loads like its source."""
    after = adapter.pruned_config(width)
    if cut is not None:
        set_field(after, adapter.expert_width_field, cut.width)
        if cut.head_shape is not None:
            adapter.set_head_shape(after, *cut.head_shape)
    before, after = adapter.config.to_dict(), after.to_dict()
    changed = {k: v for k, v in after.items() if before.get(k) != v}
    config = copy.deepcopy(stored)
    config.update(changed)
    for alias, canonical in getattr(type(adapter.config), "attribute_map", {}).items():
        if canonical in changed and alias in config:
            config[alias] = changed[canonical]
    return config


def write_layout(source: FromCheckpoint, layout: Layout, out: Path) -> int:
    """Write the sliced tensors (stored file names kept), the index and config.json; returns the
    bytes of tensor data written."""
    ckpt = source.ckpt
    by_name = {s.name: s for slices in layout.files.values() for s in slices}

    def produce(spec: TensorSpec) -> Iterator[torch.Tensor]:
        s = by_name[spec.name]
        if s.fill is not None:
            yield torch.full(s.spec.shape, s.fill, dtype=s.spec.dtype)
        elif s.slots is None:
            t = ckpt.get(s.source)
            yield t if s.index is None else t.index_select(s.index[0], s.index[1])
        else:  # one expert at a time: bounded memory whatever the tensor's size
            r = s.rows_per_expert
            for e in s.slots:
                if e in s.fillers:
                    yield torch.full((r, *s.spec.shape[1:]), s.filler_value, dtype=s.spec.dtype)
                elif s.expert_index is not None:
                    dim, positions = s.expert_index[e]
                    yield ckpt.rows(s.source, e * r, (e + 1) * r).index_select(dim, positions)
                else:
                    yield ckpt.rows(s.source, e * r, (e + 1) * r)

    total = 0
    weight_map: dict[str, str] = {}
    with ckpt:
        for file, slices in layout.files.items():
            specs = [TensorSpec(s.name, s.spec.shape, s.spec.dtype) for s in slices]
            write_safetensors(out / file, specs, produce)
            total += sum(s.nbytes for s in specs)
            weight_map.update({s.name: file for s in specs})
    if (ckpt.path / INDEX_NAME).exists():
        index = read_json(ckpt.path / INDEX_NAME)
        write_json(out / INDEX_NAME, {"metadata": {**index.get("metadata", {}), "total_size": total},
                                      "weight_map": weight_map})
        make_readable(out / INDEX_NAME)
    write_json(out / "config.json", layout.config)
    make_readable(out / "config.json")
    return total

