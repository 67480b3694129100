"""Hooks on one standalone gpt_oss decoder layer: routing restriction and routing / norm /
reconstruction records, filed under the rows of every token of the workload."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from uspx.models.base import topk_softmax


class RoutingBan:
    """A router forward hook, prepended, that routes only among allowed experts.

    Same mechanism as ``MoEAdapter.restrict`` (logits of banned experts set to -inf, top-k and the
    softmax over the k re-taken), with a mutable extra ban for the reconstruction re-runs.
    """

    def __init__(self, router: torch.nn.Module, n_experts: int, kept: Sequence[int] | None):
        self.base = torch.zeros(n_experts, dtype=torch.bool)
        if kept is not None:
            self.base[:] = True
            self.base[list(kept)] = False
        self.extra: torch.Tensor | None = None  # [rows, E] bool: one more banned expert per row
        self.top_k = int(router.top_k)
        self._handle = router.register_forward_hook(self._hook, prepend=True)

    def _hook(self, module, args, output):
        if self.extra is None and not bool(self.base.any()):
            return None
        banned = self.base if self.extra is None else self.extra | self.base
        logits = output[0].masked_fill(banned, float("-inf"))
        weights, index = topk_softmax(logits, self.top_k)
        return logits, weights, index

    def remove(self) -> None:
        self._handle.remove()


class LayerRecorder:
    """Forward hooks on one layer's router, experts and MoE block that file their outputs under
    token rows. Hooks ignore the block re-runs of the reconstruction score (``_inner``)."""

    def __init__(self, layer: torch.nn.Module, n: int, k: int, e: int, logits: bool, norms: bool,
                 ban: RoutingBan | None = None):
        self.rows: np.ndarray = np.empty(0, dtype=np.int64)
        self.ids = np.zeros((n, k), dtype=np.int32)
        self.weights = np.zeros((n, k), dtype=np.float32)
        self.logits = np.zeros((n, e), dtype=np.float32) if logits else None
        self.norms = np.zeros((n, k), dtype=np.float32) if norms else None
        self.recon = np.zeros((n, k), dtype=np.float64) if ban is not None else None
        self._ban = ban
        self._inner = False
        self._index: torch.Tensor | None = None
        self._handles = [layer.mlp.router.register_forward_hook(self._router_hook)]
        if norms:
            self._handles.append(layer.mlp.experts.register_forward_hook(self._experts_hook))
        if ban is not None:
            self._handles.append(layer.mlp.register_forward_hook(self._block_hook))

    def _router_hook(self, module, args, output) -> None:
        if self._inner:
            return
        logits, weights, index = output  # rows in the order of hidden.reshape(-1, H): batch-major
        self._index = index
        self.ids[self.rows] = index.to(torch.int32).numpy()
        self.weights[self.rows] = weights.float().numpy()
        if self.logits is not None:
            self.logits[self.rows] = logits.float().numpy()

    def _experts_hook(self, module, args, output) -> None:
        # Same computation as MoEAdapter.expert_outputs: every (token, slot) alone with weight 1,
        # through the experts' own forward, so biases and the clamped SwiGLU are the model's.
        if self._inner:
            return
        hidden, index = args[0], args[1]
        n, k = index.shape
        rows = hidden.repeat_interleave(k, dim=0)
        ones = torch.ones(n * k, 1, dtype=hidden.dtype)
        out = module.forward(rows, index.reshape(-1, 1), ones)
        self.norms[self.rows] = out.float().norm(dim=-1).reshape(n, k).numpy()

    def _block_hook(self, module, args, output) -> None:
        # Reconstruction (uspx.score.reconstruction): for every routed (token, expert), ban that
        # expert for that token, let the router re-route, squared L2 distance of the block output in
        # float64. The other tokens cannot change, so each token is re-run once per slot: k re-runs
        # of the whole batch, each token banning its slot-j expert (a per-row ban), which keeps the
        # expert matmuls as large as the forward's own (E re-runs on few tokens are far slower).
        if self._inner:
            return
        x = args[0].reshape(-1, args[0].shape[-1])
        y = output[0].reshape(x.shape).double()
        index = self._index
        n_exp = int(self._ban.base.numel())
        self._inner = True
        try:
            for slot in range(index.shape[1]):
                self._ban.extra = torch.nn.functional.one_hot(index[:, slot].long(), n_exp).bool()
                y_e = module(x[None])[0].reshape(x.shape)
                self.recon[self.rows, slot] = (y - y_e.double()).pow(2).sum(dim=1).numpy()
        finally:
            self._ban.extra = None
            self._inner = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"expert_ids": self.ids, "expert_weights": self.weights}
        if self.logits is not None:
            out["router_logits"] = self.logits
        if self.norms is not None:
            out["expert_norms"] = self.norms
        if self.recon is not None:
            out["reconstruction_error"] = self.recon
        return out
