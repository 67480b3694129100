"""``uspx channels`` and ``uspx heads``: narrow a model to the units that carry the user's workload,
then measure what that costs.

Each command scores its units on the workload's calibration items (``uspx.score.units``), writes the
narrowed checkpoint and verifies it against the masked original (``uspx.prune.channels`` and
``uspx.prune.heads``), then evaluates it against the original on the held-out items
(``uspx.evaluate``). Evaluation sits above pruning, so the two meet here rather than in either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from uspx.engine.batches import pad_id_of
from uspx.evaluate import evaluate
from uspx.models import LoadedModel, adapter_for, load_model
from uspx.plan import parse_keep
from uspx.prune.channels import channel_scores, kept_channels, masked, narrowed, save_verified
from uspx.prune.heads import group_heads, group_scores, kept_groups, kv_bytes_per_token, masked_heads, narrowed_heads
from uspx.workload import EncodedItem, Workload, default_max_length, encode, load_workload


def heldout_deltas(lm: LoadedModel, workload: Workload) -> Callable[[Path], dict]:
    """A measure of a written folder: its held-out loss delta against ``lm``, per family and "all"."""

    def measure(folder: Path) -> dict:
        ev = evaluate(lm, folder, workload, speed=False)
        return {f: v["delta"] for f, v in {**ev["families"], "all": ev["overall"]}.items()}

    return measure


def _calibration(lm: LoadedModel, workload, max_length: int | None) -> tuple[Workload, list[EncodedItem]]:
    wl = load_workload(workload)
    items = encode(wl.part("calibration"), lm.tokenizer, max_length or default_max_length(lm.model.config))
    return wl, items


def export_channels(model, workload, out_dir: str | Path, *, width: int | str, max_length: int | None = None,
                    progress: bool = True) -> dict:
    """Score the channels on ``workload``'s calibration items, keep ``width`` per expert (a count or
    a share like ``75%``), export, verify against the masked model and evaluate on held-out items."""
    lm = load_model(model)
    full = adapter_for(lm.model).expert_width()
    n = parse_keep(width, full)
    wl, items = _calibration(lm, workload, max_length)
    kept = kept_channels(channel_scores(lm.model, items, pad_id_of(lm.tokenizer)), n)
    return save_verified(lm, narrowed(lm.model, kept), masked(lm.model, kept), heldout_deltas(lm, wl), out_dir, dict(
        format="uspx-channels/1", width=n, original_width=full, kept={str(l): v.tolist() for l, v in kept.items()}))


def export_heads(model, workload, out_dir: str | Path, *, groups: int | str, max_length: int | None = None) -> dict:
    """Score KV groups on ``workload``'s calibration items, keep ``groups`` per layer (a count or
    a share), export, verify against the masked model and evaluate on held-out items."""
    lm = load_model(model)
    n_heads, kv, _ = adapter_for(lm.model).head_shape()
    n = parse_keep(groups, kv)
    wl, items = _calibration(lm, workload, max_length)
    kept = kept_groups(group_scores(lm.model, items, pad_id_of(lm.tokenizer)), n)
    heads = group_heads(kept, n_heads // kv)
    narrow = narrowed_heads(lm.model, heads)
    kv_bytes = dict(original=kv_bytes_per_token(lm.model.config), narrowed=kv_bytes_per_token(narrow.config))
    return save_verified(lm, narrow, masked_heads(lm.model, heads), heldout_deltas(lm, wl), out_dir, dict(
        format="uspx-heads/1", kv_groups=n, original_kv_groups=kv, kept={str(i): v.tolist() for i, v in enumerate(kept)},
        kv_bytes_per_token=kv_bytes))
