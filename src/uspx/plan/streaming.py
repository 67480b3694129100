"""``uspx plan --streaming``: the peak memory of a layer-by-layer run, before running it."""

from __future__ import annotations

from pathlib import Path

from uspx.io import UspxError, read_json
from uspx.progress import console
from uspx.engine import compute_dtype
from uspx.engine.memory import predict_peak_memory
from uspx.plan.memory import estimate, format_bytes
from uspx.trace.run import DEFAULT_BATCH_TOKENS

_ROWS = (
    ("layer_weights", "one decoder layer, experts dequantized"),
    ("load_temporaries", "loading a layer's experts (stacking, MXFP4 decoding)"),
    ("activations", "one batch through the layer"),
    ("routing_records", "routing of one layer, every token"),
    ("hidden_states", "hidden states of every token"),
    ("runtime", "python, torch, transformers"),
    ("embedding_phase", "embedding lookup (own phase, before layer 0)"),
    ("head_phase", "final norm + lm_head (own phase: verify, loss)"),
)


def streaming_plan(path: str | Path, tokens: int, *, seq_len: int = 512, dtype: str = "bf16",
                   batch_tokens: int = DEFAULT_BATCH_TOKENS) -> dict:
    """``predict_peak_memory`` for a model folder, with the verification / loss phase included, and
    what loading the whole model dequantized would take instead."""
    if tokens < 1 or seq_len < 1:
        raise UspxError("--tokens and --seq-len must be at least 1")
    torch_dtype = compute_dtype(dtype, path)
    config = read_json(Path(path) / "config.json")  # the config alone: no weights need be present
    parts = predict_peak_memory(config, tokens, dtype=torch_dtype, batch_tokens=batch_tokens,
                                max_seq_len=min(seq_len, tokens), head_tokens=256)
    whole = estimate(path, "bf16" if torch_dtype.itemsize == 2 else "fp32", context=0)
    return dict(parts, tokens=tokens, seq_len=seq_len, dtype=dtype, whole_model_bytes=whole.weights_bytes)


def print_streaming_plan(path: str | Path, tokens: int, *, seq_len: int = 512, dtype: str = "bf16") -> dict:
    from rich.table import Table

    plan = streaming_plan(path, tokens, seq_len=seq_len, dtype=dtype)
    table = Table(title=f"streaming peak memory, {tokens} tokens (sequences up to {seq_len}), compute {dtype}")
    table.add_column("part")
    table.add_column("bytes", justify="right")
    for key, label in _ROWS:
        table.add_row(label, format_bytes(plan[key]))
    # phases do not overlap: the peak is the largest of (layer phase, embedding phase, head phase)
    table.add_row("[bold]peak (hidden states in RAM)", f"[bold]{format_bytes(plan['total'])}")
    table.add_row("peak (hidden states spilled to disk)", format_bytes(plan["total_spilled"]))
    console.print(table)
    console.print(f"loading the whole model instead ({dtype} weights): {format_bytes(plan['whole_model_bytes'])}")
    return plan
