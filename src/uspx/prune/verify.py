"""Checks an export must pass before it is reported done: logits and size."""

from __future__ import annotations

from typing import Sequence

import torch

from uspx.engine import WeightSource, make_batches, run
from uspx.engine.observers import Logits
from uspx.engine.pair import LayerStep, run_pair
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
    diff = _LogitDiff()
    for a, b in zip(want.per_item, got.per_item):
        diff.pair_logits(None, a, b)
    return diff.record(len(items))


class _LogitDiff:
    """The largest |teacher - candidate| logit (and teacher logit, and argmax agreement) of a pair run."""

    def __init__(self) -> None:
        self.worst, self.scale, self.agree, self.tokens = 0.0, 0.0, 0, 0

    def pair_logits(self, batch, teacher: torch.Tensor, candidate: torch.Tensor, start: int = 0) -> None:
        self.worst = max(self.worst, (teacher - candidate).abs().max().item())
        self.scale = max(self.scale, teacher.abs().max().item())
        self.agree += int((teacher.argmax(-1) == candidate.argmax(-1)).sum())
        self.tokens += teacher.shape[0]

    def record(self, prompts: int) -> dict:
        return {"prompts": prompts, "tokens": self.tokens, "max_abs_logit_diff": self.worst,
                "max_abs_logit": self.scale, "argmax_agreement": self.agree / self.tokens}


def compare_layers(reference: WeightSource, kept: dict[int, list[int]], exported: WeightSource,
                   items: list[EncodedItem]) -> dict:
    """Every decoder layer of ``exported`` run on the inputs ``reference`` (restricted to ``kept``)
    gives its own layer, compared with that layer's output; then both LM heads on the last layer's.

    An export whose matrices are narrower than the original's sums its products in another order,
    so float32 rounding differs a little in every layer, and run end to end those differences grow
    layer after layer (gpt-oss-20b's 24 layers: 0.02 on logits of 6, for a cut that is exact). Fed
    the original's own inputs, each layer is judged alone: the difference left is one layer's
    rounding, while a wrong slice still changes that layer's output by the slice's whole share.
    Returns, per layer but the last (whose output reaches the logits), the largest difference
    (``max_abs_hidden_diff``) and the largest value of the original's output (``max_abs_hidden``),
    and the logits' figures as :func:`compare_logits` gives them."""
    per_layer: list[float] = []
    scale: list[float] = []
    previous: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def forced(step: LayerStep) -> None:
        if step.index > 0:
            per_layer.append(max((step.inputs(b) - previous[b.slot]).abs().max().item() for b in step.batches))
            scale.append(max(previous[b.slot].abs().max().item() for b in step.batches))
            for b in step.batches:
                step.set_inputs(b, previous[b.slot])
        for b in step.batches:
            previous[b.slot] = step.targets(b).clone()

    diff = _LogitDiff()
    with reference.adapter.restrict(kept):
        run_pair(reference, exported, make_batches(items, len(items)), [diff], fit=forced, progress=False)
    return {**diff.record(len(items)), "max_abs_hidden_diff": per_layer, "max_abs_hidden": scale,
            "teacher_forced": True}


def within_tolerance(check: dict, tolerance: float) -> bool:
    """Whether a comparison's logits differ by at most ``tolerance``, and each teacher-forced layer's
    output by at most ``tolerance`` times its scale (at least 1): residual streams run far larger
    than logits. False for NaN."""
    layers = zip(check.get("max_abs_hidden_diff", []), check.get("max_abs_hidden", []))
    return check["max_abs_logit_diff"] <= tolerance and all(d <= tolerance * max(1.0, s) for d, s in layers)


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
