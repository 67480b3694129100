"""Physically prune a gpt_oss checkpoint on disk, tensor by tensor, keeping MXFP4 experts MXFP4.

Slicing ``*_blocks`` and ``*_scales`` along the expert dim is exact (each expert's bytes are
independent), so the pruned file is the original minus the dropped experts: no dequantize /
requantize round trip, and no bf16 re-export that would come out larger than the original.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Mapping, Sequence

from uspx.io import UspxError, write_json
from uspx.stream.checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint, TensorSpec, make_readable, write_safetensors

# Tensors with the expert id on dim 0, relative to "model.layers.<i>.mlp."
_EXPERT_DIM = re.compile(r"^model\.layers\.(\d+)\.mlp\.(router\.(weight|bias)|experts\.[A-Za-z_]+)$")
_WEIGHT_FILES = re.compile(r".*\.(safetensors|bin|pt|pth|gguf)$")


def _kept_ids(kept: Mapping[int, Sequence[int]], n_layers: int, n_experts: int, top_k: int) -> dict[int, list[int]]:
    """Validate a kept set for physical pruning: every layer, one common count >= top-k, valid ids."""
    missing = [i for i in range(n_layers) if i not in kept]
    if missing:
        raise UspxError(f"kept set has no entry for layers {missing}; physical pruning needs every layer")
    extra = sorted(set(kept) - set(range(n_layers)))
    if extra:
        raise UspxError(f"kept set names layers {extra}; the model has layers 0..{n_layers - 1}")
    out = {}
    for i in range(n_layers):
        ids = [int(e) for e in kept[i]]
        if len(set(ids)) != len(ids):
            raise UspxError(f"kept set for layer {i} repeats an expert: {ids}")
        bad = [e for e in ids if not 0 <= e < n_experts]
        if bad:
            raise UspxError(f"kept set for layer {i} names experts {bad} outside 0..{n_experts - 1}")
        if len(ids) < top_k:
            raise UspxError(f"kept set for layer {i} keeps {len(ids)} experts, fewer than top-k = {top_k}")
        out[i] = sorted(ids)  # ascending, like MoEAdapter.prune: new expert j = j-th smallest kept id
    counts = {len(v) for v in out.values()}
    if len(counts) != 1:
        raise UspxError(
            f"physical pruning needs the same expert count in every layer (the gpt_oss config holds one "
            f"count); got counts {sorted(counts)}"
        )
    return out


def prune_mxfp4_checkpoint(src_dir: str | os.PathLike, kept: Mapping[int, Sequence[int]],
                           dst_dir: str | os.PathLike) -> Path:
    """Write ``dst_dir``: ``src_dir`` keeping only ``kept[layer]`` experts in every layer.

    Router weight/bias and every ``mlp.experts.*`` tensor (MXFP4 blocks and scales, biases, or dense
    experts of an unquantized checkpoint) are sliced along dim 0; ``num_local_experts`` is set to the
    kept count and ``quantization_config`` is kept, so stock ``from_pretrained`` loads the result.
    Shards keep their names; each is written atomically, and config and index are written last.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    if dst.resolve() == src.resolve():
        raise UspxError(f"{dst}: the pruned checkpoint must go to a different folder than its source")
    ckpt = Checkpoint(src)
    cfg = dict(ckpt.config)
    if cfg.get("model_type") != "gpt_oss":
        raise UspxError(f"{src}: prune_mxfp4_checkpoint handles gpt_oss checkpoints, not {cfg.get('model_type')!r}")
    n_layers, n_experts = int(cfg["num_hidden_layers"]), int(cfg["num_local_experts"])
    ids = _kept_ids(kept, n_layers, n_experts, int(cfg["num_experts_per_tok"]))
    n_kept = len(ids[0])
    dst.mkdir(parents=True, exist_ok=True)

    by_file: dict[str, list[str]] = {}
    for name, file in ckpt.weight_map.items():
        by_file.setdefault(file, []).append(name)

    def new_spec(name: str) -> TensorSpec:
        spec = ckpt.spec(name)
        if _EXPERT_DIM.match(name):
            if spec.shape[0] != n_experts:
                raise UspxError(f"{src}: {name} has {spec.shape[0]} rows on dim 0, expected {n_experts} experts")
            return TensorSpec(name, (n_kept, *spec.shape[1:]), spec.dtype)
        return spec

    def produce(spec: TensorSpec):
        m = _EXPERT_DIM.match(spec.name)
        if m is None:
            yield ckpt.get(spec.name)
            return
        # one expert at a time: bounded memory even for a 265 MB gate_up_proj_blocks tensor
        for e in ids[int(m.group(1))]:
            yield ckpt.rows(spec.name, e, e + 1)

    total = 0
    weight_map: dict[str, str] = {}
    with ckpt:
        for file, names in sorted(by_file.items()):
            specs = [new_spec(n) for n in sorted(names)]
            write_safetensors(dst / file, specs, produce)
            total += sum(s.nbytes for s in specs)
            weight_map.update({s.name: file for s in specs})
    for extra in src.iterdir():  # tokenizer, chat template, generation config: copied as they are
        if extra.is_file() and extra.name not in ("config.json", INDEX_NAME) and extra.name not in by_file \
                and not _WEIGHT_FILES.match(extra.name) and not extra.name.startswith("."):
            shutil.copy2(extra, dst / extra.name)
    cfg["num_local_experts"] = n_kept
    write_json(dst / "config.json", cfg)
    make_readable(dst / "config.json")
    if (src / INDEX_NAME).exists():
        write_json(dst / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        make_readable(dst / INDEX_NAME)
    elif set(by_file) != {SINGLE_NAME}:
        raise UspxError(f"{src}: several weight files but no {INDEX_NAME}")
    return dst


def pruned_bytes(src_dir: str | os.PathLike, kept_count: int) -> int:
    """Tensor bytes a pruned copy keeping ``kept_count`` experts per layer holds (headers excluded)."""
    ckpt = Checkpoint(src_dir)
    n_experts = int(ckpt.config["num_local_experts"])
    total = 0
    for name in ckpt.weight_map:
        spec = ckpt.spec(name)
        total += spec.nbytes * kept_count // n_experts if _EXPERT_DIM.match(name) else spec.nbytes
    ckpt.close()
    return total

