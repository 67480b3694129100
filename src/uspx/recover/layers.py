"""Recovery one decoder layer at a time, for checkpoints larger than memory.

The engine runs the original and the pruned model side by side a decoder layer at a time
(:func:`uspx.engine.pair.run_pair`): the original's stream gives the targets (each layer's output
on the user's hidden states, and its router logits over the kept experts), the pruned model's own
stream gives the inputs its layer really sees (which differ from the original's once an earlier
layer lost experts). At each layer the pruned layer trains, in float32, to reproduce the original
layer's output (relative squared error, ``--layer``) and its routing (KL over the kept experts,
``--router-kd``) on the training items' tokens, early-stopped on the validation items' tokens;
then it runs with its best weights to give the next layer its inputs. What trains: the routers
(``--train router``) or every kept weight of the layer (``--train full``: attention, norms, router,
the kept experts; an MXFP4 checkpoint's expert blocks stay frozen, so they are written byte for
byte). Memory: two layers' weights (the trained one in float32 with its optimiser state), two
hidden streams, and one batch's activations.

After every layer the trained tensors (under their stored names) and the history are saved in the
work folder, then both streams (each file atomic, the state last); the same command resumes after
a kill at the first layer not done, and each layer's training is seeded by the seed and the layer
alone, so the result equals an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from uspx.engine.batches import Batch, make_batches
from uspx.engine.hooks import forward_hooks
from uspx.engine.pair import LayerStep, run_pair
from uspx.engine.source import FromCheckpoint, WeightSource
from uspx.io import UspxError, read_json, write_json
from uspx.recover.objectives import layer_loss, router_kd_loss
from uspx.recover.train import Settings, load_tensors, save_tensors, split_items
from uspx.workload import EncodedItem

LAYER_TRAINABLE = ("router", "full")


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
    trained: int = 0  # parameters trained in this layer


@dataclass
class LayerHistory:
    layers: list[LayerRecord] = field(default_factory=list)
    layers_done: int = 0
    seconds: float = 0.0
    tokens: int = 0
    peak_rss_bytes: int = 0
    objectives: dict = field(default_factory=dict)


def train_layers(original: WeightSource, pruned: Path, kept: dict[int, list[int]], items: list[EncodedItem],
                 settings: Settings, work: Path, key: dict, *, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None, pad_id: int = 0, frozen_experts: bool = False,
                 progress: bool = True) -> tuple[dict[str, torch.Tensor], LayerHistory]:
    """Train ``pruned`` against ``original`` one decoder layer at a time; returns the trained
    tensors under their stored names (float32) and the history."""
    from uspx.recover.train import check_work

    if settings.train not in LAYER_TRAINABLE:
        raise UspxError(f"layer-by-layer recovery trains {' or '.join(LAYER_TRAINABLE)} (--train); LoRA needs the "
                        "whole model in memory")
    check_work(work, key)
    candidate = FromCheckpoint(pruned, dtype, device=device)
    if original.n_layers != candidate.n_layers:
        raise UspxError(f"{pruned} has {candidate.n_layers} decoder layers, the original {original.n_layers}")
    train_items, val_items = split_items(items, settings.val_fraction, settings.seed)
    batches = make_batches(train_items + val_items, settings.batch_size, pad_id)
    trainer = _LayerTrainer(candidate, kept, batches, len(train_items), settings, work, key, frozen_experts)
    run_pair(original, candidate, batches, fit=trainer.fit, probe_teacher=trainer.probe, state_dir=work / "streams",
             state_key=key, progress=progress, label=f"recovering ({settings.train}, layer by layer)")
    return trainer.trained, trainer.history


class _LayerTrainer:
    def __init__(self, candidate: FromCheckpoint, kept: dict[int, list[int]], batches: list[Batch], n_train: int,
                 settings: Settings, work: Path, key: dict, frozen_experts: bool):
        self.candidate, self.kept, self.batches, self.settings = candidate, kept, batches, settings
        self.work, self.key, self.frozen_experts = work, key, frozen_experts
        self.moe = {l.index: l for l in candidate.adapter.layers}
        # (router KD, layer matching) weights: the settings' own, or both 1 when neither is set
        # (token-level KD and cross-entropy need the whole model's logits)
        self.rk, self.ly = (settings.router_kd, settings.layer) if settings.router_kd or settings.layer else (1.0, 1.0)
        # [B, T] bool per batch: real tokens of training items, and of validation items
        self.train_masks = [_positions(b, lambda row: row < n_train) for b in batches]
        self.val_masks = [_positions(b, lambda row: row >= n_train) for b in batches]
        if not any(m.any() for m in self.train_masks) or not any(m.any() for m in self.val_masks):
            raise UspxError("layer-by-layer recovery needs tokens to train on and to validate on")
        # model parameter -> the stored tensors it is read from, and their dtype (what is written back)
        self.stored_of: dict[str, list[str]] = {}
        for name in candidate.ckpt.weight_map:
            self.stored_of.setdefault(candidate.target_of(name), []).append(name)
        self.stored_dtype = {param: candidate.ckpt.spec(names[0]).dtype for param, names in self.stored_of.items()}
        self.history, self.trained = _resume(work, key)
        self.history.objectives = dict(router_kd=self.rk, layer=self.ly, train=settings.train)
        self.started = time.perf_counter() - self.history.seconds

    @contextlib.contextmanager
    def probe(self, index: int, teacher: WeightSource) -> Iterator[list[torch.Tensor]]:
        """The original's router logits over the kept experts, one [B*T, kept] tensor per batch."""
        seen: list[torch.Tensor] = []
        if self.rk == 0 or index not in self.moe:
            yield seen
            return
        layer = next(l for l in teacher.adapter.layers if l.index == index)
        columns = torch.tensor(self.kept[index])

        def keep(module, args, out):
            t = teacher.adapter.router_logits(out)
            seen.append(t.reshape(-1, t.shape[-1])[:, columns].float().cpu())

        with forward_hooks([(layer.router, keep)]):
            yield seen

    def fit(self, step: LayerStep) -> None:
        t0 = time.perf_counter()
        params = self._trainable(step)
        if params:
            record, best = self._train(step, params)
            record.seconds = round(time.perf_counter() - t0, 2)
            # a layer trained again after a kill replaces its own record
            self.history.layers = [r for r in self.history.layers if r.layer != step.index] + [record]
            self.history.tokens = sum(r.train_rows for r in self.history.layers)
            self.trained.update(self._stored(step, best))
        self.history.layers_done = step.index + 1
        self.history.seconds = time.perf_counter() - self.started
        rss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
        self.history.peak_rss_bytes = max(self.history.peak_rss_bytes, rss)
        _save(self.work, self.key, self.history, self.trained)

    def _trainable(self, step: LayerStep) -> dict[str, torch.nn.Parameter]:
        moe = self.moe.get(step.index)
        if self.settings.train == "router":
            return {} if moe is None else self._floats(moe.router)
        frozen = {id(p) for p in moe.experts.parameters()} if self.frozen_experts and moe is not None else set()
        return {n: p for n, p in self._floats(step.layer).items() if id(p) not in frozen}

    def _floats(self, module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """The module's floating-point parameters under their names in the model."""
        prefix = self.candidate.module_prefix(module)
        return {prefix + n: p for n, p in module.named_parameters() if p.is_floating_point()}

    def _loss(self, step: LayerStep, b: int, mask: torch.Tensor) -> torch.Tensor:
        """The layer's objective on batch ``b``'s positions ``mask`` [B, T], in float32."""
        batch = self.batches[b]
        args, kwargs = self.candidate.layer_call(batch.attention_mask, step.index, torch.float32)
        moe = self.moe.get(step.index)
        logits: list[torch.Tensor] = []
        watch = [] if moe is None or not self.rk else [
            (moe.router, lambda m, a, out: logits.append(self.candidate.adapter.router_logits(out)))]
        with forward_hooks(watch):
            out = step.layer(step.inputs(batch).float(), *args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        where = mask.to(out.device)
        loss = out.sum() * 0.0
        if self.ly:
            loss = loss + self.ly * layer_loss(out[where], step.targets(batch).float()[where])
        if logits and step.seen:
            flat = where.reshape(-1)
            student = logits[0].reshape(flat.shape[0], -1)[flat]
            teacher = step.seen[b].to(student.device)[flat.cpu()]
            loss = loss + self.rk * router_kd_loss(student, teacher, torch.arange(teacher.shape[1]))
        return loss

    def _validation(self, step: LayerStep) -> float:
        with torch.no_grad():
            total, n = 0.0, 0
            for b, mask in enumerate(self.val_masks):
                if mask.any():
                    total += float(self._loss(step, b, mask)) * int(mask.sum())
                    n += int(mask.sum())
            return total / n

    def _train(self, step: LayerStep, params: dict[str, torch.nn.Parameter]
               ) -> tuple[LayerRecord, dict[str, torch.Tensor]]:
        s = self.settings
        layer = step.layer
        layer.float().requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        gen = torch.Generator().manual_seed(s.seed * 100_003 + step.index)
        train_batches = [b for b, m in enumerate(self.train_masks) if m.any()]
        opt = torch.optim.Adam(params.values(), lr=s.learning_rate)
        before = best_val = self._validation(step)
        best = {n: p.detach().clone() for n, p in params.items()}
        best_step, since, n_step = 0, 0, 0
        with torch.enable_grad():
            while n_step < s.steps:
                b = train_batches[int(torch.randint(len(train_batches), (1,), generator=gen))]
                loss = self._loss(step, b, self.train_masks[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                n_step += 1
                if n_step % s.eval_every == 0 or n_step == s.steps:
                    val = self._validation(step)
                    if val < best_val:
                        best_val, best_step, since = val, n_step, 0
                        best = {n: p.detach().clone() for n, p in params.items()}
                    else:
                        since += 1
                        if since >= s.patience:
                            break
        with torch.no_grad():
            for n, p in params.items():
                p.requires_grad_(False)
                # what the written file will hold: the stored precision, then the compute precision
                best[n] = best[n].to(self.stored_dtype.get(n, best[n].dtype)).float()
                p.copy_(best[n])
        layer.to(step.dtype)
        train_rows = sum(int(m.sum()) for m in self.train_masks)
        val_rows = sum(int(m.sum()) for m in self.val_masks)
        record = LayerRecord(step.index, n_step, round(before, 6), round(best_val, 6), best_step, train_rows,
                             val_rows, 0.0, trained=sum(p.numel() for p in params.values()))
        return record, best

    def _stored(self, step: LayerStep, best: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Trained model parameters as the stored tensors they are written to: one-to-one ones by
        name, fused or renamed ones through transformers' own reverse conversion."""
        from transformers.core_model_loading import revert_weight_conversion

        out, converted = {}, {}
        for param, value in best.items():
            names = self.stored_of.get(param, [])
            if len(names) == 1 and self.candidate.ckpt.spec(names[0]).shape == tuple(value.shape):
                out[names[0]] = value
            else:
                converted[param] = value
        if converted:
            for name, value in revert_weight_conversion(self.candidate.model, converted).items():
                if name not in self.candidate.ckpt.weight_map:
                    raise UspxError(f"{self.candidate.path}: trained parameter(s) {sorted(converted)[:3]} map to "
                                    f"{name}, which the checkpoint does not store; train the routers only")
                out[name] = value
        return out


def _positions(batch: Batch, keep) -> torch.Tensor:
    """[B, T] bool: real tokens of the batch's items whose caller row passes ``keep``."""
    rows = torch.tensor([bool(keep(r)) for r in batch.rows])
    return batch.attention_mask.bool() & rows[:, None]


# ----- resume ---------------------------------------------------------------------------------------
def _save(work: Path, key: dict, history: LayerHistory, trained: dict) -> None:
    work.mkdir(parents=True, exist_ok=True)
    save_tensors(work / "trained.safetensors", trained or {"_": torch.zeros(1)})
    write_json(work / "state.json", dict(key=key, history=asdict(history)))  # last: names a complete state


def _resume(work: Path, key: dict) -> tuple[LayerHistory, dict]:
    path = work / "state.json"
    if not path.exists():
        return LayerHistory(), {}
    h = read_json(path)["history"]
    history = LayerHistory(layers=[LayerRecord(**r) for r in h["layers"]],
                           **{k: v for k, v in h.items() if k != "layers"})
    trained = {k: v for k, v in load_tensors(work / "trained.safetensors").items() if k != "_"}
    return history, trained
