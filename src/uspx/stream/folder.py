"""A streaming trace written as an ordinary ``uspx trace`` folder (same manifest, items, shards).

The model runs layer by layer (``stream_trace``), so routing arrives layer-major; the trace format
is token-major. Each finished layer's arrays go to ``.streaming/layer-NNNNN.<column>.npy`` in the
output folder, and only when every layer is done are the shards assembled from them (memory-mapped,
a shard's rows at a time) and the staging folder removed.

Resuming: after every layer the hidden states are saved (``.streaming/hidden.bin``, the output of
that layer) and ``state.json`` records the layers done, in that order, each file atomic. A killed
run restarted with the same arguments continues at the first layer not done, from the saved hidden
states, so it computes exactly what an uninterrupted run computes. If it was killed while writing
shards, it resumes those like the whole-model tracer does (the manifest lists the finished ones).

With ``reconstruction`` the reconstruction score's per-item sums are computed in the same pass and
written to ``reconstruction.npz`` beside the shards (``uspx score --streaming`` reads them).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from uspx.io import UspxError, atomic_path, read_json, write_json
from uspx.models import model_fingerprint
from uspx.progress import console, progress_bar
from uspx.stream.checkpoint import Checkpoint
from uspx.stream.trace import DEFAULT_BATCH_TOKENS, HiddenStore, StreamResult, stream_trace
from uspx.trace.run import finish_manifest, open_manifest, rows_table, write_items, write_shard
from uspx.workload import EncodedItem

STAGING = ".streaming"
RECONSTRUCTION = "reconstruction.npz"
_COLUMNS = ("expert_ids", "expert_weights", "router_logits", "expert_norms", "reconstruction_error")
DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def stream_model_info(model_dir: str | os.PathLike) -> dict:
    """The manifest's ``model`` entry, from the folder alone (what ``trace.run.model_info`` gives
    for the loaded model: same source, label and fingerprint)."""
    path = Path(model_dir)
    cfg = Checkpoint(path).config
    n_layers = int(cfg["num_hidden_layers"])
    return dict(
        source=str(path), label=str(path), fingerprint=model_fingerprint(path), family="gpt_oss",
        model_type=cfg.get("model_type"), moe_layers=list(range(n_layers)),
        num_experts=int(cfg["num_local_experts"]), top_k=int(cfg["num_experts_per_tok"]),
    )


def trace_streaming(
    model_dir: str | os.PathLike,
    encoded: Sequence[EncodedItem],
    out_dir: str | os.PathLike,
    *,
    workload: dict,
    summary: dict,
    split: str = "all",
    batch_size: int = 8,
    max_length: int = 2048,
    logits: bool = False,
    norms: bool = False,
    reconstruction: bool = False,
    items_per_shard: int = 64,
    dtype: str = "bf16",
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    spill_dir: str | os.PathLike | None = None,
    memory_limit_bytes: int | None = None,
    progress: bool = True,
) -> dict:
    """Trace tokenised ``encoded`` items layer by layer into ``out_dir``; returns the manifest.

    ``workload`` is the manifest's workload entry (source, fingerprint, items, families) and
    ``summary`` the workload summary it records; ``batch_size`` / ``max_length`` are recorded as the
    whole-model tracer records them (the tokens were already cut to ``max_length``).
    """
    if dtype not in DTYPE_NAMES:
        raise UspxError(f"dtype must be one of {sorted(DTYPE_NAMES)}, not {dtype!r}")
    encoded = list(encoded)
    if not encoded:
        raise UspxError("no items to trace")
    empty = [e.index for e in encoded if not e.input_ids]
    if empty:
        raise UspxError(f"items {empty[:5]} have no tokens; streaming needs at least one per item")
    out = Path(out_dir)
    model = stream_model_info(model_dir)
    options = dict(split=split, batch_size=batch_size, max_length=max_length, logits=logits, norms=norms,
                   items_per_shard=items_per_shard, streaming=True, dtype=dtype, batch_tokens=batch_tokens,
                   reconstruction=reconstruction)
    manifest = open_manifest(out, model, workload, options)
    n_shards = (len(encoded) + items_per_shard - 1) // items_per_shard
    done_shards = {s["index"] for s in manifest["shards"]}
    if manifest.get("complete") and len(done_shards) == n_shards and (out / "items.parquet").exists():
        shutil.rmtree(out / STAGING, ignore_errors=True)  # left over if killed right after finishing
        return manifest
    started = time.perf_counter()
    write_items(out / "items.parquet", encoded)
    stage = out / STAGING
    layers = model["moe_layers"]
    if len(done_shards) < n_shards or (reconstruction and not (out / RECONSTRUCTION).exists()):
        result = _run_layers(model_dir, encoded, stage, layers, options, spill_dir, memory_limit_bytes, progress)
        if result is not None:  # this run's layers (a resumed run times only those it did)
            manifest["streaming"] = dict(
                first_layer=len(layers) - len(result.seconds_per_layer), hidden_on_disk=result.spilled,
                seconds_per_layer=[round(t, 3) for t in result.seconds_per_layer],
                load_seconds_per_layer=[round(t, 3) for t in result.load_seconds_per_layer],
            )
        if reconstruction:
            _write_reconstruction(out / RECONSTRUCTION, encoded, stage, layers, model["num_experts"])
        _write_shards(out, manifest, encoded, stage, layers, items_per_shard, done_shards, progress)
    manifest = finish_manifest(out, manifest, summary, encoded, time.perf_counter() - started)
    shutil.rmtree(stage, ignore_errors=True)  # the shards hold everything now
    return manifest


def trace_workload_streaming(
    model: str | os.PathLike,
    workload,
    out_dir: str | os.PathLike,
    *,
    split: str = "all",
    max_length: int | None = None,
    **kw,
) -> dict:
    """``uspx trace --streaming``: tokenise ``workload`` with the model folder's tokenizer, as the
    whole-model tracer does (same max_length default), and trace it with :func:`trace_streaming`."""
    from dataclasses import asdict

    from transformers import AutoTokenizer

    from uspx.models.loading import resolve_model_path
    from uspx.trace.run import workload_info
    from uspx.workload import Workload, encode, load_workload

    path = resolve_model_path(model)
    cfg = Checkpoint(path).config
    wl = workload if isinstance(workload, Workload) else load_workload(workload)
    wl = wl.part(split)
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise UspxError(f"{path}: no tokenizer files; uspx needs one to read a text workload")
    tokenizer = AutoTokenizer.from_pretrained(path)
    max_length = max_length or min(int(cfg.get("max_position_embeddings", 2048)), 2048)
    encoded = encode(wl, tokenizer, max_length)
    return trace_streaming(path, encoded, out_dir, workload=workload_info(wl), summary=asdict(wl.summary),
                           split=split, max_length=max_length, **kw)


def _run_layers(model_dir, encoded, stage: Path, layers: list[int], options: dict, spill_dir,
                memory_limit_bytes, progress: bool) -> StreamResult | None:
    """Stream the layers not yet done into ``stage`` (per-layer arrays, hidden states, state.json)."""
    stage.mkdir(parents=True, exist_ok=True)
    n_tokens = sum(len(e.input_ids) for e in encoded)
    key = dict(n_tokens=n_tokens, n_items=len(encoded), options=options)
    state_path = stage / "state.json"
    state = read_json(state_path) if state_path.exists() else None
    if state is None or state.get("key") != key:
        state = dict(key=key, layers_done=0)
    start = int(state["layers_done"])
    if start >= len(layers):
        return None
    hidden_path = stage / "hidden.bin"

    def on_layer(i: int, arrays: dict[str, np.ndarray]) -> None:
        for name, values in arrays.items():
            with atomic_path(stage / f"layer-{i:05d}.{name}.npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, values)

    def after_layer(i: int, store: HiddenStore) -> None:
        if i + 1 < len(layers):  # the last layer's output is never needed again
            store.save(hidden_path)
        state["layers_done"] = i + 1
        write_json(state_path, state)
        bar.advance()

    with progress_bar("streaming layers", total=len(layers), unit="layers", enabled=progress) as bar:
        bar.advance(start)
        return stream_trace(
            model_dir, [e.input_ids for e in encoded], on_layer,
            spill_dir=spill_dir, memory_limit_bytes=memory_limit_bytes, dtype=DTYPE_NAMES[options["dtype"]],
            batch_tokens=options["batch_tokens"], record_logits=options["logits"],
            expert_norms=options["norms"], reconstruction=options["reconstruction"],
            start_layer=start, restore=lambda store: store.load(hidden_path), after_layer=after_layer,
            progress=(lambda msg: console.print(f"  {msg}")) if progress else False,
        )


def _layer_column(stage: Path, layer: int, name: str) -> np.ndarray | None:
    path = stage / f"layer-{layer:05d}.{name}.npy"
    return np.load(path, mmap_mode="r") if path.exists() else None


def _write_shards(out: Path, manifest: dict, encoded: list[EncodedItem], stage: Path, layers: list[int],
                  items_per_shard: int, done: set[int], progress: bool) -> None:
    """Token-major shards from the layer-major arrays, through the whole-model tracer's writers."""
    offsets = np.concatenate([[0], np.cumsum([len(e.input_ids) for e in encoded])])
    names = [n for n in _COLUMNS[:4] if _layer_column(stage, layers[0], n) is not None]
    columns = {n: [_layer_column(stage, l, n) for l in layers] for n in names}
    n_shards = (len(encoded) + items_per_shard - 1) // items_per_shard
    with progress_bar("writing shards", total=n_shards, unit="shards", enabled=progress) as bar:
        for s in range(n_shards):
            if s in done:
                bar.advance()
                continue
            first, end = s * items_per_shard, min((s + 1) * items_per_shard, len(encoded))
            chunk = encoded[first:end]
            a, b = int(offsets[first]), int(offsets[end])
            lengths = [len(e.input_ids) for e in chunk]
            position = np.concatenate([np.arange(n) for n in lengths])
            start = np.repeat([e.completion_start for e in chunk], lengths)
            per_layer = {n: np.stack([np.asarray(c[a:b]) for c in cols], axis=1) for n, cols in columns.items()}
            table = rows_table(
                np.repeat([e.index for e in chunk], lengths), position,
                np.concatenate([np.asarray(e.input_ids) for e in chunk]),
                np.repeat(np.array([e.family for e in chunk]), lengths),
                np.repeat(np.array([e.split for e in chunk]), lengths),
                position >= start, layers, per_layer,
            )
            write_shard(out, manifest, s, chunk, table)
            bar.advance()


def _write_reconstruction(path: Path, encoded: list[EncodedItem], stage: Path, layers: list[int],
                          num_experts: int) -> None:
    """Per-item sums behind the reconstruction score: error [P, L, E] and routed tokens [P, L, E]."""
    p = len(encoded)
    item_of_token = np.repeat(np.arange(p), [len(e.input_ids) for e in encoded])
    err = np.zeros((p, len(layers), num_experts))
    routed = np.zeros((p, len(layers), num_experts), np.int64)
    for pos, layer in enumerate(layers):
        ids = np.asarray(_layer_column(stage, layer, "expert_ids")).astype(np.int64)
        rec = np.asarray(_layer_column(stage, layer, "reconstruction_error"))
        flat = np.repeat(item_of_token, ids.shape[1]) * num_experts + ids.reshape(-1)
        err[:, pos] = np.bincount(flat, weights=rec.reshape(-1), minlength=p * num_experts).reshape(p, num_experts)
        routed[:, pos] = np.bincount(flat, minlength=p * num_experts).reshape(p, num_experts)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, samples=np.array([e.index for e in encoded]), layers=np.array(layers), err=err, routed=routed,
                 tokens=np.array([len(e.input_ids) for e in encoded]))
