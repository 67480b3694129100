"""The engine: run batches through a weight source with observers attached.

A resident source (a model in memory) runs each batch through the whole model; a checkpoint source
runs every batch through layer 0, then layer 1, and so on, keeping only one layer's weights and the
hidden states of every token between two layers. Observers see the same calls either way. The
hidden states stay in CPU memory (or on disk); each batch's go to the source's device for the layer
and come back, so a GPU holds one layer and one batch at a time.

A layer-by-layer run given a ``state_dir`` resumes after a kill: after each layer it saves the
hidden states and the number of layers done (each file atomic), and a run with the same key starts
at the first layer not done. Observers hand each finished layer to their callbacks before that
point is saved, so a caller that writes those results atomically loses nothing.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from uspx.engine.batches import Batch
from uspx.engine.forward import forward, logits
from uspx.engine.observers import Observer, block_output
from uspx.engine.source import WeightSource, freed_memory_returned
from uspx.engine.store import HiddenStore
from uspx.io import UspxError, read_json, write_json
from uspx.models.base import MoELayer, Restriction
from uspx.progress import progress_bar

Decide = Callable[[int], Sequence[int] | None]
SPILL_SHARE = 0.5  # hidden states go to disk when they would take more than this share of free RAM
HEAD_ROWS = 256  # target positions sent through the LM head at once


@dataclass
class RunStats:
    layers_run: list[int] = field(default_factory=list)
    seconds_per_layer: list[float] = field(default_factory=list)
    hidden_on_disk: bool = False


def run(source: WeightSource, batches: Sequence[Batch], observers: Sequence[Observer], *,
        last_layer: int | None = None, state_dir: str | Path | None = None, state_key: object = None,
        spill_dir: str | Path | None = None, decide: Decide | None = None, progress: bool = True,
        label: str = "running") -> RunStats:
    """Run ``batches`` through ``source`` with ``observers``; returns timings.

    ``last_layer`` stops a layer-by-layer run after that decoder layer (no observer then wants
    logits). ``state_dir`` / ``state_key`` make a layer-by-layer run resumable (see the module doc);
    ``spill_dir`` keeps its hidden states on disk (default: only when RAM would not hold them).

    ``decide(index)`` makes the run sequential (layer by layer, also for a model in memory): once
    the observers have seen MoE layer ``index``, it returns the experts to keep there (or None), and
    the layer runs again restricted to them to give the next layer its inputs, so every later layer
    is observed on a model whose earlier layers are already pruned.
    """
    if not batches:
        raise UspxError("nothing to run: no batches")
    head = any(o.wants_logits for o in observers)
    if head and last_layer is not None:
        raise UspxError("an observer wants logits, which need every layer")
    with torch.no_grad():
        if source.resident and decide is None:
            return _run_whole(source, batches, observers, head, progress, label)
        with freed_memory_returned():
            return _run_layers(source, batches, observers, head, last_layer, state_dir, state_key, spill_dir,
                               decide, progress, label)


def _attached(source: WeightSource, observers: Sequence[Observer], layers: Sequence[MoELayer]) -> Restriction:
    """Every observer's hooks on ``layers``, removed on leaving the ``with`` block."""
    return Restriction([h for layer in layers for o in observers for h in o.attach(source.adapter, layer)])


def _run_whole(source, batches, observers, head: bool, progress: bool, label: str) -> RunStats:
    model, tokens = source.model, sum(int(b.attention_mask.sum()) for b in batches)
    with (_attached(source, observers, source.adapter.layers),
          progress_bar(label, total=tokens, unit="tok", enabled=progress) as bar):
        for batch in batches:
            for o in observers:
                o.begin(batch)
            if head and batch.loss_mask.any():
                out = logits(model, batch)
                for o in observers:
                    if o.wants_logits:
                        o.logits(batch, out)
            else:
                forward(model, batch.input_ids, batch.attention_mask, head=False)
            bar.advance(int(batch.attention_mask.sum()))
    for layer in source.adapter.layers:
        for o in observers:
            o.layer_done(layer.index)
    return RunStats(layers_run=list(range(source.n_layers)))


def _run_layers(source, batches, observers, head: bool, last_layer: int | None, state_dir, state_key,
                spill_dir, decide: Decide | None, progress: bool, label: str) -> RunStats:
    n_layers = source.n_layers
    last = n_layers - 1 if last_layer is None else int(last_layer)
    if not 0 <= last < n_layers:
        raise UspxError(f"last_layer {last_layer} outside 0..{n_layers - 1}")
    hidden = int(source.config.hidden_size)
    n_rows = _store_rows(batches)
    dtype = source.dtype
    moe = {l.index for l in source.adapter.layers}
    state_dir = Path(state_dir) if state_dir is not None else None
    key = dict(key=state_key, rows=n_rows, hidden=hidden, dtype=str(dtype), batches=len(batches))
    start = _resume_point(state_dir, key, last, head)

    tmp_spill = None
    if spill_dir is None and n_rows * hidden * dtype.itemsize > SPILL_SHARE * _available():
        tmp_spill = spill_dir = Path(tempfile.mkdtemp(prefix="uspx-hidden-"))
    store = HiddenStore(n_rows, hidden, dtype, Path(spill_dir) if spill_dir is not None else None)
    stats = RunStats(hidden_on_disk=store.spilled)
    try:
        if start == 0:
            _embed(source, batches, store)
        else:
            store.load(state_dir / "hidden.bin")
        with progress_bar(label, total=last + 1, unit="layers", enabled=progress) as bar:
            bar.advance(start)
            for index in range(start, last + 1):
                t0 = time.perf_counter()
                sequential = decide is not None and index in moe
                with source.layer(index) as layer:
                    with _attached(source, observers, [l for l in source.adapter.layers if l.index == index]):
                        _layer_pass(source, layer, index, batches, store, observers, write=not sequential)
                    for o in observers:
                        o.layer_done(index)
                    if sequential:
                        kept = decide(index)
                        with source.adapter.restrict({index: list(kept)} if kept is not None else {}):
                            _layer_pass(source, layer, index, batches, store)
                gc.collect()
                if state_dir is not None:
                    _save_state(state_dir, key, index + 1, store, save_hidden=index < last or head)
                stats.layers_run.append(index)
                stats.seconds_per_layer.append(time.perf_counter() - t0)
                bar.advance()
        if head:
            with source.head():
                for batch in batches:
                    if not batch.loss_mask.any():
                        continue
                    for o in observers:
                        o.begin(batch)
                    h = store.read(batch.slots)[batch.loss_mask.reshape(-1)]
                    for start in range(0, h.shape[0], HEAD_ROWS):  # logits are vocabulary-wide
                        logits = source.logits(h[start : start + HEAD_ROWS]).cpu()
                        for o in observers:
                            if o.wants_logits:
                                o.logits(batch, logits, start)
    finally:
        store.close()
        if tmp_spill is not None:
            shutil.rmtree(tmp_spill, ignore_errors=True)
    return stats


def _store_rows(batches: Sequence[Batch]) -> int:
    """Rows of the hidden-state store that ``batches`` fill; refused where they overlap."""
    n_rows = batches[-1].slot + batches[-1].size
    if any(b.slot + b.size > n_rows for b in batches):
        raise UspxError("batches overlap in the hidden-state store; build them with make_batches")
    return n_rows


def _embed(source: WeightSource, batches: Sequence[Batch], store: HiddenStore) -> None:
    """Fill the store with every batch's input of decoder layer 0."""
    with source.embedding():
        for batch in batches:
            store.write(batch.slots, source.embed(batch.input_ids, batch.attention_mask).cpu())


def _layer_pass(source: WeightSource, layer, index: int, batches: Sequence[Batch], store: HiddenStore,
                observers: Sequence[Observer] = (), write: bool = True) -> None:
    """Every batch through decoder layer ``index``, reading its inputs from ``store`` and, with
    ``write``, putting its outputs back in their place."""
    dtype = source.dtype
    for batch in batches:
        for o in observers:
            o.begin(batch)
        args, kwargs = source.layer_call(batch.attention_mask, index, dtype)
        h = store.read(batch.slots).reshape(*batch.input_ids.shape, -1).to(source.device)
        out = layer(h, *args, **kwargs)
        if write:  # the store stays in CPU memory whatever device the layer ran on
            store.write(batch.slots, block_output(out).cpu())


def _resume_point(state_dir: Path | None, key: dict, last: int, head: bool) -> int:
    if state_dir is None or not (state_dir / "state.json").exists():
        return 0
    state = read_json(state_dir / "state.json")
    done = int(state.get("layers_done", 0)) if state.get("key") == key else 0
    needs_hidden = done <= last or head
    return 0 if needs_hidden and not (state_dir / "hidden.bin").exists() else done


def _save_state(state_dir: Path, key: dict, done: int, store: HiddenStore, save_hidden: bool) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    if save_hidden:
        store.save(state_dir / "hidden.bin")
    write_json(state_dir / "state.json", dict(key=key, layers_done=done))


def _available() -> int:
    import psutil

    return int(psutil.virtual_memory().available)
