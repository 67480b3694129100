"""Per-prompt routing sums behind ``frequency``, ``reap`` and ``ean``.

They come from a trace (streamed shard by shard, so a trace larger than memory is fine) or from the
routing captured during a model pass (``RouterStats.add``); either way the result is per prompt, the
bootstrap unit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from uspx.io import UspxError
from uspx.score.bootstrap import Factor
from uspx.trace import Trace


@dataclass
class RouterStats:
    samples: np.ndarray  # [P] workload sample ids of the prompts (trace ``sample`` column)
    layers: list[int]  # decoder indices of the MoE layers, in order
    num_experts: int
    tokens: np.ndarray  # [P] real tokens per prompt
    count: np.ndarray  # [P, L, E] tokens routed to (layer, expert)
    sum_weight_norm: np.ndarray | None  # [P, L, E] sum of g_{t,e} * ||f_e(x_t)|| over routed tokens
    sum_norm: np.ndarray | None  # [P, L, E] sum of ||f_e(x_t)|| over routed tokens

    @classmethod
    def empty(cls, samples: np.ndarray, layers: list[int], num_experts: int, norms: bool) -> "RouterStats":
        p, shape = len(samples), (len(samples), len(layers), num_experts)
        return cls(
            np.asarray(samples), list(layers), num_experts, np.zeros(p, np.int64), np.zeros(shape, np.int64),
            np.zeros(shape) if norms else None, np.zeros(shape) if norms else None,
        )

    @property
    def has_norms(self) -> bool:
        return self.sum_norm is not None

    def add(
        self,
        prompt: np.ndarray,
        layer_pos: np.ndarray,
        ids: np.ndarray,
        weights: np.ndarray,
        norms: np.ndarray | None,
        first_layer: np.ndarray,
    ) -> None:
        """Accumulate rows: ``prompt``, ``layer_pos`` [N]; ``ids``, ``weights``, ``norms`` [N, k];
        ``first_layer`` [N] bool marks one row per token (tokens are counted once, not per layer)."""
        p, l, e = self.count.shape
        k = ids.shape[1]
        flat = (np.repeat(prompt * l + layer_pos, k) * e + ids.reshape(-1).astype(np.int64))
        if flat.size and (ids.min() < 0 or ids.max() >= e):
            raise UspxError(f"routing names expert ids outside 0..{e - 1}")
        size = p * l * e
        self.count += np.bincount(flat, minlength=size).reshape(p, l, e)
        self.tokens += np.bincount(prompt[first_layer], minlength=p)
        if self.sum_norm is not None:
            if norms is None:
                raise UspxError("expert norms are missing")
            w = weights.reshape(-1).astype(np.float64)
            nrm = norms.reshape(-1).astype(np.float64)
            self.sum_weight_norm += np.bincount(flat, weights=w * nrm, minlength=size).reshape(p, l, e)
            self.sum_norm += np.bincount(flat, weights=nrm, minlength=size).reshape(p, l, e)

    def add_routing(self, prompt_of_row: np.ndarray, routing: dict) -> None:
        """Accumulate ``RoutingRecorder.layers`` of one forward; ``prompt_of_row`` [N] is the prompt
        position of each flattened row, -1 for padding (pads are routed but never counted)."""
        real = prompt_of_row >= 0
        for pos, layer in enumerate(self.layers):
            rec = routing[layer]
            ids = rec.index[torch.from_numpy(real)].numpy()
            w = rec.weights[torch.from_numpy(real)].float().numpy()
            nrm = rec.norms[torch.from_numpy(real)].numpy() if rec.norms is not None else None
            prompts = prompt_of_row[real]
            self.add(prompts, np.full(len(prompts), pos), ids, w, nrm, np.full(len(prompts), pos == 0))

    # ----- the scores' ratios ----------------------------------------------------------------------
    def frequency(self) -> Factor:
        return Factor(self.count.astype(np.float64), self.tokens[:, None, None].astype(np.float64))

    def reap(self) -> Factor:
        return Factor(self.sum_weight_norm, self.count.astype(np.float64))

    def ean(self) -> Factor:
        return Factor(self.sum_norm, self.count.astype(np.float64))


def stats_from_trace(trace: Trace, split: str, *, norms: bool) -> RouterStats:
    """Per-prompt sums over the trace rows of ``split`` ("all" for every row)."""
    columns = ["sample", "layer", "split", "expert_ids", "expert_weights"]
    if norms and "expert_norms" not in trace_columns(trace):
        raise UspxError(f"{trace.path}: trace has no expert_norms column (trace with --norms)")
    if norms:
        columns.append("expert_norms")
    layers = list(trace.moe_layers)
    items = trace.items()
    samples = np.asarray(items.column("sample").to_numpy())
    item_split = np.asarray(items.column("split").cast(pa.string()).to_numpy(zero_copy_only=False)) if "split" in items.column_names else None
    if split != "all" and item_split is not None:
        samples = samples[item_split == split]
    if len(samples) == 0:
        raise UspxError(f"{trace.path}: no items of split {split!r} in this trace")
    samples = np.sort(samples)
    stats = RouterStats.empty(samples, layers, trace.num_experts, norms)
    pos_of_sample = np.full(int(np.asarray(items.column("sample").to_numpy()).max()) + 1, -1, np.int64)
    pos_of_sample[samples] = np.arange(len(samples))
    pos_of_layer = np.full(max(layers) + 1, -1, np.int64)
    pos_of_layer[layers] = np.arange(len(layers))
    for batch in trace.iter_batches(columns):
        if split != "all":
            keep = pc.equal(batch.column("split").cast(pa.string()), split)
            batch = batch.filter(keep)
        if batch.num_rows == 0:
            continue
        sample = batch.column("sample").to_numpy()
        layer = batch.column("layer").to_numpy().astype(np.int64)
        if sample.max() >= len(pos_of_sample) or layer.max() >= len(pos_of_layer) or (pos_of_layer[layer] < 0).any():
            raise UspxError(f"{trace.path}: rows name samples or layers the manifest does not list")
        prompt = pos_of_sample[sample]
        if (prompt < 0).any():
            raise UspxError(f"{trace.path}: rows of split {split!r} belong to items of another split")
        lpos = pos_of_layer[layer]
        ids = _fixed_list(batch.column("expert_ids"))
        w = _fixed_list(batch.column("expert_weights"))
        nrm = _fixed_list(batch.column("expert_norms")) if norms else None
        stats.add(prompt, lpos, ids, w, nrm, lpos == 0)
    return stats


def trace_columns(trace: Trace) -> list[str]:
    """The column names of the trace's shards (none when it has no shard)."""
    import pyarrow.parquet as pq

    files = trace.files()
    return pq.read_schema(files[0]).names if files else []


def _fixed_list(col: pa.Array) -> np.ndarray:
    """A FixedSizeList column as an [N, width] array (``flatten`` honours slicing offsets)."""
    width = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
