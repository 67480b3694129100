"""Prefill and decode throughput of teacher and candidate, measured in one run on one machine.

Short by design (a few prompts, 32 greedy tokens): enough to compare two models side by side, not a
benchmark. Repeats alternate between the two models so that load from other processes hits both
alike, and the best repeat counts (the least disturbed one).
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from uspx.evaluate.metrics import Runner

PREFILL_PROMPTS = 4
PREFILL_TOKENS = 128
DECODE_PROMPT_TOKENS = 32


@torch.no_grad()
def prefill_seconds(runner: Runner, prompts: Sequence[torch.Tensor]) -> float:
    start = time.perf_counter()
    with runner.context():
        for ids in prompts:
            runner.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - start


@torch.no_grad()
def decode_seconds(runner: Runner, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds for ``new_tokens`` greedy steps with the KV cache (the prefill is not counted)."""
    with runner.context():
        out = runner.model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        past, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = runner.model(input_ids=nxt, cache=past, use_cache=True)
            past, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        return time.perf_counter() - start


def measure(runners: dict[str, Runner], token_lists: Sequence[Sequence[int]], *, new_tokens: int = 32,
            repeats: int = 3) -> dict:
    """Tokens per second (prefill and decode, best of ``repeats``) for each runner."""
    prompts = [torch.tensor([list(t)[:PREFILL_TOKENS]]) for t in token_lists if len(t) >= 2][:PREFILL_PROMPTS]
    if not prompts:
        return {"skipped": "no prompt with at least 2 tokens"}
    decode_prompt = prompts[0][:, :DECODE_PROMPT_TOKENS]
    n_prefill = sum(p.shape[1] for p in prompts)
    best = {name: {"prefill": float("inf"), "decode": float("inf")} for name in runners}
    for name, r in runners.items():  # warm-up: first calls allocate and pick kernels
        prefill_seconds(r, prompts[:1])
    for _ in range(repeats):
        for name, r in runners.items():
            best[name]["prefill"] = min(best[name]["prefill"], prefill_seconds(r, prompts))
            best[name]["decode"] = min(best[name]["decode"], decode_seconds(r, decode_prompt, new_tokens))
    out: dict = {
        "settings": {"prefill_prompts": len(prompts), "prefill_tokens": n_prefill, "decode_tokens": new_tokens,
                     "decode_prompt_tokens": int(decode_prompt.shape[1]), "repeats": repeats,
                     "threads": torch.get_num_threads(), "measure": "best of repeats, models alternating"},
    }
    for name, b in best.items():
        out[name] = {"prefill_tokens_per_s": n_prefill / b["prefill"], "decode_tokens_per_s": new_tokens / b["decode"]}
    return out
