"""Prefill and decode throughput of teacher and candidate, measured in one run on one machine.

Short by design (a few prompts, 32 greedy tokens): enough to compare two models side by side, not a
benchmark. Repeats alternate between the two models so that load from other processes hits both
alike, and the best repeat counts (the least disturbed one).
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from uspx.engine.forward import decode_steps, device_of, prefill
from uspx.evaluate.metrics import Runner

PREFILL_PROMPTS = 4
PREFILL_TOKENS = 128
DECODE_PROMPT_TOKENS = 32


def prefill_seconds(runner: Runner, prompts: Sequence[torch.Tensor]) -> float:
    start = time.perf_counter()
    with runner.context():
        for ids in prompts:
            prefill(runner.model, ids, cache=False)
        _sync(runner.model)
    return time.perf_counter() - start


def decode_seconds(runner: Runner, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds for ``new_tokens`` greedy steps with the KV cache (the prefill is not counted)."""
    with runner.context():
        step = prefill(runner.model, prompt)
        _sync(runner.model)
        start = time.perf_counter()
        decode_steps(runner.model, step, new_tokens)
        _sync(runner.model)
        return time.perf_counter() - start


def _sync(model: torch.nn.Module) -> None:
    """Wait for a GPU's queued kernels, so the clock reads when the work is done, not queued."""
    device = device_of(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TorchTimer:
    """A transformers model timed on token lists, as :func:`rates` times every model."""

    def __init__(self, runner: Runner):
        self.runner = runner

    def prefill_seconds(self, prompts: Sequence[Sequence[int]]) -> float:
        return prefill_seconds(self.runner, [torch.tensor([list(p)]) for p in prompts])

    def decode_seconds(self, prompt: Sequence[int], new_tokens: int) -> float:
        return decode_seconds(self.runner, torch.tensor([list(prompt)]), new_tokens)


def prompts_of(token_lists: Sequence[Sequence[int]]) -> list[list[int]]:
    """The prompts timed: the first few with at least 2 tokens, cut to :data:`PREFILL_TOKENS`."""
    return [list(t)[:PREFILL_TOKENS] for t in token_lists if len(t) >= 2][:PREFILL_PROMPTS]


def rates(timers: dict, prompts: list[list[int]], new_tokens: int, repeats: int, **settings) -> dict:
    """Tokens per second (prefill and decode, best of ``repeats``) for each timer (an object with
    :class:`TorchTimer`'s two methods); ``settings`` are added to the record's settings."""
    decode_prompt = prompts[0][:DECODE_PROMPT_TOKENS]
    best = {name: {"prefill": float("inf"), "decode": float("inf")} for name in timers}
    for t in timers.values():  # warm-up: first calls allocate and pick kernels
        t.prefill_seconds(prompts[:1])
    for _ in range(repeats):
        for name, t in timers.items():
            best[name]["prefill"] = min(best[name]["prefill"], t.prefill_seconds(prompts))
            best[name]["decode"] = min(best[name]["decode"], t.decode_seconds(decode_prompt, new_tokens))
    n_prefill = sum(len(p) for p in prompts)
    out: dict = {
        "settings": {"prefill_prompts": len(prompts), "prefill_tokens": n_prefill, "decode_tokens": new_tokens,
                     "decode_prompt_tokens": len(decode_prompt), "repeats": repeats, **settings,
                     "measure": "best of repeats, models alternating"},
    }
    for name, b in best.items():
        out[name] = {"prefill_tokens_per_s": n_prefill / b["prefill"], "decode_tokens_per_s": new_tokens / b["decode"]}
    return out


def measure(runners: dict[str, Runner], token_lists: Sequence[Sequence[int]], *, new_tokens: int = 32,
            repeats: int = 3) -> dict:
    """Tokens per second (prefill and decode, best of ``repeats``) for each runner."""
    prompts = prompts_of(token_lists)
    if not prompts:
        return {"skipped": "no prompt with at least 2 tokens"}
    timers = {name: TorchTimer(r) for name, r in runners.items()}
    return rates(timers, prompts, new_tokens, repeats, threads=torch.get_num_threads())
