"""Hidden states of every token between two decoder layers, in RAM or in a memory-mapped file.

A layer-by-layer run reads a batch's rows, runs one decoder layer, and writes the output to the
same rows, so one buffer suffices (no ping-pong copy): its size is ``rows * hidden * itemsize`` in
RAM, or about zero resident with a spill file. ``save`` / ``load`` let a killed run resume after the
last finished layer.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from uspx.io import UspxError, atomic_path

_CHUNK = 1 << 15  # rows copied at a time by save / load


class HiddenStore:
    """Hidden states ``[N, H]`` of every token, in RAM or in a memory-mapped file updated in place."""

    def __init__(self, n_tokens: int, hidden: int, dtype: torch.dtype, spill_dir: Path | None):
        self.dtype = dtype
        self.shape = (n_tokens, hidden)
        self.spilled = spill_dir is not None
        if spill_dir is None:
            self._mem = torch.empty(n_tokens, hidden, dtype=dtype)
            self._map = None
        else:
            spill_dir.mkdir(parents=True, exist_ok=True)
            self.path = spill_dir / f"hidden-{os.getpid()}-{id(self)}.bin"
            # numpy has no bfloat16: store raw 16-bit words and reinterpret on the torch side
            np_dtype = {torch.bfloat16: np.uint16, torch.float16: np.float16, torch.float32: np.float32}[dtype]
            self._map = np.memmap(self.path, dtype=np_dtype, mode="w+", shape=(n_tokens, hidden))

    def read(self, rows: np.ndarray) -> torch.Tensor:
        if self._map is None:
            return self._mem[torch.from_numpy(rows)]
        return torch.from_numpy(np.ascontiguousarray(self._map[rows])).view(self.dtype)

    def write(self, rows: np.ndarray, values: torch.Tensor) -> None:
        values = values.reshape(len(rows), -1).to(self.dtype)
        if self._map is None:
            self._mem[torch.from_numpy(rows)] = values
        else:
            self._map[rows] = values.contiguous().view(torch.uint16 if self.dtype == torch.bfloat16 else self.dtype).numpy()

    def save(self, path: Path) -> None:
        """Copy every row to ``path`` (raw little-endian words), chunk by chunk; atomic."""
        n = self.shape[0]
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            for a in range(0, n, _CHUNK):
                rows = self.read(np.arange(a, min(a + _CHUNK, n)))
                fh.write(rows.contiguous().view(torch.uint8).numpy().tobytes())

    def load(self, path: Path) -> None:
        """Fill every row from a file written by :meth:`save`."""
        n, hidden = self.shape
        item = self.dtype.itemsize
        if path.stat().st_size != n * hidden * item:
            raise UspxError(f"{path}: {path.stat().st_size} bytes, expected {n * hidden * item} for [{n}, {hidden}]")
        with open(path, "rb") as fh:
            for a in range(0, n, _CHUNK):
                b = min(a + _CHUNK, n)
                raw = bytearray(fh.read((b - a) * hidden * item))
                self.write(np.arange(a, b), torch.frombuffer(raw, dtype=torch.uint8).view(self.dtype).reshape(b - a, hidden))

    def close(self) -> None:
        if self._map is not None:
            self._map._mmap.close()  # release the mapping before the file is removed
            self._map = None
            self.path.unlink(missing_ok=True)
