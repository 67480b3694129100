"""Read tensors from a sharded safetensors folder one at a time, and write safetensors files one
tensor (or one chunk of a tensor) at a time.

Both sides keep memory bounded by the largest tensor (reader) or a chunk (writer): nothing here
ever holds a whole shard, which is what lets a 12.8 GiB checkpoint be written, pruned and streamed
on a machine that could not hold it.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from uspx.io import UspxError, atomic_path, read_json, write_json

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
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


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
                data = chunk.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
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


class Checkpoint:
    """A Hugging Face model folder: ``config.json`` plus one or many safetensors files.

    Tensors are read one at a time through ``safe_open`` (memory-mapped), so only what is asked for
    is ever resident. Unless ``keep_open``, a file is unmapped after every read: pages touched through
    a live mapping count in the process's RSS (pruning a 12.8 GiB checkpoint with handles kept open
    peaked at 8.7 GB RSS), and reopening costs only a header parse.
    """

    def __init__(self, model_dir: str | os.PathLike, keep_open: bool = False):
        self.path = Path(model_dir)
        self.keep_open = keep_open
        self._handles: dict[str, object] = {}
        if not (self.path / "config.json").exists():
            raise UspxError(f"{self.path}: no config.json (not a Hugging Face model folder)")
        self.config: dict = read_json(self.path / "config.json")
        if (self.path / INDEX_NAME).exists():
            index = read_json(self.path / INDEX_NAME)
            if "weight_map" not in index:
                raise UspxError(f"{self.path / INDEX_NAME}: no weight_map")
            self.weight_map: dict[str, str] = dict(index["weight_map"])
        elif (self.path / SINGLE_NAME).exists():
            self.weight_map = {k: SINGLE_NAME for k in self._keys(SINGLE_NAME)}
        else:
            raise UspxError(f"{self.path}: no {SINGLE_NAME} and no {INDEX_NAME}")
        missing = sorted({f for f in self.weight_map.values() if not (self.path / f).exists()})
        if missing:
            raise UspxError(f"{self.path}: the index names shard files that are missing: {missing}")

    def _keys(self, file: str) -> list[str]:
        return list(self._open(file).keys())

    def _open(self, file: str):
        from safetensors import safe_open

        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.path / file), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise UspxError(f"{self.path / file}: cannot read safetensors file: {exc}") from None
        return self._handles[file]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.weight_map if n.startswith(prefix)]

    def _done(self, file: str) -> None:
        if not self.keep_open:
            self._handles.pop(file, None)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise UspxError(f"{self.path}: tensor {name!r} is not in the checkpoint")
        file = self.weight_map[name]
        tensor = self._open(file).get_tensor(name)
        self._done(file)
        return tensor

    def spec(self, name: str) -> TensorSpec:
        if name not in self.weight_map:
            raise UspxError(f"{self.path}: tensor {name!r} is not in the checkpoint")
        sl = self._open(self.weight_map[name]).get_slice(name)
        return TensorSpec(name, tuple(sl.get_shape()), DTYPES[sl.get_dtype()])  # header only: stays open

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor along dim 0, read without loading the rest."""
        file = self.weight_map[name]
        rows = self._open(file).get_slice(name)[start:stop]
        self._done(file)
        return rows

    def files(self) -> list[Path]:
        return [self.path / f for f in sorted(set(self.weight_map.values()))]

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_replacing(src: str | os.PathLike, out_dir: str | os.PathLike, replace: dict[str, torch.Tensor],
                    skip_files: Iterable[str] = ()) -> int:
    """Copy the model folder ``src`` into ``out_dir`` with the stored tensors named in ``replace``
    given new values (cast to their stored dtype; shapes must match), every other tensor byte for
    byte in its file, quantized ones included. Other files (config, tokenizer) are copied, except
    ``skip_files``. Returns the bytes of tensor data written.

    This is how a model that changed only some tensors is saved without touching the rest: an
    MXFP4 checkpoint whose experts stayed frozen keeps its expert blocks exactly.
    """
    import shutil

    ckpt = Checkpoint(src)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(replace) - set(ckpt.weight_map))
    if unknown:
        raise UspxError(f"{ckpt.path}: no stored tensors named {unknown[:4]}")
    for name, value in replace.items():
        spec = ckpt.spec(name)
        if tuple(value.shape) != spec.shape:
            raise UspxError(f"{name}: new value has shape {tuple(value.shape)}, stored {spec.shape}")

    def produce(spec: TensorSpec) -> Iterable[torch.Tensor]:
        if spec.name in replace:
            yield replace[spec.name].detach().to(spec.dtype)
        elif not spec.shape:
            yield ckpt.get(spec.name)
        else:  # row chunks of about _CHUNK_BYTES: memory stays bounded on any tensor
            step = max(1, _CHUNK_BYTES * spec.shape[0] // max(1, spec.nbytes))
            for start in range(0, spec.shape[0], step):
                yield ckpt.rows(spec.name, start, start + step)

    written = 0
    by_file: dict[str, list[str]] = {}
    for name, file in ckpt.weight_map.items():
        by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        metadata = ckpt._open(file).metadata()
        specs = [ckpt.spec(n) for n in names]
        write_safetensors(out / file, specs, produce, metadata)
        written += sum(s.nbytes for s in specs)
    skip = set(skip_files) | set(by_file)
    for path in sorted(ckpt.path.iterdir()):
        if path.is_file() and path.name not in skip:
            shutil.copy2(path, out / path.name)
    ckpt.close()
    return written


_CHUNK_BYTES = 64 << 20
