"""Hooks that record what every MoE router decided during a forward pass.

Hook points (the same in every family, see ``uspx.models.base``): a forward pre-hook on each
``experts`` module sees exactly the ids and weights the model used (after any restriction, since
restriction hooks are prepended on the router); a forward hook on the router gives the raw logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from uspx.models.base import MoEAdapter, MoELayer


@dataclass
class LayerRouting:
    """One MoE layer's routing for the flattened tokens of one forward pass ([B*T] rows)."""

    index: torch.Tensor  # [N, k] expert ids, in the rank order the router returned
    weights: torch.Tensor  # [N, k]
    logits: torch.Tensor | None = None  # [N, E]
    norms: torch.Tensor | None = None  # [N, k] ||f_e(x)||_2 of each routed expert, before gating


class RoutingRecorder:
    """Context manager: ``with RoutingRecorder(adapter) as rec: model(...)``; then ``rec.layers``.

    ``logits`` and ``norms`` cost extra (norms run every routed expert a second time), so both are
    off by default.
    """

    def __init__(self, adapter: MoEAdapter, *, logits: bool = False, norms: bool = False):
        self.adapter = adapter
        self.want_logits = logits
        self.want_norms = norms
        self.layers: dict[int, LayerRouting] = {}
        self._handles: list = []

    def __enter__(self) -> "RoutingRecorder":
        for layer in self.adapter.layers:
            self._handles.append(layer.experts.register_forward_pre_hook(self._experts_hook(layer)))
            if self.want_logits:
                self._handles.append(layer.router.register_forward_hook(self._router_hook(layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def clear(self) -> None:
        self.layers = {}

    def _experts_hook(self, layer: MoELayer):
        def hook(module, args):
            hidden, index, weights = args[0], args[1], args[2]
            hidden = hidden.reshape(-1, hidden.shape[-1])
            index = index.detach().reshape(hidden.shape[0], -1)
            # kept on the CPU, where every reader of the records works, whatever device ran the layer
            rec = LayerRouting(index.cpu(), weights.detach().reshape(hidden.shape[0], -1).cpu())
            if self.want_norms:
                with torch.no_grad():
                    out = self.adapter.expert_outputs(layer, hidden.detach(), index)
                rec.norms = out.float().norm(dim=-1).cpu()
            old = self.layers.get(layer.index)
            if old is not None and old.logits is not None:
                rec.logits = old.logits
            self.layers[layer.index] = rec

        return hook

    def _router_hook(self, layer: MoELayer):
        def hook(module, args, output):
            logits = self.adapter.router_logits(output).detach()
            logits = logits.reshape(-1, logits.shape[-1]).cpu()
            rec = self.layers.get(layer.index)
            if rec is None:
                # the router runs before the experts: park the logits until the experts hook fires
                self.layers[layer.index] = LayerRouting(torch.empty(0), torch.empty(0), logits)
            else:
                rec.logits = logits

        return hook
