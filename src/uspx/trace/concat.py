"""One trace folder from traces of consecutive runs of items: a trace that grows without tracing
again what it already holds.

Each part is a complete trace folder of the same model made with the same options; part ``i``
covers the next items of the workload after part ``i - 1``'s. The result is the trace a single run
over all those items would have written, row for row: its sample ids count on from the part
before (``sample`` columns, ``items.parquet`` and the reconstruction sums are offset), its
shards are the parts' shards renumbered, and its manifest names the whole workload. Only the
shard layout differs (a part's last shard may hold fewer items than ``items_per_shard``), which
the manifest's ``parts`` entry records, so ``uspx trace`` treats the folder as finished instead of
tracing it again.

Written in a temporary folder beside ``out`` and moved into place once complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import uspx
from uspx.io import FingerprintMismatch, UspxError, atomic_folder, atomic_path, read_json, write_json
from uspx.trace.format import FORMAT
from uspx.trace.read import Trace
from uspx.trace.run import RECONSTRUCTION, workload_info
from uspx.workload import Workload


def concatenate(parts: list[str | Path], workload: Workload, out: str | Path) -> dict:
    """The trace of ``workload`` (every item of it, in order) in ``out`` from ``parts``, traces of
    its consecutive items; returns the manifest. An ``out`` that already holds this very trace is
    left as it is."""
    out = Path(out)
    traces = [Trace(p) for p in parts]
    if not traces:
        raise UspxError("no traces to concatenate")
    info = workload_info(workload)
    if (out / "manifest.json").exists():
        old = read_json(out / "manifest.json")
        if old.get("complete") and old["workload"]["fingerprint"] == info["fingerprint"] and \
                old["model"]["fingerprint"] == traces[0].manifest["model"]["fingerprint"]:
            return old
        raise UspxError(f"{out} holds another trace; use another output folder or delete it")
    offsets = _check_parts(traces, workload)
    with atomic_folder(out) as tmp:
        shards = _write_shards(traces, offsets, tmp)
        _write_items(traces, offsets, tmp / "items.parquet")
        options = traces[0].manifest["options"]
        if options.get("reconstruction"):
            _write_reconstruction(traces, offsets, tmp / RECONSTRUCTION)
        manifest = dict(
            format=FORMAT, uspx_version=uspx.__version__, model=traces[0].manifest["model"], workload=info,
            options=options, shards=shards, complete=True,
            summary=dict(workload.summary.__dict__, items=len(workload.items),
                         tokens=sum(t.manifest["summary"]["tokens"] for t in traces),
                         rows=sum(s["rows"] for s in shards), seconds_this_run=0.0),
            parts=[dict(path=str(t.path), workload=t.manifest["workload"]["fingerprint"], first_item=int(o),
                        items=_n_items(t), tokens=t.manifest["summary"]["tokens"]) for t, o in zip(traces, offsets)],
        )
        write_json(tmp / "manifest.json", manifest)
    return manifest


def _n_items(t: Trace) -> int:
    return pq.read_metadata(t.path / "items.parquet").num_rows


def _check_parts(traces: list[Trace], workload: Workload) -> list[int]:
    """The first sample id of each part in the whole, once every part is checked to be of the same
    model and options and to cover the next items of ``workload``."""
    first = traces[0].manifest
    offsets, start = [], 0
    for t in traces:
        m = t.manifest
        if m["model"]["fingerprint"] != first["model"]["fingerprint"]:
            raise FingerprintMismatch(f"{t.path}: traced on another model than {traces[0].path}")
        if m["options"] != first["options"]:
            raise UspxError(f"{t.path}: traced with options {m['options']}, {traces[0].path} with {first['options']}")
        n = _n_items(t)
        piece = Workload(workload.source, workload.items[start : start + n], workload.summary)
        if n == 0 or start + n > len(workload.items) or piece.fingerprint != m["workload"]["fingerprint"]:
            raise FingerprintMismatch(f"{t.path}: its items are not items {start} to {start + n - 1} of "
                                      f"{workload.source}")
        offsets.append(start)
        start += n
    if start != len(workload.items):
        raise UspxError(f"the traces cover {start} items of {workload.source}, which has {len(workload.items)}")
    return offsets


def _offset(table: pa.Table, offset: int) -> pa.Table:
    if not offset:
        return table
    i = table.schema.get_field_index("sample")
    return table.set_column(i, "sample", pc.add(table.column("sample"), pa.scalar(offset, pa.int32())))


def _write_shards(traces: list[Trace], offsets: list[int], out: Path) -> list[dict]:
    entries: list[dict] = []
    for t, offset in zip(traces, offsets):
        for shard in t.manifest["shards"]:
            name = f"shard-{len(entries):05d}.parquet"
            if offset:
                with atomic_path(out / name) as tmp:
                    pq.write_table(_offset(pq.read_table(t.path / shard["file"]), offset), tmp, compression="zstd")
            else:  # the first part's shards are the whole's as they are
                shutil.copyfile(t.path / shard["file"], out / name)
            entries.append(dict(shard, index=len(entries), file=name, first_item=shard["first_item"] + offset,
                                end_item=shard["end_item"] + offset))
    return entries


def _write_items(traces: list[Trace], offsets: list[int], path: Path) -> None:
    def recode(table: pa.Table, how) -> pa.Table:
        for name in ("family", "split"):
            table = table.set_column(table.schema.get_field_index(name), name, how(table.column(name)))
        return table

    # dictionaries differ between parts: plain strings to concatenate, encoded again once whole
    parts = [recode(_offset(t.items(), o), lambda c: c.cast(pa.string())) for t, o in zip(traces, offsets)]
    with atomic_path(path) as tmp:
        pq.write_table(recode(pa.concat_tables(parts), pc.dictionary_encode), tmp)


def _write_reconstruction(traces: list[Trace], offsets: list[int], path: Path) -> None:
    """The parts' per-item reconstruction sums, one after the other (sums over an item's tokens:
    each item's are its own part's)."""
    parts = []
    for t in traces:
        if not (t.path / RECONSTRUCTION).exists():
            raise UspxError(f"{t.path}: traced with reconstruction but {RECONSTRUCTION} is missing")
        with np.load(t.path / RECONSTRUCTION) as z:
            parts.append({k: z[k] for k in ("samples", "layers", "err", "routed", "tokens")})
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, samples=np.concatenate([p["samples"] + o for p, o in zip(parts, offsets)]),
                 layers=parts[0]["layers"], err=np.concatenate([p["err"] for p in parts]),
                 routed=np.concatenate([p["routed"] for p in parts]),
                 tokens=np.concatenate([p["tokens"] for p in parts]))
