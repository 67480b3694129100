"""Super experts (Su et al. 2025): experts whose removal alone breaks the model.

Candidates are the experts with the largest routed down-projection outputs (max |f_e(x)| over the
tokens routed to them: the experts that write massive activations). Each is removed alone (banned
in the router, so the next expert takes its slot, as pruning would) and judged by the loss and by
the repetition rate of greedy generation, against a control of the same number of random other
experts removed the same way. Both are also removed as a group.
"""

from __future__ import annotations

import random

import torch

from uspx.models import MoEAdapter
from uspx.superweights.passes import Slice, repetition_rate, run_pass


def _ban(adapter: MoEAdapter, pairs: list[tuple[int, int]]):
    kept: dict[int, list[int]] = {}
    for layer, expert in pairs:
        kept.setdefault(layer, list(range(adapter.num_experts)))
        kept[layer].remove(expert)
    return adapter.restrict(kept)


def super_experts(
    model,
    adapter: MoEAdapter,
    diag: Slice,
    base_loss: float,
    base_rep: float,
    out_stats: dict[tuple[int, int], dict],
    *,
    n_candidates: int,
    gen_prompts: list[list[int]],
    gen_tokens: int,
    pad_id: int,
    break_loss: float,
    break_rep: float,
    control_factor: float,
    seed: int,
    bar=None,
) -> dict:
    ranked = sorted(out_stats.items(), key=lambda kv: -kv[1]["max_abs_out"])
    cands = [k for k, _ in ranked[:n_candidates]]
    pool = [(l.index, e) for l in adapter.layers for e in range(adapter.num_experts) if (l.index, e) not in cands]
    rng = random.Random(seed)
    control = rng.sample(pool, min(len(cands), len(pool)))
    median_out = float(torch.tensor([v["max_abs_out"] for v in out_stats.values()]).median()) if out_stats else 0.0

    def measure(pairs: list[tuple[int, int]]) -> dict:
        with _ban(adapter, pairs):
            loss = run_pass(model, adapter, diag).loss
            rep = repetition_rate(model, gen_prompts, gen_tokens, pad_id) if gen_prompts else 0.0
        if bar is not None:
            bar.advance(1)
        return dict(delta_loss=round(loss - base_loss, 6), repetition_rate=round(rep, 4), delta_repetition=round(rep - base_rep, 4))

    rows = []
    for l, e in cands:
        st = out_stats[(l, e)]
        rows.append(dict(layer=l, expert=e, max_abs_out=round(st["max_abs_out"], 4), out_channel=st["channel"],
                         ratio_to_median=round(st["max_abs_out"] / max(median_out, 1e-12), 3), tokens=st["tokens"],
                         **measure([(l, e)])))
    ctrl = [dict(layer=l, expert=e, max_abs_out=round(out_stats.get((l, e), {}).get("max_abs_out", 0.0), 4), **measure([(l, e)]))
            for l, e in control]
    joint = measure(cands) if cands else None
    joint_ctrl = measure(control) if control else None
    ctrl_max = max([c["delta_loss"] for c in ctrl], default=0.0)
    for r in rows:
        breaks = r["delta_loss"] >= break_loss or r["delta_repetition"] >= break_rep
        beats = r["delta_loss"] >= control_factor * max(ctrl_max, 1e-3)
        r["breaks_model"] = bool(breaks)
        r["beats_control"] = bool(beats)
        r["is_super_expert"] = bool(breaks and beats)
    return dict(
        method="candidates: largest max |f_e(x)| over routed tokens; removal: router ban (restrict), alone and as a group",
        criteria=dict(break_loss=break_loss, break_repetition=break_rep, control_factor=control_factor),
        baseline=dict(loss=round(base_loss, 6), repetition_rate=round(base_rep, 4)),
        median_max_abs_out=round(median_out, 4),
        candidates=rows,
        control=ctrl,
        joint=dict(candidates=joint, control=joint_ctrl),
        super_experts=[dict(layer=r["layer"], expert=r["expert"]) for r in rows if r["is_super_expert"]],
    )
