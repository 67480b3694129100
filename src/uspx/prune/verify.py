"""Checks an export must pass before it is reported done: logits and size."""

from __future__ import annotations

from typing import Sequence

import torch

from uspx.engine import WeightSource, make_batches, run
from uspx.engine.observers import Logits
from uspx.io import UspxError
from uspx.workload import EncodedItem

DEFAULT_PROMPTS = (
    "def parse_args(argv):\n    parser = argparse.ArgumentParser(",
    "$ find . -name '*.py' | xargs grep -n TODO",
    "The module provides functions for working with dates and times.",
)
MAX_PROMPT_TOKENS = 64


def verification_items(tokenizer, prompts: Sequence[str] | None, vocab_size: int) -> list[EncodedItem]:
    """The verification prompts as items scored at every position; without a tokenizer, fixed
    pseudo-random ids."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        seqs = [torch.randint(0, vocab_size, (24,), generator=g).tolist() for _ in range(len(prompts or DEFAULT_PROMPTS))]
    else:
        seqs = [tokenizer.encode(text, add_special_tokens=False)[:MAX_PROMPT_TOKENS] for text in prompts or DEFAULT_PROMPTS]
        seqs = [s for s in seqs if len(s) > 1]
    if not seqs:
        raise UspxError("no verification prompt has two tokens")
    return [EncodedItem(i, f"verify-{i}", "verify", "verify", list(s), 0) for i, s in enumerate(seqs)]


@torch.no_grad()
def compare_logits(reference: WeightSource, kept: dict[int, list[int]], exported: WeightSource,
                   items: list[EncodedItem]) -> dict:
    """Max |logits| difference between ``reference`` restricted to ``kept`` and ``exported``, over
    every scored position of ``items``; both sources compute in float32."""
    want, got = Logits(len(items)), Logits(len(items))
    with reference.adapter.restrict(kept):
        run(reference, make_batches(items, len(items)), [want], progress=False)
    run(exported, make_batches(items, len(items)), [got], progress=False)
    worst, scale, agree, tokens = 0.0, 0.0, 0, 0
    for a, b in zip(want.per_item, got.per_item):
        worst = max(worst, (a - b).abs().max().item())
        scale = max(scale, a.abs().max().item())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        tokens += a.shape[0]
    return {"prompts": len(items), "tokens": tokens, "max_abs_logit_diff": worst, "max_abs_logit": scale,
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
