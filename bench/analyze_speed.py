"""Speed of the trace-only analyses: build a synthetic trace in the uspx schema and time
``uspx.analyze.analyze(only="utilisation,circuits,attention")`` per million routed (token, layer) rows.

    python bench/analyze_speed.py --rows 2000000 --layers 24 --experts 32 --top-k 4

Routing is drawn from a skewed per-layer distribution with some cross-layer dependence, so the path
dictionary and the sparse token counts see realistic (not all-distinct, not all-equal) keys.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from uspx.io import write_json


def build(out: Path, rows: int, L: int, E: int, k: int, tokens_per_item: int = 256, vocab: int = 32000,
          items_per_shard: int = 64, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n_tok = rows // L
    n_items = (n_tok + tokens_per_item - 1) // tokens_per_item
    pref = rng.dirichlet(np.full(E, 0.5), size=L)  # skewed usage per layer
    shards = []
    out.mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, n_items, items_per_shard)):
        items = np.arange(start, min(start + items_per_shard, n_items))
        t = min(len(items) * tokens_per_item, n_tok - start * tokens_per_item)
        sample = start + np.arange(t) // tokens_per_item
        position = np.arange(t) % tokens_per_item
        token = rng.zipf(1.3, size=t) % vocab
        gumbel = -np.log(-np.log(rng.random((t, L, E))))
        scores = np.log(pref)[None] + gumbel
        scores[:, 1:] += 0.5 * gumbel[:, :-1]  # layer l+1 leans on layer l
        ids = np.argsort(-scores, axis=-1)[..., :k]
        w = np.sort(rng.dirichlet(np.ones(k), size=(t, L)), axis=-1)[..., ::-1]
        fam = np.where(sample % 2 == 0, "code", "prose")
        table = pa.table(dict(
            sample=pa.array(np.repeat(sample, L).astype(np.int32)),
            position=pa.array(np.repeat(position, L).astype(np.int32)),
            token_id=pa.array(np.repeat(token, L).astype(np.int32)),
            family=pa.array(np.repeat(fam, L)).dictionary_encode(),
            split=pa.array(np.repeat(np.where(sample % 5 == 0, "heldout", "calibration"), L)).dictionary_encode(),
            is_completion=pa.array(np.repeat(position > 32, L)),
            layer=pa.array(np.tile(np.arange(L, dtype=np.int16), t)),
            expert_ids=pa.FixedSizeListArray.from_arrays(pa.array(ids.astype(np.int16).ravel()), k),
            expert_weights=pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(w).astype(np.float32).ravel()), k),
        ))
        name = f"shard-{s:05d}.parquet"
        pq.write_table(table, out / name, compression="zstd")
        shards.append(dict(index=s, file=name, rows=table.num_rows))
    pq.write_table(pa.table(dict(sample=pa.array(np.arange(n_items, dtype=np.int32)))), out / "items.parquet")
    write_json(out / "manifest.json", dict(
        format="uspx-trace/1", complete=True, shards=shards,
        model=dict(moe_layers=list(range(L)), num_experts=E, top_k=k, fingerprint="synthetic", label="synthetic"),
        workload=dict(fingerprint="synthetic", source="synthetic", items=int(n_items)),
    ))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--only", default="utilisation,circuits,attention")
    args = ap.parse_args()
    from uspx.analyze import analyze

    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        build(Path(d) / "trace", args.rows, args.layers, args.experts, args.top_k)
        t1 = time.perf_counter()
        r = analyze(Path(d) / "trace", Path(d) / "report", only=args.only, progress=False)
        t2 = time.perf_counter()
    rows = r["timings"]["trace_rows"]
    print(f"synthetic trace: {rows} rows ({args.layers} layers, {args.experts} experts, top-{args.top_k}), built in {t1 - t0:.1f} s")
    print(f"trace pass ({args.only}): {r['timings']['trace_pass_s']:.1f} s = {r['timings']['trace_pass_s'] / rows * 1e6:.2f} s per million rows")
    print(f"analyze total incl. statistics and report: {t2 - t1:.1f} s = {(t2 - t1) / rows * 1e6:.2f} s per million rows")


if __name__ == "__main__":
    main()
