"""``uspx import-routing``: the routing a vLLM or SGLang server recorded, as a uspx trace (when the
engine gives the experts of each token: vLLM's routed experts, SGLang's per_token dumps) or a
frequency score table (SGLang's stat and per_pass dumps, which hold counts only).

The file formats and filters are :mod:`uspx.trace.serving`'s. What each import supports:

* a trace of expert ids: ``frequency`` (``uspx score MODEL OUT OUT/workload.jsonl --methods
  frequency``), and ``uspx drift`` (shares of routed tokens, the engines record no weights);
  ``reap`` and ``ean`` need the gate weights and the routed experts' output norms, and
  ``reconstruction``, ``taylor`` and the ablations need the model: ``uspx score`` runs a model pass
  over the items' decoded text for them (``--max-tokens`` subsamples it);
* a table of counts: ``frequency`` only, with forward passes as the bootstrap unit (``uspx select``
  reads it like any score table).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from uspx.io import UspxError
from uspx.trace.serving import (DEDUPE, DEFAULT_MODES, FORMATS, TRACE_SCORES, Imported, check_out, count_passes,
                                model_shape, per_token_items, read_dumps, read_vllm, write_trace)

if TYPE_CHECKING:
    from uspx.engine import Opened
    from uspx.score import ScoreTable

MODEL_PASS_SCORES = ["reap", "ean", "reconstruction", "taylor", "ablation_natural", "ablation_interventional",
                     "usage_x_marginal"]


def import_routing(paths: list[str | Path], fmt: str, model: str | Path | Opened, out: str | Path, *,
                   family: str = "serving", dedupe: str = "id", keep_modes: tuple[int, ...] = DEFAULT_MODES,
                   bootstrap: int = 200, seed: int = 0) -> Imported:
    """Import the files ``paths`` of engine ``fmt`` ("vllm": one routed-experts JSONL; "sglang":
    expert-distribution dumps) recorded while ``model`` served; writes ``out`` (a new folder).

    ``family``: the family of the imported items. ``dedupe``: "id" (a request id seen before),
    "tokens" (also identical token ids) or "none". ``keep_modes``: SGLang forward modes kept.
    ``bootstrap`` / ``seed``: the intervals of a count table (forward passes resampled).
    """
    from uspx.engine import open_source

    if fmt not in FORMATS:
        raise UspxError(f"unknown routing format {fmt!r}; choose from {', '.join(FORMATS)}")
    if dedupe not in DEDUPE:
        raise UspxError(f"dedupe must be one of {', '.join(DEDUPE)}, not {dedupe!r}")
    files = [Path(p) for p in paths]
    for f in files:
        if not f.is_file():
            raise UspxError(f"{f}: file not found")
    if fmt == "vllm" and len(files) != 1:
        raise UspxError("vLLM routing comes as one JSONL file; concatenate the files first")
    out = Path(out)
    check_out(out)
    # opened layer by layer: only the config, tokenizer and file layout are read, never the weights
    opened = open_source(model, streaming=True)
    shape = model_shape(opened)
    if fmt == "vllm":
        routed, dropped = read_vllm(files[0], shape, dedupe)
    else:
        dumps, repeated = read_dumps(files)
        if dumps[0].kind != "per_token":
            counts, dropped = count_passes(dumps, shape)
            dropped["files given twice"] = repeated
            write_scores(counts, opened, out, sources=files, dropped=dropped, bootstrap=bootstrap, seed=seed)
            return Imported("scores", str(out), f"sglang {dumps[0].kind}", len(counts),
                            int(counts.sum() // (shape.top_k * len(shape.layers))), dropped, ["frequency"])
        routed, dropped = per_token_items(dumps, shape, tuple(keep_modes), dedupe)
        dropped["files given twice"] = repeated
    manifest = write_trace(routed, opened, out, sources=files, fmt=fmt, family=family, dropped=dropped)
    return Imported("trace", str(out), fmt, len(routed), int(manifest["summary"]["tokens"]), dropped, TRACE_SCORES)


def write_scores(counts: np.ndarray, opened: Opened, out: Path, *, sources: list[Path], dropped: dict[str, int],
                 bootstrap: int, seed: int) -> ScoreTable:
    """The frequency table of per-pass counts [P, L, E]: routed tokens over tokens, where a pass's
    tokens in a layer are its routed slots over top-k; percentile intervals over passes."""
    import uspx
    from uspx.score.bootstrap import Factor, estimate
    from uspx.score.table import FORMAT, ScoreTable, build_table
    from uspx.trace.serving import file_digest

    a = opened.source.adapter
    layers = [l.index for l in a.layers]
    tokens = counts.sum(-1, keepdims=True) / a.top_k  # [P, L, 1]
    est = estimate([Factor(counts.astype(np.float64), tokens)], bootstrap, seed)
    table = build_table(layers, a.num_experts, "frequency", est.value, counts.sum(0), est.ci_low, est.ci_high,
                        opened.source.stored_expert_bytes(), len(counts))
    meta = dict(
        format=FORMAT, uspx_version=uspx.__version__,
        model=dict(source=opened.path, label=opened.label, fingerprint=opened.fingerprint, family=a.family,
                   moe_layers=layers, num_experts=a.num_experts, top_k=a.top_k),
        workload=dict(source=[str(p) for p in sources], fingerprint=file_digest(sources), split="all"),
        trace=None, methods=["frequency"],
        options=dict(bootstrap=bootstrap, seed=seed, ci_level=0.95, bootstrap_unit="forward pass",
                     imported=dict(format="sglang", sources=[str(p) for p in sources], dropped=dropped),
                     sequential=None, units=["experts"]),
        prompts=dict(trace=int(len(counts)), model=None, model_tokens=None, loss_tokens=None),
        method_source={"frequency": "sglang expert-distribution counts"},
        cost_bytes="bytes of one expert in the checkpoint as stored (quantized blocks and scales, biases, router row)",
    )
    t = ScoreTable(table, meta)
    t.write(out)
    return t


def print_imported(res: Imported) -> None:
    from uspx.progress import console

    what = "items" if res.kind == "trace" and res.format == "vllm" else "forward passes"
    console.print(f"imported {res.items} {what} ({res.tokens} tokens) from {res.format} as a {res.kind} in {res.out}")
    for reason, n in res.dropped.items():
        if n:
            console.print(f"  dropped: {n} {reason}")
    console.print(f"scores this import gives: {', '.join(res.supports)}; model passes add "
                  f"{', '.join(MODEL_PASS_SCORES)}" if res.kind == "trace" else
                  f"scores this import gives: {', '.join(res.supports)} (counts hold no tokens to run the model on)")
    if res.kind == "trace":
        console.print(f"score it: uspx score MODEL {res.out} {Path(res.out) / 'workload.jsonl'} -o SCORES "
                      "--methods frequency")
