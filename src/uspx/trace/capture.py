"""What every MoE router decided during a forward pass of a model in memory, as tensors.

The hooks are the engine's (:func:`uspx.engine.observers.routing_hooks`): the ids and weights the
experts module was called with (after any restriction), the raw router logits, and the routed
experts' output norms read inside the forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from uspx.engine.hooks import Handles
from uspx.engine.observers import routing_hooks
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

    The engine's routing hooks (:func:`uspx.engine.observers.routing_hooks`, the ones the
    ``Routing`` observer uses) on every MoE layer, keeping the last forward's routing per layer as
    tensors on the CPU, where every reader of the records works, whatever device ran the layer.
    ``logits`` and ``norms`` (read inside the forward) are off by default.
    """

    def __init__(self, adapter: MoEAdapter, *, logits: bool = False, norms: bool = False):
        self.adapter = adapter
        self.want_logits = logits
        self.want_norms = norms
        self.layers: dict[int, LayerRouting] = {}
        self._logits: dict[int, torch.Tensor] = {}  # the router runs before the experts: parked here
        self._handles = Handles()

    def __enter__(self) -> "RoutingRecorder":
        for layer in self.adapter.layers:
            self._handles.extend(self._hooks(layer))
        return self

    def _hooks(self, layer: MoELayer) -> list:
        i = layer.index

        def on_route(index: torch.Tensor, weights: torch.Tensor) -> None:
            self.layers[i] = LayerRouting(index.cpu(), weights.cpu(), self._logits.get(i))

        def on_logits(logits: torch.Tensor) -> None:
            self._logits[i] = logits.cpu()

        def on_norms(norms: torch.Tensor) -> None:
            self.layers[i].norms = norms.cpu()

        return routing_hooks(self.adapter, layer, on_route, on_logits=on_logits if self.want_logits else None,
                             on_norms=on_norms if self.want_norms else None)

    def __exit__(self, *exc: object) -> None:
        self._handles.remove()

    def clear(self) -> None:
        self.layers = {}
        self._logits = {}
