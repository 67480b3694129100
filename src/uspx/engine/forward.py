"""Whole-model passes: the engine's modes for a model held in memory.

:func:`uspx.engine.run` sends a workload through a weight source with observers; the functions here
are the single passes a stage needs besides that, each a thin, uniform wrapper around the model's
own forward or ``generate``:

- :func:`logits`: the logits at a :class:`~uspx.engine.batches.Batch`'s target positions (the ones
  :mod:`uspx.engine.losses` scores), with or without gradients;
- :func:`forward`: one forward over token ids with named extra outputs (``output_hidden_states``,
  ``output_router_logits``), or only the decoder stack (``head=False``) when hooks collect what is
  needed;
- :func:`generate`: greedy or sampled continuations with a KV cache;
- :func:`prefill` and :func:`decode_step` / :func:`decode_steps`: greedy decoding one token at a time
  with a KV cache, for timing and for watching each step.

Every function accepts a model (``nn.Module``), a :class:`~uspx.models.LoadedModel` or a resident
:class:`~uspx.engine.source.WeightSource`; it moves the inputs to the model's device, and passes
run without the KV cache unless they decode. Gradients are explicit: ``grad=False`` runs under
``torch.no_grad()``, ``grad=True`` under ``torch.enable_grad()``, whatever the caller's mode.
What comes back lives on the CPU where noted (the batches' targets live there), else on the
model's device, in the model's own dtype (the losses compute in float32 themselves).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal, Sequence

import torch
from torch import nn

from uspx.engine.batches import Batch
from uspx.engine.source import WeightSource
from uspx.io import UspxError

__all__ = ["Sampling", "Step", "decode_step", "decode_steps", "device_of", "forward", "frozen", "generate",
           "logits", "model_of", "prefill"]


def model_of(model) -> nn.Module:
    """The ``nn.Module`` that runs: ``model`` itself, a LoadedModel's model, or a resident source's."""
    if isinstance(model, WeightSource):
        if not model.resident:
            raise UspxError("a layer-by-layer source holds no whole model to run at once; run it through "
                            "uspx.engine.run")
        return model.model
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "model", None)  # a LoadedModel (not imported: models sits below the engine)
    if isinstance(inner, nn.Module):
        return inner
    raise UspxError(f"cannot run a {type(model).__name__}: expected a model, a loaded model or a weight source")


def device_of(model) -> torch.device:
    """Where the model takes its inputs: its first parameter's device (transformers' rule, which
    accelerate's device maps follow: their hooks move activations between devices themselves)."""
    return next((p.device for p in model_of(model).parameters()), torch.device("cpu"))


def _grad_mode(grad: bool) -> contextlib.AbstractContextManager:
    return torch.enable_grad() if grad else torch.no_grad()


@contextlib.contextmanager
def frozen(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """``params`` take no gradients for the block (a caller turns on the few it wants); each gets its
    own ``requires_grad`` back afterwards, also when the block raises."""
    flags = [(p, p.requires_grad) for p in params]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def logits(model, batch: Batch, *, grad: bool = False) -> torch.Tensor:
    """[N, V] logits at the True positions of ``batch.loss_mask`` in row-major order (N may be 0),
    on the CPU, in the model's dtype; differentiable when ``grad``.

    Only those positions go through the LM head (``logits_to_keep`` with a boolean mask): the head
    over a large vocabulary is a big share of a small model's forward, and a prompt's positions are
    never scored.
    """
    module = model_of(model)
    device = device_of(module)
    mask = batch.loss_mask
    with _grad_mode(grad):
        out = module(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                     logits_to_keep=mask.to(device), use_cache=False).logits
        if out.dim() == 3:  # a model that ignored logits_to_keep returns every position
            out = out[mask.to(out.device)]
        return out.cpu()


def forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, grad: bool = False,
            head: bool = True, **outputs):
    """One forward over ``input_ids`` [B, T] without the KV cache; returns the model's output object
    (on the model's device). ``outputs`` are passed to the model as given (``output_hidden_states=True``,
    ``output_router_logits=True``, ``logits_to_keep=...``). ``head=False`` runs the decoder stack
    only (the base model: no logits), for a pass whose hooks collect what the caller needs."""
    module = model_of(model)
    device = device_of(module)
    kw = dict(input_ids=input_ids.to(device), use_cache=False, **outputs)
    if attention_mask is not None:
        kw["attention_mask"] = attention_mask.to(device)
    with _grad_mode(grad):
        return (module if head else module.base_model)(**kw)


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of :func:`generate` (transformers' meaning): ``top_k=0`` and ``top_p=1``
    keep the whole vocabulary, so ``Sampling()`` samples from the model's own distribution."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, max_new_tokens: int,
             sampling: Sampling | None = None, stopping_criteria: Sequence | None = None,
             eos_token_id: int | list[int] | None | Literal["config"] = "config",
             pad_token_id: int | None = None, stop_strings: Sequence[str] = (), tokenizer=None) -> torch.Tensor:
    """[B, T + new] ``input_ids`` followed by up to ``max_new_tokens`` generated tokens (transformers'
    ``generate`` with a KV cache), on ``input_ids``' device.

    Greedy unless ``sampling`` is given (sampling draws from torch's global generator: seed it for a
    repeatable run). ``eos_token_id`` stops a row at that token: ``"config"`` (the default) uses the
    model's generation config, None never stops early. Left-pad batches of different lengths and
    give their ``attention_mask``. ``stopping_criteria`` are transformers ``StoppingCriteria``;
    ``stop_strings`` stop a row once its text contains one of them (decoded by ``tokenizer``, which
    they need). A finished row is filled with ``pad_token_id``.
    """
    from transformers import StoppingCriteriaList

    module = model_of(model)
    device = device_of(module)
    ids = input_ids.to(device)
    kw: dict = dict(max_new_tokens=max_new_tokens, do_sample=sampling is not None)
    if attention_mask is not None:
        kw["attention_mask"] = attention_mask.to(device)
    if sampling is not None:
        kw.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    if stopping_criteria is not None:
        kw["stopping_criteria"] = StoppingCriteriaList(list(stopping_criteria))
    if eos_token_id != "config":
        kw["eos_token_id"] = eos_token_id
    if pad_token_id is not None:
        kw["pad_token_id"] = pad_token_id
    if stop_strings:
        if tokenizer is None:
            raise UspxError("stop strings need the tokenizer that decodes the generated tokens")
        kw.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
    with torch.no_grad():
        return module.generate(ids, **kw).to(input_ids.device)


@dataclass
class Step:
    """Where greedy decoding stands: the logits [B, V] of the last position run, the greedy next
    token [B, 1] (both on the model's device) and the KV cache (None after a prefill without one)."""

    logits: torch.Tensor
    next_ids: torch.Tensor
    cache: object = None


def _step(model, ids: torch.Tensor, cache: object, use_cache: bool) -> Step:
    kw = dict(input_ids=ids, use_cache=use_cache)
    if cache is not None:
        kw["cache"] = cache
    else:
        kw["logits_to_keep"] = 1  # a prompt: only its last position predicts
    with torch.no_grad():
        out = model_of(model)(**kw)
    last = out.logits[:, -1]
    return Step(last, last.argmax(-1, keepdim=True), out.cache if use_cache else None)


def prefill(model, input_ids: torch.Tensor, *, cache: bool = True) -> Step:
    """Run a prompt [B, T] (unpadded) once, the LM head on its last position only; ``cache=False``
    keeps no KV cache (a prefill that is only timed)."""
    return _step(model, input_ids.to(device_of(model)), None, cache)


def decode_step(model, step: Step) -> Step:
    """Feed ``step.next_ids`` through the model with ``step``'s cache: one greedy token further."""
    if step.cache is None:
        raise UspxError("decoding needs the cache of a prefill run with cache=True")
    return _step(model, step.next_ids, step.cache, True)


def decode_steps(model, step: Step, n: int) -> Step:
    """``n`` greedy steps from ``step`` (see :func:`decode_step`)."""
    for _ in range(n):
        step = decode_step(model, step)
    return step
