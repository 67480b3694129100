"""Section 3, generation dynamics: greedy decoding with the routing of every step recorded.

Step by step with the KV cache (the engine's prefill and decode steps): step 0 runs the prompt,
every later step feeds the token just generated, and the RoutingRecorder keeps the routing of the
single new position. Consistency between consecutive steps is the Jaccard overlap of their top-k
sets; a handoff is a change of the highest-WEIGHT expert; a layer's stability is the share of steps without a handoff. Chance levels
(two independent draws from the layer's own usage) are reported beside them, since a layer that
always uses the same few experts is "stable" without any memory.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from uspx.analyze.stats import bootstrap_ratio
from uspx.engine.forward import decode_step, prefill
from uspx.models.base import MoEAdapter
from uspx.trace.capture import RoutingRecorder


@torch.no_grad()
def generate_routing(lm, adapter: MoEAdapter, prompt_ids: list[int], new_tokens: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Greedy decoding; returns ids [S, L, k], weights [S, L, k] per step and the generated tokens."""
    layers = [l.index for l in adapter.layers]
    ids_steps, w_steps, out = [], [], []
    eos = getattr(lm.model.config, "eos_token_id", None)
    eos = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    step = None
    with RoutingRecorder(adapter) as rec:
        for _ in range(new_tokens):
            rec.clear()
            step = prefill(lm, torch.tensor([prompt_ids])) if step is None else decode_step(lm, step)
            ids_steps.append(np.stack([rec.layers[l].index[-1].numpy() for l in layers]))
            w_steps.append(np.stack([rec.layers[l].weights[-1].float().numpy() for l in layers]))
            nxt = int(step.next_ids[0, 0])
            out.append(nxt)
            if nxt in eos:
                break
    return np.stack(ids_steps), np.stack(w_steps), out


def dynamics(lm, adapter: MoEAdapter, items, new_tokens: int = 32) -> dict:
    L, E = len(adapter.layers), adapter.num_experts
    layers = [l.index for l in adapter.layers]
    jac_sum, same_sum, steps = [], [], []  # per prompt: [L] sums over consecutive step pairs
    top1_hist = np.zeros((L, E))
    set_hist = np.zeros((L, E))
    handoffs: Counter = Counter()
    for it in items:
        ids, w, _ = generate_routing(lm, adapter, it.input_ids, new_tokens)
        top1 = np.take_along_axis(ids, w.argmax(-1)[..., None], -1)[..., 0]  # [S, L]
        for l in range(L):
            top1_hist[l] += np.bincount(top1[:, l], minlength=E)
            set_hist[l] += np.bincount(ids[:, l].ravel(), minlength=E)
        if len(ids) < 2:
            continue
        a, b = ids[:-1], ids[1:]
        inter = (a[..., :, None] == b[..., None, :]).any(-1).sum(-1)  # [S-1, L]
        k = ids.shape[-1]
        jac = inter / (2 * k - inter)
        same = top1[:-1] == top1[1:]
        jac_sum.append(jac.sum(0))
        same_sum.append(same.sum(0))
        steps.append(len(ids) - 1)
        for s, l in zip(*np.nonzero(~same)):
            handoffs[(layers[l], int(top1[s, l]), int(top1[s + 1, l]))] += 1
    if not steps:
        return dict(prompts=len(items), steps=0, note="no prompt produced two steps")
    jac_b = bootstrap_ratio(np.array(jac_sum), np.array(steps, dtype=float))
    same_b = bootstrap_ratio(np.array(same_sum), np.array(steps, dtype=float))
    p1 = top1_hist / top1_hist.sum(1, keepdims=True)
    pk = set_hist / set_hist.sum(1, keepdims=True) * adapter.top_k  # p_active during generation
    n_steps = int(sum(steps))
    return dict(
        prompts=len(items), new_tokens=new_tokens, step_pairs=n_steps, layers=layers,
        jaccard=jac_b["value"], jaccard_lo=jac_b["lo"], jaccard_hi=jac_b["hi"],
        stability=same_b["value"], stability_lo=same_b["lo"], stability_hi=same_b["hi"],
        stability_chance=(p1 ** 2).sum(1), jaccard_chance=_chance_jaccard(pk, adapter.top_k),
        handoffs_per_step=float((1 - same_b["value"]).sum()),
        top_handoffs=[dict(layer=l, src=a, dst=b, count=c) for (l, a, b), c in handoffs.most_common(15)],
    )


def _chance_jaccard(p_active: np.ndarray, k: int) -> np.ndarray:
    """Approximate Jaccard of two independent top-k sets drawn with the layer's p_active."""
    inter = (p_active ** 2).sum(1)  # expected overlap size
    return inter / (2 * k - inter)
