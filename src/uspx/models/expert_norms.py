"""Each routed expert's unweighted output norm ``||f_e(x)||_2``, taken where the family computes f_e(x).

REAP and EAN need these norms for every (token, routed slot). Running the routed experts a second
time costs about half a forward; instead a capture reads them inside the forward:

* transformers' grouped and batched expert kernels (``use_experts_implementation``, every family
  here but dbrx) pass the per-(token, slot) expert outputs, before the routing weights, through an
  optional post-expert norm. The capture stands in that place with an identity that takes their
  norms, so the forward's outputs are unchanged to the bit. The grouped kernel holds the rows
  sorted by expert; the capture sorts the same ids with the same call to put them back.
* experts that loop over a per-expert module (the adapter's ``expert_call_module``: dbrx's
  ``mlp``) are read by a forward hook on that module; the loop visits the experts that have tokens
  in ascending id, each with its tokens in (slot, token) order, as transformers' loops do.
* anything else (transformers' eager loops, a GPU kernel that skips the post-expert point) falls
  back to running the routed experts again through ``adapter.expert_outputs``: same numbers, old cost.

Only calls of the experts module through ``module(...)`` report norms; direct ``.forward`` calls
(other hooks re-running experts) are told apart by the index tensor they were given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

if TYPE_CHECKING:
    from uspx.models.base import MoEAdapter, MoELayer

NormSink = Callable[[torch.Tensor], None]
"""Called once per experts-module call with the norms [N, k] (float32, the call's device, slots in
the order of the ``topk_index`` the experts were given)."""

FUSED_KERNELS = ("grouped_mm", "batched_mm")


class _Frame:
    """One running experts forward: its routing and the norms found so far."""

    def __init__(self, index: torch.Tensor | None):
        self.index = index
        self.norms: torch.Tensor | None = None
        self.hit: list[int] | None = None  # per-expert loops: experts with tokens, ascending
        self.calls = 0


class NormCapture:
    """Hands ``sink`` the norms of every call of one MoE layer's experts module; ``remove()`` restores
    the module."""

    def __init__(self, adapter: "MoEAdapter", layer: "MoELayer", sink: NormSink):
        self.adapter, self.layer, self.sink = adapter, layer, sink
        self.experts = experts = layer.experts
        self._stack: list[_Frame] = []
        self._done: list[_Frame] = []
        self._saved = {k: experts.__dict__[k] for k in ("forward", "has_post_expert_norm", "post_expert_norm")
                       if k in experts.__dict__}
        inner = self._saved.get("forward") or type(experts).forward.__get__(experts)
        object.__setattr__(experts, "forward", self._wrap(inner))
        self._handles = [experts.register_forward_hook(self._after)]
        module_name = adapter.expert_call_module
        if module_name is not None:
            self._handles.append(getattr(experts, module_name).register_forward_hook(self._per_expert))
        elif "has_post_expert_norm" in self._saved:  # built by transformers' use_experts_implementation
            previous = getattr(experts, "post_expert_norm", None) if self._saved["has_post_expert_norm"] else None
            object.__setattr__(experts, "has_post_expert_norm", True)
            object.__setattr__(experts, "post_expert_norm", self._fused_point(previous))

    def _wrap(self, inner: Callable) -> Callable:
        def forward(*args, **kwargs):
            frame = _Frame(args[1] if len(args) > 1 else None)  # every family passes the routing positionally
            self._stack.append(frame)
            try:
                return inner(*args, **kwargs)
            finally:
                self._stack.pop()
                self._done = self._done[-7:] + [frame]  # direct .forward calls never reach _after

        return forward

    def _fused_point(self, previous: nn.Module | None) -> Callable:
        def post_expert_norm(proj_out: torch.Tensor) -> torch.Tensor:
            if previous is not None:
                proj_out = previous(proj_out)
            if self._stack:
                self._take_fused(self._stack[-1], proj_out)
            return proj_out

        return post_expert_norm

    def _take_fused(self, frame: _Frame, proj_out: torch.Tensor) -> None:
        kernel = getattr(self.experts.config, "_experts_implementation", None)
        index = frame.index
        if kernel not in FUSED_KERNELS or index is None or proj_out.shape[0] != index.numel():
            return  # an order this capture does not know: the fallback computes the norms
        norms = proj_out.detach().float().norm(dim=-1)
        if kernel == "grouped_mm":  # rows sorted by expert id, exactly as the kernel sorted them
            _, perm = torch.sort(index.reshape(-1))
            norms = torch.empty_like(norms).index_copy_(0, perm.to(norms.device), norms)
        frame.norms = norms.reshape(index.shape[0], -1)

    def _per_expert(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not self._stack or self._stack[-1].index is None:
            return
        frame = self._stack[-1]
        index = frame.index.reshape(-1, frame.index.shape[-1])
        if frame.hit is None:
            frame.hit = torch.unique(index).tolist()
            frame.norms = torch.zeros(index.shape, dtype=torch.float32, device=output.device)
        expert = frame.hit[frame.calls]
        frame.calls += 1
        slot, token = torch.where(index.T == expert)  # the loop's order: torch.where(expert_mask[e])
        frame.norms[token, slot] = output.detach().reshape(len(token), -1).float().norm(dim=-1)

    def _after(self, module: nn.Module, args: tuple, output: object) -> None:
        index = args[1]
        frame = next((f for f in reversed(self._done) if f.index is index), None)
        self._done.clear()
        complete = frame is not None and frame.norms is not None and (frame.hit is None or frame.calls == len(frame.hit))
        if complete:
            norms = frame.norms
        else:
            hidden = args[0].reshape(-1, args[0].shape[-1]).detach()
            with torch.no_grad():
                out = self.adapter.expert_outputs(self.layer, hidden, index.reshape(hidden.shape[0], -1))
            norms = out.float().norm(dim=-1)
            self._done.clear()  # the re-run's own frame
        self.sink(norms)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for k in ("forward", "has_post_expert_norm", "post_expert_norm"):
            self.experts.__dict__.pop(k, None)
        for k, v in self._saved.items():
            object.__setattr__(self.experts, k, v)
