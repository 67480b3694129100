"""Router recovery one decoder layer at a time, for checkpoints larger than memory.

Router KD and layer matching are local to a MoE layer, so they need neither the whole model nor
its logits. Two hidden-state streams run through the layers side by side: the original's (from its
files) and the pruned model's (from the export). At MoE layer ``i`` the original gives the targets
(its router logits over the kept experts, its MoE block output); the pruned layer gives the inputs
its router really sees (the block input on the pruned stream, which differs from the original's
once an earlier layer lost experts). Only that layer's router trains, in float32, on the training
items' tokens, early-stopped on the validation items' tokens; then the pruned layer runs again with
the trained router to give the next layer its inputs. Memory: two layers' weights, two hidden
streams, and one layer's training rows.

After every layer the trained routers, both streams and the layer count are saved in the work
folder (each file atomic, the state last); the same command resumes after a kill at the first layer
not done, and each layer's training is seeded by the seed and the layer alone, so the result equals
an uninterrupted run.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from uspx.engine.batches import Batch, make_batches
from uspx.engine.hooks import forward_hook, forward_hooks, hooked, pre_hook
from uspx.engine.observers import _first
from uspx.engine.source import FromCheckpoint, freed_memory_returned
from uspx.engine.store import HiddenStore
from uspx.io import UspxError, read_json, write_json
from uspx.progress import progress_bar
from uspx.recover.objectives import layer_loss, router_kd_loss
from uspx.recover.train import Settings, load_tensors, save_tensors, split_items
from uspx.workload import EncodedItem

ROWS_PER_STEP = 256  # tokens per training step of one router
EVAL_ROWS = 4096  # validation tokens sent through a block at once


@dataclass
class LayerRecord:
    layer: int
    steps: int
    val_before: float
    val_after: float
    best_step: int
    train_rows: int
    val_rows: int
    seconds: float


@dataclass
class LayerHistory:
    layers: list[LayerRecord] = field(default_factory=list)
    layers_done: int = 0
    seconds: float = 0.0
    tokens: int = 0
    peak_rss_bytes: int = 0
    objectives: dict = field(default_factory=dict)


def objective_weights(settings: Settings) -> tuple[float, float]:
    """(router KD, layer matching) weights of a layer-by-layer run: the settings' own, or both 1
    when neither is set (token-level KD and cross-entropy need the whole model's logits)."""
    if settings.router_kd or settings.layer:
        return settings.router_kd, settings.layer
    return 1.0, 1.0


def train_routers(original: Path, pruned: Path, kept: dict[int, list[int]], items: list[EncodedItem],
                  settings: Settings, work: Path, key: dict, *, dtype: torch.dtype = torch.bfloat16,
                  pad_id: int = 0, progress: bool = True) -> tuple[dict[str, torch.Tensor], LayerHistory]:
    """Train every MoE layer's router of ``pruned`` against ``original``, layer by layer; returns the
    trained router tensors under their stored names (float32) and the history."""
    from uspx.recover.train import check_work

    if settings.train != "router":
        raise UspxError("layer-by-layer recovery trains routers only (--train router); full and LoRA "
                        "training need the whole model in memory")
    check_work(work, key)
    with freed_memory_returned():
        return _train_routers(original, pruned, kept, items, settings, work, key, dtype, pad_id, progress)


def _train_routers(original, pruned, kept, items, settings, work, key, dtype, pad_id, progress):
    teacher, student = FromCheckpoint(original, dtype), FromCheckpoint(pruned, dtype)
    if teacher.n_layers != student.n_layers:
        raise UspxError(f"{pruned} has {student.n_layers} decoder layers, {original} {teacher.n_layers}")
    rk, ly = objective_weights(settings)
    train_items, val_items = split_items(items, settings.val_fraction, settings.seed)
    batches = make_batches(train_items + val_items, settings.batch_size, pad_id)
    is_val = _validation_rows(batches, len(train_items))
    n_rows, hidden = batches[-1].slot + batches[-1].size, int(student.config.hidden_size)
    t_store, s_store = HiddenStore(n_rows, hidden, dtype, None), HiddenStore(n_rows, hidden, dtype, None)
    history, trained = _resume(work, key, t_store, s_store)
    history.objectives = dict(router_kd=rk, layer=ly)
    started = time.perf_counter() - history.seconds
    moe = {l.index: l for l in student.adapter.layers}
    t_moe = {l.index: l for l in teacher.adapter.layers}
    try:
        with torch.no_grad():
            if history.layers_done == 0:
                with teacher.embedding():
                    for b in batches:
                        t_store.write(b.slots, teacher.embed(b.input_ids, b.attention_mask))
                with student.embedding():
                    for b in batches:
                        s_store.write(b.slots, student.embed(b.input_ids, b.attention_mask))
        with progress_bar("recovering routers", total=student.n_layers, unit="layers", enabled=progress) as bar:
            bar.advance(history.layers_done)
            for index in range(history.layers_done, student.n_layers):
                t0 = time.perf_counter()
                targets = _teacher_pass(teacher, t_moe.get(index), index, batches, t_store, kept.get(index), dtype)
                if index in moe:
                    record, params = _train_layer(student, moe[index], index, batches, s_store, targets, is_val,
                                                  settings, rk, ly, dtype)
                    trained.update(params)
                    record.seconds = round(time.perf_counter() - t0, 2)
                    history.layers.append(record)
                    history.tokens += record.train_rows
                    bar.describe(f"recovering routers (layer {index}: {record.val_before:.4f} -> {record.val_after:.4f})")
                else:
                    _student_pass(student, None, index, batches, s_store, None, dtype)
                history.layers_done = index + 1
                history.seconds = time.perf_counter() - started
                history.peak_rss_bytes = max(history.peak_rss_bytes, _peak_rss())
                _save(work, key, history, trained, t_store, s_store)
                bar.advance()
    finally:
        t_store.close()
        s_store.close()
    stored = _stored_names(student, trained)
    return {stored[n]: v for n, v in trained.items()}, history


# ----- the two streams -------------------------------------------------------------------------
@dataclass
class _Targets:
    logits: torch.Tensor  # [N, n_kept] the original's router logits of the kept experts, real tokens
    blocks: torch.Tensor  # [N, H] the original's MoE block output


def _teacher_pass(source: FromCheckpoint, moe_layer, index: int, batches: list[Batch], store: HiddenStore,
                  kept: list[int] | None, dtype: torch.dtype) -> _Targets | None:
    """Run the original's layer ``index`` over every batch (advancing its stream); for a MoE layer,
    collect its router logits over ``kept`` and its block outputs on the real tokens."""
    logits, blocks, hooks = [], [], []
    with torch.no_grad(), source.layer(index) as layer:
        if moe_layer is not None:
            if kept is None:
                raise UspxError(f"the plan names no kept experts for MoE layer {index}")
            columns = torch.tensor(kept)

            def keep_logits(module, args, out):
                t = source.adapter.router_logits(out)
                logits.append(t.reshape(-1, t.shape[-1])[:, columns].float())

            def keep_block(module, args, out):
                blocks.append(_first(out).reshape(-1, _first(out).shape[-1]))

            hooks = [forward_hook(moe_layer.router, keep_logits), forward_hook(moe_layer.block, keep_block)]
        with hooked(hooks):
            for b in batches:
                args, kwargs = source.layer_call(b.attention_mask, index, dtype)
                out = layer(store.read(b.slots).reshape(*b.input_ids.shape, -1), *args, **kwargs)
                store.write(b.slots, _first(out))
                if moe_layer is not None:
                    real = b.real
                    logits[-1], blocks[-1] = logits[-1][real], blocks[-1][real]
    if moe_layer is None:
        return None
    return _Targets(torch.cat(logits), torch.cat(blocks))


def _student_pass(source: FromCheckpoint, moe_layer, index: int, batches: list[Batch], store: HiddenStore,
                  inputs: list | None, dtype: torch.dtype, layer=None) -> None:
    """Run the pruned model's layer ``index`` over every batch; with ``inputs``, collect its MoE
    block's inputs on the real tokens instead of advancing the stream."""
    def go(layer):
        def keep_input(module, args):
            inputs.append(args[0].reshape(-1, args[0].shape[-1]))

        keep = [] if inputs is None else [pre_hook(moe_layer.block, keep_input)]
        with hooked(keep):
            for b in batches:
                args, kwargs = source.layer_call(b.attention_mask, index, dtype)
                out = layer(store.read(b.slots).reshape(*b.input_ids.shape, -1), *args, **kwargs)
                if inputs is not None:
                    inputs[-1] = inputs[-1][b.real]
                else:
                    store.write(b.slots, _first(out))

    with torch.no_grad():
        if layer is not None:
            go(layer)
        else:
            with source.layer(index) as layer:
                go(layer)


def _train_layer(source: FromCheckpoint, moe_layer, index: int, batches: list[Batch], store: HiddenStore,
                 targets: _Targets, is_val: torch.Tensor, settings: Settings, rk: float, ly: float,
                 dtype: torch.dtype) -> tuple[LayerRecord, dict[str, torch.Tensor]]:
    prefix = source._module_prefix(moe_layer.router)
    with source.layer(index) as layer:
        inputs: list[torch.Tensor] = []
        _student_pass(source, moe_layer, index, batches, store, inputs, dtype, layer=layer)
        x = torch.cat(inputs)
        block, router = moe_layer.block, moe_layer.router
        params = {n: p for n, p in router.named_parameters() if p.is_floating_point()}
        block.float()
        train_rows = torch.nonzero(~is_val).flatten()
        val_rows = torch.nonzero(is_val).flatten()
        if len(train_rows) == 0 or len(val_rows) == 0:
            raise UspxError("layer-by-layer recovery needs tokens to train on and to validate on")

        def loss_of(rows: torch.Tensor) -> torch.Tensor:
            seen: list[torch.Tensor] = []
            with forward_hooks([(router, lambda m, a, out: seen.append(source.adapter.router_logits(out)))]):
                out = _first(block(x[rows].float().unsqueeze(0)))
            loss = out.sum() * 0.0
            if rk:
                loss = loss + rk * router_kd_loss(seen[0].reshape(len(rows), -1), targets.logits[rows],
                                                  torch.arange(targets.logits.shape[1]))
            if ly:
                loss = loss + ly * layer_loss(out.reshape(len(rows), -1), targets.blocks[rows])
            return loss

        def validation() -> float:
            with torch.no_grad():
                total = 0.0
                for a in range(0, len(val_rows), EVAL_ROWS):
                    rows = val_rows[a : a + EVAL_ROWS]
                    total += float(loss_of(rows)) * len(rows)
                return total / len(val_rows)

        gen = torch.Generator().manual_seed(settings.seed * 100_003 + index)
        for p in block.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        opt = torch.optim.Adam(params.values(), lr=settings.learning_rate)
        before = best_val = validation()
        best = {n: p.detach().clone() for n, p in params.items()}
        best_step, since, step = 0, 0, 0
        with torch.enable_grad():
            while step < settings.steps:
                rows = train_rows[torch.randint(len(train_rows), (min(ROWS_PER_STEP, len(train_rows)),), generator=gen)]
                loss = loss_of(rows)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if step % settings.eval_every == 0 or step == settings.steps:
                    val = validation()
                    if val < best_val:
                        best_val, best_step, since = val, step, 0
                        best = {n: p.detach().clone() for n, p in params.items()}
                    else:
                        since += 1
                        if since >= settings.patience:
                            break
        with torch.no_grad():
            for n, p in params.items():
                p.requires_grad_(False)
                # what the written file will hold: the stored precision, then the compute precision
                p.copy_(best[n].to(source.ckpt.spec(_stored_name(source, prefix + n)).dtype).float())
        block.to(dtype)
        _student_pass(source, moe_layer, index, batches, store, None, dtype, layer=layer)
    record = LayerRecord(index, step, round(before, 6), round(best_val, 6), best_step,
                         int(len(train_rows)), int(len(val_rows)), 0.0)
    return record, {prefix + n: v for n, v in best.items()}


def _validation_rows(batches: list[Batch], n_train: int) -> torch.Tensor:
    """[real tokens] bool, in the order the layers see them: True for tokens of validation items."""
    flags = []
    for b in batches:
        per_row = torch.tensor([r >= n_train for r in b.rows]).repeat_interleave(b.input_ids.shape[1])
        flags.append(per_row[b.real])
    return torch.cat(flags)


def _stored_name(source: FromCheckpoint, param: str) -> str:
    names = [n for n in source.ckpt.weight_map if source.target_of(n) == param]
    if len(names) != 1:
        raise UspxError(f"{source.path}: router parameter {param} is stored as {names or 'nothing'}; "
                        "it must be one stored tensor")
    return names[0]


def _stored_names(source: FromCheckpoint, trained: dict[str, torch.Tensor]) -> dict[str, str]:
    return {n: _stored_name(source, n) for n in trained}


def _peak_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


# ----- resume ---------------------------------------------------------------------------------------
def _save(work: Path, key: dict, history: LayerHistory, trained: dict, t_store: HiddenStore,
          s_store: HiddenStore) -> None:
    from dataclasses import asdict

    work.mkdir(parents=True, exist_ok=True)
    save_tensors(work / "routers.safetensors", trained or {"_": torch.zeros(1)})
    t_store.save(work / "original.bin")
    s_store.save(work / "pruned.bin")
    write_json(work / "state.json", dict(key=key, history=asdict(history)))  # last: names a complete state


def _resume(work: Path, key: dict, t_store: HiddenStore, s_store: HiddenStore) -> tuple[LayerHistory, dict]:
    path = work / "state.json"
    if not path.exists():
        return LayerHistory(), {}
    state = read_json(path)
    h = state["history"]
    history = LayerHistory(layers=[LayerRecord(**r) for r in h["layers"]],
                           **{k: v for k, v in h.items() if k != "layers"})
    trained = {k: v for k, v in load_tensors(work / "routers.safetensors").items() if k != "_"}
    t_store.load(work / "original.bin")
    s_store.load(work / "pruned.bin")
    return history, trained

