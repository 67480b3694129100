"""Build one gpt_oss decoder layer, with transformers' own ``GptOssDecoderLayer`` class, from a
checkpoint's tensors, dequantizing MXFP4 experts on the way.

Using the real class (not a re-implementation) means attention sinks, sliding windows, the clamped
SwiGLU and the router are the model's own code; only the weights come from disk one layer at a time.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from uspx.io import UspxError
from uspx.models import mxfp4
from uspx.stream.checkpoint import Checkpoint

# Attention and experts kernels that from_pretrained picks for gpt_oss on CPU (checked with
# transformers 5.23: ``model.config._attn_implementation == "eager"``, experts ``"grouped_mm"``);
# a standalone layer must use the same or its numbers drift from the whole model's.
ATTN_IMPLEMENTATION = "eager"
EXPERTS_IMPLEMENTATION = "grouped_mm"
HEAD_VOCAB_CHUNK = 1 << 15  # lm_head rows cast to the compute dtype at once


def load_config(ckpt: Checkpoint):
    """The transformers config of a gpt_oss checkpoint, set up for standalone layers."""
    from transformers import AutoConfig

    model_type = ckpt.config.get("model_type")
    if model_type != "gpt_oss":
        raise UspxError(f"{ckpt.path}: streaming supports gpt_oss checkpoints only, this one is {model_type!r}")
    config = AutoConfig.from_pretrained(ckpt.path)
    config._attn_implementation = ATTN_IMPLEMENTATION
    config._experts_implementation = EXPERTS_IMPLEMENTATION
    return config


def layer_state(ckpt: Checkpoint, layer_idx: int, dtype: torch.dtype,
                experts: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """State dict (names relative to the layer) of decoder layer ``layer_idx`` in ``dtype``.

    MXFP4 ``*_blocks``/``*_scales`` pairs become the dense parameter transformers would build
    (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``), decoded one expert at a time into the
    preallocated parameter so no second full-size copy exists.

    With ``experts``, only those experts' MXFP4 weights are read and decoded; the others' rows are
    allocated but never written. For a run whose routing is restricted to ``experts`` (their rows
    are never read: grouped_mm skips experts without tokens), those pages are never touched and
    never resident, so the restricted original costs the memory of its kept experts only.
    """
    prefix = f"model.layers.{layer_idx}."
    names = ckpt.names(prefix)
    if not names:
        raise UspxError(f"{ckpt.path}: no tensors for layer {layer_idx}")
    state: dict[str, torch.Tensor] = {}
    for name in names:
        local = name[len(prefix):]
        if local.endswith("_scales"):
            continue  # consumed with its blocks
        if local.endswith("_blocks"):
            param = local[: -len("_blocks")]
            scales_name = prefix + param + "_scales"
            if scales_name not in ckpt:
                raise UspxError(f"{ckpt.path}: {name} has no matching {scales_name}")
            n_e, rows, groups, _ = ckpt.spec(name).shape
            out = torch.empty(n_e, groups * mxfp4.BLOCK_SIZE, rows, dtype=dtype)
            if experts is None:
                blocks, scales = ckpt.get(name), ckpt.get(scales_name)
                mxfp4.decode_into(out, blocks, scales)
                del blocks, scales
            else:
                for e in sorted(int(x) for x in experts):
                    mxfp4.decode_into(out[e : e + 1], ckpt.rows(name, e, e + 1), ckpt.rows(scales_name, e, e + 1))
            state[param] = out
        else:
            state[local] = ckpt.get(name).to(dtype)
    return state


def build_layer(ckpt: Checkpoint, config, layer_idx: int, dtype: torch.dtype,
                experts: Sequence[int] | None = None) -> torch.nn.Module:
    """A ready ``GptOssDecoderLayer`` in eval mode holding layer ``layer_idx``'s weights (MXFP4
    experts: only ``experts`` decoded, see :func:`layer_state`)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssDecoderLayer

    with torch.device("meta"):
        layer = GptOssDecoderLayer(config, layer_idx)
    state = layer_state(ckpt, layer_idx, dtype, experts)
    try:
        # strict: a tensor the class expects but the file lacks must fail, not stay uninitialised
        layer.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise UspxError(f"{ckpt.path}: layer {layer_idx} does not match GptOssDecoderLayer: {exc}") from None
    return layer.eval()


def embedding_table(ckpt: Checkpoint, token_ids: torch.Tensor) -> torch.Tensor:
    """The embedding table as stored, after checking that ``token_ids`` index into it."""
    name = "model.embed_tokens.weight"
    vocab = ckpt.spec(name).shape[0]
    if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab):
        raise UspxError(f"token ids must lie in 0..{vocab - 1} (the model's vocabulary)")
    return ckpt.get(name)


def run_head(ckpt: Checkpoint, config, store, n_tokens: int, dtype: torch.dtype, head, head_tokens: int) -> None:
    """Final norm and lm_head over the hidden states after the last layer, a chunk of tokens at a time."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

    norm = GptOssRMSNorm(int(config.hidden_size), eps=config.rms_norm_eps)
    norm.weight.data = ckpt.get("model.norm.weight").to(dtype)
    # untied gpt_oss checkpoints hold lm_head; tied ones reuse the embedding
    name = "lm_head.weight" if "lm_head.weight" in ckpt else "model.embed_tokens.weight"
    weight = ckpt.get(name)  # as stored; cast a slice of the vocabulary at a time (no full copy)
    ckpt.close()
    vocab = weight.shape[0]
    for a in range(0, n_tokens, max(1, head_tokens)):
        rows = np.arange(a, min(a + head_tokens, n_tokens))
        h = norm(store.read(rows))
        logits = torch.empty(len(rows), vocab, dtype=torch.float32)
        for v in range(0, vocab, HEAD_VOCAB_CHUNK):
            w = weight[v : v + HEAD_VOCAB_CHUNK].to(dtype)
            logits[:, v : v + w.shape[0]] = torch.nn.functional.linear(h, w).float()
        head(rows, logits)
