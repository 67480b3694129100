"""Two models in lockstep on the same batches: a teacher (the original) and a candidate.

Two things need both models at once: comparing their predictions at the same target positions
(KL, top-1 agreement), and fitting the candidate to the teacher layer by layer. When both models
are in memory and nothing is fitted, every batch runs through each whole model in turn. Otherwise
two hidden-state streams advance side by side one decoder layer at a time: the teacher's layer
over every batch, then the candidate's layer over the candidate's own stream (its inputs differ
from the teacher's once an earlier layer was cut), and at the end both heads over both streams, a
chunk of target positions at a time, so no vocabulary-wide table of a whole workload is ever held.
Memory: two layers' weights, two hidden streams, two heads.

``fit(step)`` is called at each decoder layer after the teacher's pass and before the candidate's:
``step`` gives the candidate's layer, the teacher's outputs on the teacher stream (the targets) and
the candidate's inputs, so a trainer can fit the candidate layer to reproduce the original layer's
output on the user's hidden states; the candidate's pass then runs the fitted layer. A
``probe_teacher`` context around the teacher's pass of a layer collects more targets (its hooks see
the teacher's modules, e.g. router logits) and hands them to the fit as ``step.seen``.

A run given ``state_dir`` resumes after a kill: after each layer both streams and the number of
layers done are saved (the state file last); ``fit``'s own results must be saved by the trainer
before it returns.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import torch
from torch import nn

from uspx.engine.batches import Batch
from uspx.engine.forward import logits
from uspx.engine.runner import HEAD_ROWS, _embed, _layer_pass, _store_rows
from uspx.engine.source import WeightSource, freed_memory_returned
from uspx.engine.store import HiddenStore
from uspx.io import UspxError, read_json, write_json
from uspx.progress import progress_bar


class PairObserver:
    """Sees both models' logits at the same target positions of a batch."""

    def pair_logits(self, batch: Batch, teacher: torch.Tensor, candidate: torch.Tensor, start: int = 0) -> None:
        """Logits [n, V] of the True positions ``start .. start + n`` of ``batch.loss_mask``, row-major,
        from the teacher and from the candidate."""


@dataclass
class LayerStep:
    """What a fit sees at decoder layer ``index`` of a layer-by-layer pair run."""

    index: int
    layer: nn.Module  # the candidate's decoder layer, its weights in memory
    source: WeightSource  # the candidate's source
    batches: Sequence[Batch]
    _inputs: HiddenStore
    _targets: HiddenStore
    dtype: torch.dtype
    seen: object = None  # what ``probe_teacher`` collected during the teacher's pass of this layer

    def inputs(self, batch: Batch) -> torch.Tensor:
        """[B, T, H] the candidate's hidden states entering this layer, on the source's device."""
        return self._inputs.read(batch.slots).reshape(*batch.input_ids.shape, -1).to(self.source.device)

    def targets(self, batch: Batch) -> torch.Tensor:
        """[B, T, H] the teacher's layer output on the teacher's stream (same positions)."""
        return self._targets.read(batch.slots).reshape(*batch.input_ids.shape, -1).to(self.source.device)

    def set_inputs(self, batch: Batch, hidden: torch.Tensor) -> None:
        """Replace the candidate's inputs of this layer for ``batch`` (teacher forcing: the layer then
        runs on ``hidden``, e.g. the teacher's own stream)."""
        self._inputs.write(batch.slots, hidden.cpu())


Fit = Callable[[LayerStep], None]
Context = Callable[[], ContextManager]
# (layer index, teacher source) -> a context entered around the teacher's pass of that layer; what
# it yields (typically a list its hooks fill) reaches the fit as ``step.seen``
Probe = Callable[[int, WeightSource], ContextManager]


def run_pair(teacher: WeightSource, candidate: WeightSource, batches: Sequence[Batch],
             observers: Sequence[PairObserver] = (), *, fit: Fit | None = None, probe_teacher: Probe | None = None,
             candidate_context: Context = contextlib.nullcontext, teacher_context: Context = contextlib.nullcontext,
             state_dir: str | Path | None = None,
             state_key: object = None, progress: bool = True, label: str = "teacher and candidate") -> int:
    """Run ``batches`` through both models (see the module doc); returns the decoder layers run
    layer by layer (0 for a whole-model run). ``candidate_context`` (``teacher_context``) wraps every
    candidate (teacher) forward: a restriction of the experts it may route to, for a model that is a
    masked original."""
    if not batches:
        raise UspxError("nothing to run: no batches")
    if teacher.n_layers != candidate.n_layers:
        raise UspxError(f"the candidate has {candidate.n_layers} decoder layers, the original {teacher.n_layers}")
    if fit is None and teacher.resident and candidate.resident:
        with torch.no_grad(), progress_bar(label, total=len(batches), unit="batches", enabled=progress) as bar:
            for batch in batches:
                if batch.loss_mask.any():
                    with teacher_context():
                        t = logits(teacher, batch).float()
                    with candidate_context():
                        c = logits(candidate, batch).float()
                    for o in observers:
                        o.pair_logits(batch, t, c, 0)
                bar.advance()
        return 0
    with freed_memory_returned():
        return _layers(teacher, candidate, batches, observers, fit, probe_teacher, candidate_context,
                       teacher_context, state_dir, state_key, progress, label)


def _layers(teacher, candidate, batches, observers, fit, probe_teacher, candidate_context, teacher_context,
            state_dir, state_key, progress: bool, label: str) -> int:
    n_layers, n_rows, hidden = teacher.n_layers, _store_rows(batches), int(candidate.config.hidden_size)
    state_dir = Path(state_dir) if state_dir is not None else None
    key = dict(key=state_key, rows=n_rows, batches=len(batches),
               dtype=[str(teacher.dtype), str(candidate.dtype)])
    with (contextlib.closing(HiddenStore(n_rows, hidden, teacher.dtype, None)) as t_store,
          contextlib.closing(HiddenStore(n_rows, hidden, candidate.dtype, None)) as c_store):
        start = _resume(state_dir, key, t_store, c_store)
        if start == 0:
            with torch.no_grad():
                _embed(teacher, batches, t_store)
                _embed(candidate, batches, c_store)
        with progress_bar(label, total=n_layers, unit="layers", enabled=progress) as bar:
            bar.advance(start)
            for index in range(start, n_layers):
                probe = probe_teacher(index, teacher) if probe_teacher is not None else contextlib.nullcontext()
                with torch.no_grad(), teacher.layer(index) as layer, teacher_context(), probe as seen:
                    _layer_pass(teacher, layer, index, batches, t_store)
                with candidate.layer(index) as layer, candidate_context():
                    if fit is not None:
                        fit(LayerStep(index, layer, candidate, batches, c_store, t_store, candidate.dtype, seen))
                    with torch.no_grad():
                        _layer_pass(candidate, layer, index, batches, c_store)
                if state_dir is not None:
                    _save(state_dir, key, index + 1, t_store, c_store)
                bar.advance()
        if observers:
            with torch.no_grad():
                _heads(teacher, candidate, batches, observers, t_store, c_store)
    return n_layers - start


def _heads(teacher, candidate, batches, observers, t_store: HiddenStore, c_store: HiddenStore) -> None:
    with teacher.head(), candidate.head():
        for batch in batches:
            if not batch.loss_mask.any():
                continue
            where = batch.loss_mask.reshape(-1)
            th, ch = t_store.read(batch.slots)[where], c_store.read(batch.slots)[where]
            for a in range(0, th.shape[0], HEAD_ROWS):  # logits are vocabulary-wide
                t = teacher.logits(th[a : a + HEAD_ROWS]).float().cpu()
                c = candidate.logits(ch[a : a + HEAD_ROWS]).float().cpu()
                for o in observers:
                    o.pair_logits(batch, t, c, a)


def _resume(state_dir: Path | None, key: dict, t_store: HiddenStore, c_store: HiddenStore) -> int:
    if state_dir is None or not (state_dir / "pair.json").exists():
        return 0
    state = read_json(state_dir / "pair.json")
    if state.get("key") != key:
        return 0
    t_store.load(state_dir / "teacher.bin")
    c_store.load(state_dir / "candidate.bin")
    return int(state["layers_done"])


def _save(state_dir: Path, key: dict, done: int, t_store: HiddenStore, c_store: HiddenStore) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    t_store.save(state_dir / "teacher.bin")
    c_store.save(state_dir / "candidate.bin")
    write_json(state_dir / "pair.json", dict(key=key, layers_done=done))  # last: names a complete state
