"""Ablation scores with a tenth of the forward passes: the experts exhaustive ablation would keep.

Exhaustive ablation removes every expert of every layer on every calibration item (items where the
expert is never routed cost nothing: removing it changes nothing there). The score of expert ``e``
is its loss increase summed over items, per target token: ``sum_i d_i(e) / T``. Pruning only needs
each layer's ``keep`` best, so ablations are worth spending only where that ranking is in doubt.

Why sampling items is not enough (``bandit_ablation``: LUCB, Kalyanakrishnan et al., 2012, one
item per pull, drawn without replacement). A trained model sits near a minimum of its loss, so
removing an expert moves one item's loss mostly by the first-order term ``sum_t <dL/dh_t, dh_t>``
(``dh_t`` the change of the layer's output at token ``t``), up on some items and down on others,
while the score is the small positive remainder left once those terms cancel over the items. One
item's loss change spreads two to three times its mean, and the experts at a keep boundary differ
by 10-20% of their scores: ordering them by sampling takes nearly every item.

``guided_ablation`` removes that noise instead of averaging it away. One forward and one backward
per item (``removal_surrogate``) give, for every expert at once, the first-order term ``c_i(e)``
(exact and summed over every item, so it carries no sampling error) and a size
``s_i(e) = sum |dh_t|^2`` over the loss-predicting tokens routed to the expert, which the second-
order remainder grows with. Each loss change is then ``d_i = c_i + gamma_e * s_i + noise``: one
unknown slope per expert, and an ablation measures only what the first order misses, whose spread
is about half that of ``d_i``. A score is predicted as the ablated items' exact loss changes plus
``c_i + gamma_e * s_i`` over the rest (a model-based prediction estimator, Royall, 1970); an expert
whose items have all been ablated is known exactly.

- The slopes of a layer's experts differ by tens of percent, so each is estimated from its own
  ablations, but shrunk towards the layer's pooled slope (normal prior of relative spread
  ``prior``): an expert with two ablations borrows from its layer rather than trust two items.
- The residual variance (taken proportional to the size plus a floor) is pooled the same way
  (``pool`` pseudo-items): a variance from two items is too often tiny, and an expert wrongly
  believed certain would never be ablated again.
- Items are ablated in successive sampling order proportional to that variance (Efraimidis and
  Spirakis, 2006): the items that hold most of an expert's uncertainty come first, and the
  randomness keeps the sample from being only the largest items, on which the slope could differ.
- Each ablation goes to the expert, in any layer, fewest standard errors away from its layer's keep
  boundary (midway between the ``keep``-th and next estimates; the APT rule of Locatelli et al.,
  2016): the budget flows to the layers and experts whose order is unsettled, none to the rest.

Accounting: a forward is one item's pass, as exhaustive ablation counts them; the surrogate pass is
charged ``SURROGATE_FORWARDS`` forwards per item (the forward, a backward of about two, and the
rerouted experts' outputs, under one), which the benchmark checks against wall-clock time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from uspx.engine.forward import frozen
from uspx.engine.hooks import forward_hook, hooked
from uspx.models import MoEAdapter
from uspx.score.ablation import ablate
from uspx.score.baseline import Baseline
from uspx.score.loss import token_losses


@dataclass
class BanditResult:
    value: np.ndarray  # [L, E] estimated scores (loss increase per target token)
    pulls: np.ndarray  # [L, E] forward passes spent on each arm
    kept: dict[int, list[int]]  # per MoE layer, the ``keep`` experts with the highest estimates
    forwards: int
    settled: list[bool]  # per layer: the bounds separated before the budget ran out
    se: np.ndarray | None = None  # [L, E] standard errors of ``value`` (guided ablation)


def bandit_ablation(model: torch.nn.Module, adapter: MoEAdapter, base: Baseline, keep: int, *,
                    budget: int, kind: str = "interventional", z: float = 2.0, initial: int = 2,
                    seed: int = 0) -> BanditResult:
    """LUCB over each layer's experts with at most ``budget`` forward passes per layer (items of one
    prompt each: build ``base`` with ``batch_size=1``)."""
    rng = np.random.default_rng(seed)
    layers = adapter.layers
    e_count = adapter.num_experts
    total_tokens = float(base.loss_tokens().sum())
    value = np.zeros((len(layers), e_count))
    pulls = np.zeros((len(layers), e_count), dtype=np.int64)
    kept, settled = {}, []
    with torch.no_grad():
        for pos, layer in enumerate(layers):
            hits = [rng.permutation([b for b in range(len(base.batches)) if base.hit(b, pos, e)]) for e in range(e_count)]
            samples: list[list[float]] = [[] for _ in range(e_count)]

            def pull(e: int) -> None:
                batch = int(hits[e][len(samples[e])])
                samples[e].append(_ablated_delta(model, adapter, base, layer, e, kind, batch))
                pulls[pos, e] += 1

            def bounds(e: int) -> tuple[float, float, float]:
                n, size = len(samples[e]), len(hits[e])
                if size == 0:
                    return 0.0, 0.0, 0.0
                mean = float(np.mean(samples[e])) if n else 0.0
                est = size * mean / total_tokens
                if n >= size:
                    return est, est, est
                spread = float(np.std(samples[e], ddof=1)) if n > 1 else abs(mean) + 1e-12
                half = z * size * spread / math.sqrt(n) * math.sqrt((size - n) / max(size - 1, 1)) / total_tokens
                return est, est - half, est + half

            for e in range(e_count):
                for _ in range(min(initial, len(hits[e]))):
                    pull(e)
            done = False
            while True:
                b = [bounds(e) for e in range(e_count)]
                order = sorted(range(e_count), key=lambda e: (-b[e][0], e))
                top, rest = order[:keep], order[keep:]
                weakest = min(top, key=lambda e: b[e][1])
                strongest = max(rest, key=lambda e: b[e][2]) if rest else None
                if strongest is None or b[weakest][1] >= b[strongest][2]:
                    done = True
                    break
                candidates = [e for e in (weakest, strongest) if len(samples[e]) < len(hits[e])]
                if not candidates or int(pulls[pos].sum()) + len(candidates) > budget:
                    break
                for e in candidates:
                    pull(e)
            for e in range(e_count):
                value[pos, e] = bounds(e)[0]
            kept[layer.index] = sorted(order[:keep])
            settled.append(done)
    return BanditResult(value, pulls, kept, int(pulls.sum()), settled)


def _ablated_delta(model: torch.nn.Module, adapter: MoEAdapter, base: Baseline, layer, expert: int, kind: str,
                   b: int) -> float:
    """Batch ``b``'s summed target-loss change with ``expert`` of ``layer`` removed ``kind``-ly."""
    batch = base.batches[b]
    with torch.no_grad(), ablate(adapter, layer, expert, kind):
        losses = token_losses(model, batch)
    return float(((losses - base.losses[b]).double() * batch.loss_mask).sum())


def jaccard(a: dict[int, list[int]], b: dict[int, list[int]]) -> float:
    """Overlap of two kept sets over every (layer, expert) pair."""
    sa = {(l, e) for l, v in a.items() for e in v}
    sb = {(l, e) for l, v in b.items() for e in v}
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


# ----- surrogate-guided ablation ----------------------------------------------------------------

SURROGATE_FORWARDS = 4  # forward-pass equivalents charged per item for the surrogate pass


@dataclass
class Surrogate:
    """Per calibration item, what removing each expert does to its layer's output, to first order."""

    first_order: np.ndarray  # [P, L, E] sum over the tokens routed to the expert of <dL/dh, dh>
    size: np.ndarray  # [P, L, E] sum over the loss-predicting tokens routed to the expert of |dh|^2
    forwards: int  # forward-pass equivalents charged for computing it


def removal_surrogate(model: torch.nn.Module, adapter: MoEAdapter, base: Baseline,
                      kind: str = "interventional") -> Surrogate:
    """One forward and one backward per batch of ``base``: for every token and every expert it is
    routed to, the change ``dh`` of the layer's expert output when that expert is removed in the
    way ``kind`` says (``ablate``'s two ways, computed with the family's own routing), and the
    gradient ``dL/dh`` of the batch's summed target loss at that layer's output."""
    layers = adapter.layers
    e_count = adapter.num_experts
    first = np.zeros((base.n_prompts, len(layers), e_count))
    size = np.zeros_like(first)
    captured: dict[int, dict] = {}

    def router_hook(pos):
        def hook(module, args, output):
            captured.setdefault(pos, {})["logits"] = adapter.router_logits(output).detach().reshape(-1, e_count)
        return hook

    def experts_hook(pos):
        def hook(module, args, output):
            c = captured.setdefault(pos, {})
            hidden = args[0].detach().reshape(-1, args[0].shape[-1])
            c["hidden"], c["index"] = hidden, args[1].detach().reshape(hidden.shape[0], -1).long()
            c["weights"] = args[2].detach().reshape(hidden.shape[0], -1)
            c["probe"] = torch.zeros_like(output, requires_grad=True)  # d loss / d probe = d loss / d output
            return output + c["probe"]
        return hook

    hooks = [h for pos, layer in enumerate(layers)
             for h in (forward_hook(layer.router, router_hook(pos)), forward_hook(layer.experts, experts_hook(pos)))]
    with frozen(model.parameters()), hooked(hooks):
        for batch in base.batches:
            captured.clear()
            with torch.enable_grad():
                loss = (token_losses(model, batch).double() * batch.loss_mask).sum()
                grads = torch.autograd.grad(loss, [captured[p]["probe"] for p in range(len(layers))], allow_unused=True)
            real = batch.real
            item = torch.as_tensor(np.repeat(np.asarray(batch.rows), batch.input_ids.shape[1]))[real].numpy()
            predicting = batch.loss_mask.reshape(-1)[real].double()
            with torch.no_grad():
                for pos, layer in enumerate(layers):
                    if grads[pos] is not None:
                        _accumulate(adapter, layer, captured[pos], grads[pos], real, item, predicting, kind,
                                    first[:, pos], size[:, pos])
    return Surrogate(first, size, SURROGATE_FORWARDS * base.n_prompts)


def _accumulate(adapter: MoEAdapter, layer, c: dict, g: torch.Tensor, real: torch.Tensor, item: np.ndarray,
                predicting: torch.Tensor, kind: str, first: np.ndarray, size: np.ndarray) -> None:
    """Add one batch of one layer to ``first`` and ``size`` [P, E] (views of the layer's slices)."""
    e_count = first.shape[1]
    g = g.reshape(-1, g.shape[-1])[real].double()
    dh_of = _output_changes(adapter, layer, c["hidden"][real], c["index"][real], c["weights"][real],
                            c["logits"][real] if "logits" in c else None, kind)
    index = c["index"][real].numpy()
    cells = first.size
    for slot, dh in enumerate(dh_of):
        flat = item * e_count + index[:, slot]
        first += np.bincount(flat, (g * dh).sum(1).numpy(), cells).reshape(-1, e_count)
        size += np.bincount(flat, ((dh * dh).sum(1) * predicting).numpy(), cells).reshape(-1, e_count)


def _output_changes(adapter: MoEAdapter, layer, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                    logits: torch.Tensor | None, kind: str) -> list[torch.Tensor]:
    """Per routing slot ``j``: [N, H] change of the experts' output of each token when the expert in
    its slot ``j`` is removed."""
    n, k = index.shape
    if kind == "natural":
        f = adapter.expert_outputs(layer, hidden, index).double()
        return [-weights[:, j, None].double() * f[:, j] for j in range(k)]
    if kind != "interventional":
        raise ValueError(f"unknown ablation kind {kind!r}")
    if logits is None:
        raise ValueError(f"{layer.name}: the router's logits were not seen")
    # a top-k router gives a removed expert's slot to the best expert outside the top k: the k + 1
    # candidates' outputs cover every reroute (other routers fall back to computing the new experts)
    runner_up = logits.masked_fill(torch.zeros_like(logits, dtype=torch.bool).scatter(1, index, True), float("-inf")).argmax(1)
    ids = torch.cat([index, runner_up[:, None]], 1)
    f = adapter.expert_outputs(layer, hidden, ids).double()  # [N, k + 1, H]
    w = torch.cat([weights.double(), torch.zeros(n, 1, dtype=torch.float64)], 1)
    before = (w[:, :, None] * f).sum(1)
    out = []
    for j in range(k):
        banned = torch.zeros_like(logits, dtype=torch.bool)
        banned[torch.arange(n), index[:, j]] = True
        w2, i2 = adapter.route(layer, adapter.masked_logits(layer, logits, banned))
        match = i2.long()[:, :, None] == ids[:, None, :]  # [N, k, k + 1]
        dh = ((match.double() * w2.double()[:, :, None]).sum(1)[:, :, None] * f).sum(1) - before
        missed = ~match.any(2).all(1)
        if missed.any():
            f2 = adapter.expert_outputs(layer, hidden[missed], i2[missed].long()).double()
            dh[missed] = (w2[missed].double()[:, :, None] * f2).sum(1) - before[missed]
        out.append(dh)
    return out


def guided_selection(first_order: np.ndarray, size: np.ndarray, hit: np.ndarray, keep: int, budget: int,
                     pull: Callable[[int, int, int], float], *, initial: int = 2, prior: float = 0.4,
                     pool: float = 3.0, floor: float = 0.05, z: float | None = None, seed: int = 0) -> dict:
    """Each layer's ``keep`` largest sums ``S[l, e] = sum_i d_i(l, e)`` over the items ``i`` with
    ``hit[i, l, e]``, where ``d_i`` is known only through ``pull(l, e, i)``; at most ``budget`` pulls.

    ``first_order`` and ``size`` ([items, L, E]) describe each ``d_i`` before it is pulled:
    ``d_i = first_order_i + gamma_e * size_i + noise``, with the arm's ``gamma_e`` unknown. Returns
    the estimates ``value`` and their standard errors ``se`` ([L, E]), ``pulls`` ([L, E]),
    ``spent`` and ``kept`` (per layer position, the chosen experts)."""
    _, l_count, e_count = first_order.shape
    rng = np.random.default_rng(seed)
    hit = hit.astype(bool)
    hits = hit.transpose(1, 2, 0)  # [L, E, P]
    c = np.where(hit, first_order, 0.0).transpose(1, 2, 0)
    s = np.where(hit, np.maximum(size, 0.0), 0.0).transpose(1, 2, 0)
    total = hits.sum(2)  # [L, E] items that can move the arm
    # the residual's variance is taken proportional to the size plus a floor, so that no item is
    # certain and every item can be drawn
    v = s + floor * (s.sum(2) / np.maximum(total, 1))[:, :, None] * hits
    v = np.where(hits & (v <= 0), 1.0, v)
    # successive sampling proportional to v (Efraimidis and Spirakis, 2006)
    order = [[np.flatnonzero(hits[l, e])[np.argsort(-np.log(rng.random(int(total[l, e]))) / v[l, e][hits[l, e]],
                                                    kind="stable")] for e in range(e_count)] for l in range(l_count)]
    n = np.zeros((l_count, e_count), dtype=np.int64)
    s_d, s_c, s_qs, s_ss, s_qq, s_pulled, v_pulled = (np.zeros((l_count, e_count)) for _ in range(7))
    s_all, v_all, c_all = s.sum(2), v.sum(2), c.sum(2)

    def do(l: int, e: int) -> None:
        i = int(order[l][e][n[l, e]])
        d = float(pull(l, e, i))
        q = d - c[l, e, i]
        n[l, e] += 1
        s_d[l, e] += d
        s_c[l, e] += c[l, e, i]
        s_qs[l, e] += q * s[l, e, i] / v[l, e, i]
        s_ss[l, e] += s[l, e, i] ** 2 / v[l, e, i]
        s_qq[l, e] += q * q / v[l, e, i]
        s_pulled[l, e] += s[l, e, i]
        v_pulled[l, e] += v[l, e, i]

    def estimate() -> tuple[np.ndarray, np.ndarray]:
        with np.errstate(divide="ignore", invalid="ignore"):
            layer_ss = s_ss.sum(1, keepdims=True)
            gamma = np.where(layer_ss > 0, s_qs.sum(1, keepdims=True) / layer_ss, 0.0)  # the layer's slope
            own = np.where(s_ss > 0, s_qs / s_ss, gamma)
            dof = np.maximum(n - 1, 0)
            phi = np.where(dof > 0, np.maximum(s_qq - 2 * own * s_qs + own ** 2 * s_ss, 0) / np.maximum(dof, 1), 0.0)
            some = (dof > 0).sum(1, keepdims=True)
            phi_layer = np.where(some > 0, (phi * (dof > 0)).sum(1, keepdims=True) / np.maximum(some, 1),
                                 s_qq.sum(1, keepdims=True) / np.maximum(n.sum(1, keepdims=True), 1))
            phi = np.maximum((dof * phi + pool * phi_layer) / (dof + pool), 1e-300)
            # normal prior on the arm's slope around the layer's, normal likelihood of its ablations
            prior_var = (prior * gamma) ** 2
            shrink = np.where(s_ss > 0, s_ss * prior_var / (s_ss * prior_var + phi), 0.0)
            post = gamma + shrink * (own - gamma)
            post_var = np.where(s_ss > 0, prior_var * phi / (s_ss * prior_var + phi), prior_var)
            rest_s = np.maximum(s_all - s_pulled, 0)
            rest_v = np.maximum(v_all - v_pulled, 0)
            value = s_d + (c_all - s_c) + post * rest_s
            se = np.sqrt(phi * rest_v + rest_s ** 2 * post_var)
        done = n >= total
        value = np.where(done, s_d, value)
        se = np.where(done, 0.0, np.where(layer_ss > 0, se, np.inf))
        return value, se

    def index(value: np.ndarray, se: np.ndarray) -> np.ndarray:
        """Per arm: how many standard errors separate it from its layer's keep boundary."""
        out = np.full(value.shape, np.inf)
        if 0 < keep < e_count:
            ranked = -np.sort(-value, axis=1)
            boundary = (ranked[:, keep - 1] + ranked[:, keep]) / 2
            with np.errstate(divide="ignore", invalid="ignore"):
                out = np.where(se > 0, np.abs(value - boundary[:, None]) / se, np.inf)
        return out

    undecided = 0 < keep < e_count
    for _ in range(initial if undecided else 0):
        for l in range(l_count):
            for e in range(e_count):
                if n[l, e] < total[l, e] and n.sum() < budget:
                    do(l, e)
    value, se = estimate()
    while n.sum() < budget:
        idx = index(value, se)
        best = np.unravel_index(int(np.argmin(idx)), idx.shape)
        if not np.isfinite(idx[best]) or (z is not None and idx[best] >= z):
            break
        do(int(best[0]), int(best[1]))
        value, se = estimate()
    kept = [sorted(np.argsort(-value[l], kind="stable")[:keep].tolist()) for l in range(l_count)]
    return dict(value=value, se=se, pulls=n, spent=int(n.sum()), kept=kept, index=index(value, se))


def guided_ablation(model: torch.nn.Module, adapter: MoEAdapter, base: Baseline, keep: int, *, budget: int,
                    kind: str = "interventional", surrogate: Surrogate | None = None, initial: int = 2,
                    prior: float = 0.4, z: float | None = None, seed: int = 0,
                    pull: Callable[[int, int, int], float] | None = None) -> BanditResult:
    """Each layer's ``keep`` experts by ablation score with at most ``budget`` forward passes in all,
    the surrogate pass (``removal_surrogate``, charged ``SURROGATE_FORWARDS`` per item) included.
    A pull removes one expert on one batch of ``base``: ``pull(layer position, expert, batch)``
    returns the batch's summed loss change (default: a forward with the expert removed)."""
    layers = adapter.layers
    items = base.n_prompts
    if budget < SURROGATE_FORWARDS * items:
        raise ValueError(f"a budget of {budget} forwards does not cover the surrogate pass "
                         f"({SURROGATE_FORWARDS} per item, {SURROGATE_FORWARDS * items})")
    sur = surrogate if surrogate is not None else removal_surrogate(model, adapter, base, kind)
    rows = [np.asarray(b.rows) for b in base.batches]
    first = np.stack([sur.first_order[r].sum(0) for r in rows])  # per batch [B, L, E]
    size = np.stack([sur.size[r].sum(0) for r in rows])
    hit = np.stack([r.any(2).any(1).numpy() for r in base.routed])
    if pull is None:
        def pull(pos: int, expert: int, b: int) -> float:
            return _ablated_delta(model, adapter, base, layers[pos], expert, kind, b)

    out = guided_selection(first, size, hit, keep, max(budget - sur.forwards, 0), pull, initial=initial,
                           prior=prior, z=z, seed=seed)
    total_tokens = float(base.loss_tokens().sum())
    kept = {layer.index: out["kept"][pos] for pos, layer in enumerate(layers)}
    settled = [bool((out["index"][pos] >= 2).all()) for pos in range(len(layers))]
    return BanditResult(out["value"] / total_tokens, out["pulls"], kept, sur.forwards + out["spent"], settled,
                        se=out["se"] / total_tokens)
