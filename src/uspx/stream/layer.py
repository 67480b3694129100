"""Build one gpt_oss decoder layer, with transformers' own ``GptOssDecoderLayer`` class, from a
checkpoint's tensors, dequantizing MXFP4 experts on the way.

Using the real class (not a re-implementation) means attention sinks, sliding windows, the clamped
SwiGLU and the router are the model's own code; only the weights come from disk one layer at a time.
"""

from __future__ import annotations

import torch

from uspx.io import UspxError
from uspx.models import mxfp4
from uspx.stream.checkpoint import Checkpoint

# Attention and experts kernels that from_pretrained picks for gpt_oss on CPU (checked with
# transformers 5.23: ``model.config._attn_implementation == "eager"``, experts ``"grouped_mm"``);
# a standalone layer must use the same or its numbers drift from the whole model's.
ATTN_IMPLEMENTATION = "eager"
EXPERTS_IMPLEMENTATION = "grouped_mm"


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


def layer_state(ckpt: Checkpoint, layer_idx: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """State dict (names relative to the layer) of decoder layer ``layer_idx`` in ``dtype``.

    MXFP4 ``*_blocks``/``*_scales`` pairs become the dense parameter transformers would build
    (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``), decoded one expert at a time into the
    preallocated parameter so no second full-size copy exists.
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
            blocks, scales = ckpt.get(name), ckpt.get(scales_name)
            n_e, rows, groups, _ = blocks.shape
            out = torch.empty(n_e, groups * mxfp4.BLOCK_SIZE, rows, dtype=dtype)
            state[param] = mxfp4.decode_into(out, blocks, scales)
            del blocks, scales
        else:
            state[local] = ckpt.get(name).to(dtype)
    return state


def build_layer(ckpt: Checkpoint, config, layer_idx: int, dtype: torch.dtype) -> torch.nn.Module:
    """A ready ``GptOssDecoderLayer`` in eval mode holding layer ``layer_idx``'s weights."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssDecoderLayer

    with torch.device("meta"):
        layer = GptOssDecoderLayer(config, layer_idx)
    state = layer_state(ckpt, layer_idx, dtype)
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
