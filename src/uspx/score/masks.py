"""Learned expert masks: which experts to keep under a per-layer budget, learned jointly.

Every MoE layer gets a vector ``log_alpha`` [E] of hard-concrete gate parameters (defined below). A
router forward hook adds ``log(z)`` to the router's logits, ``z`` the layer's gates (``-inf`` where
a gate is exactly 0, so a closed expert is never chosen), and routes again with the family's own
rule (:meth:`MoEAdapter.route`). With a softmax router this scales each expert's routing
probability by its gate and renormalises, so a gate in (0, 1) turns an expert down smoothly and a
gate of 0 removes it as pruning does; with other routers (sigmoid scores, sparsemixer) it is a
monotone turn-down of the same kind.

The model stays frozen (no weight gradients). Each step: the ungated model's logits at the target
positions (the teacher, no gradients), then the gated model with one hard-concrete sample of the
gates, and the loss ``kd_loss(student, teacher, tau) + sum_l lagrangian(E[open_l], keep, l1_l, l2_l)``
with ``E[open_l] = sum_e P(gate_le != 0)``. Adam descends in ``log_alpha`` and ascends in the
lambdas (``maximize=True``), so the expected number of open gates per layer is driven to ``keep``
while the gates that matter least to the output close first. The kept set of a layer is its
``keep`` largest ``log_alpha`` (ties: lower expert id); ``P(gate open)`` is the score uspx's
selection ranks.

Batches follow recovery's (``uspx.engine.batches.batch_of_step``): the batch of a step is a function
of the step and the seed alone, the gate noise comes from a generator seeded with ``seed``; with one
thread a run is deterministic.

Hard-concrete gates (Louizos et al., 2018): ``u ~ U(0, 1)``,
``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``, stretched to ``(gamma, zeta)`` and clamped
to [0, 1]; ``P(gate != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))``. The Lagrangian term
``lambda_1 * (E[n] - n_target) + lambda_2 * (E[n] - n_target)^2`` drives the expected number of open
gates to the target; the lambdas are maximised (gradient ascent) while the gates minimise.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch
from torch import nn

from uspx.engine.batches import batch_of_step
from uspx.engine.forward import frozen, logits as target_logits
from uspx.engine.hooks import forward_hook, pre_hook, register
from uspx.engine.losses import kd_loss, layer_loss
from uspx.engine.observers import Observer, block_output
from uspx.io import UspxError
from uspx.models import adapter_for
from uspx.models.base import MoEAdapter, MoELayer, Restriction
from uspx.progress import progress_bar
from uspx.workload import EncodedItem

INIT_LOG_ALPHA = 3.0  # P(gate open) ~ 0.99 at the start: every expert starts (almost surely) in
HISTORY_POINTS = 50  # at most this many entries per curve in the returned history
BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1  # the hard-concrete constants of Louizos et al.


def hard_concrete(log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One sample of the gates (differentiable in ``log_alpha``)."""
    u = torch.rand(log_alpha.shape, generator=generator).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def gate_open_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """``P(gate != 0)``: the expected number of open gates is its sum."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


def lagrangian(expected: torch.Tensor, target: float, lambda_1: torch.Tensor, lambda_2: torch.Tensor) -> torch.Tensor:
    """``lambda_1 * (E[n] - target) + lambda_2 * (E[n] - target)^2``: minimised in the gates,
    maximised in the lambdas (their gradients are ascended)."""
    gap = expected - target
    return lambda_1 * gap + lambda_2 * gap * gap


def gate_hook(adapter: MoEAdapter, layer: MoELayer, gates: Callable[[], torch.Tensor | None]) -> Callable:
    """A router forward hook that adds ``log(z)`` to the router logits and routes again with the
    family's rule; ``z = gates()`` [E] in [0, 1], read at each call (``None``: leave the output
    as it is, the ungated model). Gradients flow to ``z`` wherever ``z > 0``."""

    def hook(module: nn.Module, args: tuple, output: object) -> object:
        z = gates()
        if z is None:
            return output
        logits = adapter.router_logits(output)
        z = z.to(device=logits.device, dtype=torch.float32)
        log_z = torch.where(z > 0, torch.log(z.clamp_min(1e-30)), torch.full_like(z, float("-inf")))
        gated = (logits.float() + log_z).to(logits.dtype)
        if not adapter.router_returns_tuple:
            return gated
        weights, index = adapter.route(layer, gated)
        return (gated, weights, index)

    return hook


def gate(model: nn.Module, gates: dict[int, Callable[[], torch.Tensor | None]]) -> Restriction:
    """Register :func:`gate_hook` on the routers of the MoE layers in ``gates`` (layer index ->
    a callable giving that layer's gates), prepended like :meth:`MoEAdapter.restrict` so that
    transformers' recorders and uspx's tracer see the gated routing. ``remove()`` (or a ``with``
    block) undoes it."""
    adapter = adapter_for(model)
    handles = []
    for layer in adapter.layers:
        if layer.index in gates:
            handles.append(register(forward_hook(layer.router, gate_hook(adapter, layer, gates[layer.index]),
                                                 prepend=True)))
    return Restriction(handles)


def sample_gates(log_alpha: torch.Tensor, top_k: int, generator: torch.Generator, tries: int = 100) -> torch.Tensor:
    """One hard-concrete sample [L, E] in which every layer has at least ``top_k`` open gates.

    A layer's sample with fewer is drawn again (the gates are then conditioned on describing a
    model the router can fill its k slots in, as every kept set must); after ``tries`` draws the
    ``top_k`` largest ``log_alpha`` of the last draw are opened to at least 1e-3. Without this a
    layer with every gate at 0 would route nowhere (NaN weights)."""
    rows = []
    for r in range(log_alpha.shape[0]):
        for _ in range(tries):
            z = hard_concrete(log_alpha[r], generator)
            if int((z > 0).sum()) >= top_k:
                break
        else:
            force = torch.zeros(z.shape, dtype=torch.bool)
            force[torch.topk(log_alpha[r].detach(), top_k).indices] = True
            z = torch.where(force, z.clamp_min(1e-3), z)
        rows.append(z)
    return torch.stack(rows)


def kept_from_log_alpha(log_alpha: torch.Tensor, layers: Sequence[int], keep: int) -> dict[int, list[int]]:
    """Each layer's ``keep`` largest ``log_alpha`` (ties: lower expert id), ids sorted."""
    out = {}
    for row, index in zip(log_alpha.detach().cpu().double(), layers):
        order = sorted(range(len(row)), key=lambda e: (-float(row[e]), e))
        out[int(index)] = sorted(order[:keep])
    return out


def _outcome(log_alpha: torch.Tensor, layers: list[int], keep: int) -> dict:
    """The history's kept sets and expected open gates per layer of learned ``log_alpha`` [L, E]."""
    return dict(kept={str(l): v for l, v in kept_from_log_alpha(log_alpha, layers, keep).items()},
                expected_open=[round(float(x), 4) for x in gate_open_probability(log_alpha).sum(-1)])


def learn_masks(
    model: nn.Module,
    items: Sequence[EncodedItem],
    keep: int,
    *,
    steps: int = 200,
    lr: float = 0.05,
    lambda_lr: float = 0.05,
    batch_size: int = 8,
    tau: float = 1.0,
    seed: int = 0,
    pad_id: int = 0,
    progress: bool = True,
    init_log_alpha: float = INIT_LOG_ALPHA,
) -> tuple[torch.Tensor, dict]:
    """Learn hard-concrete expert gates so that ``keep`` experts per MoE layer stay open.

    Returns ``log_alpha`` [L, E] (rows in the adapter's layer order, CPU float32) and the history:
    the settings, the seconds, the MoE layer indices, the kept sets (each layer's ``keep`` largest
    ``log_alpha``), the final expected open gates and lambdas per layer, and at most
    :data:`HISTORY_POINTS` samples of the KD loss and of the mean expected open count per step.
    The model's weights are left as they were (``requires_grad`` flags restored).
    """
    adapter = adapter_for(model)
    n_layers, n_exp, top_k = len(adapter.layers), adapter.num_experts, adapter.top_k
    if not top_k <= keep <= n_exp:
        raise UspxError(f"learned masks keep {keep} experts per layer; it must be in {top_k}..{n_exp} (top-k..experts)")
    if steps < 1 or batch_size < 1 or tau <= 0 or lr <= 0 or lambda_lr <= 0:
        raise UspxError("learned masks need steps and batch size >= 1, and tau and learning rates > 0")
    items = list(items)
    if not items:
        raise UspxError("learned masks need at least one calibration item")

    log_alpha = torch.full((n_layers, n_exp), float(init_log_alpha), requires_grad=True)
    lambdas = torch.zeros((2, n_layers), requires_grad=True)  # lambda_1, lambda_2 per layer
    # descends in the gates, ascends in the lambdas
    opt = torch.optim.Adam([dict(params=[log_alpha], lr=lr), dict(params=[lambdas], lr=lambda_lr, maximize=True)])
    generator = torch.Generator().manual_seed(seed)

    was_training = model.training
    current: dict[str, torch.Tensor | None] = {"z": None}
    rows = {layer.index: r for r, layer in enumerate(adapter.layers)}

    def gates_of(r: int) -> Callable[[], torch.Tensor | None]:
        return lambda: None if current["z"] is None else current["z"][r]

    kd_curve, open_curve = [], []
    every = max(1, math.ceil(steps / HISTORY_POINTS))
    started = time.perf_counter()
    with frozen(model.parameters()):
        model.eval()  # deterministic routing (phimoe samples in train mode), no dropout
        hooks = gate(model, {index: gates_of(r) for index, r in rows.items()})
        try:
            with progress_bar("learning masks", total=steps, unit="steps", enabled=progress) as bar:
                for step in range(steps):
                    batch = batch_of_step(items, step, batch_size, seed, pad_id)
                    current["z"] = None
                    teacher = target_logits(model, batch)
                    current["z"] = sample_gates(log_alpha, top_k, generator)
                    student = target_logits(model, batch, grad=True)
                    current["z"] = None
                    kd = kd_loss(student, teacher.to(student.device), tau).cpu()
                    expected = gate_open_probability(log_alpha).sum(-1)  # [L]
                    penalty = lagrangian(expected, float(keep), lambdas[0], lambdas[1]).sum()
                    opt.zero_grad(set_to_none=True)
                    (kd + penalty).backward()
                    opt.step()
                    done, kd_now, open_now = step + 1, float(kd.detach()), float(expected.detach().mean())
                    if done % every == 0 or done == steps:
                        kd_curve.append([done, round(kd_now, 6)])
                        open_curve.append([done, round(open_now, 4)])
                    bar.advance()
                    bar.describe(f"learning masks (kd {kd_now:.4f}, open {open_now:.2f})")
        finally:
            current["z"] = None
            hooks.remove()
            model.train(was_training)

    final = log_alpha.detach().clone()
    layers = [layer.index for layer in adapter.layers]
    history = dict(
        keep=int(keep), steps=int(steps), lr=lr, lambda_lr=lambda_lr, batch_size=int(batch_size), tau=tau,
        seed=int(seed), init_log_alpha=float(init_log_alpha), seconds=round(time.perf_counter() - started, 3),
        layers=layers, **_outcome(final, layers, keep),
        lambda_1=[round(float(x), 6) for x in lambdas[0].detach()],
        lambda_2=[round(float(x), 6) for x in lambdas[1].detach()],
        kd=kd_curve, mean_expected_open=open_curve,
    )
    return final, history


class LayerMasks(Observer):
    """Learned masks one MoE layer at a time (method ``l0_layer``): an engine observer.

    The same gates as :func:`learn_masks` (hard-concrete on the router logits, Lagrangian on the
    expected open count), trained on one layer alone: the loss is the relative squared error of the
    gated MoE block's output against the ungated one on the same inputs (``layer_loss``), on the
    layer's own inputs (the original's hidden states at that layer). It needs one layer's weights
    and its tokens' inputs, so it runs layer by layer from the files like the other local methods.
    ``max_rows`` tokens per layer at most (the first ones met) are kept for training.
    """

    def __init__(self, keep: int, *, steps: int = 200, lr: float = 0.05, lambda_lr: float = 0.05,
                 rows_per_step: int = 256, max_rows: int = 8192, seed: int = 0,
                 init_log_alpha: float = INIT_LOG_ALPHA):
        super().__init__()
        self.keep, self.steps, self.lr, self.lambda_lr = keep, steps, lr, lambda_lr
        self.rows_per_step, self.max_rows, self.seed, self.init = rows_per_step, max_rows, seed, init_log_alpha
        self.log_alpha: dict[int, torch.Tensor] = {}
        self.final_loss: dict[int, float] = {}
        self._inputs: dict[int, list[torch.Tensor]] = {}
        self._layers: dict[int, tuple[MoEAdapter, MoELayer]] = {}

    def attach(self, adapter: MoEAdapter, layer: MoELayer) -> list:
        if not adapter.top_k <= self.keep <= adapter.num_experts:
            raise UspxError(f"learned masks keep {self.keep} experts per layer; it must be in "
                            f"{adapter.top_k}..{adapter.num_experts} (top-k..experts)")
        self._layers[layer.index] = (adapter, layer)
        store = self._inputs.setdefault(layer.index, [])

        def keep_input(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            have = sum(len(t) for t in store)
            if have < self.max_rows:
                x = x.reshape(-1, x.shape[-1])[self.batch.real]
                store.append(x[: self.max_rows - have].detach().clone())

        return [register(pre_hook(layer.block, keep_input, with_kwargs=True))]

    def layer_done(self, index: int) -> None:
        adapter, layer = self._layers[index]
        x = torch.cat(self._inputs.pop(index))
        block = layer.block
        current: dict[str, torch.Tensor | None] = {"z": None}
        hook = register(forward_hook(layer.router, gate_hook(adapter, layer, lambda: current["z"]), prepend=True))
        gen = torch.Generator().manual_seed(self.seed * 100_003 + index)
        log_alpha = torch.full((adapter.num_experts,), float(self.init), requires_grad=True)
        lambdas = torch.zeros(2, requires_grad=True)
        opt = torch.optim.Adam([dict(params=[log_alpha], lr=self.lr),
                                dict(params=[lambdas], lr=self.lambda_lr, maximize=True)])
        try:
            with frozen(block.parameters()):
                with torch.no_grad():
                    y = torch.cat([block_output(block(x[a : a + 4096].unsqueeze(0))).reshape(-1, x.shape[1])
                                   for a in range(0, len(x), 4096)])
                with torch.enable_grad():
                    for _ in range(self.steps):
                        rows = torch.randint(len(x), (min(self.rows_per_step, len(x)),), generator=gen)
                        current["z"] = sample_gates(log_alpha[None], adapter.top_k, gen)[0]
                        out = block_output(block(x[rows].unsqueeze(0))).reshape(len(rows), -1)
                        current["z"] = None
                        loss = layer_loss(out, y[rows])
                        penalty = lagrangian(gate_open_probability(log_alpha).sum(), float(self.keep),
                                             lambdas[0], lambdas[1])
                        opt.zero_grad(set_to_none=True)
                        (loss + penalty).backward()
                        opt.step()
        finally:
            current["z"] = None
            hook.remove()
        self.log_alpha[index] = log_alpha.detach().clone()
        self.final_loss[index] = float(loss.detach())


def layer_masks(source, items: Sequence[EncodedItem], keep: int, *, pad_id: int = 0, batch_size: int = 8,
                steps: int = 200, seed: int = 0, progress: bool = True) -> tuple[torch.Tensor, dict]:
    """``log_alpha`` [L, E] learned layer by layer (:class:`LayerMasks`) on ``source`` (a model in
    memory or a checkpoint read a layer at a time), and the history."""
    from uspx.engine import make_batches, run

    started = time.perf_counter()
    observer = LayerMasks(keep, steps=steps, seed=seed)
    run(source, make_batches(list(items), batch_size, pad_id), [observer], progress=progress, label="learning masks")
    layers = [layer.index for layer in source.adapter.layers]
    log_alpha = torch.stack([observer.log_alpha[l] for l in layers])
    history = dict(keep=int(keep), steps=int(steps), seed=int(seed), layers=layers, objective="layer",
                   seconds=round(time.perf_counter() - started, 3), **_outcome(log_alpha, layers, keep),
                   final_layer_loss=[round(observer.final_loss[l], 6) for l in layers])
    return log_alpha, history
