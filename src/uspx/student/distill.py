"""Distillation of the original into a dense base model the user already has.

The base is any local Hugging Face causal LM (its own family, width and tokenizer). What it learns:

- same tokenizer (same vocabulary and logit width): token-level KD from the original at every target
  token plus cross-entropy on the completions, recovery's two objectives;
- different tokenizer: cross-entropy on the completions, among them the original's own
  continuations of the calibration prompts (sequence-level KD), plus ULD at the positions where both
  tokenizations start a token at the same character (:mod:`uspx.student.objectives`).

What trains: LoRA adapters on every linear layer but the output head (peft's ``all-linear``), merged
into the weights at the end, or every weight (``full``). A 4-bit base (bitsandbytes NF4, QLoRA)
needs a CUDA GPU and bitsandbytes; elsewhere it is refused before anything loads.

The loop is recovery's (:mod:`uspx.recover.train`): its settings, seeded batches per step, warm-up
and cosine schedule, gradient clipping, early stopping on a validation slice of the calibration
items, and its checkpoints (a killed run resumes with the same key). Only the loss differs: it
runs two tokenizations of one text, which recovery's loop (one batch for both models) cannot.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from uspx.io import UspxError
from uspx.recover.train import History, Settings
from uspx.student.text import Scored
from uspx.workload import EncodedItem, Workload, WorkloadItem, WorkloadSummary

DENSE_TRAINABLE = ("lora", "full")


@dataclass
class Pair:
    """One text as the student and as the original tokenise it, and their aligned target tokens."""

    student: Scored
    teacher: Scored
    aligned: list[tuple[int, int]]  # (student target k, teacher target j), see objectives.aligned_targets


def same_tokenizer(teacher_tok: object, student_tok: object, teacher_config: object, student_config: object) -> bool:
    """One vocabulary and one logit width: token-level KD compares the logits id by id."""
    return (int(teacher_config.vocab_size) == int(student_config.vocab_size)
            and teacher_tok.get_vocab() == student_tok.get_vocab())


def check_settings(settings: Settings, four_bit: bool) -> None:
    """Refuse what a dense student cannot train, and a 4-bit base where bitsandbytes cannot run."""
    if settings.train not in DENSE_TRAINABLE:
        raise UspxError(f"--train must be lora or full for a dense base (it has no router), not {settings.train!r}")
    if settings.router_kd or settings.layer:
        raise UspxError("router KD and layer matching compare MoE layers; a dense base has none: leave them 0")
    if settings.kd + settings.ce <= 0:
        raise UspxError("both --kd and --ce are 0: nothing to train on")
    if four_bit:
        if settings.train != "lora":
            raise UspxError("a 4-bit base trains LoRA adapters only (--train lora)")
        if not torch.cuda.is_available():
            raise UspxError("a 4-bit base (QLoRA) needs a CUDA GPU for bitsandbytes' kernels; this machine has "
                            "none: drop --4bit to train LoRA on the base in its own precision")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UspxError("a 4-bit base needs bitsandbytes: pip install bitsandbytes")


def load_base(path: str | Path, *, four_bit: bool = False) -> tuple[torch.nn.Module, object]:
    """(model in fp32 and eval mode, or NF4 on the GPU; tokenizer) of a local causal LM folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UspxError(f"{path}: not a Hugging Face model folder (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise UspxError(f"{path}: no *.safetensors weights (uspx never loads pickle checkpoints)")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise UspxError(f"{path}: no tokenizer files; the student needs its own tokenizer to read the prompts")
    try:
        AutoConfig.from_pretrained(path)
        kw: dict = dict(dtype=torch.float32, use_safetensors=True)
        if four_bit:
            from transformers import BitsAndBytesConfig

            kw = dict(use_safetensors=True, device_map={"": 0}, quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise UspxError(f"{path}: cannot load it as a causal LM: {exc}") from None
    return model.eval(), tokenizer


def make_pairs(workload: Workload, teacher_tok: object, student_tok: object, max_length: int,
               same: bool) -> list[Pair]:
    """Every item of ``workload`` tokenised by both models, with the aligned targets (all of them
    when the tokenizers are the same)."""
    from uspx.student.objectives import aligned_targets
    from uspx.student.text import encode_scored

    t = encode_scored(workload, teacher_tok, max_length)
    s = t if same else encode_scored(workload, student_tok, max_length)
    out = []
    for i, (ts, ss) in enumerate(zip(t, s)):
        ss = dataclasses.replace(ss, item=dataclasses.replace(ss.item, index=i))  # the pair it belongs to
        if same:
            n = len(ts.item.input_ids) - max(ts.item.completion_start, 1)
            aligned = [(k, k) for k in range(max(n, 0))]
        else:
            aligned = aligned_targets(ss.starts, ts.starts) if ss.starts is not None and ts.starts is not None else []
        out.append(Pair(ss, ts, aligned))
    return out


def generated_workload(teacher: torch.nn.Module, teacher_tok: object, items: list[EncodedItem], settings: Settings,
                       cache: Path) -> Workload:
    """The original's continuations of the training prompts (recovery's generated items) as text, so
    the student reads them with its own tokenizer: the teacher writes the references."""
    from uspx.recover.train import generated_items

    eos = getattr(teacher.config, "eos_token_id", None)
    rows = []
    for e in generated_items(teacher, items, settings, cache, eos if isinstance(eos, int) else None):
        prompt = teacher_tok.decode(e.input_ids[: e.completion_start], skip_special_tokens=True)
        whole = teacher_tok.decode(e.input_ids, skip_special_tokens=True)
        completion = whole[len(prompt):] if whole.startswith(prompt) else teacher_tok.decode(
            e.input_ids[e.completion_start:], skip_special_tokens=True)
        if prompt and completion:
            rows.append(WorkloadItem(e.id, e.family, "calibration", prompt, completion))
    return Workload("generated by the original", rows, WorkloadSummary())


def trainable(model: torch.nn.Module, settings: Settings) -> tuple[torch.nn.Module, dict[str, torch.nn.Parameter]]:
    """The model to train (peft-wrapped for LoRA) and its trainable parameters by name."""
    for p in model.parameters():
        p.requires_grad_(settings.train == "full" and p.is_floating_point())
    if settings.train != "full":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise UspxError("LoRA needs peft: pip install 'uspx[lora]' (or --train full)") from None
        # every linear layer but the output head: the family's own projection names are not needed
        config = LoraConfig(r=settings.lora_rank, lora_alpha=2 * settings.lora_rank, lora_dropout=0.0,
                            target_modules="all-linear")
        model = get_peft_model(model, config)
    return model, {n: p for n, p in model.named_parameters() if p.requires_grad}


def step_loss(teacher: torch.nn.Module, student: torch.nn.Module, pairs: list[Pair], student_items: list[EncodedItem],
              settings: Settings, same: bool, teacher_pad: int, student_pad: int,
              step: int) -> tuple[torch.Tensor, int]:
    """The loss of training step ``step`` (KD or ULD from the original plus cross-entropy) and the
    student tokens it read."""
    from uspx.engine.batches import batch_of_step, make_batches, n_targets, target_losses
    from uspx.engine.forward import logits
    from uspx.student.objectives import kd_loss, uld_loss

    batch = batch_of_step(student_items, step, settings.batch_size, settings.seed, student_pad)
    s_logits = logits(student, batch, grad=True)
    loss = s_logits.sum() * 0.0
    if settings.ce:
        loss = loss + settings.ce * target_losses(batch, s_logits).mean()
    if settings.kd:
        chosen = [pairs[e.index] for e in batch.items]  # the batch's own row order
        t_batch = make_batches([p.teacher.item for p in chosen], len(chosen), teacher_pad, by_length=False)[0]
        t_logits = logits(teacher, t_batch)
        if same:
            loss = loss + settings.kd * kd_loss(s_logits, t_logits.to(s_logits.device), settings.tau)
        else:
            s_rows, t_rows, s_at, t_at = [], [], 0, 0
            for p in chosen:
                s_rows += [s_at + k for k, _ in p.aligned]
                t_rows += [t_at + j for _, j in p.aligned]
                s_at, t_at = s_at + n_targets(p.student.item), t_at + n_targets(p.teacher.item)
            loss = loss + settings.kd * uld_loss(s_logits[s_rows], t_logits[t_rows], settings.tau)
    return loss, int(batch.attention_mask.sum())


def distill(teacher: torch.nn.Module, student: torch.nn.Module, pairs: list[Pair], val: list[EncodedItem], settings: Settings,
            work: Path, key: dict, *, same: bool, teacher_pad: int, student_pad: int,
            progress: bool = True) -> tuple[torch.nn.Module, History]:
    """Train ``student`` on ``pairs`` with recovery's loop (schedule, early stopping on ``val``,
    checkpoints in ``work``); returns it with its best validation weights, LoRA still unmerged."""
    from uspx.engine.batches import make_batches
    from uspx.recover.train import check_work, train_steps

    torch.manual_seed(settings.seed)
    check_work(work, key)
    student, params = trainable(student, settings)
    items = [p.student.item for p in pairs]
    losses = functools.partial(step_loss, teacher, student, pairs, items, settings, same, teacher_pad, student_pad)
    val_batches = make_batches(val, settings.batch_size, student_pad)
    history = train_steps(student, params, settings, work, key, val_batches, losses, label="distilling",
                          progress=progress)
    return student, history


def merged(student: torch.nn.Module, settings: Settings, base: Path, four_bit: bool) -> torch.nn.Module:
    """The trained model as plain weights: LoRA merged. A 4-bit base is reloaded in its stored
    precision and the adapters merged there (merging into NF4 would round the weights again)."""
    if settings.train != "lora":
        student.requires_grad_(False)
        return student
    if four_bit:
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        full, _ = load_base(base)
        full = get_peft_model(full, student.peft_config["default"])
        set_peft_model_state_dict(full, {k: v.float().cpu() for k, v in get_peft_model_state_dict(student).items()})
        student = full
    out = student.merge_and_unload()
    out.requires_grad_(False)
    return out.eval()
