"""A dense student built from the user's own experts.

A sum of M experts with fixed weights is one MLP of M times the width: the experts' channels side
by side (gate and up rows concatenated), each expert's down projection scaled by its weight, the
down biases summed with the same weights. So every MoE layer of the original becomes one MLP made
of the M experts that carry the user's work there, and the student computes exactly "these M
experts always on, with these weights".

The student is saved as the original's own family with one expert per layer, chosen top-1: that
family's routing gives a single chosen expert the weight 1 whatever its router says, so the layer is
the dense MLP, every runtime that loads the family loads it, and attention, norms and embeddings are
the original's tensors unchanged. Its router (one row of zeros per layer) costs ``hidden_size``
numbers per layer.

Weights per expert, from the user's calibration tokens (``weighting``):

- ``routed``: the mean routing weight the expert gets per token (0 where it is not chosen): the
  first-order match of ``E[sum_e g_e(x) f_e(x)]`` by ``sum_e E[g_e] f_e(x)``;
- ``router``: the mean of the router's softmax over all experts (what the router would give every
  expert if it did not pick).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from uspx.io import UspxError
from uspx.models import MoEAdapter, adapter_for
from uspx.workload import EncodedItem

WEIGHTINGS = ("routed", "router")


@dataclass
class RoutingStats:
    """Per MoE layer, over the user's tokens: mean routing weight and mean router softmax per expert."""

    tokens: int
    routed: dict[int, np.ndarray]  # layer -> [E]
    router: dict[int, np.ndarray]  # layer -> [E]


@dataclass
class ExpertChoice:
    """The experts each student layer is made of (best first) and their fixed weights."""

    experts: dict[int, list[int]]
    weights: dict[int, list[float]]
    weighting: str

    @property
    def per_layer(self) -> int:
        return len(next(iter(self.experts.values())))


def routing_stats(model: nn.Module, items: list[EncodedItem], pad_id: int = 0, progress: bool = False) -> RoutingStats:
    """Run ``model`` over ``items`` once and average its routing per (layer, expert)."""
    from uspx.engine import InMemory, make_batches, run
    from uspx.engine.observers import Routing

    n = sum(len(e.input_ids) for e in items)
    routing = Routing(n, logits=True)
    run(InMemory(model), make_batches(items, 8, pad_id), [routing], progress=progress, label="routing statistics")
    routed, router = {}, {}
    for layer, arrays in routing.layers.items():
        e = arrays["router_logits"].shape[1]
        sums = np.zeros(e)
        np.add.at(sums, arrays["expert_ids"].reshape(-1), arrays["expert_weights"].reshape(-1))
        routed[layer] = sums / n
        logits = torch.from_numpy(arrays["router_logits"]).double()
        router[layer] = torch.softmax(logits, dim=-1).mean(0).numpy()
    return RoutingStats(n, routed, router)


def choose_experts(ranking: dict[int, np.ndarray], stats: RoutingStats, per_layer: int,
                   weighting: str = "routed") -> ExpertChoice:
    """The ``per_layer`` best experts of every layer by ``ranking`` (a score per expert, higher is
    better), weighted by ``stats``."""
    if weighting not in WEIGHTINGS:
        raise UspxError(f"weighting must be one of {', '.join(WEIGHTINGS)}, not {weighting!r}")
    experts, weights = {}, {}
    for layer, values in sorted(ranking.items()):
        if not 1 <= per_layer <= len(values):
            raise UspxError(f"--experts-per-layer {per_layer} outside 1..{len(values)}")
        order = np.argsort(-np.asarray(values), kind="stable")[:per_layer]
        experts[layer] = [int(e) for e in order]
        table = stats.routed if weighting == "routed" else stats.router
        weights[layer] = [float(table[layer][e]) for e in order]
    return ExpertChoice(experts, weights, weighting)


def build_student(model: nn.Module, choice: ExpertChoice) -> nn.Module:
    """The dense student of ``model`` (float32, eval mode): every MoE layer one MLP of the chosen
    experts, every other tensor the original's."""
    from uspx.models.loading import model_from_state

    adapter: MoEAdapter = adapter_for(model)
    missing = sorted({l.index for l in adapter.layers} - set(choice.experts))
    if missing:
        raise UspxError(f"no experts chosen for MoE layers {missing}")
    width = choice.per_layer * adapter.expert_width()
    config = adapter.student_config(adapter.config, width)
    state = {n: t for n, t in model.state_dict().items() if adapter.pruned_with_expert(n) is None}
    for layer in adapter.layers:
        merged = adapter.merged_experts(layer, choice.experts[layer.index], choice.weights[layer.index])
        state.update({f"{layer.name}.experts.{n}": t for n, t in merged.items()})
        for name in adapter.router_expert_params:
            original = model.get_parameter(f"{layer.name}.{adapter.router_attr}.{name}")
            state[f"{layer.name}.{adapter.router_attr}.{name}"] = torch.zeros((1, *original.shape[1:]), dtype=original.dtype)
    return model_from_state(config, state, torch.float32)


def channel_groups(student: nn.Module, groups: int) -> list[list[tuple[torch.nn.Parameter, int, torch.Tensor]]]:
    """Each student layer's channels split into ``groups`` equal blocks (one per source expert): per
    block, the (parameter, dim, positions) that hold its channels (for group lasso)."""
    adapter = adapter_for(student)
    out = []
    for layer in adapter.layers:
        width = adapter.expert_width()
        if width % groups:
            raise UspxError(f"student width {width} is not a multiple of {groups} groups")
        layout = adapter.channel_layout(layer, width)
        size = width // groups
        for g in range(groups):
            channels = torch.arange(g * size, (g + 1) * size)
            out.append([(getattr(layer.experts, n), dim, index[channels].reshape(-1)) for n, (dim, index) in layout.items()])
    return out


def group_norms(groups) -> torch.Tensor:
    return torch.stack([
        torch.sqrt(sum(p.detach().index_select(dim, idx).float().pow(2).sum() for p, dim, idx in g)) for g in groups
    ])


def group_lasso_step(groups, strength: float) -> None:
    """Proximal step of ``strength * sum_g ||W_g||_2``: every group shrinks by ``strength`` in norm,
    and one whose norm is below it becomes exactly zero (structured zeros, which plain gradient
    steps on the penalty never reach)."""
    norms = group_norms(groups)
    with torch.no_grad():
        for g, norm in zip(groups, norms):
            scale = float(torch.clamp(1 - strength / norm.clamp_min(1e-12), min=0.0))
            for p, dim, idx in g:
                p.index_copy_(dim, idx, p.index_select(dim, idx) * scale)
