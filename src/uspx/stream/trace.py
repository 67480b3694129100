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
from typing import Callable, Sequence

import numpy as np
import torch

from uspx.io import UspxError
from uspx.stream.checkpoint import Checkpoint
from uspx.stream.layer import build_layer, embedding_table, load_config

OnLayer = Callable[[int, dict[str, np.ndarray]], None]

DEFAULT_BATCH_TOKENS = 2048
_EMBED_CHUNK = 1 << 15


@dataclass
class StreamResult:
    n_tokens: int
    n_layers: int
    spilled: bool
    seconds_per_layer: list[float] = field(default_factory=list)


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
    lengths = [len(s) for s in sequences]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n_tokens = int(offsets[-1])
    top_k, n_experts = int(config.num_experts_per_tok), int(config.num_local_experts)

    tmp_dir: Path | None = None
    spill = Path(spill_dir) if spill_dir is not None else None
    if spill is None:
        plan = predict_peak_memory(config, n_tokens, dtype=dtype, batch_tokens=batch_tokens,
                                   max_seq_len=max(lengths), record_logits=record_logits)
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
            ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long)
            table = embedding_table(ckpt, ids)
            for a in range(0, n_tokens, _EMBED_CHUNK):  # slices: no [N, H] copy besides the store
                b = min(a + _EMBED_CHUNK, n_tokens)
                store.write(np.arange(a, b), table.index_select(0, ids[a:b]).to(dtype))
            del ids, table
            rotary = GptOssRotaryEmbedding(config)
            batches = _batches(lengths, batch_tokens)
            for layer_idx in range(wanted[-1] + 1):
                t0 = time.perf_counter()
                layer = build_layer(ckpt, config, layer_idx, dtype)
                ckpt.close()  # unmap the shards: touched pages would otherwise stay in RSS all run
                # layers before a wanted one only move hidden states along: no hooks, no extra pass
                rec = _Recorder(layer, n_tokens, top_k, n_experts, record_logits, expert_norms) \
                    if layer_idx in wanted else None
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
                del layer
                gc.collect()
                if rec is not None:
                    rec.remove()
                    on_layer(layer_idx, rec.arrays())
                result.seconds_per_layer.append(time.perf_counter() - t0)
                say(f"layer {layer_idx + 1}/{n_layers}: {n_tokens} tokens in "
                    f"{result.seconds_per_layer[-1]:.1f} s{' (hidden states on disk)' if store.spilled else ''}")
    finally:
        store.close()
        ckpt.close()
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return result


class _Recorder:
    """Forward hooks on one layer's router and experts that file their outputs under token rows."""

    def __init__(self, layer: torch.nn.Module, n: int, k: int, e: int, logits: bool, norms: bool):
        self.rows: np.ndarray = np.empty(0, dtype=np.int64)
        self.ids = np.zeros((n, k), dtype=np.int32)
        self.weights = np.zeros((n, k), dtype=np.float32)
        self.logits = np.zeros((n, e), dtype=np.float32) if logits else None
        self.norms = np.zeros((n, k), dtype=np.float32) if norms else None
        self._handles = [layer.mlp.router.register_forward_hook(self._router_hook)]
        if norms:
            self._handles.append(layer.mlp.experts.register_forward_hook(self._experts_hook))

    def _router_hook(self, module, args, output) -> None:
        logits, weights, index = output  # rows in the order of hidden.reshape(-1, H): batch-major
        self.ids[self.rows] = index.to(torch.int32).numpy()
        self.weights[self.rows] = weights.float().numpy()
        if self.logits is not None:
            self.logits[self.rows] = logits.float().numpy()

    def _experts_hook(self, module, args, output) -> None:
        # Same computation as MoEAdapter.expert_outputs: every (token, slot) alone with weight 1,
        # through the experts' own forward, so biases and the clamped SwiGLU are the model's.
        hidden, index = args[0], args[1]
        n, k = index.shape
        rows = hidden.repeat_interleave(k, dim=0)
        ones = torch.ones(n * k, 1, dtype=hidden.dtype)
        out = module.forward(rows, index.reshape(-1, 1), ones)
        self.norms[self.rows] = out.float().norm(dim=-1).reshape(n, k).numpy()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"expert_ids": self.ids, "expert_weights": self.weights}
        if self.logits is not None:
            out["router_logits"] = self.logits
        if self.norms is not None:
            out["expert_norms"] = self.norms
        return out


def predict_peak_memory(config, n_tokens: int, *, dtype: torch.dtype = torch.bfloat16,
                        batch_tokens: int = DEFAULT_BATCH_TOKENS, max_seq_len: int | None = None,
                        record_logits: bool = True) -> dict[str, int]:
    """Bytes :func:`stream_trace` needs at its peak, by part (an estimate, from the config alone).

    ``config`` is a transformers config or a config.json dict. Parts: one dense decoder layer,
    MXFP4 decode temporaries (one expert in float32), the hidden states, one batch's activations
    (eager attention materialises ``heads x T x T`` scores several times), the routing records of
    one layer, and the embedding table (read once, before the first layer, so it counts only if it
    is larger than a layer). ``total_spilled`` is the same with hidden states on disk.
    """
    c = config if isinstance(config, dict) else config.to_dict()
    h, i_sz, e, k = (int(c[f]) for f in ("hidden_size", "intermediate_size", "num_local_experts", "num_experts_per_tok"))
    heads, kv, hd, v = (int(c[f]) for f in ("num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size"))
    item = torch.empty((), dtype=dtype).element_size()
    t = min(max_seq_len or batch_tokens, batch_tokens)
    b_tokens = max(batch_tokens, t)
    attn_params = h * heads * hd * 2 + h * kv * hd * 2 + heads * hd * 2 + kv * hd * 2 + h + heads + 2 * h
    expert_params = e * (h * 2 * i_sz + i_sz * h + 2 * i_sz + h) + e * (h + 1)
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
    steady = layer + decode_tmp + activations + records
    base = 300 * 2**20  # python, torch and transformers themselves
    total_spilled = base + max(steady, embed_phase)
    return {
        "layer_weights": layer,
        "decode_temporaries": decode_tmp,
        "activations": activations,
        "routing_records": records,
        "embedding_phase": embed_phase,
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
