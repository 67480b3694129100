"""Sequential calibration: score MoE layer ``l`` on a model whose earlier MoE layers are already
pruned to what their scores keep.

A one-pass score sees every layer's inputs as the original model computes them; after pruning, the
inputs of later layers change. Here the engine runs layer by layer: once a layer has been observed,
its ``keep`` best experts by ``method`` are kept and the layer runs again restricted to them, so the
next layer is observed on the pruned model's hidden states. Every local method's sums come out of
the same pass (routing for frequency, REAP and EAN; block re-runs for reconstruction, when that is
the deciding method).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from uspx.engine import WeightSource, make_batches, run
from uspx.engine.observers import Reconstruction, Routing
from uspx.score.bootstrap import Factor, estimate
from uspx.score.trace_stats import RouterStats
from uspx.trace.run import DEFAULT_BATCH_TOKENS
from uspx.workload import EncodedItem


@dataclass
class SequentialSums:
    stats: RouterStats  # routing sums of the sequentially pruned model (norms included)
    err: np.ndarray  # [P, L, E] reconstruction sums (zero unless the method was reconstruction)
    routed: np.ndarray  # [P, L, E]
    kept: dict[int, list[int]]  # what each layer kept while the next ones were observed


def sequential_sums(source: WeightSource, items: list[EncodedItem], method: str, keep: int, *, pad_id: int,
                    batch_size: int = 8, progress: bool = True) -> SequentialSums:
    """Observe every MoE layer after pruning the ones before it to their ``keep`` best by ``method``."""
    layers = [l.index for l in source.adapter.layers]
    pos = {l: i for i, l in enumerate(layers)}
    lengths = [len(e.input_ids) for e in items]
    item_of_token = np.repeat(np.arange(len(items)), lengths)
    stats = RouterStats.empty(np.array([e.index for e in items]), layers, source.adapter.num_experts, norms=True)
    stats.tokens[:] = lengths
    e = source.adapter.num_experts
    err = np.zeros((len(items), len(layers), e))
    routed = np.zeros((len(items), len(layers), e), np.int64)
    kept: dict[int, list[int]] = {}

    def on_routing(index: int, arrays: dict[str, np.ndarray]) -> None:
        n = len(item_of_token)
        stats.add(item_of_token, np.full(n, pos[index]), arrays["expert_ids"], arrays["expert_weights"],
                  arrays["expert_norms"], np.zeros(n, bool))

    def on_reconstruction(index: int, arrays: dict[str, np.ndarray]) -> None:
        err[:, pos[index]] = arrays["reconstruction_error"]
        routed[:, pos[index]] = arrays["reconstruction_routed"]

    def decide(index: int) -> list[int]:
        factor = {"frequency": stats.frequency, "reap": stats.reap, "ean": stats.ean}.get(method)
        f = factor() if factor else Factor(err, stats.tokens[:, None, None].astype(float))
        value = estimate([f], 0, 0).value[pos[index]]  # the point value the score table holds
        order = sorted(range(e), key=lambda x: (-np.nan_to_num(value[x], nan=-np.inf), x))
        kept[index] = sorted(order[:keep])
        return kept[index]

    observers = [Routing(len(item_of_token), norms=True, on_layer=on_routing)]
    if method == "reconstruction":  # block re-runs cost k forwards of the layer's experts: only when used
        observers.append(Reconstruction(item_of_token, len(items), on_layer=on_reconstruction))
    batches = make_batches(items, batch_size, pad_id, max_tokens=None if source.resident else DEFAULT_BATCH_TOKENS)
    run(source, batches, observers, last_layer=max(layers), decide=decide, progress=progress,
        label="sequential calibration")
    return SequentialSums(stats, err, routed, kept)
