"""Section 4, cooperation: does the model need all k experts? Re-route with top-k reduced to
1..k and measure held-out completion loss and top-1 agreement with the unablated model.

Mechanism: a forward hook on every router, prepended so that every later hook sees it, that takes
the router's raw logits and re-routes them with the family's own rule (``adapter.route``) at the
smaller k (for gpt_oss: top-k on logits, softmax over the kept k, so weights renormalise). The same
hook at full k must reproduce the unablated loss exactly: an independent check that the hook path is
the model's own routing. Output length is not a quality measure and is not used as one.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from uspx.analyze.collect import Losses, heldout_losses
from uspx.analyze.stats import bootstrap_ratio, wilson
from uspx.engine.hooks import forward_hook, register
from uspx.io import UspxError
from uspx.models.base import MoEAdapter, MoELayer, Restriction

MECHANISM = "prepended router forward hook re-routing the raw logits with adapter.route at reduced top-k"


def reduce_top_k(adapter: MoEAdapter, k: int) -> Restriction:
    if not adapter.router_returns_tuple:
        raise UspxError(f"{adapter.family}: the router returns logits only; k-ablation by router hook is unsupported")
    handles = []
    for layer in adapter.layers:
        small = dataclasses.replace(layer, top_k=k)
        handles.append(register(forward_hook(layer.router, _hook(adapter, small), prepend=True)))
    return Restriction(handles)


def _hook(adapter: MoEAdapter, layer: MoELayer):
    def hook(module, args, output):
        logits = adapter.router_logits(output)
        weights, index = adapter.route(layer, logits)
        return (logits, weights, index)

    return hook


def k_ablation(lm, adapter: MoEAdapter, items, pad_id: int, batch_size: int = 8) -> dict:
    full = heldout_losses(lm.model, items, pad_id, batch_size)
    rows = []
    for k in range(1, adapter.top_k + 1):
        with reduce_top_k(adapter, k):
            res = heldout_losses(lm.model, items, pad_id, batch_size)
        rows.append(_row(k, res, full))
    base = bootstrap_ratio(full.nll, full.tokens)
    return dict(
        mechanism=MECHANISM, items=len(items), tokens=int(full.tokens.sum()),
        unablated_loss=float(base["value"]), unablated_lo=float(base["lo"]), unablated_hi=float(base["hi"]),
        rows=rows, full_k_equals_unablated=bool(rows[-1]["loss"] == float(base["value"])),
    )


def _row(k: int, res: Losses, full: Losses) -> dict:
    loss = bootstrap_ratio(res.nll, res.tokens)
    delta = bootstrap_ratio(res.nll - full.nll, res.tokens)  # paired over prompts
    agree = np.array([int((a == b).sum()) for a, b in zip(res.argmax, full.argmax)])
    lo, hi = wilson(agree.sum(), res.tokens.sum())
    boot = bootstrap_ratio(agree, res.tokens)
    return dict(k=k, loss=float(loss["value"]), loss_lo=float(loss["lo"]), loss_hi=float(loss["hi"]),
                delta=float(delta["value"]), delta_lo=float(delta["lo"]), delta_hi=float(delta["hi"]),
                top1_agreement=float(agree.sum() / max(res.tokens.sum(), 1)), agreement_wilson_lo=float(lo),
                agreement_wilson_hi=float(hi), agreement_boot_lo=float(boot["lo"]), agreement_boot_hi=float(boot["hi"]),
                tokens=int(res.tokens.sum()))
