"""Trace routing of a gpt_oss model one decoder layer at a time, straight from safetensors.

Memory holds one layer's weights, the hidden states of every calibration token (or none: they can
live in a memory-mapped file) and one batch's activations, so a model larger than RAM can be traced.
Each layer runs every sequence, reports its routing through ``on_layer`` and is freed before the
next layer is read.

Rows of every reported array are the tokens of all sequences concatenated in input order.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from uspx.io import UspxError
from uspx.stream.checkpoint import Checkpoint
from uspx.stream.hooks import LayerRecorder, RoutingBan
from uspx.stream.layer import HEAD_VOCAB_CHUNK, build_layer, embedding_table, load_config, run_head

OnLayer = Callable[[int, dict[str, np.ndarray]], None]
OnLogits = Callable[[np.ndarray, torch.Tensor], None]

DEFAULT_BATCH_TOKENS = 2048
_EMBED_CHUNK = 1 << 15


@dataclass
class StreamResult:
    n_tokens: int
    n_layers: int
    spilled: bool
    seconds_per_layer: list[float] = field(default_factory=list)
    load_seconds_per_layer: list[float] = field(default_factory=list)  # reading + MXFP4 decoding


class HiddenStore:
    """Hidden states ``[N, H]`` of every token, in RAM or in a memory-mapped file updated in place.

    Each layer reads a batch's rows and writes its output to the same rows, so one buffer suffices
    (no ping-pong copy): peak is ``N * H * itemsize`` in RAM, or about zero with a spill file.
    """

    def __init__(self, n_tokens: int, hidden: int, dtype: torch.dtype, spill_dir: Path | None):
        self.dtype = dtype
        self.spilled = spill_dir is not None
        if spill_dir is None:
            self._mem = torch.empty(n_tokens, hidden, dtype=dtype)
            self._map = None
        else:
            spill_dir.mkdir(parents=True, exist_ok=True)
            self.path = spill_dir / f"hidden-{os.getpid()}-{id(self)}.bin"
            # numpy has no bfloat16: store raw 16-bit words and reinterpret on the torch side
            np_dtype = {torch.bfloat16: np.uint16, torch.float16: np.float16, torch.float32: np.float32}[dtype]
            self._map = np.memmap(self.path, dtype=np_dtype, mode="w+", shape=(n_tokens, hidden))

    def read(self, rows: np.ndarray) -> torch.Tensor:
        if self._map is None:
            return self._mem[torch.from_numpy(rows)]
        return torch.from_numpy(np.ascontiguousarray(self._map[rows])).view(self.dtype)

    def write(self, rows: np.ndarray, values: torch.Tensor) -> None:
        values = values.reshape(len(rows), -1).to(self.dtype)
        if self._map is None:
            self._mem[torch.from_numpy(rows)] = values
        else:
            self._map[rows] = values.contiguous().view(torch.uint16 if self.dtype == torch.bfloat16 else self.dtype).numpy()

    def save(self, path: Path) -> None:
        """Copy every row to ``path`` (raw little-endian words), chunk by chunk; atomic."""
        from uspx.io import atomic_path

        n = self._mem.shape[0] if self._map is None else self._map.shape[0]
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            for a in range(0, n, _EMBED_CHUNK):
                rows = self.read(np.arange(a, min(a + _EMBED_CHUNK, n)))
                fh.write(rows.contiguous().view(torch.uint8).numpy().tobytes())

    def load(self, path: Path) -> None:
        """Fill every row from a file written by :meth:`save`."""
        n, hidden = (self._mem.shape if self._map is None else self._map.shape)
        item = torch.empty((), dtype=self.dtype).element_size()
        if path.stat().st_size != n * hidden * item:
            raise UspxError(f"{path}: {path.stat().st_size} bytes, expected {n * hidden * item} for [{n}, {hidden}]")
        with open(path, "rb") as fh:
            for a in range(0, n, _EMBED_CHUNK):
                b = min(a + _EMBED_CHUNK, n)
                raw = bytearray(fh.read((b - a) * hidden * item))
                self.write(np.arange(a, b), torch.frombuffer(raw, dtype=torch.uint8).view(self.dtype).reshape(b - a, hidden))

    def close(self) -> None:
        if self._map is not None:
            self._map._mmap.close()  # release the mapping before the file is removed
            self._map = None
            self.path.unlink(missing_ok=True)


def _batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Sequence indices grouped into equal-length batches of at most ``batch_tokens`` tokens.

    Equal lengths mean no padding, so the masks are the plain causal / sliding masks of the model.
    """
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_len.setdefault(n, []).append(i)
    batches = []
    for n, idx in sorted(by_len.items()):
        per = max(1, batch_tokens // max(n, 1))
        batches += [idx[a : a + per] for a in range(0, len(idx), per)]
    return batches


def stream_trace(
    model_dir: str | os.PathLike,
    sequences: Sequence[Sequence[int]],
    on_layer: OnLayer,
    *,
    spill_dir: str | os.PathLike | None = None,
    memory_limit_bytes: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    record_logits: bool = True,
    expert_norms: bool = True,
    layers: Sequence[int] | None = None,
    progress: bool | Callable[[str], None] = True,
    kept: Mapping[int, Sequence[int]] | None = None,
    reconstruction: bool = False,
    start_layer: int = 0,
    restore: Callable[[HiddenStore], None] | None = None,
    after_layer: Callable[[int, HiddenStore], None] | None = None,
    head: OnLogits | None = None,
    head_tokens: int = 256,
) -> StreamResult:
    """Run ``sequences`` through a gpt_oss checkpoint layer by layer and report each layer's routing.

    ``on_layer(layer_idx, routing)`` receives numpy arrays over all tokens: ``expert_ids`` int32
    [N, k], ``expert_weights`` float32 [N, k], ``router_logits`` float32 [N, E] (if
    ``record_logits``) and ``expert_norms`` float32 [N, k], the L2 norm of each routed expert's
    unweighted output f_e(x) (if ``expert_norms``; costs one more expert pass). The names are those
    of the ``uspx.trace`` columns; rows here are layer-major, one call per layer.

    Hidden states spill to ``spill_dir`` when given, or to a temporary folder when keeping them in
    RAM would exceed ``memory_limit_bytes`` (default: 80% of the memory available at the start; an
    explicit limit that even spilling cannot meet is an error). ``layers`` stops early
    after the largest listed layer and reports only those listed.

    ``kept`` restricts routing to those experts per layer (banned logits set to -inf and top-k
    re-taken, as ``MoEAdapter.restrict`` does), so a pruned checkpoint can be compared with its
    original. ``reconstruction`` adds ``reconstruction_error`` float64 [N, k] to the reported arrays:
    for each routed (token, slot), ``||y - y^{-e}||^2`` of the MoE block output when that slot's
    expert is banned and the router re-routes (the definition of ``uspx.score.reconstruction``),
    computed on the block input while the layer is in memory. ``head(rows, logits)`` receives the
    float32 logits (final norm + lm_head) of ``head_tokens`` tokens at a time after the last layer
    (all layers run then). ``start_layer`` / ``restore`` / ``after_layer`` let a caller resume: the
    embedding is skipped, ``restore(store)`` fills the hidden states after layer ``start_layer - 1``,
    and ``after_layer(i, store)`` runs once layer ``i`` is done (after ``on_layer``).
    """
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    say = _progress_fn(progress)
    if not sequences or any(len(s) == 0 for s in sequences):
        raise UspxError("stream_trace needs at least one sequence, and no empty sequence")
    ckpt = Checkpoint(model_dir)
    config = load_config(ckpt)
    n_layers = int(config.num_hidden_layers)
    wanted = sorted(set(range(n_layers) if layers is None else layers))
    if any(not 0 <= i < n_layers for i in wanted):
        raise UspxError(f"layers {wanted} outside 0..{n_layers - 1}")
    last = n_layers - 1 if head is not None else wanted[-1]
    if not 0 <= start_layer <= last + 1 or (start_layer > 0 and restore is None):
        raise UspxError(f"start_layer {start_layer} needs restore() and must lie in 0..{last + 1}")
    lengths = [len(s) for s in sequences]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n_tokens = int(offsets[-1])
    top_k, n_experts = int(config.num_experts_per_tok), int(config.num_local_experts)

    tmp_dir: Path | None = None
    spill = Path(spill_dir) if spill_dir is not None else None
    if spill is None:
        plan = predict_peak_memory(config, n_tokens, dtype=dtype, batch_tokens=batch_tokens,
                                   max_seq_len=max(lengths), record_logits=record_logits,
                                   head_tokens=head_tokens if head is not None else 0)
        limit = memory_limit_bytes if memory_limit_bytes is not None else _default_limit()
        if memory_limit_bytes is not None and plan["total_spilled"] > limit:
            raise UspxError(
                f"tracing needs about {plan['total_spilled'] / 2**30:.1f} GiB even with hidden states on disk, "
                f"over the {limit / 2**30:.1f} GiB limit; use fewer tokens per batch (batch_tokens) or "
                "shorter sequences"
            )
        if plan["total"] > limit:
            tmp_dir = spill = Path(tempfile.mkdtemp(prefix="uspx-hidden-"))
            say(f"hidden states ({plan['hidden_states'] / 2**30:.1f} GiB) go to {spill}: RAM would not hold them")
    store = HiddenStore(n_tokens, int(config.hidden_size), dtype, spill)
    result = StreamResult(n_tokens, n_layers, store.spilled)
    try:
        with torch.no_grad():
            if start_layer == 0:
                ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long)
                table = embedding_table(ckpt, ids)
                for a in range(0, n_tokens, _EMBED_CHUNK):  # slices: no [N, H] copy besides the store
                    b = min(a + _EMBED_CHUNK, n_tokens)
                    store.write(np.arange(a, b), table.index_select(0, ids[a:b]).to(dtype))
                del ids, table
            else:
                restore(store)
                say(f"resuming at layer {start_layer + 1}/{n_layers} from saved hidden states")
            rotary = GptOssRotaryEmbedding(config)
            batches = _batches(lengths, batch_tokens)
            for layer_idx in range(start_layer, last + 1):
                t0 = time.perf_counter()
                # restricted: banned experts never get a token, so their weights need not be decoded
                layer = build_layer(ckpt, config, layer_idx, dtype, None if kept is None else kept.get(layer_idx))
                ckpt.close()  # unmap the shards: touched pages would otherwise stay in RSS all run
                result.load_seconds_per_layer.append(time.perf_counter() - t0)
                ban = RoutingBan(layer.mlp.router, n_experts, None if kept is None else kept.get(layer_idx))
                # layers before a wanted one only move hidden states along: no hooks, no extra pass
                rec = LayerRecorder(layer, n_tokens, top_k, n_experts, record_logits, expert_norms,
                                ban if reconstruction else None) if layer_idx in wanted else None
                layer_type = config.layer_types[layer_idx]
                for batch in batches:
                    rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in batch])
                    seq_len = lengths[batch[0]]
                    x = store.read(rows).reshape(len(batch), seq_len, -1)
                    position_ids = torch.arange(seq_len).unsqueeze(0)
                    mask_fn = create_sliding_window_causal_mask if layer_type == "sliding_attention" else create_causal_mask
                    mask = mask_fn(config=config, inputs_embeds=x, attention_mask=None, past_key_values=None)
                    if rec is not None:
                        rec.rows = rows
                    out = layer(x, attention_mask=mask, position_embeddings=rotary(x, position_ids),
                                position_ids=position_ids, use_cache=False)
                    store.write(rows, out)
                if rec is not None:
                    rec.remove()
                ban.remove()
                del layer
                gc.collect()
                if rec is not None:
                    on_layer(layer_idx, rec.arrays())
                    del rec
                if after_layer is not None:
                    after_layer(layer_idx, store)
                result.seconds_per_layer.append(time.perf_counter() - t0)
                say(f"layer {layer_idx + 1}/{n_layers}: {n_tokens} tokens in "
                    f"{result.seconds_per_layer[-1]:.1f} s{' (hidden states on disk)' if store.spilled else ''}")
            if head is not None:
                run_head(ckpt, config, store, n_tokens, dtype, head, head_tokens)
    finally:
        store.close()
        ckpt.close()
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return result


def predict_peak_memory(config, n_tokens: int, *, dtype: torch.dtype = torch.bfloat16,
                        batch_tokens: int = DEFAULT_BATCH_TOKENS, max_seq_len: int | None = None,
                        record_logits: bool = True, head_tokens: int = 0,
                        decoded_experts: int | None = None) -> dict[str, int]:
    """Bytes :func:`stream_trace` needs at its peak, by part (an estimate, from the config alone).

    ``config`` is a transformers config or a config.json dict. Parts: one dense decoder layer,
    MXFP4 decode temporaries (one expert in float32), the hidden states, one batch's activations
    (eager attention materialises ``heads x T x T`` scores several times), the routing records of
    one layer, and the embedding table (read once, before the first layer, so it counts only if it
    is larger than a layer). ``total_spilled`` is the same with hidden states on disk.
    ``decoded_experts``: experts decoded per layer when a run is restricted to a kept set (only
    those become resident; see ``layer.layer_state``), default all.
    """
    c = config if isinstance(config, dict) else config.to_dict()
    h, i_sz, e, k = (int(c[f]) for f in ("hidden_size", "intermediate_size", "num_local_experts", "num_experts_per_tok"))
    heads, kv, hd, v = (int(c[f]) for f in ("num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size"))
    item = torch.empty((), dtype=dtype).element_size()
    t = min(max_seq_len or batch_tokens, batch_tokens)
    b_tokens = min(max(batch_tokens, t), max(n_tokens, 1))  # a batch never holds more than every token
    attn_params = h * heads * hd * 2 + h * kv * hd * 2 + heads * hd * 2 + kv * hd * 2 + h + heads + 2 * h
    resident = e if decoded_experts is None else min(e, int(decoded_experts))
    expert_params = resident * (h * 2 * i_sz + i_sz * h) + e * (2 * i_sz + h) + e * (h + 1)  # biases, router: all
    layer = (attn_params + expert_params) * item
    decode_tmp = (2 * i_sz * h) * 4 * 3  # float32 values, scale factors, transpose copy for one expert
    hidden = n_tokens * h * item
    activations = (
        b_tokens * h * item * 12  # residual, norms, q/k/v/o, expert input copies
        + b_tokens * k * 2 * i_sz * 4 * 3  # grouped_mm gate_up outputs and SwiGLU, float32 worst case
        + b_tokens * k * h * 4 * 2  # per-slot expert outputs (expert_norms pass)
        + b_tokens * heads * (t + 1) * 4 * 4  # scores, scores+sinks, softmax, mask
    )
    records = n_tokens * (k * 12 + (e * 4 if record_logits else 0))
    embed_phase = v * h * 2 + min(n_tokens, _EMBED_CHUNK) * h * (2 + item) + n_tokens * 8  # table, one slice, ids
    # lm_head as stored plus a slice in dtype; one chunk of float32 logits, a dtype copy, a log-softmax
    head_phase = (v * h * 2 + HEAD_VOCAB_CHUNK * h * item + head_tokens * v * (item + 4 * 3)) if head_tokens else 0
    steady = layer + decode_tmp + activations + records
    base = 512 * 2**20  # python, torch, transformers and pyarrow themselves (measured: about 480 MiB)
    total_spilled = base + max(steady, embed_phase, head_phase)
    return {
        "layer_weights": layer,
        "decode_temporaries": decode_tmp,
        "activations": activations,
        "routing_records": records,
        "embedding_phase": embed_phase,
        "head_phase": head_phase,
        "hidden_states": hidden,
        "runtime": base,
        "total": total_spilled + hidden,
        "total_spilled": total_spilled,
    }


def _default_limit() -> int:
    """80% of the memory available now: what a trace may use without pushing others out."""
    import psutil

    return int(psutil.virtual_memory().available * 0.8)


def _progress_fn(progress: bool | Callable[[str], None]) -> Callable[[str], None]:
    if callable(progress):
        return progress
    if progress:
        return lambda msg: print(f"[uspx stream] {msg}", file=sys.stderr, flush=True)
    return lambda msg: None
