"""Stream a trace as blocks of whole tokens: every array is [T, L, ...] for T complete tokens.

Rows are (token, layer) in (sample, position, layer) order; a Parquet batch can end mid-token, so
the rows of an unfinished token are carried into the next batch. Nothing larger than one batch is
ever held, whatever the trace size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from uspx.io import UspxError
from uspx.trace import Trace

COLUMNS = ("sample", "position", "token_id", "family", "layer", "expert_ids", "expert_weights")


@dataclass
class Block:
    sample: np.ndarray  # [T] int64
    position: np.ndarray  # [T]
    token: np.ndarray  # [T]
    family: np.ndarray  # [T] int codes into Vocab.families
    ids: np.ndarray  # [T, L, k] int64, router rank order
    weights: np.ndarray  # [T, L, k] float32

    @property
    def top1(self) -> np.ndarray:
        """[T, L] the highest-WEIGHT expert per layer: the rank order in the trace is not trusted."""
        pick = np.argmax(self.weights, axis=-1)
        return np.take_along_axis(self.ids, pick[..., None], axis=-1)[..., 0]


class Vocab:
    """Maps family strings of every batch (each with its own dictionary) to stable int codes."""

    def __init__(self) -> None:
        self.families: list[str] = []
        self._code: dict[str, int] = {}

    def codes(self, col: pa.Array) -> np.ndarray:
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        if pa.types.is_dictionary(col.type):
            words = col.dictionary.to_pylist()
            lut = np.array([self._get(w) for w in words] or [0], dtype=np.int64)
            return lut[col.indices.to_numpy(zero_copy_only=False)]
        return np.array([self._get(w) for w in col.to_pylist()], dtype=np.int64)

    def _get(self, word: str) -> int:
        if word not in self._code:
            self._code[word] = len(self.families)
            self.families.append(word)
        return self._code[word]


def _fixed(col: pa.Array, width: int, dtype) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(-1, width)


def iter_blocks(trace: Trace, vocab: Vocab, batch_size: int = 1 << 18) -> Iterator[Block]:
    layers = np.asarray(trace.moe_layers, dtype=np.int64)
    n_layers, k = len(layers), trace.top_k
    carry: dict[str, np.ndarray] | None = None
    for rb in trace.iter_batches(columns=list(COLUMNS), batch_size=batch_size):
        cur = dict(
            sample=rb.column("sample").to_numpy().astype(np.int64),
            position=rb.column("position").to_numpy().astype(np.int64),
            token=rb.column("token_id").to_numpy().astype(np.int64),
            family=vocab.codes(rb.column("family")),
            layer=rb.column("layer").to_numpy().astype(np.int64),
            ids=_fixed(rb.column("expert_ids"), k, np.int64),
            weights=_fixed(rb.column("expert_weights"), k, np.float32),
        )
        if carry is not None:
            cur = {key: np.concatenate([carry[key], cur[key]]) for key in cur}
        n_full = (len(cur["sample"]) // n_layers) * n_layers
        carry = {key: v[n_full:] for key, v in cur.items()} if n_full < len(cur["sample"]) else None
        if n_full == 0:
            continue
        full = {key: v[:n_full] for key, v in cur.items()}
        lay = full["layer"].reshape(-1, n_layers)
        smp = full["sample"].reshape(-1, n_layers)
        pos = full["position"].reshape(-1, n_layers)
        if not (np.array_equal(lay, np.broadcast_to(layers, lay.shape))
                and (smp == smp[:, :1]).all() and (pos == pos[:, :1]).all()):
            raise UspxError(
                f"{trace.path}: rows are not grouped by token with layers {layers.tolist()} in order; "
                "was this trace written by uspx trace?"
            )
        yield Block(
            sample=smp[:, 0], position=pos[:, 0], token=full["token"][::n_layers],
            family=full["family"][::n_layers],
            ids=full["ids"].reshape(-1, n_layers, k), weights=full["weights"].reshape(-1, n_layers, k),
        )
    if carry is not None:
        raise UspxError(f"{trace.path}: the last token has {len(carry['sample'])} of {n_layers} layer rows")


def n_samples(trace: Trace) -> int:
    """Number of workload items in the trace (sample ids run 0..n-1)."""
    try:
        return int(trace.items().num_rows)
    except Exception:  # a trace without items.parquet (hand-made): fall back to the manifest
        return int(trace.manifest.get("workload", {}).get("items", 0))
