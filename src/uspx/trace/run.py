"""``uspx trace``: run the model over a workload and write its routing as Parquet shards.

Layout of a trace folder::

    manifest.json        format, uspx version, model and workload fingerprints, options, shards
    items.parquet        one row per workload item: sample, id, family, split, tokens, completion_start
    shard-00000.parquet  one row per (real token, MoE layer)

A shard covers a fixed range of workload items and is written atomically, then recorded in the
manifest (also atomically). A killed run restarts at the first shard the manifest does not list,
and since shard boundaries and batches depend only on the workload, the result is identical to an
uninterrupted run.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import uspx
from uspx.io import UspxError, atomic_path, read_json, remove_stale_temps, write_json
from uspx.models import LoadedModel, adapter_for, load_model
from uspx.progress import progress_bar
from uspx.trace.capture import RoutingRecorder
from uspx.workload import EncodedItem, Workload, encode, load_workload

FORMAT = "uspx-trace/1"


def trace(
    model: str | Path | LoadedModel,
    workload: str | Path | Workload,
    out_dir: str | Path,
    *,
    split: str = "all",
    batch_size: int = 8,
    max_length: int | None = None,
    logits: bool = False,
    norms: bool = False,
    items_per_shard: int = 64,
    progress: bool = True,
    trust_remote_code: bool = False,
    streaming: bool = False,
    reconstruction: bool = False,
    dtype: str = "bf16",
) -> dict:
    """Trace routing of ``model`` on ``workload`` into ``out_dir``; returns the manifest.

    ``streaming`` runs a gpt_oss checkpoint layer by layer from its safetensors files instead of
    loading it (models larger than memory; see ``uspx.stream.folder``): same folder format, computed
    in ``dtype``, with the reconstruction score's sums when ``reconstruction``.
    """
    if streaming:
        from uspx.stream.folder import trace_workload_streaming

        if isinstance(model, LoadedModel):
            raise UspxError("streaming traces read the model folder layer by layer; pass its path, not a loaded model")
        return trace_workload_streaming(
            model, workload, out_dir, split=split, batch_size=batch_size, max_length=max_length, logits=logits,
            norms=norms, reconstruction=reconstruction, items_per_shard=items_per_shard, dtype=dtype,
            progress=progress,
        )
    if reconstruction:
        raise UspxError("reconstruction sums are recorded by streaming traces only (streaming=True)")
    lm = model if isinstance(model, LoadedModel) else load_model(model, trust_remote_code=trust_remote_code)
    wl = workload if isinstance(workload, Workload) else load_workload(workload)
    wl = wl.part(split)
    if lm.tokenizer is None:
        raise UspxError(f"{lm.source}: no tokenizer files; uspx needs one to read a text workload")
    adapter = adapter_for(lm.model)
    max_length = max_length or min(int(getattr(lm.model.config, "max_position_embeddings", 2048)), 2048)
    encoded = encode(wl, lm.tokenizer, max_length)

    out = Path(out_dir)
    options = dict(
        split=split, batch_size=batch_size, max_length=max_length, logits=logits, norms=norms,
        items_per_shard=items_per_shard,
    )
    manifest = _start_manifest(out, lm, adapter, wl, options)
    done = {s["index"] for s in manifest["shards"]}
    n_shards = (len(encoded) + items_per_shard - 1) // items_per_shard
    if manifest.get("complete") and len(done) == n_shards and (out / "items.parquet").exists():
        return manifest  # already finished with the same model, workload and options
    write_items(out / "items.parquet", encoded)

    todo_tokens = sum(
        len(e.input_ids) for e in encoded if e.index // items_per_shard not in done
    )
    started = time.perf_counter()
    with progress_bar("tracing", total=todo_tokens, unit="tok", enabled=progress) as bar, torch.no_grad():
        with RoutingRecorder(adapter, logits=logits, norms=norms) as rec:
            for s in range(n_shards):
                if s in done:
                    continue
                chunk = encoded[s * items_per_shard : (s + 1) * items_per_shard]
                table = _trace_chunk(lm.model, rec, adapter, chunk, batch_size, lm.tokenizer, bar)
                write_shard(out, manifest, s, chunk, table)
    return finish_manifest(out, manifest, asdict(wl.summary), encoded, time.perf_counter() - started)


def model_info(lm: LoadedModel, adapter) -> dict:
    """The manifest's ``model`` entry of a loaded model."""
    return dict(
        source=lm.source, label=lm.label, fingerprint=lm.fingerprint, family=adapter.family,
        model_type=lm.model.config.model_type, moe_layers=[l.index for l in adapter.layers],
        num_experts=adapter.num_experts, top_k=adapter.top_k,
    )


def workload_info(wl: Workload) -> dict:
    return dict(source=wl.source, fingerprint=wl.fingerprint, items=len(wl.items), families=wl.families)


def _start_manifest(out: Path, lm: LoadedModel, adapter, wl: Workload, options: dict) -> dict:
    return open_manifest(out, model_info(lm, adapter), workload_info(wl), options)


def open_manifest(out: Path, model: dict, workload: dict, options: dict) -> dict:
    """The manifest of a trace folder: the existing one if it matches (to resume), else a new one.

    Shared by the whole-model and the streaming tracers, so both write the same format.
    """
    model_info, workload_info = model, workload
    path = out / "manifest.json"
    if path.exists():
        old = read_json(path)
        if old.get("format") != FORMAT:
            raise UspxError(f"{path}: not a uspx trace manifest (format {old.get('format')!r})")
        for key, new in (("model", model_info), ("workload", workload_info)):
            if old[key]["fingerprint"] != new["fingerprint"]:
                raise UspxError(
                    f"{out} already holds a trace of another {key} ({old[key]['source']}); "
                    "use another output folder or delete it"
                )
        if old["options"] != options:
            raise UspxError(f"{out} holds a trace made with other options {old['options']}; use another folder")
        remove_stale_temps(out)  # a killed run's half-written shard or manifest
        return old
    if out.exists() and any(out.iterdir()):
        raise UspxError(f"{out} exists and is not a trace folder; refusing to write into it")
    manifest = dict(
        format=FORMAT, uspx_version=uspx.__version__, model=model_info, workload=workload_info,
        options=options, shards=[], complete=False,
    )
    write_json(path, manifest)
    return manifest


def write_shard(out: Path, manifest: dict, index: int, chunk: list[EncodedItem], table: pa.Table) -> None:
    """Write shard ``index`` (items ``chunk``) atomically, then record it in the manifest."""
    name = f"shard-{index:05d}.parquet"
    with atomic_path(out / name) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    manifest["shards"].append(
        dict(index=index, file=name, first_item=chunk[0].index, end_item=chunk[-1].index + 1,
             rows=table.num_rows, tokens=sum(len(e.input_ids) for e in chunk))
    )
    manifest["shards"].sort(key=lambda x: x["index"])
    write_json(out / "manifest.json", manifest)


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


def batches(items: list[EncodedItem], batch_size: int, pad_id: int) -> list[tuple[list[EncodedItem], torch.Tensor, torch.Tensor]]:
    """Right-padded batches in workload order: (items, input_ids [B, T], attention_mask [B, T])."""
    out = []
    for i in range(0, len(items), batch_size):
        group = items[i : i + batch_size]
        width = max(len(e.input_ids) for e in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for r, e in enumerate(group):
            ids[r, : len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[r, : len(e.input_ids)] = 1
        out.append((group, ids, mask))
    return out


def pad_id_of(tokenizer) -> int:
    for tok_id in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tok_id is not None:
            return int(tok_id)
    return 0


def _trace_chunk(model, rec: RoutingRecorder, adapter, chunk, batch_size, tokenizer, bar) -> pa.Table:
    layer_ids = [l.index for l in adapter.layers]
    parts: list[pa.Table] = []
    for group, ids, mask in batches(chunk, batch_size, pad_id_of(tokenizer)):
        rec.clear()
        model(input_ids=ids, attention_mask=mask)
        real = mask.reshape(-1).bool()  # pad tokens are routed by the model but never recorded
        parts.append(_rows(group, ids, mask, real, rec, layer_ids))
        bar.advance(int(real.sum()))
    return pa.concat_tables(parts)


def _rows(group, ids, mask, real, rec: RoutingRecorder, layer_ids: list[int]) -> pa.Table:
    b, t = ids.shape
    sample = torch.tensor([e.index for e in group]).unsqueeze(1).expand(b, t).reshape(-1)[real]
    position = torch.arange(t).unsqueeze(0).expand(b, t).reshape(-1)[real]
    start = torch.tensor([e.completion_start for e in group]).unsqueeze(1).expand(b, t).reshape(-1)[real]
    family = np.array([e.family for e in group])[sample.numpy() - group[0].index]
    split = np.array([e.split for e in group])[sample.numpy() - group[0].index]
    token = ids.reshape(-1)[real]

    def per_layer(get) -> np.ndarray:  # [n, L, ...] token-major so rows sort by (sample, position, layer)
        return np.stack([get(rec.layers[i])[real].numpy() for i in layer_ids], axis=1)

    per = dict(
        expert_ids=per_layer(lambda r: r.index),
        expert_weights=per_layer(lambda r: r.weights.float()),
    )
    if rec.want_logits:
        per["router_logits"] = per_layer(lambda r: r.logits.float())
    if rec.want_norms:
        per["expert_norms"] = per_layer(lambda r: r.norms)
    return rows_table(sample.numpy(), position.numpy(), token.numpy(), family, split,
                      (position >= start).numpy(), layer_ids, per)


def rows_table(sample: np.ndarray, position: np.ndarray, token: np.ndarray, family: np.ndarray, split: np.ndarray,
               is_completion: np.ndarray, layer_ids: list[int], per_layer: dict[str, np.ndarray]) -> pa.Table:
    """Trace rows of ``n`` tokens, one row per (token, layer), token-major.

    Per-token arrays are [n]; ``per_layer`` maps a routing column (expert_ids, expert_weights and
    optionally router_logits, expert_norms) to [n, L, width]. The one place rows are built, so the
    whole-model and the streaming tracer write identical columns and types.
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
    dtypes = dict(expert_ids=np.int16, expert_weights=np.float32, router_logits=np.float32, expert_norms=np.float32)
    for name in ("expert_ids", "expert_weights", "router_logits", "expert_norms"):
        if name in per_layer:
            values = per_layer[name]
            cols[name] = _fixed(values.astype(dtypes[name]), values.shape[-1])
    return pa.table(cols)


def _fixed(values: np.ndarray, width: int) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width)
