"""Read tensors from a sharded safetensors folder one at a time, and copy a folder with some
tensors replaced.

Memory stays bounded by the largest tensor (reader) or a chunk (copy): nothing here ever holds a
whole shard, which is what lets a 12.8 GiB checkpoint be pruned and streamed on a machine that
could not hold it. Writing files lives in ``uspx.models.tensorfiles`` (the synthetic checkpoints
below the engine write them too).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch

from uspx.io import UspxError, read_json
from uspx.models.tensorfiles import DTYPES, INDEX_NAME, SINGLE_NAME, TensorSpec, write_safetensors


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
            self.weight_map = {k: SINGLE_NAME for k in self._open(SINGLE_NAME).keys()}
        else:
            raise UspxError(f"{self.path}: no {SINGLE_NAME} and no {INDEX_NAME}")
        missing = sorted({f for f in self.weight_map.values() if not (self.path / f).exists()})
        if missing:
            raise UspxError(f"{self.path}: the index names shard files that are missing: {missing}")

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

    def _done(self, file: str) -> None:
        if not self.keep_open:
            self._handles.pop(file, None)

    def _file(self, name: str) -> str:
        if name not in self.weight_map:
            raise UspxError(f"{self.path}: tensor {name!r} is not in the checkpoint")
        return self.weight_map[name]

    def get(self, name: str) -> torch.Tensor:
        file = self._file(name)
        tensor = self._open(file).get_tensor(name)
        self._done(file)
        return tensor

    def spec(self, name: str) -> TensorSpec:
        sl = self._open(self._file(name)).get_slice(name)
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
