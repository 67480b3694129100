"""The score artifact: ``scores.parquet`` (one row per layer, expert and method) and ``scores.json``
(provenance). The JSON is written last, so a folder with a readable ``scores.json`` holds a complete
table; both are written atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from uspx.io import Provenance, UspxError, atomic_path, read_json, write_json

FORMAT = "uspx-scores/1"
PARQUET = "scores.parquet"
META = "scores.json"

SCHEMA = pa.schema(
    [
        ("layer", pa.int16()),
        ("expert", pa.int16()),
        ("method", pa.string()),
        ("value", pa.float64()),  # higher = more important, for every method
        ("tokens", pa.int64()),  # tokens behind the value (routed tokens; loss tokens for ablations)
        ("ci_low", pa.float64()),  # bootstrap percentile interval over prompts; NaN = no data
        ("ci_high", pa.float64()),
        ("cost_bytes", pa.int64()),  # bytes freed by removing the expert
        ("n_prompts", pa.int32()),  # prompts the value was estimated from (the bootstrap unit)
    ]
)


class ScoreTable(Provenance):
    """Scores of every (layer, expert) under one or more methods, with their provenance."""

    def __init__(self, table: pa.Table, meta: dict, path: Path | None = None):
        self.table = table
        self.meta = meta
        self.path = path

    @property
    def methods(self) -> list[str]:
        return list(self.meta["methods"])

    @property
    def record(self) -> dict:
        return self.meta

    def to_pandas(self):
        return self.table.to_pandas()

    def method(self, method: str) -> pa.Table:
        if method not in self.methods:
            raise UspxError(f"no {method!r} scores in this table; it has {', '.join(self.methods)}")
        return self.table.filter(pc.equal(self.table.column("method"), method))

    def random(self, seed: int = 0) -> pa.Table:
        """A seeded random ranking in the layout of this table's first method: the baseline every
        selection should beat (``uspx select --method random``)."""
        t = self.method(self.methods[0])
        n, nan = t.num_rows, np.full(t.num_rows, np.nan)
        columns = dict(value=np.random.default_rng(seed).random(n), ci_low=nan, ci_high=nan, method=["random"] * n)
        for name, column in columns.items():
            field = t.schema.field(name)
            t = t.set_column(t.schema.get_field_index(name), name, pa.array(column, type=field.type))
        return t

    def values(self, method: str) -> dict[tuple[int, int], float]:
        """``{(layer, expert): value}`` of one method."""
        t = self.method(method)
        return {
            (int(l), int(e)): float(v)
            for l, e, v in zip(t.column("layer").to_numpy(), t.column("expert").to_numpy(), t.column("value").to_numpy())
        }

    def matrix(self, method: str, column: str = "value") -> tuple[list[int], np.ndarray]:
        """(MoE layer indices, [L, E] array of ``column``) of one method."""
        t = self.method(method)
        layers = sorted(set(t.column("layer").to_pylist()))
        n_exp = int(max(t.column("expert").to_pylist())) + 1
        out = np.full((len(layers), n_exp), np.nan)
        pos = {l: i for i, l in enumerate(layers)}
        for l, e, v in zip(t.column("layer").to_pylist(), t.column("expert").to_pylist(), t.column(column).to_pylist()):
            out[pos[l], e] = v
        return layers, out

    def write(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / PARQUET) as tmp:
            pq.write_table(self.table, tmp)
        write_json(out / META, self.meta)
        self.path = out
        return out


def load_scores(path: str | Path) -> ScoreTable:
    """Read and validate a score folder (or its ``scores.json`` / ``scores.parquet``)."""
    path = Path(path)
    folder = path.parent if path.name in (PARQUET, META) else path
    meta = read_json(folder / META)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UspxError(f"{folder / META}: not a uspx score table (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if not (folder / PARQUET).exists():
        raise UspxError(f"{folder / PARQUET}: missing")
    try:
        table = pq.read_table(folder / PARQUET)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UspxError(f"{folder / PARQUET}: unreadable ({exc})") from None
    missing = [f.name for f in SCHEMA if f.name not in table.column_names]
    if missing:
        raise UspxError(f"{folder / PARQUET}: missing columns {missing}")
    try:
        table = table.select(SCHEMA.names).cast(SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise UspxError(f"{folder / PARQUET}: wrong column types ({exc})") from None
    methods = set(table.column("method").to_pylist())
    if methods != set(meta.get("methods", [])):
        raise UspxError(f"{folder}: table methods {sorted(methods)} differ from scores.json {meta.get('methods')}")
    keys = list(zip(table.column("layer").to_pylist(), table.column("expert").to_pylist(), table.column("method").to_pylist()))
    if len(set(keys)) != len(keys):
        raise UspxError(f"{folder / PARQUET}: duplicate (layer, expert, method) rows")
    expected = len(meta["model"]["moe_layers"]) * int(meta["model"]["num_experts"])
    for m in methods:
        n = sum(1 for k in keys if k[2] == m)
        if n != expected:
            raise UspxError(f"{folder / PARQUET}: method {m!r} has {n} rows, expected {expected} (layers x experts)")
    return ScoreTable(table, meta, folder)


def build_table(
    layers: list[int],
    num_experts: int,
    method: str,
    value: np.ndarray,
    tokens: np.ndarray,
    ci_low: np.ndarray,
    ci_high: np.ndarray,
    cost_bytes: list[int],
    n_prompts: int,
) -> pa.Table:
    """Rows of one method from [L, E] arrays (``cost_bytes`` per layer)."""
    l, e = len(layers), num_experts
    return pa.table(
        dict(
            layer=pa.array(np.repeat(np.array(layers), e), pa.int16()),
            expert=pa.array(np.tile(np.arange(e), l), pa.int16()),
            method=pa.array([method] * (l * e), pa.string()),
            value=pa.array(np.asarray(value, np.float64).reshape(-1)),
            tokens=pa.array(np.asarray(tokens, np.int64).reshape(-1)),
            ci_low=pa.array(np.asarray(ci_low, np.float64).reshape(-1)),
            ci_high=pa.array(np.asarray(ci_high, np.float64).reshape(-1)),
            cost_bytes=pa.array(np.repeat(np.array(cost_bytes, np.int64), e)),
            n_prompts=pa.array(np.full(l * e, n_prompts), pa.int32()),
        ),
        schema=SCHEMA,
    )
