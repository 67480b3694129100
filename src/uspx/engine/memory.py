"""What a layer-by-layer run needs at its peak, from the config alone, for any family.

Parts: one decoder layer in the compute dtype (the largest: attention, norms, dense or shared MLP
and every routed expert; a restricted run of an MXFP4 checkpoint decodes only its kept experts), two
more copies of its experts while they are loaded (transformers' checkpoint conversion stacks the
per-expert tensors, then joins the gate and up projections), the hidden states of every token, one batch's activations
(eager attention materialises ``heads x T x T`` scores several times), the routing records of one
layer, and the embedding and head phases (each runs alone, before the first or after the last
layer, so each counts only if it is larger than a layer's phase).
"""

from __future__ import annotations

import torch

from uspx.models.params import count_params, load_config

RUNTIME_BYTES = 640 * 2**20  # python, torch, transformers, accelerate and pyarrow themselves


def predict_peak_memory(config, n_tokens: int, *, dtype: torch.dtype = torch.bfloat16, batch_tokens: int = 2048,
                        max_seq_len: int | None = None, record_logits: bool = True, head_tokens: int = 0,
                        decoded_experts: int | None = None, paired: bool = False) -> dict[str, int]:
    """Bytes by part (an estimate); ``total`` keeps hidden states in RAM, ``total_spilled`` on disk.

    ``config`` is a transformers config, a config.json dict or a model folder. ``decoded_experts``
    counts only for quantized (MXFP4) experts: dense ones are read whole even when restricted.
    ``paired``: two models side by side (:mod:`uspx.engine.pair`: evaluation, layer-by-layer
    recovery), which hold two hidden streams and, at the end, both heads and both chunks of logits;
    their layers take turns, so one layer's weights count once.
    """
    cfg = load_config(config)
    p = count_params(cfg)
    item = torch.empty((), dtype=dtype).element_size()
    h, v = int(cfg.hidden_size), int(cfg.vocab_size)
    heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
    e, k = p.num_experts, p.top_k
    inter = max(1, p.expert.matrix // (3 * h))
    resident = e if decoded_experts is None or p.stored_dtype != "mxfp4" else min(e, int(decoded_experts))
    shared = sum(p.other[c].total for c in ("attention", "norms", "dense_mlp") if c in p.other)
    per_layer_shared = shared // max(p.num_layers, 1)
    experts = resident * p.expert.total + e * p.router_row.total
    layer = (per_layer_shared + experts) * item
    # loading: transformers stacks per-expert tensors into the fused parameter and concatenates the
    # gate and up projections (two more copies at worst); MXFP4 is decoded into the parameter itself
    load_tmp = (1 if p.stored_dtype == "mxfp4" else 2) * resident * p.expert.total * item
    t = min(max_seq_len or batch_tokens, batch_tokens)
    b_tokens = min(max(batch_tokens, t), max(n_tokens, 1))
    activations = (
        b_tokens * h * item * 12  # residual, norms, attention projections, expert input copies
        + b_tokens * k * 2 * inter * 4 * 3  # grouped expert gate/up outputs and activation, float32 worst case
        + b_tokens * k * h * 4 * 2  # per-slot expert outputs (norms, reconstruction re-runs)
        + b_tokens * heads * (t + 1) * 4 * 4  # scores, softmax, mask
    )
    records = n_tokens * (k * 12 + (e * 4 if record_logits else 0))
    streams = 2 if paired else 1
    hidden = streams * n_tokens * h * item
    embed_phase = v * h * item + min(n_tokens, 1 << 15) * h * item * 2
    head_phase = streams * (v * h * item * 2 + head_tokens * v * (item + 4 * 3)) if head_tokens else 0
    steady = layer + load_tmp + activations + records
    total_spilled = RUNTIME_BYTES + max(steady, embed_phase, head_phase)
    return dict(layer_weights=layer, load_temporaries=load_tmp, activations=activations, routing_records=records,
                embedding_phase=embed_phase, head_phase=head_phase, hidden_states=hidden, runtime=RUNTIME_BYTES,
                total=total_spilled + hidden, total_spilled=total_spilled)
