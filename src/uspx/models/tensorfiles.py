"""Write safetensors files one tensor (or one chunk of a tensor) at a time, and the names of a
Hugging Face checkpoint folder's weight files.

Memory stays bounded by a chunk: nothing here ever holds a whole shard, which is what lets a 12.8
GiB checkpoint be written and pruned on a machine that could not hold it. The reader is
``uspx.engine.checkpoint.Checkpoint``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from uspx.io import UspxError, atomic_path, write_json

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors dtype tags <-> torch dtypes
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
_TAGS = {v: k for k, v in DTYPES.items()}


def dtype_tag(dtype: torch.dtype) -> str:
    try:
        return _TAGS[dtype]
    except KeyError:
        raise UspxError(f"dtype {dtype} cannot be written to safetensors by uspx") from None


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor to write, known before its bytes exist."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


Producer = Callable[[TensorSpec], Iterable[torch.Tensor]]
"""Yields the tensor's contents as row chunks (contiguous along dim 0) in order."""


def write_safetensors(path: str | os.PathLike, specs: list[TensorSpec], produce: Producer,
                      metadata: dict[str, str] | None = None) -> int:
    """Write one safetensors file, streaming each tensor's bytes from ``produce``; atomic.

    The header (names, shapes, offsets) is known from ``specs`` alone, so it is written first and the
    data follows chunk by chunk. Returns the file size.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": dtype_tag(spec.dtype), "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for spec in specs:
            written = 0
            for chunk in produce(spec):
                if chunk.dtype != spec.dtype:
                    raise UspxError(f"{spec.name}: producer gave {chunk.dtype}, header says {spec.dtype}")
                data = chunk.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()  # trained on a GPU: bytes come back here
                fh.write(data)
                written += data.nbytes
            if written != spec.nbytes:
                raise UspxError(f"{spec.name}: wrote {written} bytes, expected {spec.nbytes} for {spec.shape}")
    make_readable(path)
    return 8 + len(raw) + offset


def make_readable(path: str | os.PathLike) -> None:
    """atomic_path's temporary files are 0600; weights are shared files, so give them the umask's mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split specs, in order, into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def write_sharded(out_dir: str | os.PathLike, specs: list[TensorSpec], produce: Producer,
                  max_shard_bytes: int, progress: Callable[[str], None] | None = None) -> dict[str, str]:
    """Write ``specs`` as ``model-0000i-of-0000n.safetensors`` plus the index; returns the weight map.

    The index goes last: a folder with an index is complete (each shard is itself atomic).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(specs, max_shard_bytes)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else SINGLE_NAME
        if progress:
            progress(f"writing {name} ({sum(s.nbytes for s in shard) / 2**30:.2f} GiB, {len(shard)} tensors)")
        write_safetensors(out_dir / name, shard, produce)
        weight_map.update({s.name: name for s in shard})
    if len(shards) > 1:
        total = sum(s.nbytes for s in specs)
        write_json(out_dir / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        make_readable(out_dir / INDEX_NAME)
    elif (out_dir / INDEX_NAME).exists():
        (out_dir / INDEX_NAME).unlink()  # a stale index would point at shards that are gone
    return weight_map
