"""Read a trace folder: manifest checks, and streaming or whole-table access to the shards."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from uspx.io import Provenance, UspxError, read_json
from uspx.trace.format import FORMAT


class Trace(Provenance):
    """An on-disk trace. ``iter_batches`` streams; ``table`` loads (small traces only)."""

    def __init__(self, path: str | Path, *, require_complete: bool = True):
        self.path = Path(path)
        self.manifest = read_json(self.path / "manifest.json")
        if self.manifest.get("format") != FORMAT:
            raise UspxError(f"{self.path / 'manifest.json'}: not a uspx trace (format {self.manifest.get('format')!r})")
        if require_complete and not self.manifest.get("complete"):
            raise UspxError(f"{self.path}: trace is incomplete; re-run `uspx trace` with the same arguments to finish it")
        for shard in self.manifest["shards"]:
            if not (self.path / shard["file"]).exists():
                raise UspxError(f"{self.path / shard['file']}: shard listed in the manifest is missing")

    @property
    def record(self) -> dict:
        return self.manifest

    @property
    def moe_layers(self) -> list[int]:
        return self.manifest["model"]["moe_layers"]

    @property
    def num_experts(self) -> int:
        return self.manifest["model"]["num_experts"]

    @property
    def top_k(self) -> int:
        return self.manifest["model"]["top_k"]

    def files(self) -> list[Path]:
        return [self.path / s["file"] for s in self.manifest["shards"]]

    def iter_batches(self, columns: Sequence[str] | None = None, batch_size: int = 65536) -> Iterator[pa.RecordBatch]:
        for f in self.files():
            try:
                pf = pq.ParquetFile(f)
            except (pa.ArrowInvalid, OSError) as exc:
                raise UspxError(f"{f}: unreadable Parquet shard ({exc})") from None
            yield from pf.iter_batches(batch_size=batch_size, columns=list(columns) if columns else None)

    def table(self, columns: Sequence[str] | None = None) -> pa.Table:
        tables = [pq.read_table(f, columns=list(columns) if columns else None) for f in self.files()]
        return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})

    def items(self) -> pa.Table:
        return pq.read_table(self.path / "items.parquet")
