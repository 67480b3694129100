"""Logits and losses of a model larger than memory, layer by layer: to check a pruned checkpoint
against its original restricted to the kept experts, and to measure held-out loss per family.

Both run ``stream_trace`` with a ``head`` (final norm + lm_head on the last hidden states), so they
hold one layer at a time like the trace does, plus lm_head and one chunk of logits.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
import torch

from uspx.stream.trace import stream_trace
from uspx.workload import EncodedItem


def stream_logits(model_dir: str | os.PathLike, sequences: Sequence[Sequence[int]], *,
                  kept: Mapping[int, Sequence[int]] | None = None, dtype: torch.dtype = torch.bfloat16,
                  progress: bool = False) -> np.ndarray:
    """float32 logits [N, V] of every token of ``sequences`` (concatenated); keep N small (V is
    201088 for gpt-oss: 0.8 MB per token)."""
    n = sum(len(s) for s in sequences)
    out: np.ndarray | None = None

    def head(rows: np.ndarray, logits: torch.Tensor) -> None:
        nonlocal out
        if out is None:
            out = np.empty((n, logits.shape[-1]), np.float32)
        out[rows] = logits.numpy()

    stream_trace(model_dir, sequences, lambda i, r: None, layers=[0], record_logits=False, expert_norms=False,
                 kept=kept, dtype=dtype, head=head, progress=progress)
    assert out is not None
    return out


def verify_pruned(original: str | os.PathLike, pruned: str | os.PathLike, kept: Mapping[int, Sequence[int]],
                  sequences: Sequence[Sequence[int]], *, dtype: torch.dtype = torch.float32,
                  progress: bool = False) -> dict:
    """Check a pruned checkpoint two ways: its expert tensors are byte for byte the original's kept
    rows, and its logits equal those of the original restricted to ``kept`` (expert j of the pruned
    model is the j-th smallest kept id, so routing must agree).

    float32 by default: in bf16 the router's matmul over 32 vs 16 rows can round differently, flip
    a near-tie in top-k and move logits for reasons that have nothing to do with the pruning.
    """
    want = stream_logits(original, sequences, kept=kept, dtype=dtype, progress=progress)
    got = stream_logits(pruned, sequences, dtype=dtype, progress=progress)
    diff = float(np.abs(got - want).max())
    top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
    return dict(max_abs_logit_diff=diff, max_abs_logit=float(np.abs(want).max()), top1_agreement=top1,
                tokens=int(want.shape[0]), dtype=str(dtype).replace("torch.", ""),
                expert_tensors_identical=same_expert_bytes(original, pruned, kept))


def same_expert_bytes(original: str | os.PathLike, pruned: str | os.PathLike,
                      kept: Mapping[int, Sequence[int]]) -> bool:
    """Whether every expert tensor of ``pruned`` (MXFP4 blocks and scales, biases, router rows) holds
    exactly the original's rows of the kept experts, compared one expert at a time."""
    from uspx.stream.checkpoint import Checkpoint
    from uspx.stream.prune import _EXPERT_DIM

    src, dst = Checkpoint(original), Checkpoint(pruned)
    try:
        for name in dst.weight_map:
            m = _EXPERT_DIM.match(name)
            if m is None:
                continue
            for j, e in enumerate(sorted(int(x) for x in kept[int(m.group(1))])):
                if not torch.equal(dst.rows(name, j, j + 1), src.rows(name, e, e + 1)):
                    return False
    finally:
        src.close()
        dst.close()
    return True


def stream_item_losses(model_dir: str | os.PathLike, items: Sequence[EncodedItem], *,
                       kept: Mapping[int, Sequence[int]] | None = None, dtype: torch.dtype = torch.bfloat16,
                       progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per item (summed target loss, target tokens), with ``uspx.score.loss``'s definition: targets
    are ``x_j`` for ``max(s, 1) <= j < n``, predicted by the logits at ``j - 1``."""
    items = [e for e in items]
    lengths = [len(e.input_ids) for e in items]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # per token: its item, and the id it must predict (-1 where it predicts nothing counted)
    item_of = np.repeat(np.arange(len(items)), lengths)
    target = np.full(int(offsets[-1]), -1, np.int64)
    for i, e in enumerate(items):
        first = max(e.completion_start, 1)
        for j in range(first, len(e.input_ids)):
            target[offsets[i] + j - 1] = e.input_ids[j]
    loss = np.zeros(len(items))
    count = np.zeros(len(items), np.int64)

    def head(rows: np.ndarray, logits: torch.Tensor) -> None:
        t = target[rows]
        sel = t >= 0
        if not sel.any():
            return
        lp = torch.log_softmax(logits[torch.from_numpy(sel)], dim=-1)
        nll = -lp.gather(1, torch.from_numpy(t[sel])[:, None]).squeeze(1).double().numpy()
        np.add.at(loss, item_of[rows][sel], nll)
        np.add.at(count, item_of[rows][sel], 1)

    stream_trace(model_dir, [e.input_ids for e in items], lambda i, r: None, layers=[0], record_logits=False,
                 expert_norms=False, kept=kept, dtype=dtype, head=head, progress=progress)
    return loss, count


def family_losses(items: Sequence[EncodedItem], loss: np.ndarray, count: np.ndarray) -> dict[str, dict]:
    """Token-weighted loss per family (and "all")."""
    out: dict[str, dict] = {}
    fams = sorted({e.family for e in items})
    for fam in fams + ["all"]:
        idx = [i for i, e in enumerate(items) if fam == "all" or e.family == fam]
        n = int(count[idx].sum())
        out[fam] = dict(loss=float(loss[idx].sum() / n) if n else None, tokens=n, items=len(idx))
    return out
