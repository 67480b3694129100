"""What a stage measures while the engine runs: observers attached to the MoE layers and the head.

An observer registers hooks on one MoE layer's modules (router, experts, block) when the engine
asks (``attach``), learns which batch is running (``begin``), may receive the LM logits of the
batch's target positions (``logits``, when ``wants_logits``), and is told when a layer has seen
every batch (``layer_done``). It files what it sees under token rows (``Batch.token_rows``), so the
same observer gives the same numbers whether the model runs whole or a layer at a time.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import numpy as np
import torch

from uspx.engine.batches import Batch, target_losses
from uspx.engine.hooks import forward_hook, pre_hook, register
from uspx.models.base import MoEAdapter, MoELayer

LayerArrays = dict[str, np.ndarray]
OnLayer = Callable[[int, LayerArrays], None]

_rerun = [False]  # set while an observer re-runs a block: the other hooks must not record it


@contextlib.contextmanager
def rerunning() -> Iterator[None]:
    _rerun[0] = True
    try:
        yield
    finally:
        _rerun[0] = False


class Observer:
    wants_logits = False

    def __init__(self) -> None:
        self.batch: Batch | None = None

    def attach(self, adapter: MoEAdapter, layer: MoELayer) -> list:
        """Register hooks on ``layer``'s modules; return their handles."""
        return []

    def begin(self, batch: Batch) -> None:
        self.batch = batch

    def logits(self, batch: Batch, logits: torch.Tensor, start: int = 0) -> None:
        """Logits [n, V] of the True positions ``start .. start + n`` of ``batch.loss_mask``, row-major
        (a batch's positions may come in several calls)."""

    def layer_done(self, index: int) -> None:
        """Layer ``index`` has seen every batch."""


def _real(batch: Batch) -> tuple[np.ndarray, torch.Tensor]:
    rows = batch.token_rows
    return rows[rows >= 0], torch.from_numpy(rows >= 0)


OnRoute = Callable[[torch.Tensor, torch.Tensor], None]
OnTensor = Callable[[torch.Tensor], None]


def routing_hooks(adapter: MoEAdapter, layer: MoELayer, on_route: OnRoute, *, on_logits: OnTensor | None = None,
                  on_norms: OnTensor | None = None) -> list:
    """The hooks that see one MoE layer's routing as the model used it; returns their handles.

    ``on_route(index [N, k], weights [N, k])`` gets the ids and weights the experts module is called
    with (after any restriction: restriction hooks are prepended on the router), in the router's
    order; ``on_logits(logits [N, E])`` the raw router logits; ``on_norms(norms [N, k])`` each
    routed expert's unweighted output norm ``||f_e(x)||_2``, read inside the forward by the family's
    adapter. Tensors are detached, on the device that ran the layer; N counts padding too. Nothing
    is reported while an observer re-runs a block (:func:`rerunning`).
    """

    def experts_hook(module, args):
        if not _rerun[0]:
            n = args[0].reshape(-1, args[0].shape[-1]).shape[0]
            on_route(args[1].detach().reshape(n, -1), args[2].detach().reshape(n, -1))

    handles = [register(pre_hook(layer.experts, experts_hook))]
    if on_logits is not None:
        def router_hook(module, args, output):
            if not _rerun[0]:
                logits = adapter.router_logits(output).detach()
                on_logits(logits.reshape(-1, logits.shape[-1]))

        handles.append(register(forward_hook(layer.router, router_hook)))
    if on_norms is not None:
        handles.append(adapter.capture_expert_norms(layer, lambda norms: None if _rerun[0] else on_norms(norms)))
    return handles


class _PerLayer(Observer):
    """Files arrays per MoE layer: a layer's are handed to ``on_layer`` (then dropped) when it is
    done, or kept in ``self.layers`` without a callback."""

    def __init__(self, on_layer: OnLayer | None):
        super().__init__()
        self.on_layer = on_layer
        self.layers: dict[int, LayerArrays] = {}

    def layer_done(self, index: int) -> None:
        if self.on_layer is not None and index in self.layers:
            self.on_layer(index, self.layers.pop(index))


class Routing(_PerLayer):
    """Per token and MoE layer: expert ids and gate weights, highest weight first; optionally the
    raw router logits and each routed expert's unweighted output norm ``||f_e(x)||_2``."""

    def __init__(self, n_tokens: int, *, logits: bool = False, norms: bool = False, on_layer: OnLayer | None = None):
        super().__init__(on_layer)
        self.n, self.want_logits, self.want_norms = n_tokens, logits, norms
        self._order: dict[int, torch.Tensor] = {}  # rank order of the last call's slots, per layer

    def attach(self, adapter: MoEAdapter, layer: MoELayer) -> list:
        k, e = layer.top_k, layer.num_experts
        arrays = dict(expert_ids=np.zeros((self.n, k), np.int32), expert_weights=np.zeros((self.n, k), np.float32))
        if self.want_logits:
            arrays["router_logits"] = np.zeros((self.n, e), np.float32)
        if self.want_norms:
            arrays["expert_norms"] = np.zeros((self.n, k), np.float32)
        self.layers.setdefault(layer.index, arrays)
        i = layer.index
        return routing_hooks(adapter, layer, lambda index, weights: self._route(i, index, weights),
                             on_logits=(lambda x: self._logits(i, x)) if self.want_logits else None,
                             on_norms=(lambda x: self._norms(i, x)) if self.want_norms else None)

    def _route(self, layer: int, index: torch.Tensor, weights: torch.Tensor) -> None:
        rows, real = _real(self.batch)
        index, weights = index.cpu()[real], weights.cpu()[real].float()
        # rank order, highest weight first (some routers return their top-k unsorted)
        order = torch.argsort(weights, dim=1, descending=True, stable=True)
        self._order[layer] = order
        out = self.layers[layer]
        out["expert_ids"][rows] = index.gather(1, order).numpy()
        out["expert_weights"][rows] = weights.gather(1, order).numpy()

    def _logits(self, layer: int, logits: torch.Tensor) -> None:
        rows, real = _real(self.batch)
        self.layers[layer]["router_logits"][rows] = logits.cpu()[real].float().numpy()

    def _norms(self, layer: int, norms: torch.Tensor) -> None:
        rows, real = _real(self.batch)
        self.layers[layer]["expert_norms"][rows] = norms.cpu()[real].gather(1, self._order.pop(layer)).numpy()


class Reconstruction(_PerLayer):
    """How far each MoE block's output moves when one routed expert is removed.

    For every routed (token, expert): ban that expert for that token in the router (the next expert
    takes its slot, weights recomputed by the family's routing, as pruning does), re-run the block
    on the same input and take ``||y - y^{-e}||^2`` in float64. A MoE block treats tokens
    independently, so every token is re-run once per slot: ``k`` re-runs of the batch, each token
    banning its slot-``j`` expert, which keeps the expert matmuls as large as the forward's own.

    Per layer, sums per item are handed to ``on_layer`` (or kept): ``reconstruction_error`` [P, E]
    and ``reconstruction_routed`` [P, E] (routed tokens), with ``item_of_token`` mapping token rows
    to the P items.
    """

    def __init__(self, item_of_token: np.ndarray, n_items: int, on_layer: OnLayer | None = None):
        super().__init__(on_layer)
        self.item_of_token, self.p = item_of_token, n_items
        self._index: dict[int, torch.Tensor] = {}

    def attach(self, adapter: MoEAdapter, layer: MoELayer) -> list:
        e = layer.num_experts
        self.layers.setdefault(layer.index, dict(reconstruction_error=np.zeros((self.p, e)),
                                                 reconstruction_routed=np.zeros((self.p, e), np.int64)))

        def keep_index(module, args):
            if not _rerun[0]:
                self._index[layer.index] = args[1].reshape(-1, args[1].shape[-1])

        return [register(pre_hook(layer.experts, keep_index)),
                register(forward_hook(layer.block, self._block_hook(adapter, layer), with_kwargs=True))]

    def _block_hook(self, adapter: MoEAdapter, layer: MoELayer):
        def hook(module, args, kwargs, output):
            if _rerun[0]:
                return
            x = args[0] if args else kwargs["hidden_states"]
            x = x.reshape(-1, x.shape[-1])
            rows, real = _real(self.batch)
            real = real.to(x.device)
            x = x[real].detach()
            y = block_output(output).reshape(real.shape[0], -1)[real].double()
            index = self._index.pop(layer.index)[real].long()
            e = layer.num_experts
            out = self.layers[layer.index]
            items = self.item_of_token[rows]
            banned = torch.zeros(len(rows), e, dtype=torch.bool)
            handle = register(forward_hook(layer.router, adapter.reroute_hook(layer, lambda: banned), prepend=True))
            try:
                with rerunning(), torch.no_grad():
                    for slot in range(index.shape[1]):
                        banned = torch.nn.functional.one_hot(index[:, slot], e).bool()
                        y_e = block_output(module(x[None])).reshape(x.shape)
                        d = (y - y_e.double()).pow(2).sum(dim=1).cpu().numpy()
                        flat = items * e + index[:, slot].cpu().numpy()
                        out["reconstruction_error"] += np.bincount(flat, weights=d, minlength=self.p * e).reshape(self.p, e)
                        out["reconstruction_routed"] += np.bincount(flat, minlength=self.p * e).reshape(self.p, e)
            finally:
                handle.remove()

        return hook


def block_output(output: object) -> torch.Tensor:
    """A block's hidden-state output (some families return (hidden, router scores))."""
    return output[0] if isinstance(output, tuple) else output  # type: ignore[index]


class TokenLoss(Observer):
    """Per item: summed next-token loss over its target tokens and their count (the loss every
    stage measures; targets defined by ``engine.batches.loss_mask``)."""

    wants_logits = True

    def __init__(self, n_items: int, *, argmax: bool = False):
        super().__init__()
        self.sum_loss = np.zeros(n_items, np.float64)
        self.n_tokens = np.zeros(n_items, np.int64)
        self.argmax: list[torch.Tensor | None] | None = [None] * n_items if argmax else None

    def logits(self, batch: Batch, logits: torch.Tensor, start: int = 0) -> None:
        losses = target_losses(batch, logits, start).double()
        owner = _owners(batch, len(logits), start)
        rows = torch.tensor(batch.rows)[owner].numpy()
        np.add.at(self.sum_loss, rows, losses.numpy())
        np.add.at(self.n_tokens, rows, 1)
        if self.argmax is not None:  # top-1 prediction at each target position, for agreement
            _append_per_item(self.argmax, batch, owner, logits.argmax(-1), start)


class Logits(Observer):
    """The float32 logits of every target position, per item (``per_item[i]`` is [n_targets_i, V]);
    keep the item count small, a logit row is as wide as the vocabulary."""

    wants_logits = True

    def __init__(self, n_items: int):
        super().__init__()
        self.per_item: list[torch.Tensor | None] = [None] * n_items

    def logits(self, batch: Batch, logits: torch.Tensor, start: int = 0) -> None:
        owner = _owners(batch, len(logits), start)
        _append_per_item(self.per_item, batch, owner, logits.float(), start)  # a mask's rows are a copy


def _owners(batch: Batch, n: int, start: int) -> torch.Tensor:
    """[n] the batch row of each of the True positions ``start .. start + n`` of ``batch.loss_mask``."""
    return torch.nonzero(batch.loss_mask)[start : start + n, 0]


def _append_per_item(per_item: list, batch: Batch, owner: torch.Tensor, values: torch.Tensor, start: int) -> None:
    """File ``values`` [n, ...] under their items (``owner``: batch rows); a batch's first call
    (``start == 0``) replaces what an item held, later calls append to it."""
    for r in owner.unique().tolist():
        row, part = batch.rows[r], values[owner == r]
        per_item[row] = part if per_item[row] is None or start == 0 else torch.cat([per_item[row], part])
