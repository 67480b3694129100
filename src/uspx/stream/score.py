"""``uspx score --streaming``: the local scores of a model larger than memory.

Local scores need no full-model forward per expert: ``frequency``, ``reap`` and ``ean`` are sums
over a trace (reap / ean need its expert norms), and ``reconstruction`` compares one MoE block's
output with and without an expert on that block's own inputs, which a streaming pass has at hand
layer by layer. The sums come from the trace folder (``reconstruction.npz`` when the streaming
trace recorded it, else one more streaming pass over the trace's tokens), and the table is built
exactly as ``uspx.score.score`` builds it: same ratios, same bootstrap over prompts, same columns.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

import uspx
from uspx.io import UspxError
from uspx.models import model_fingerprint
from uspx.models.loading import resolve_model_path
from uspx.score.api import LOSS_DEFINITION, NORM_METHODS, _check_methods
from uspx.score.bootstrap import Factor, estimate
from uspx.score.table import FORMAT, ScoreTable, build_table
from uspx.score.trace_stats import stats_from_trace
from uspx.stream.checkpoint import Checkpoint
from uspx.stream.folder import DTYPE_NAMES, RECONSTRUCTION
from uspx.trace import Trace

LOCAL_METHODS = ("frequency", "reap", "ean", "reconstruction")
_LAYER_EXPERTS = re.compile(r"^model\.layers\.(\d+)\.mlp\.(router\.(weight|bias)|experts\.[A-Za-z_]+)$")


def expert_cost_bytes(model_dir: str | os.PathLike) -> list[int]:
    """Bytes one expert takes on disk, per layer (its slice of every expert tensor and the router):
    what pruning it saves in this checkpoint, MXFP4 blocks and scales included."""
    ckpt = Checkpoint(model_dir)
    n_layers, n_exp = int(ckpt.config["num_hidden_layers"]), int(ckpt.config["num_local_experts"])
    total = [0] * n_layers
    for name in ckpt.weight_map:
        m = _LAYER_EXPERTS.match(name)
        if m:
            total[int(m.group(1))] += ckpt.spec(name).nbytes
    ckpt.close()
    return [t // n_exp for t in total]


def score_streaming(
    model: str | os.PathLike,
    trace_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    methods: Sequence[str] | None = None,
    *,
    workload=None,
    split: str = "calibration",
    bootstrap: int = 200,
    seed: int = 0,
    dtype: str = "bf16",
    progress: bool = True,
) -> ScoreTable:
    """Score every (layer, expert) of a gpt_oss checkpoint with local ``methods`` without loading it.

    ``methods`` defaults to every local method the trace allows (reap / ean need its norms).
    ``workload`` (optional) is checked against the trace as ``uspx score`` checks it; without it the
    trace's own workload record is trusted. Every prompt of ``split`` in the trace is used.
    """
    if methods is None:
        has_norms = "expert_norms" in _columns(Trace(trace_dir))
        methods = [m for m in LOCAL_METHODS if has_norms or m not in NORM_METHODS]
    methods = _check_methods(methods)
    whole = [m for m in methods if m not in LOCAL_METHODS]
    if whole:
        raise UspxError(
            f"{', '.join(whole)} need the whole model in memory (a full forward, or gradients, per expert); "
            f"streaming scores only the local methods {', '.join(LOCAL_METHODS)}"
        )
    if bootstrap < 0:
        raise UspxError("bootstrap must be >= 0")
    path = resolve_model_path(model)
    tr = Trace(trace_dir)
    fingerprint = model_fingerprint(path)
    tr.check(model=fingerprint)
    trace_split = tr.manifest.get("options", {}).get("split", "all")
    if trace_split not in ("all", split):
        raise UspxError(f"{tr.path}: the trace covers split {trace_split!r}, not {split!r}")
    wl_record = dict(source=tr.manifest["workload"]["source"], fingerprint=tr.workload_fingerprint)
    if workload is not None:
        from uspx.workload import Workload, load_workload

        wl = workload if isinstance(workload, Workload) else load_workload(workload)
        tr.check(workload=wl.part(trace_split).fingerprint)
        wl_record = dict(source=wl.source, fingerprint=wl.fingerprint)
    columns = _columns(tr)
    has_norms = "expert_norms" in columns
    if any(m in NORM_METHODS for m in methods) and not has_norms:
        raise UspxError(f"{tr.path}: reap / ean need expert norms; trace with --norms")

    layers, n_exp = list(tr.moe_layers), tr.num_experts
    cost = expert_cost_bytes(path)
    cost = [cost[l] for l in layers]
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    stats = stats_from_trace(tr, split, norms=has_norms and any(m in NORM_METHODS for m in methods))
    seconds["trace_stats"] = time.perf_counter() - t0
    p = len(stats.samples)
    rows: list[pa.Table] = []
    source: dict[str, str] = {}

    def add(method: str, factors: list[Factor], tokens: np.ndarray) -> None:
        est = estimate(factors, bootstrap, seed)
        tok = np.broadcast_to(tokens, est.value.shape)
        rows.append(build_table(layers, n_exp, method, est.value, tok, est.ci_low, est.ci_high, cost, p))

    for m in methods:
        if m == "reconstruction":
            t0 = time.perf_counter()
            err, routed, source[m] = _reconstruction_sums(path, tr, stats.samples, dtype, progress)
            seconds["reconstruction"] = time.perf_counter() - t0
            # same ratio as uspx.score: summed squared error over all tokens of the prompts
            add(m, [Factor(err, stats.tokens[:, None, None].astype(float))], routed.sum(0))
        else:
            source[m] = "trace"
            add(m, [getattr(stats, m)()], stats.count.sum(0))

    model_rec = tr.manifest["model"]
    meta = dict(
        format=FORMAT,
        uspx_version=uspx.__version__,
        model=dict(source=str(path), label=model_rec.get("label", str(path)), fingerprint=fingerprint,
                   family=model_rec.get("family", "gpt_oss"), moe_layers=layers, num_experts=n_exp,
                   top_k=tr.top_k),
        workload=dict(wl_record, trace_fingerprint=tr.workload_fingerprint, split=split),
        trace=dict(path=str(Path(trace_dir).resolve()), split=trace_split, norms=has_norms),
        methods=list(methods),
        options=dict(
            split=split, max_tokens=None, bootstrap=bootstrap, seed=seed, streaming=True, dtype=dtype,
            ci_level=0.95, bootstrap_unit="prompt", loss=LOSS_DEFINITION,
            reconstruction_removal="interventional (banned in the router, next expert takes the slot)",
            cost_bytes="bytes of one expert in the checkpoint as stored (MXFP4 blocks + scales, biases, router row)",
        ),
        prompts=dict(trace=p, model=None, model_tokens=None, loss_tokens=None),
        method_source=source,
        seconds={k: round(v, 3) for k, v in seconds.items()},
        ablation_forwards={},
    )
    table = ScoreTable(pa.concat_tables(rows), meta)
    table.write(out_dir)
    return table


def _columns(tr: Trace) -> list[str]:
    import pyarrow.parquet as pq

    files = tr.files()
    return pq.read_schema(files[0]).names if files else []


def _reconstruction_sums(path: Path, tr: Trace, samples: np.ndarray, dtype: str,
                         progress: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """([P, L, E] squared error, [P, L, E] routed tokens) of the prompts ``samples``, and where
    they came from: the trace's ``reconstruction.npz``, or a streaming pass run now."""
    rec_path = tr.path / RECONSTRUCTION
    if rec_path.exists():
        with np.load(rec_path) as z:
            pos = {int(s): i for i, s in enumerate(z["samples"])}
            if list(z["layers"]) != list(tr.moe_layers) or any(int(s) not in pos for s in samples):
                raise UspxError(f"{rec_path}: does not cover this trace's layers and prompts")
            idx = [pos[int(s)] for s in samples]
            return z["err"][idx], z["routed"][idx], "streaming trace"
    from uspx.stream.trace import stream_trace

    sequences, item_of_token = _trace_tokens(tr, samples)
    p, layers, n_exp = len(samples), list(tr.moe_layers), tr.num_experts
    err = np.zeros((p, len(layers), n_exp))
    routed = np.zeros((p, len(layers), n_exp), np.int64)

    def on_layer(i: int, arrays: dict[str, np.ndarray]) -> None:
        pos = layers.index(i)
        ids = arrays["expert_ids"].astype(np.int64)
        flat = np.repeat(item_of_token, ids.shape[1]) * n_exp + ids.reshape(-1)
        err[:, pos] = np.bincount(flat, weights=arrays["reconstruction_error"].reshape(-1),
                                  minlength=p * n_exp).reshape(p, n_exp)
        routed[:, pos] = np.bincount(flat, minlength=p * n_exp).reshape(p, n_exp)

    stream_trace(path, sequences, on_layer, dtype=DTYPE_NAMES[dtype], record_logits=False, expert_norms=False,
                 reconstruction=True, progress=progress)
    return err, routed, "streaming pass"


def _trace_tokens(tr: Trace, samples: np.ndarray) -> tuple[list[list[int]], np.ndarray]:
    """Token ids of the prompts ``samples`` in order, rebuilt from the trace's first-layer rows
    (the trace holds every token, so no tokenizer is needed)."""
    first = tr.moe_layers[0]
    want = {int(s): i for i, s in enumerate(samples)}
    tokens: list[dict[int, int]] = [dict() for _ in samples]
    for batch in tr.iter_batches(["sample", "position", "token_id", "layer"]):
        layer = batch.column("layer").to_numpy()
        keep = layer == first
        for s, q, t in zip(batch.column("sample").to_numpy()[keep], batch.column("position").to_numpy()[keep],
                           batch.column("token_id").to_numpy()[keep]):
            if int(s) in want:
                tokens[want[int(s)]][int(q)] = int(t)
    seqs = [[d[q] for q in sorted(d)] for d in tokens]
    return seqs, np.repeat(np.arange(len(seqs)), [len(s) for s in seqs])
