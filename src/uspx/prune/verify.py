"""Checks an export must pass before it is reported done: logits and size."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from uspx.io import UspxError
from uspx.models import adapter_for

DEFAULT_PROMPTS = (
    "def parse_args(argv):\n    parser = argparse.ArgumentParser(",
    "$ find . -name '*.py' | xargs grep -n TODO",
    "The module provides functions for working with dates and times.",
)
MAX_PROMPT_TOKENS = 64


def prompt_ids(tokenizer, prompts: Sequence[str] | None, vocab_size: int) -> list[torch.Tensor]:
    """Token ids of the verification prompts; without a tokenizer, fixed pseudo-random ids."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab_size, (1, 24), generator=g) for _ in range(len(prompts or DEFAULT_PROMPTS))]
    out = []
    for text in prompts or DEFAULT_PROMPTS:
        ids = tokenizer.encode(text, add_special_tokens=False)[:MAX_PROMPT_TOKENS]
        if ids:
            out.append(torch.tensor([ids]))
    if not out:
        raise UspxError("no verification prompt has any token")
    return out


@torch.no_grad()
def compare_logits(reference: nn.Module, kept: dict[int, list[int]], exported_dir: Path,
                   ids: list[torch.Tensor]) -> dict:
    """Max |logits| difference between ``reference`` restricted to ``kept`` and the export reloaded
    with stock ``AutoModelForCausalLM.from_pretrained`` (both fp32), over every prompt position."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(exported_dir, dtype=torch.float32, use_safetensors=True)
    reloaded.eval()
    worst, scale, agree, tokens = 0.0, 0.0, 0, 0
    with adapter_for(reference).restrict(kept):
        for x in ids:
            a = reference(input_ids=x).logits.float()
            b = reloaded(input_ids=x).logits.float()
            worst = max(worst, (a - b).abs().max().item())
            scale = max(scale, a.abs().max().item())
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            tokens += x.numel()
    return {"prompts": len(ids), "tokens": tokens, "max_abs_logit_diff": worst, "max_abs_logit": scale,
            "argmax_agreement": agree / tokens}


def check_size(actual: int, predicted: int | None, tolerance: float, context: str = "") -> dict:
    """Actual tensor bytes vs the prediction; an error, with both numbers, beyond ``tolerance``."""
    if predicted is None:
        return {"actual_bytes": actual, "predicted_bytes": None, "relative_error": None}
    if predicted <= 0:
        raise UspxError(f"predicted size must be positive, got {predicted}")
    rel = (actual - predicted) / predicted
    if abs(rel) > tolerance:
        raise UspxError(
            f"exported weights take {actual} bytes on disk but {predicted} were predicted "
            f"({100 * rel:+.2f}%, tolerance {100 * tolerance:.0f}%){context}; the prediction was made for "
            "another precision or model, or the export is wrong"
        )
    return {"actual_bytes": actual, "predicted_bytes": predicted, "relative_error": rel}
