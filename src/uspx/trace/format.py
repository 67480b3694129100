"""The trace folder format: manifest, items table and Parquet shards.

Layout of a trace folder::

    manifest.json        format, uspx version, model and workload fingerprints, options, shards
    items.parquet        one row per workload item: sample, id, family, split, tokens, completion_start
    shard-00000.parquet  one row per (real token, MoE layer)

A shard covers a fixed range of workload items and is written atomically, then recorded in the
manifest (also atomically). A run restarted with the same arguments skips the shards the manifest
lists, so a killed run ends with the same files as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import uspx
from uspx.io import UspxError, atomic_path, read_json, remove_stale_temps, write_json
from uspx.workload import EncodedItem

FORMAT = "uspx-trace/1"
COLUMNS = ("expert_ids", "expert_weights", "router_logits", "expert_norms")
DTYPES = dict(expert_ids=np.int16, expert_weights=np.float32, router_logits=np.float32, expert_norms=np.float32)


def open_manifest(out: Path, model: dict, workload: dict, options: dict) -> dict:
    """The manifest of a trace folder: the existing one if it matches (to resume), else a new one.

    A folder holding nothing but temporary files of an interrupted first write is empty.
    """
    path = out / "manifest.json"
    if path.exists():
        old = read_json(path)
        if old.get("format") != FORMAT:
            raise UspxError(f"{path}: not a uspx trace manifest (format {old.get('format')!r})")
        for key, new in (("model", model), ("workload", workload)):
            if old[key]["fingerprint"] != new["fingerprint"]:
                raise UspxError(
                    f"{out} already holds a trace of another {key} ({old[key]['source']}); "
                    "use another output folder or delete it"
                )
        if old["options"] != options:
            raise UspxError(f"{out} holds a trace made with other options {old['options']}; use another folder")
        remove_stale_temps(out)  # a killed run's half-written shard or manifest
        return old
    if out.is_dir():
        first = [p for p in out.iterdir() if p.name.startswith(".manifest.json.") and p.name.endswith(".tmp")]
        if first and len(first) == len(list(out.iterdir())):
            for p in first:  # a run killed while writing its first manifest: nothing else was written
                p.unlink()
    if out.exists() and any(out.iterdir()):
        raise UspxError(f"{out} exists and is not a trace folder; refusing to write into it")
    manifest = dict(
        format=FORMAT, uspx_version=uspx.__version__, model=model, workload=workload, options=options, shards=[],
        complete=False,
    )
    write_json(path, manifest)
    return manifest


def write_shard(out: Path, manifest: dict | None, index: int, chunk: list[EncodedItem], table: pa.Table) -> dict:
    """Write shard ``index`` (items ``chunk``) atomically, then record it in ``manifest`` (a process
    of a multi-process run passes None and records it in its own rank file); returns its entry."""
    name = f"shard-{index:05d}.parquet"
    with atomic_path(out / name) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    entry = dict(index=index, file=name, first_item=chunk[0].index, end_item=chunk[-1].index + 1,
                 rows=table.num_rows, tokens=sum(len(e.input_ids) for e in chunk))
    if manifest is not None:
        record_shards(out, manifest, [entry])
    return entry


RANKS = ".ranks"  # a multi-process run's per-rank lists of written shards, merged by rank 0


def record_shards(out: Path, manifest: dict, entries: list[dict]) -> None:
    """Add shard entries to the manifest (by index, once each) and write it atomically."""
    known = {s["index"] for s in manifest["shards"]}
    manifest["shards"] += [e for e in entries if e["index"] not in known and (out / e["file"]).exists()]
    manifest["shards"].sort(key=lambda x: x["index"])
    write_json(out / "manifest.json", manifest)


def record_rank_shard(out: Path, rank: int, entry: dict) -> None:
    """A process of a multi-process run records a shard it wrote in its own file (atomic)."""
    path = out / RANKS / f"rank-{rank:05d}.json"
    entries = read_json(path) if path.exists() else []
    write_json(path, entries + [entry])


def merge_rank_shards(out: Path, manifest: dict) -> None:
    """Rank 0: every shard the processes recorded goes into the manifest (also those of a killed
    run, whose files are complete since each is written atomically)."""
    folder = out / RANKS
    if not folder.is_dir():
        return
    entries = [e for path in sorted(folder.glob("rank-*.json")) for e in read_json(path)]
    record_shards(out, manifest, entries)
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()


def finish_manifest(out: Path, manifest: dict, wl_summary: dict, encoded: list[EncodedItem], seconds: float) -> dict:
    manifest["complete"] = True
    manifest["summary"] = dict(
        wl_summary,
        tokens=sum(len(e.input_ids) for e in encoded),
        rows=sum(s["rows"] for s in manifest["shards"]),
        seconds_this_run=round(seconds, 3),
    )
    write_json(out / "manifest.json", manifest)
    return manifest


def write_items(path: Path, encoded: list[EncodedItem]) -> None:
    table = pa.table(
        dict(
            sample=pa.array([e.index for e in encoded], pa.int32()),
            id=pa.array([e.id for e in encoded], pa.string()),
            family=pa.array([e.family for e in encoded], pa.string()).dictionary_encode(),
            split=pa.array([e.split for e in encoded], pa.string()).dictionary_encode(),
            tokens=pa.array([len(e.input_ids) for e in encoded], pa.int32()),
            completion_start=pa.array([e.completion_start for e in encoded], pa.int32()),
        )
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def rows_table(sample: np.ndarray, position: np.ndarray, token: np.ndarray, family: np.ndarray, split: np.ndarray,
               is_completion: np.ndarray, layer_ids: list[int], per_layer: dict[str, np.ndarray]) -> pa.Table:
    """Trace rows of ``n`` tokens, one row per (token, layer), token-major.

    Per-token arrays are [n]; ``per_layer`` maps a routing column (expert_ids, expert_weights and
    optionally router_logits, expert_norms) to [n, L, width]. The one place rows are built, so the
    whole-model and the layer-by-layer tracer write identical columns and types.
    """
    n_layers, n = len(layer_ids), len(sample)
    cols = dict(
        sample=pa.array(np.repeat(sample, n_layers).astype(np.int32)),
        position=pa.array(np.repeat(position, n_layers).astype(np.int32)),
        token_id=pa.array(np.repeat(token, n_layers).astype(np.int32)),
        family=pa.array(np.repeat(family, n_layers)).dictionary_encode(),
        split=pa.array(np.repeat(split, n_layers)).dictionary_encode(),
        is_completion=pa.array(np.repeat(is_completion, n_layers)),
        layer=pa.array(np.tile(np.array(layer_ids, dtype=np.int16), n)),
    )
    for name in COLUMNS:
        if name in per_layer:
            values = per_layer[name].astype(DTYPES[name])
            cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[-1])
    return pa.table(cols)


def items_table(chunk: list[EncodedItem], layers: list[int], per_layer: dict[str, np.ndarray],
                positions: np.ndarray | None = None) -> pa.Table:
    """:func:`rows_table` of the items ``chunk``, ``per_layer`` over their tokens in item order. A
    token's position is its index in its item unless ``positions`` gives them; the tokens from an
    item's ``completion_start`` on are its completion (the ones ``uspx trace`` scores)."""
    lengths = [len(e.input_ids) for e in chunk]
    local = np.concatenate([np.arange(n) for n in lengths])
    start = np.repeat([e.completion_start for e in chunk], lengths)
    return rows_table(
        np.repeat([e.index for e in chunk], lengths), local if positions is None else positions,
        np.concatenate([np.asarray(e.input_ids) for e in chunk]),
        np.repeat(np.array([e.family for e in chunk], object), lengths),
        np.repeat(np.array([e.split for e in chunk], object), lengths),
        local >= start, layers, per_layer,
    )
