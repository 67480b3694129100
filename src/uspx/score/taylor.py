"""Second-order Taylor / OBD saliency: ``1/2 * sum_j theta_j^2 * H_jj`` over the
parameters of one expert (the fused expert tensors' slice ``[e]``; router rows are not expert
parameters and are left out).

``H_jj`` is the empirical Fisher, estimated *per prompt*: ``H_jj = mean_i g_ij^2`` where ``g_i`` is
the gradient of prompt i's mean target loss (one backward per prompt, batch size 1). Per-token
gradients would be the textbook empirical Fisher but cost one backward per token; per-batch
gradients would depend on the batch size. Since the score is linear in ``H``, it is the mean over
prompts of ``1/2 sum_j theta_j^2 g_ij^2``: the per-prompt term is the bootstrap unit.

Under several processes each takes every ``N``-th prompt and the per-prompt rows are added across
processes: a prompt's row comes from the one process that ran it (the others hold 0), so the sum is
the single-process value exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from uspx.dist import Dist
from uspx.engine.forward import frozen
from uspx.io import UspxError
from uspx.models import MoEAdapter
from uspx.score.loss import make_batches, token_losses
from uspx.workload import EncodedItem


def _expert_params(adapter: MoEAdapter) -> list[list[tuple[torch.nn.Parameter, torch.Size]]]:
    """Per MoE layer: the parameters holding its experts, with the expert-first shape to view them in.

    ``expert_tensors`` may return views (dbrx: [E*F, H] seen as [E, F, H]); gradients are taken
    w.r.t. the underlying parameter and viewed the same way, valid because those views keep memory
    order (expert id outermost).
    """
    out = []
    for layer in adapter.layers:
        params = []
        for name, t in adapter.expert_tensors(layer).items():
            base = t if isinstance(t, torch.nn.Parameter) else t._base
            if not isinstance(base, torch.nn.Parameter) or not t.is_floating_point():
                raise UspxError(
                    f"taylor needs floating-point expert parameters; {layer.name} {name} is "
                    f"{t.dtype} (dequantize the model first)"
                )
            if base.device.type == "meta":  # offloaded by a device map: its gradient would never reach it
                raise UspxError(f"taylor needs every expert weight in memory; {layer.name} {name} is offloaded "
                                "by the device map (map that layer to a device, not to disk)")
            if base.numel() != t.numel() or not t.is_contiguous():
                raise UspxError(f"{layer.name} {name}: expert view does not keep memory order")
            params.append((base, t.shape))
        out.append(params)
    return out


def run_taylor(model: torch.nn.Module, adapter: MoEAdapter, items: list[EncodedItem], pad_id: int, bar, *,
               dist: Dist = Dist()) -> np.ndarray:
    """[P, L, E] per-prompt ``1/2 sum_j theta_j^2 g_ij^2`` (0 for prompts without target tokens);
    ``dist``: this process's share of the prompts (every process returns every row)."""
    per_layer = _expert_params(adapter)
    wanted = [p for params in per_layer for p, _ in params]
    out = np.zeros((len(items), len(per_layer), adapter.num_experts))
    # gradients only for expert tensors: the rest of the backward still runs, but no parameter
    # grads are materialised for attention or embeddings
    with frozen(model.parameters()):
        for p in wanted:
            p.requires_grad_(True)
        for i, batch in enumerate(make_batches(items, 1, pad_id)):
            n = int(batch.loss_mask.sum())
            if n == 0 or not dist.mine(i):  # prompts sorted by length: every N-th one balances the shares
                bar.advance()
                continue
            loss = token_losses(model, batch).sum() / n
            grads = torch.autograd.grad(loss, wanted, allow_unused=True)
            g_iter = iter(grads)
            for pos, params in enumerate(per_layer):
                total = torch.zeros(adapter.num_experts, dtype=torch.float64)
                for p, shape in params:
                    g = next(g_iter)
                    if g is None:
                        continue
                    sal = (p.detach().double() ** 2) * (g.double() ** 2)
                    total += sal.reshape(shape[0], -1).sum(1).cpu()
                out[batch.rows[0], pos] = 0.5 * total.numpy()
            bar.advance()
    return dist.sum(out)
