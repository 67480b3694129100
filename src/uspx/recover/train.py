"""The recovery training loop: the pruned model (student) learns from the original (teacher) on the
user's calibration items, early-stopped on a validation slice of them, resumable after a kill.

Every ``checkpoint_every`` steps the work folder gets the trainable tensors, the optimizer state, the
best tensors so far and the step (safetensors and JSON, each written atomically; nothing is
pickled). A restarted run with the same key continues from there; the batch of step ``s`` is a
function of ``s`` and the seed alone, so with one thread a resumed run ends with the same weights as
an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from uspx.engine.batches import Batch, batch_of_step, make_batches, target_losses
from uspx.engine.forward import Sampling, generate, logits
from uspx.engine.hooks import Handles, forward_hook
from uspx.io import UspxError, atomic_path, read_json, write_json
from uspx.models import MoEAdapter, adapter_for
from uspx.progress import progress_bar
from uspx.recover.objectives import kd_loss, layer_loss, router_kd_loss
from uspx.workload import EncodedItem

TRAINABLE = ("router", "lora", "full")
GENERATE_BATCH = 16  # prompts continued at once


@dataclass
class Settings:
    """What recovery trains and how long. Losses are weighted sums of the objectives' definitions."""

    train: str = "full"  # router: routers only; lora: routers + LoRA on attention and experts; full: every kept weight
    kd: float = 1.0  # token-level KD weight
    ce: float = 0.0  # cross-entropy on the calibration targets
    router_kd: float = 0.0
    layer: float = 0.0  # MoE block output matching
    tau: float = 1.0
    lr: float | None = None  # default by what trains: router 1e-3, lora 5e-4, full 5e-4
    steps: int = 300
    batch_size: int = 8
    warmup: int = 10
    lora_rank: int = 8
    eval_every: int = 20
    patience: int = 5  # evaluations without a better validation loss before stopping
    checkpoint_every: int = 20
    val_fraction: float = 0.15
    generated: int = 2  # extra training items per calibration item: the original's own continuations
    generated_tokens: int = 64
    seed: int = 0
    max_minutes: float | None = None

    def __post_init__(self) -> None:
        if self.train not in TRAINABLE:
            raise UspxError(f"--train must be one of {', '.join(TRAINABLE)}, not {self.train!r}")
        for name in ("kd", "ce", "router_kd", "layer"):
            if getattr(self, name) < 0:
                raise UspxError(f"the {name} weight must be >= 0")
        if self.kd + self.ce + self.router_kd + self.layer <= 0:
            raise UspxError("every objective weight is 0: nothing to train on")
        if self.steps < 1 or self.batch_size < 1 or self.tau <= 0:
            raise UspxError("steps and batch size must be >= 1, tau > 0")
        if not 0 < self.val_fraction < 1:
            raise UspxError("val_fraction must lie in (0, 1)")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else {"router": 1e-3, "lora": 5e-4, "full": 5e-4}[self.train]


@dataclass
class History:
    step: int = 0
    best_step: int = 0
    best_val: float = math.inf
    evals_since_best: int = 0
    tokens_seen: int = 0
    seconds: float = 0.0
    train_loss: list[list[float]] = field(default_factory=list)  # [step, loss]
    val_loss: list[list[float]] = field(default_factory=list)  # [step, student target loss]
    stopped: str = ""


class _Signals:
    """Forward hooks keeping each MoE layer's router logits and block output of the last forward."""

    def __init__(self, adapter: MoEAdapter, router: bool, blocks: bool):
        self.adapter = adapter
        self.router: dict[int, torch.Tensor] = {}
        self.blocks: dict[int, torch.Tensor] = {}
        hooks = [forward_hook(layer.router, self._keep(self.router, layer.index, True)) for layer in adapter.layers
                 if router]
        hooks += [forward_hook(layer.block, self._keep(self.blocks, layer.index, False)) for layer in adapter.layers
                  if blocks]
        self._handles = Handles().add(hooks)

    def _keep(self, into: dict, index: int, router: bool):
        def hook(module, args, out):
            t = self.adapter.router_logits(out) if router else (out[0] if isinstance(out, tuple) else out)
            into[index] = t.reshape(-1, t.shape[-1])

        return hook

    def remove(self) -> None:
        self._handles.remove()


def split_items(items: list[EncodedItem], fraction: float, seed: int) -> tuple[list[EncodedItem], list[EncodedItem]]:
    """(train, validation): a seeded share of the calibration items, at least one each."""
    if len(items) < 2:
        raise UspxError("recovery needs at least two calibration items (one to train on, one to validate)")
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = min(len(items) - 1, max(1, round(fraction * len(items))))
    val = sorted(order[:n_val].tolist())
    return [items[i] for i in sorted(order[n_val:].tolist())], [items[i] for i in val]


def generated_items(teacher: torch.nn.Module, items: list[EncodedItem], settings: Settings, cache: Path,
                    eos: int | None = None) -> list[EncodedItem]:
    """Text the original writes from the user's own prompts, as more training items.

    For every training item, ``settings.generated`` continuations of ``generated_tokens`` tokens are
    sampled from the original (temperature 1, seeded) after the item's prompt (its first half when
    it has no completion); the continuation is the item's completion, so distillation targets it.
    Held-out items never enter. Kept in ``cache`` so a resumed run trains on the same items.
    """
    if settings.generated <= 0:
        return []
    if cache.exists():
        return [EncodedItem(**row) for row in read_json(cache)]
    out: list[EncodedItem] = []
    pad = eos if eos is not None else 0
    torch.manual_seed(settings.seed)  # generate() samples from the global generator
    prompts = [(item, r, item.input_ids[: item.completion_start or max(1, len(item.input_ids) // 2)])
               for item in items for r in range(settings.generated)]
    for a in range(0, len(prompts), GENERATE_BATCH):  # left-padded batches: one cache per batch
        group = prompts[a : a + GENERATE_BATCH]
        width = max(len(p) for _, _, p in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, (_, _, p) in enumerate(group):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        new = generate(teacher, ids, mask, max_new_tokens=settings.generated_tokens, sampling=Sampling(),
                       eos_token_id=eos, pad_token_id=pad)[:, width:]
        for (item, r, p), row in zip(group, new.tolist()):
            if eos is not None and eos in row:
                row = row[: row.index(eos) + 1]
            out.append(EncodedItem(item.index, f"{item.id}#gen{r}", item.family, "generated", p + row, len(p)))
    write_json(cache, [asdict(e) for e in out])
    return out


def expert_parameter_names(model: torch.nn.Module, adapter: MoEAdapter) -> set[str]:
    prefixes = tuple(f"{layer.name}.experts." for layer in adapter.layers)
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


def trainable_parameters(student: torch.nn.Module, adapter: MoEAdapter, settings: Settings,
                         frozen_experts: bool = False):
    """The student to train (peft-wrapped for LoRA) and its trainable parameters, by name.
    ``frozen_experts``: expert weights never train (an MXFP4 checkpoint keeps its expert blocks)."""
    frozen = expert_parameter_names(student, adapter) if frozen_experts else set()
    for n, p in student.named_parameters():
        p.requires_grad_(settings.train == "full" and n not in frozen)
    if settings.train == "lora":
        student = _with_lora(student, adapter, settings.lora_rank, experts=not frozen_experts)
    routers = {id(p) for layer in adapter.layers for p in layer.router.parameters()}
    for p in student.parameters():
        if id(p) in routers and p.is_floating_point():
            p.requires_grad_(True)  # routers train in every mode
    return student, {n: p for n, p in student.named_parameters() if p.requires_grad}


def _with_lora(student: torch.nn.Module, adapter: MoEAdapter, rank: int, experts: bool = True) -> torch.nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UspxError("--train lora needs peft: pip install 'uspx[lora]'") from None
    experts = [f"{layer.name}.experts.{name}" for layer in adapter.layers
               for name in adapter.expert_tensors(layer)] if experts else None
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(adapter.attention_projections),
                        target_parameters=experts)
    return get_peft_model(student, config)


def train(teacher: torch.nn.Module, student: torch.nn.Module, kept: dict[int, list[int]], items: list[EncodedItem],
          settings: Settings, work: Path, key: dict, *, pad_id: int = 0, progress: bool = True,
          frozen_experts: bool = False, on_checkpoint: Callable[[int], None] | None = None,
          after_step: Callable[[float], None] | None = None) -> tuple[torch.nn.Module, History]:
    """Train ``student`` (the pruned model) towards ``teacher``; returns the student with its best
    validation weights loaded (LoRA merged) and the history. ``kept``: per MoE layer, the original
    ids of the student's experts in its order (router KD; its keys are the layers layer matching
    compares). ``frozen_experts``: expert weights stay as loaded. ``after_step(lr)`` runs after each
    optimizer step (a proximal step of a regulariser)."""
    torch.manual_seed(settings.seed)
    t_adapter, s_adapter = adapter_for(teacher), adapter_for(student)
    check_work(work, key)
    train_items, val_items = split_items(items, settings.val_fraction, settings.seed)
    eos = getattr(teacher.config, "eos_token_id", None)
    train_items = train_items + generated_items(teacher, train_items, settings, work / "generated.json",
                                                eos if isinstance(eos, int) else None)
    student, params = trainable_parameters(student, s_adapter, settings, frozen_experts)
    want_router, want_blocks = settings.router_kd > 0, settings.layer > 0
    t_sig, s_sig = _Signals(t_adapter, want_router, want_blocks), _Signals(s_adapter, want_router, want_blocks)
    kept_t = {l: torch.tensor(v) for l, v in kept.items()}
    teacher.eval()
    student.eval()  # no dropout anywhere; eval keeps routing deterministic (phimoe samples in train mode)

    def step_loss(step: int) -> tuple[torch.Tensor, int]:
        batch = batch_of_step(train_items, step, settings.batch_size, settings.seed, pad_id)
        return _loss(teacher, student, batch, settings, t_sig, s_sig, kept_t), int(batch.attention_mask.sum())

    val_batches = make_batches(val_items, settings.batch_size, pad_id)
    try:
        history = train_steps(student, params, settings, work, key, val_batches, step_loss, label="recovering",
                              progress=progress, after_step=after_step, on_checkpoint=on_checkpoint)
    finally:
        t_sig.remove()
        s_sig.remove()
    if settings.train == "lora":
        student = student.merge_and_unload()
    for p in student.parameters():
        p.requires_grad_(False)
    return student, history


def train_steps(student: torch.nn.Module, params: dict[str, torch.nn.Parameter], settings: Settings, work: Path,
                key: dict, val_batches: list[Batch], step_loss: Callable[[int], tuple[torch.Tensor, int]], *,
                label: str, progress: bool = True, after_step: Callable[[float], None] | None = None,
                on_checkpoint: Callable[[int], None] | None = None) -> History:
    """Recovery's loop over ``step_loss(step)`` -> (loss, tokens read): AdamW with warm-up and a
    cosine schedule, gradient clipping, early stopping on ``val_batches`` and checkpoints in ``work``
    (a run with the same key resumes from them). Returns the history, ``params`` holding the best
    validation weights."""
    optimizer = torch.optim.AdamW(params.values(), lr=settings.learning_rate, weight_decay=0.0)
    history = _resume(work, key, params, optimizer)
    best = {n: p.detach().clone() for n, p in params.items()}
    if history.step and (work / "best.safetensors").exists():
        best = load_tensors(work / "best.safetensors")
    started = time.perf_counter() - history.seconds
    with progress_bar(label, total=settings.steps, unit="steps", enabled=progress) as bar:
        bar.advance(history.step)
        while history.step < settings.steps and not history.stopped:
            lr = settings.learning_rate * min(1.0, (history.step + 1) / max(1, settings.warmup))
            lr *= 0.5 * (1 + math.cos(math.pi * history.step / settings.steps))
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss, tokens = step_loss(history.step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            optimizer.step()
            if after_step is not None:
                after_step(lr)
            history.step += 1
            history.tokens_seen += tokens
            value = float(loss.detach())
            history.train_loss.append([history.step, round(value, 6)])
            bar.advance()
            bar.describe(f"{label} (loss {value:.4f})")
            history.seconds = time.perf_counter() - started
            best, saved = end_of_step(history, settings, student, val_batches, params, best, work, key, optimizer)
            if saved and on_checkpoint is not None:
                on_checkpoint(history.step)
    history.stopped = history.stopped or f"{settings.steps} steps done"
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(best[n])
    return history


def _loss(teacher, student, batch: Batch, settings: Settings, t_sig: _Signals, s_sig: _Signals,
          kept: dict[int, torch.Tensor]) -> torch.Tensor:
    t_logits = logits(teacher, batch)
    s_logits = logits(student, batch, grad=True)
    real = batch.real
    loss = s_logits.sum() * 0.0
    if settings.kd:
        loss = loss + settings.kd * kd_loss(s_logits, t_logits, settings.tau)
    if settings.ce:
        loss = loss + settings.ce * target_losses(batch, s_logits).mean()
    if settings.router_kd:
        parts = [router_kd_loss(s_sig.router[l][real], t_sig.router[l][real], kept[l]) for l in kept]
        loss = loss + settings.router_kd * torch.stack(parts).mean()
    if settings.layer:
        parts = [layer_loss(s_sig.blocks[l][real], t_sig.blocks[l][real]) for l in kept]
        loss = loss + settings.layer * torch.stack(parts).mean()
    return loss


@torch.no_grad()
def end_of_step(history: History, settings: Settings, student, val_batches: list[Batch], params: dict, best: dict,
                work: Path, key: dict, optimizer) -> tuple[dict, bool]:
    """After a training step: the validation loss when due (the best weights kept, patience
    counted), the time budget, and a checkpoint when due. Returns the best weights and whether a
    checkpoint was written."""
    if history.step % settings.eval_every == 0 or history.step == settings.steps:
        val = _validation_loss(student, val_batches)
        history.val_loss.append([history.step, round(val, 6)])
        if val < history.best_val:
            history.best_val, history.best_step, history.evals_since_best = val, history.step, 0
            best = {n: p.detach().clone() for n, p in params.items()}
        else:
            history.evals_since_best += 1
            if history.evals_since_best >= settings.patience:
                history.stopped = f"validation loss did not improve for {settings.patience} evaluations"
    if settings.max_minutes is not None and history.seconds >= 60 * settings.max_minutes:
        history.stopped = history.stopped or f"time budget of {settings.max_minutes:g} minutes reached"
    due = history.step % settings.checkpoint_every == 0 or bool(history.stopped) or history.step == settings.steps
    if due:
        _checkpoint(work, key, history, params, optimizer, best)
    return best, due


def _validation_loss(student, batches: list[Batch]) -> float:
    """The student's mean target loss on the validation items (what the held-out delta measures)."""
    total, count = 0.0, 0
    for batch in batches:
        if not batch.loss_mask.any():
            continue
        losses = target_losses(batch, logits(student, batch))
        total += float(losses.double().sum())
        count += losses.numel()
    return total / count if count else math.inf


# ----- checkpoints: tensors as safetensors, the rest as JSON ----------------------------------------
def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors' own error types for damaged files
        raise UspxError(f"{path}: unreadable recovery checkpoint ({exc}); delete the folder to start over") from None


def _checkpoint(work: Path, key: dict, history: History, params: dict, optimizer, best: dict) -> None:
    work.mkdir(parents=True, exist_ok=True)
    state = optimizer.state_dict()
    flat = {f"{i}.{k}": v for i, s in state["state"].items() for k, v in s.items() if isinstance(v, torch.Tensor)}
    save_tensors(work / "trainable.safetensors", params)
    save_tensors(work / "optimizer.safetensors", flat)
    save_tensors(work / "best.safetensors", best)
    # written last: a state.json names a complete checkpoint
    write_json(work / "state.json", dict(key=key, history=asdict(history), param_groups=state["param_groups"]))


def check_work(work: Path, key: dict) -> None:
    """Refuse a work folder of another run (or of something else) before anything is written to it."""
    path = work / "state.json"
    if path.exists():
        if read_json(path).get("key") != key:
            raise UspxError(
                f"{work} holds a recovery run of another plan, model or settings; delete it or choose another output"
            )
    elif work.exists() and any(p.name != "generated.json" for p in work.iterdir()):
        raise UspxError(f"{work} holds files that are not a uspx recovery checkpoint; use another folder")
    elif (work / "generated.json").exists():
        (work / "generated.json").unlink()  # made before a kill that left no checkpoint: its key is unknown


def _resume(work: Path, key: dict, params: dict, optimizer) -> History:
    path = work / "state.json"
    if not path.exists():
        return History()
    state = read_json(path)
    trainable = load_tensors(work / "trainable.safetensors")
    if set(trainable) != set(params):
        raise UspxError(f"{work}: the checkpoint's trainable tensors do not match this run")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(trainable[n])
    flat = load_tensors(work / "optimizer.safetensors")
    opt_state: dict = {}
    for name, value in flat.items():
        idx, field_name = name.split(".", 1)
        opt_state.setdefault(int(idx), {})[field_name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    return History(**state["history"])
