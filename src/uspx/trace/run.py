"""``uspx trace``: run the model over a workload and write its routing as a trace folder.

A model loaded in memory is traced a shard of items at a time: each shard is run through the whole
model and written, so a killed run resumes at the first shard the manifest does not list. A model
opened layer by layer (``open_source(..., streaming=True)``) runs every item through one layer
before the next; each finished layer's routing is staged in ``.streaming/`` and the engine saves
the hidden states after it, so a killed run resumes at the first layer not done. The shards are
assembled once every layer is done. Either way the folder format (``uspx.trace.format``) is the same.

Under torchrun (``uspx.dist``) the whole-model tracer shares out shards; the layer-by-layer one
shares out the batches a single process would run (batch ``i`` to rank ``i % N``, each process
running every layer over its own batches and staging them in ``.streaming/rank-R-of-N/``), then
every process assembles its shards from all the stages. Each batch computes what it computes in
one process, so the folder is the single-process one, byte for byte.

With ``reconstruction`` the reconstruction score's per-item sums are computed in the same pass and
written to ``reconstruction.npz`` (``uspx score`` reads them instead of running the model again).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from uspx.engine import AUTO, Opened, dtype_name, make_batches, open_source, pad_id_of, run
from uspx.engine.batches import share
from uspx.engine.observers import Reconstruction, Routing
from uspx.io import UspxError, atomic_path, read_json
from uspx.models import LoadedModel
from uspx.progress import progress_bar
from uspx.dist import Dist, current
from uspx.trace.format import (COLUMNS, finish_manifest, items_table, merge_rank_shards, open_manifest,
                               record_rank_shard, write_items, write_shard)
from uspx.workload import EncodedItem, Workload, default_max_length, encode, load_workload

STAGING = ".streaming"
RECONSTRUCTION = "reconstruction.npz"
DEFAULT_BATCH_TOKENS = 2048  # padded positions per batch of a layer-by-layer run


def trace(
    model: str | Path | LoadedModel | Opened,
    workload: str | Path | Workload,
    out_dir: str | Path,
    *,
    split: str = "all",
    batch_size: int = 8,
    max_length: int | None = None,
    logits: bool = False,
    norms: bool = False,
    reconstruction: bool = False,
    items_per_shard: int = 64,
    progress: bool = True,
    trust_remote_code: bool = False,
    dtype: str = AUTO,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    device_map: str | Path | dict | None = None,
    max_memory: str | dict | None = None,
    device: str | None = None,
) -> dict:
    """Trace routing of ``model`` on ``workload`` into ``out_dir``; returns the manifest.

    ``model`` is an opened source (:func:`uspx.engine.open_source`), a loaded model, or a folder,
    which is loaded whole in ``dtype`` (``"auto"``: the checkpoint's stored float type; bf16, fp16,
    fp32) on ``device``, or placed across devices by ``device_map`` / ``max_memory`` (accelerate; see
    :func:`uspx.models.load_model`); under torchrun with GPUs, each process computes on its own GPU.
    A source opened layer by layer runs a decoder layer at a time from its safetensors files with
    batches of at most ``batch_size`` items and ``batch_tokens`` padded positions (models larger than
    memory); the folder is the same either way.
    """
    d = current()
    if d.active and (device_map is not None or max_memory is not None):
        raise UspxError(f"--device-map places one process's model across devices; this run has {d.world} "
                        "processes, each with its own copy: start it without torchrun")
    if device is None and d.device != "cpu":
        device = d.device
    opened = open_source(model, dtype=dtype, trust_remote_code=trust_remote_code, device=device,
                         device_map=device_map, max_memory=max_memory)
    wl = load_workload(workload).part(split)
    if opened.tokenizer is None:
        raise UspxError(f"{opened.path}: no tokenizer files; uspx needs one to read a text workload")
    source = opened.source
    max_length = max_length or default_max_length(source.config)
    encoded = encode(wl, opened.tokenizer, max_length)
    if not encoded:
        raise UspxError(f"{wl.source}: no items to trace in split {split!r}")

    out = Path(out_dir)
    options = dict(split=split, batch_size=batch_size, max_length=max_length, logits=logits, norms=norms,
                   items_per_shard=items_per_shard)
    if reconstruction:
        options["reconstruction"] = True
    if opened.streaming:
        options.update(streaming=True, dtype=dtype_name(opened.dtype), batch_tokens=batch_tokens)
    if d.main:
        manifest = open_manifest(out, model_info(opened), workload_info(wl), options)
        merge_rank_shards(out, manifest)  # shards a killed multi-process run wrote
        if opened.streaming:
            _clear_other_stages(out / STAGING, d.world)
    d.barrier()
    if not d.main:
        manifest = read_json(out / "manifest.json")
    done = {s["index"] for s in manifest["shards"]}
    if _finished(out, manifest, done, len(encoded), items_per_shard, reconstruction, d):
        d.barrier()
        return manifest
    if d.main:
        write_items(out / "items.parquet", encoded)
    started = time.perf_counter()
    pad = pad_id_of(opened.tokenizer)
    record = None if d.active else manifest  # several processes record their shards in rank files
    entry = None
    if opened.streaming:
        batches = make_batches(encoded, batch_size, pad, max_tokens=batch_tokens)
        shares = [share(batches, r, d.world) for r in range(d.world)]  # every rank's, known to every rank
        stats = _trace_layers(opened, encoded, out, options, shares[d.rank][0], progress and d.main, d)
        entry = _streaming_entry(d.gather(stats))
        d.barrier()  # every rank's layers are staged before any shard is assembled from them
        _write_staged_shards(out, record, encoded, source, items_per_shard, [o for _, o in shares], done,
                             progress and d.main, d)
        if reconstruction and d.main:
            _write_reconstruction(out / RECONSTRUCTION, encoded, _staged_reconstruction(out, source, d.world))
    else:
        _trace_shards(opened, encoded, out, record, options, pad, done, progress and d.main, d)
    d.barrier()
    if d.main:
        merge_rank_shards(out, manifest)
        if entry is not None:
            manifest["streaming"] = entry
        manifest = finish_manifest(out, manifest, asdict(wl.summary), encoded, time.perf_counter() - started)
        shutil.rmtree(out / STAGING, ignore_errors=True)  # the shards hold everything now
    d.barrier()
    return manifest if d.main else read_json(out / "manifest.json")


def _finished(out: Path, manifest: dict, done: set, items: int, items_per_shard: int, reconstruction: bool,
              d: Dist) -> bool:
    """Whether ``out`` already holds this trace whole (a resumed run that finished, or a trace
    concatenated from others, which no tracer continues)."""
    if manifest.get("parts"):  # concatenated from traces (uspx.trace.concat): finished, or not this tracer's
        if not manifest.get("complete") or reconstruction and not (out / RECONSTRUCTION).exists():
            raise UspxError(f"{out}: a trace concatenated from others ({len(manifest['parts'])} parts) without "
                            "what this run asks for; trace into another folder")
        return True
    n_shards = (items + items_per_shard - 1) // items_per_shard
    finished = manifest.get("complete") and len(done) == n_shards and (out / "items.parquet").exists()
    if finished and (not reconstruction or (out / RECONSTRUCTION).exists()):
        if d.main:
            shutil.rmtree(out / STAGING, ignore_errors=True)  # left over if killed right after finishing
        return True
    return False


def model_info(opened: Opened) -> dict:
    """The manifest's ``model`` entry."""
    a = opened.source.adapter
    return dict(
        source=opened.path, label=opened.label, fingerprint=opened.fingerprint, family=a.family,
        model_type=opened.source.config.model_type, moe_layers=[l.index for l in a.layers],
        num_experts=a.num_experts, top_k=a.top_k,
    )


def workload_info(wl: Workload) -> dict:
    return dict(source=wl.source, fingerprint=wl.fingerprint, items=len(wl.items), families=wl.families)


def _moe_layers(source) -> list[int]:
    return [l.index for l in source.adapter.layers]


def _trace_shards(opened: Opened, encoded, out: Path, manifest: dict | None, options: dict, pad: int, done: set,
                  progress: bool, d: Dist = Dist()) -> None:
    """Trace the shards not done (this process's share of them in a multi-process run, which
    records them in its rank file; rank 0 writes the reconstruction sums of every rank)."""
    source, per = opened.source, options["items_per_shard"]
    layers = _moe_layers(source)
    recon_parts: dict[int, dict] = {}
    n_shards = (len(encoded) + per - 1) // per
    todo = [s for s in range(n_shards) if d.mine(s) and (s not in done or options.get("reconstruction"))]
    total = sum(len(e.input_ids) for s in todo for e in encoded[s * per : (s + 1) * per])
    with progress_bar("tracing", total=total, unit="tok", enabled=progress) as bar:
        for s in todo:
            chunk = encoded[s * per : (s + 1) * per]
            n = sum(len(e.input_ids) for e in chunk)
            routing = Routing(n, logits=options["logits"], norms=options["norms"])
            observers = [routing]
            if options.get("reconstruction"):
                item_of_token = np.repeat(np.arange(len(chunk)), [len(e.input_ids) for e in chunk])
                observers.append(Reconstruction(item_of_token, len(chunk)))
            run(source, make_batches(chunk, options["batch_size"], pad, by_length=False), observers, progress=False)
            if len(observers) > 1:
                recon_parts[s] = observers[1].layers
            if s not in done:
                _write(out, manifest, s, chunk, layers, routing.layers, d)
            bar.advance(n)
    if options.get("reconstruction"):
        parts = {s: p for ranks in d.gather(recon_parts) for s, p in ranks.items()}
        if d.main:
            ordered = [parts[s] for s in sorted(parts)]
            staged = {l: {k: np.concatenate([p[l][k] for p in ordered]) for k in ordered[0][l]} for l in layers}
            _write_reconstruction(out / RECONSTRUCTION, encoded, staged)


def _write(out: Path, manifest: dict | None, index: int, chunk: list[EncodedItem], layers: list[int],
           arrays: dict[int, dict[str, np.ndarray]], d: Dist) -> None:
    """Shard ``index`` of the items ``chunk`` from per-layer arrays over their tokens (in item
    order), recorded in ``manifest``, or in this process's rank file when it is None."""
    names = [c for c in COLUMNS if c in arrays[layers[0]]]
    per_layer = {c: np.stack([np.asarray(arrays[l][c]) for l in layers], axis=1) for c in names}
    entry = write_shard(out, manifest, index, chunk, items_table(chunk, layers, per_layer))
    if manifest is None:
        record_rank_shard(out, d.rank, entry)


def _stage_dir(out: Path, d: Dist) -> Path:
    """Where a process stages its layers: ``.streaming/`` alone, a folder per rank with several
    (named by the process count too, so a rerun with another count never reads a different share)."""
    return out / STAGING if not d.active else out / STAGING / f"rank-{d.rank:05d}-of-{d.world:05d}"


def _clear_other_stages(stage: Path, world: int) -> None:
    """Rank 0, before any work: drop what a killed run with another process count staged (its
    shares held other tokens; only its finished shards, in the manifest, carry over)."""
    if not stage.is_dir():
        return
    for p in stage.iterdir():
        ours = p.is_dir() and p.name.endswith(f"-of-{world:05d}") if world > 1 else not p.name.startswith("rank-")
        if not ours:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _trace_layers(opened: Opened, encoded, out: Path, options: dict, batches, progress: bool, d: Dist = Dist()):
    """Run ``batches`` (this process's share, token rows its own) through every MoE layer not yet
    staged; each finished layer's arrays go to the process's stage folder."""
    source = opened.source
    stage = _stage_dir(out, d)
    layers = _moe_layers(source)
    names = ["expert_ids"] + (["reconstruction_error"] if options.get("reconstruction") else [])
    if not batches or all(_staged(stage, l, c) is not None for c in names for l in layers):
        return None  # more processes than batches, or every layer already staged
    n = sum(int(b.attention_mask.sum()) for b in batches)

    def on_layer(index: int, arrays: dict[str, np.ndarray]) -> None:
        for name, values in arrays.items():
            with atomic_path(stage / f"layer-{index:05d}.{name}.npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, values)

    observers = [Routing(n, logits=options["logits"], norms=options["norms"], on_layer=on_layer)]
    if options.get("reconstruction"):  # per workload item: a share fills its own items' sums, the rest stay 0
        item_of_token = np.zeros(n, np.int64)
        for b in batches:
            real = b.token_rows >= 0
            item_of_token[b.token_rows[real]] = np.repeat(b.rows, b.input_ids.shape[1])[real]
        observers.append(Reconstruction(item_of_token, len(encoded), on_layer=on_layer))
    stage.mkdir(parents=True, exist_ok=True)
    key = dict(options=options, items=len(encoded), tokens=sum(len(e.input_ids) for e in encoded))
    if d.active:
        key.update(rank=d.rank, world=d.world)
    return run(source, batches, observers, last_layer=max(layers), state_dir=stage, state_key=key,
               progress=progress, label="tracing layer by layer")


def _streaming_entry(all_stats: list) -> dict | None:
    """The manifest's ``streaming`` entry from every process's run (None when none ran): a layer
    took as long as its slowest process."""
    ran = [s for s in all_stats if s is not None]
    if not ran:
        return None
    seconds: dict[int, float] = {}
    for s in ran:
        for layer, t in zip(s.layers_run, s.seconds_per_layer):
            seconds[layer] = max(seconds.get(layer, 0.0), t)
    return dict(first_layer=min(seconds) if seconds else None, hidden_on_disk=any(s.hidden_on_disk for s in ran),
                seconds_per_layer=[round(seconds[l], 3) for l in sorted(seconds)])


def _staged(stage: Path, layer: int, name: str) -> np.ndarray | None:
    path = stage / f"layer-{layer:05d}.{name}.npy"
    return np.load(path, mmap_mode="r") if path.exists() else None


def _write_staged_shards(out: Path, manifest: dict | None, encoded: list[EncodedItem], source, per: int,
                         originals: list[np.ndarray], done: set, progress: bool, d: Dist = Dist()) -> None:
    """Token-major shards from the layer-major staged arrays of every process's share
    (``originals[r]``: the token rows of rank r's share, in its staged order), memory-mapped and
    read a shard at a time. A process writes the shards ``d.mine`` gives it; with several, each
    records them in its rank file (``manifest`` None)."""
    layers = _moe_layers(source)
    offsets = np.concatenate([[0], np.cumsum([len(e.input_ids) for e in encoded])]).astype(np.int64)
    owner = np.zeros(int(offsets[-1]), np.int64)  # the share holding each token, and its row there
    local = np.zeros(int(offsets[-1]), np.int64)
    for r, original in enumerate(originals):
        owner[original] = r
        local[original] = np.arange(len(original))
    stages = [_stage_dir(out, Dist(r, d.world)) for r in range(d.world)]
    held = [r for r, original in enumerate(originals) if len(original)]
    names = [c for c in COLUMNS if _staged(stages[held[0]], layers[0], c) is not None]
    columns = {r: {c: {l: _staged(stages[r], l, c) for l in layers} for c in names} for r in held}
    n_shards = (len(encoded) + per - 1) // per
    todo = [s for s in range(n_shards) if d.mine(s) and s not in done]
    with progress_bar("writing shards", total=len(todo), unit="shards", enabled=progress) as bar:
        for s in todo:
            first, end = s * per, min((s + 1) * per, len(encoded))
            a, b = int(offsets[first]), int(offsets[end])
            who, row = owner[a:b], local[a:b]
            arrays: dict[int, dict[str, np.ndarray]] = {l: {} for l in layers}
            for c in names:
                for l in layers:
                    like = columns[held[0]][c][l]
                    values = np.empty((b - a, *like.shape[1:]), like.dtype)
                    for r in held:
                        at = who == r
                        if at.any():
                            values[at] = columns[r][c][l][row[at]]
                    arrays[l][c] = values
            _write(out, manifest, s, encoded[first:end], layers, arrays, d)
            bar.advance()


def _staged_reconstruction(out: Path, source, world: int) -> dict[int, dict[str, np.ndarray]]:
    """Every share's per-item sums added up (an item's come from the one share that ran it, the
    others hold 0 for it, so the sum is that share's value exactly)."""
    stages = [_stage_dir(out, Dist(r, world)) for r in range(world)]
    total: dict[int, dict[str, np.ndarray]] = {}
    for l in _moe_layers(source):
        total[l] = {}
        for k in ("reconstruction_error", "reconstruction_routed"):
            parts = [np.asarray(p) for p in (_staged(stage, l, k) for stage in stages) if p is not None]
            total[l][k] = np.sum(parts, axis=0)
    return total


def _write_reconstruction(path: Path, encoded: list[EncodedItem], per_layer: dict[int, dict[str, np.ndarray]]) -> None:
    """Per-item sums behind the reconstruction score: error [P, L, E] and routed tokens [P, L, E]."""
    layers = sorted(per_layer)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, samples=np.array([e.index for e in encoded]), layers=np.array(layers),
                 err=np.stack([per_layer[l]["reconstruction_error"] for l in layers], axis=1),
                 routed=np.stack([per_layer[l]["reconstruction_routed"] for l in layers], axis=1),
                 tokens=np.array([len(e.input_ids) for e in encoded]))
