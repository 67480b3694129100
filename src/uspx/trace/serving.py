"""Routing recorded by a serving engine, imported as a uspx trace or a score table.

vLLM (``enable_return_routed_experts``): each finished request's ``CompletionOutput.routed_experts``
is an int32 array ``[tokens, num_hidden_layers, num_experts_per_tok]`` (vllm/outputs.py; the
capture buffer in vllm/model_executor/layers/fused_moe/routed_experts_capturer.py has that shape),
read by the scheduler from the request's KV slots for its first ``num_tokens - 1`` tokens (the
last sampled token is never run). uspx reads it from JSONL, one object per completion:
``{"request_id", "index" (optional), "prompt_token_ids", "output_token_ids" (optional),
"routed_experts": [[[id, ...], ...], ...]}``. Each becomes a trace item; ids only (no weights).

SGLang (``--expert-distribution-recorder-mode``; python/sglang/srt/eplb/expert_distribution.py):
``dump_record`` writes ``torch.save`` files. Mode ``per_token`` holds ``records`` (per forward pass:
``forward_pass_id``, ``rank``, ``gatherer_key``, ``input_ids``, ``positions``, ``forward_mode``,
``topk_ids_of_layer`` ``[num_layers, tokens, 8]`` physical ids, -1 padded) and
``last_physical_to_logical_map`` ``[num_layers, num_physical_experts]``: imported as a trace, one
item per forward pass (the dump names no requests). Modes ``stat`` (``logical_count``
``[passes, num_layers, num_logical_experts]``) and ``per_pass`` (``global_physical_count`` per
record) hold counts only: imported as a frequency score table, forward passes as the bootstrap unit.

Filters, as far as each format allows: vLLM rows past the request's tokens (routing of draft
tokens that were not accepted, or padding) are dropped, and a request id (with its completion
index) seen before is a duplicate; ``dedupe="tokens"`` also drops requests whose token ids repeat
an earlier one. SGLang passes whose ``forward_mode`` is not in ``keep_modes`` (default EXTEND,
DECODE, MIXED: 1, 2, 3 in forward_batch_info.py's ``ForwardMode``; TARGET_VERIFY runs the draft
tokens, accepted or not) are dropped, and the same pass with the same tokens in several files
(tensor-parallel ranks each dump it) counts once. A file given twice counts once, and a count
dump whose first passes are every pass of an earlier one (counts accumulated across runs) keeps
only its new passes.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import uspx
from uspx.io import UspxError, write_json, write_text

FORMATS = ("vllm", "sglang")
DEDUPE = ("id", "tokens", "none")
DEFAULT_MODES = (1, 2, 3)  # SGLang ForwardMode EXTEND, DECODE, MIXED
WORKLOAD_FILE = "workload.jsonl"  # the decoded text of the imported items, for `uspx score`
TRACE_SCORES = ["frequency"]  # what ids alone support; reap / ean need gate weights and expert norms


@dataclass
class Imported:
    """What an import wrote and what it left out."""

    kind: str  # "trace" or "scores"
    out: str
    format: str
    items: int  # requests (vLLM), forward passes (SGLang)
    tokens: int
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> how many (requests, rows, passes, files)
    supports: list[str] = field(default_factory=list)  # uspx scores this import can give


@dataclass
class Routed:
    """One imported item: token ids, their positions and the experts routed per MoE layer."""

    id: str
    tokens: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    completion_start: int  # first generated token (0: none known)
    ids: np.ndarray  # [T, L, k] expert ids per MoE layer


@dataclass
class ModelShape:
    """What the import checks the files against."""

    layers: list[int]  # decoder indices of the MoE layers
    num_hidden_layers: int
    num_experts: int
    top_k: int

    def layer_axis(self, size: int, where: str) -> list[int]:
        """Positions of the MoE layers in a file's layer axis: every decoder layer, or the MoE ones only."""
        if size == self.num_hidden_layers:
            return list(self.layers)
        if size == len(self.layers):
            return list(range(size))
        raise UspxError(f"{where}: {size} layers, but the model has {self.num_hidden_layers} decoder layers "
                        f"({len(self.layers)} MoE); is this the model that served it?")


def file_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


# ----- vLLM -------------------------------------------------------------------------------------
def read_vllm(path: Path, shape: ModelShape, dedupe: str = "id") -> tuple[list[Routed], dict[str, int]]:
    """The completions of a vLLM routed-experts JSONL file, filtered (see the module doc)."""
    out: list[Routed] = []
    dropped = {"duplicate requests": 0, "rows past the request's tokens": 0}
    seen_ids: set[str] = set()
    seen_tokens: set[tuple] = set()
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            r = _vllm_record(line, where, shape, dropped)
            key = tuple(r.tokens.tolist())
            if dedupe != "none" and (r.id in seen_ids or dedupe == "tokens" and key in seen_tokens):
                dropped["duplicate requests"] += 1
                continue
            seen_ids.add(r.id)
            seen_tokens.add(key)
            out.append(r)
    if not out:
        raise UspxError(f"{path}: no completions with routed experts")
    return out, dropped


def _vllm_record(line: str, where: str, shape: ModelShape, dropped: dict[str, int]) -> Routed:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UspxError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict) or "routed_experts" not in obj or "prompt_token_ids" not in obj:
        raise UspxError(f"{where}: needs 'prompt_token_ids' and 'routed_experts' (a completion's "
                        "routed_experts, [tokens, layers, top-k])")
    prompt = _int_list(obj["prompt_token_ids"], where, "prompt_token_ids")
    output = _int_list(obj.get("output_token_ids") or [], where, "output_token_ids")
    try:
        arr = np.asarray(obj["routed_experts"], dtype=np.int64)
    except (ValueError, TypeError):
        raise UspxError(f"{where}: 'routed_experts' is not a [tokens, layers, top-k] array of ints") from None
    if arr.ndim != 3 or arr.shape[2] != shape.top_k:
        raise UspxError(f"{where}: 'routed_experts' has shape {list(arr.shape)}, expected [tokens, layers, "
                        f"{shape.top_k}] (the model routes to {shape.top_k} experts)")
    tokens = prompt + output
    # the last sampled token is never run: a completion routes its first len(tokens) - 1 positions;
    # rows past them are routing of positions the request did not keep (drafts not accepted)
    routed = len(tokens) - 1 if output else len(tokens)
    if len(arr) > routed:
        dropped["rows past the request's tokens"] += len(arr) - routed
        arr = arr[:routed]
    ids = arr[:, shape.layer_axis(arr.shape[1], where), :]
    _check_ids(ids, shape, where)
    n = len(ids)
    rid = str(obj.get("request_id", where))
    if obj.get("index") is not None:
        rid = f"{rid}#{obj['index']}"
    return Routed(rid, np.asarray(tokens[:n], np.int64), np.arange(n), len(prompt) if output else 0, ids)


def _int_list(value, where: str, name: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
        raise UspxError(f"{where}: '{name}' must be a list of token ids")
    return value


def _check_ids(ids: np.ndarray, shape: ModelShape, where: str) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= shape.num_experts):
        bad = ids[(ids < 0) | (ids >= shape.num_experts)][0]
        raise UspxError(f"{where}: expert id {int(bad)} outside 0..{shape.num_experts - 1}")


# ----- SGLang -----------------------------------------------------------------------------------
@dataclass
class Dump:
    """One SGLang dump file, read."""

    path: Path
    kind: str  # "per_token", "per_pass" or "stat"
    data: dict


def read_dumps(paths: list[Path]) -> tuple[list[Dump], int]:
    """The dump files (``torch.load`` with weights only: tensors, lists and numbers, no code), the
    same file given twice read once; all of one recorder mode."""
    import torch

    dumps, seen, repeated = [], set(), 0
    for p in sorted(paths, key=_dump_order):
        digest = file_digest([p])
        if digest in seen:
            repeated += 1
            continue
        seen.add(digest)
        try:
            data = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # a pickle that is not a dump, or a truncated file
            raise UspxError(f"{p}: not a readable SGLang expert-distribution dump ({type(exc).__name__}: {exc})") from None
        if isinstance(data, dict) and "logical_count" in data:
            kind = "stat"
        elif isinstance(data, dict) and isinstance(data.get("records"), list):
            kind = "per_token" if any("topk_ids_of_layer" in r for r in data["records"]) else "per_pass"
        else:
            raise UspxError(f"{p}: neither a 'stat' dump (logical_count) nor a per_pass / per_token one (records)")
        dumps.append(Dump(p, kind, data))
    kinds = {d.kind for d in dumps}
    if len(kinds) > 1:
        raise UspxError(f"dumps of several recorder modes ({', '.join(sorted(kinds))}); import one mode at a time")
    return dumps, repeated


def _dump_order(path: Path) -> tuple:
    """Dump files in the order they were written: their name holds the time (expert_distribution_recorder_{time}[_{rank}].pt)."""
    m = re.search(r"recorder_([0-9.]+?)(?:_(\d+))?\.pt$", path.name)
    return (float(m.group(1)), int(m.group(2) or 0), path.name) if m else (float("inf"), 0, path.name)


def per_token_items(dumps: list[Dump], shape: ModelShape, keep_modes: tuple[int, ...],
                    dedupe: str = "id") -> tuple[list[Routed], dict[str, int]]:
    """One item per forward pass of per_token dumps, physical ids mapped to logical ones."""
    out: list[Routed] = []
    dropped: dict[str, int] = {}
    seen: set[tuple] = set()
    for d in dumps:
        if "last_physical_to_logical_map" not in d.data:
            raise UspxError(f"{d.path}: no last_physical_to_logical_map (physical experts cannot be named)")
        p2l = np.asarray(d.data["last_physical_to_logical_map"], np.int64)
        for i, rec in enumerate(d.data["records"]):
            where = f"{d.path}: record {i} (forward pass {rec.get('forward_pass_id')})"
            mode = int(rec.get("forward_mode", -1))
            if mode not in keep_modes:
                key = f"passes of forward_mode {mode}"
                dropped[key] = dropped.get(key, 0) + 1
                continue
            missing = [k for k in ("input_ids", "positions", "topk_ids_of_layer") if k not in rec]
            if missing:
                raise UspxError(f"{where}: a per_token record without {', '.join(missing)}")
            tokens = np.asarray(rec["input_ids"], np.int64)
            if len(rec["positions"]) != len(tokens):
                raise UspxError(f"{where}: {len(rec['positions'])} positions for {len(tokens)} input ids")
            key = (rec.get("forward_pass_id"), rec.get("gatherer_key"), tuple(tokens.tolist()))
            if dedupe != "none" and key in seen:  # the same pass as another rank recorded it
                dropped["duplicate passes"] = dropped.get("duplicate passes", 0) + 1
                continue
            seen.add(key)
            if len(tokens) == 0:
                continue
            ids = _logical_topk(np.asarray(rec["topk_ids_of_layer"], np.int64), p2l, len(tokens), shape, where)
            out.append(Routed(f"pass-{rec.get('forward_pass_id')}-{rec.get('rank', d.path.name)}", tokens,
                              np.asarray(rec["positions"], np.int64), 0, ids))
    if not out:
        raise UspxError(f"{', '.join(str(d.path) for d in dumps)}: no forward passes left to import "
                        f"(modes kept: {list(keep_modes)}; dropped: {dropped})")
    return out, dropped


def _logical_topk(topk: np.ndarray, p2l: np.ndarray, n: int, shape: ModelShape, where: str) -> np.ndarray:
    """[tokens, MoE layers, k] logical expert ids from a record's [layers, tokens, width] physical ids."""
    if topk.ndim != 3 or topk.shape[1] < n or p2l.shape[0] != topk.shape[0]:
        raise UspxError(f"{where}: topk_ids_of_layer has shape {list(topk.shape)} for {n} tokens "
                        f"(the map has {p2l.shape[0]} layers)")
    axis = shape.layer_axis(topk.shape[0], where)
    phys = topk[axis, :n, :]  # [L, n, width]
    real = phys >= 0
    if not (real.sum(-1) == shape.top_k).all() or real[..., shape.top_k:].any():
        raise UspxError(f"{where}: tokens with other than {shape.top_k} experts (the model's top-k) in the first columns")
    logical = np.take_along_axis(p2l[axis][:, None, :].repeat(n, 1), phys[..., : shape.top_k], axis=2)
    ids = logical.transpose(1, 0, 2)
    _check_ids(ids, shape, where)
    return ids


def count_passes(dumps: list[Dump], shape: ModelShape) -> tuple[np.ndarray, dict[str, int]]:
    """[passes, MoE layers, experts] logical counts of stat or per_pass dumps, empty passes left out,
    and a dump's leading passes dropped when they are every pass of the dump before it."""
    dropped = {"passes accumulated from an earlier dump": 0}
    prev, kept = None, []  # the dump before's passes, and what each dump adds to the dumps before it
    for d in dumps:
        if d.kind == "stat":
            counts = np.asarray(d.data["logical_count"], np.int64)
        else:
            bad = [i for i, r in enumerate(d.data["records"]) if "global_physical_count" not in r]
            if bad or "last_physical_to_logical_map" not in d.data:
                raise UspxError(f"{d.path}: per_pass records without global_physical_count (record {bad[:1]}) "
                                "or no last_physical_to_logical_map")
            p2l = np.asarray(d.data["last_physical_to_logical_map"], np.int64)
            counts = np.stack([_to_logical(np.asarray(r["global_physical_count"], np.int64), p2l, shape.num_experts)
                               for r in d.data["records"]]) if d.data["records"] else np.zeros((0, *p2l.shape))
        if counts.ndim != 3 or counts.shape[2] != shape.num_experts:
            raise UspxError(f"{d.path}: counts of shape {list(counts.shape)}, expected [passes, layers, "
                            f"{shape.num_experts}] (the model's experts)")
        counts = counts[:, shape.layer_axis(counts.shape[1], str(d.path)), :]
        counts = counts[counts.reshape(len(counts), -1).any(1)]  # a ring buffer's unused slots are all zero
        new = counts
        if prev is not None and len(prev) and len(counts) >= len(prev) and np.array_equal(counts[: len(prev)], prev):
            dropped["passes accumulated from an earlier dump"] += len(prev)
            new = counts[len(prev):]
        prev = counts
        kept.append(new)
    allc = [c for c in kept if len(c)]
    if not allc:
        raise UspxError(f"{', '.join(str(d.path) for d in dumps)}: no routed tokens recorded")
    return np.concatenate(allc), dropped


def _to_logical(physical: np.ndarray, p2l: np.ndarray, num_experts: int) -> np.ndarray:
    """[layers, logical experts] counts from [layers, physical experts] ones (replicas added up)."""
    if physical.shape != p2l.shape:
        raise UspxError(f"global_physical_count of shape {list(physical.shape)} does not match the physical-to-"
                        f"logical map {list(p2l.shape)}")
    out = np.zeros((physical.shape[0], num_experts), np.int64)
    for layer in range(physical.shape[0]):
        np.add.at(out[layer], p2l[layer], physical[layer])
    return out


# ----- the trace --------------------------------------------------------------------------------
def model_shape(opened) -> ModelShape:
    """The MoE layers, decoder layer count, experts and top-k an import is checked against."""
    a = opened.source.adapter
    return ModelShape([l.index for l in a.layers], int(opened.source.config.num_hidden_layers), a.num_experts, a.top_k)


def check_out(out: Path) -> None:
    """Imports write a new folder (they are quick to redo; a half-written one has no complete manifest)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UspxError(f"{out} exists and is not empty; choose a new output folder (or delete it)")


def write_trace(routed: list[Routed], opened, out: str | Path, *, sources: list[Path], fmt: str, family: str,
                dropped: dict[str, int], items_per_shard: int = 64) -> dict:
    """A uspx trace folder of the imported items (expert weights NaN: not recorded), with their
    decoded text in ``workload.jsonl`` so that ``uspx score MODEL OUT OUT/workload.jsonl`` reads it."""
    from uspx.trace.format import FORMAT, finish_manifest, items_table, write_items, write_shard
    from uspx.trace.run import model_info
    from uspx.workload import EncodedItem

    started = time.perf_counter()
    out = Path(out)
    check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    wl = _write_workload(out / WORKLOAD_FILE, routed, opened.tokenizer, family)
    if len(wl.items) != len(routed):
        raise UspxError(f"{out / WORKLOAD_FILE}: {len(routed) - len(wl.items)} items decode to empty text; "
                        "uspx cannot list them in a workload")
    encoded = [EncodedItem(i, r.id, family, "calibration", r.tokens.tolist(), r.completion_start)
               for i, r in enumerate(routed)]
    write_items(out / "items.parquet", encoded)
    shape = model_shape(opened)
    entries = []
    for s in range(0, len(routed), items_per_shard):
        chunk, items = routed[s : s + items_per_shard], encoded[s : s + items_per_shard]
        ids = np.concatenate([r.ids for r in chunk])
        per_layer = dict(expert_ids=ids, expert_weights=np.full(ids.shape, np.nan, np.float32))
        table = items_table(items, shape.layers, per_layer, np.concatenate([r.positions for r in chunk]))
        entries.append(write_shard(out, None, s // items_per_shard, items, table))
    workload = dict(source=str(out / WORKLOAD_FILE), fingerprint=wl.fingerprint, items=len(wl.items),
                    families=wl.families)
    options = dict(split="all", weights=False, logits=False, norms=False, items_per_shard=items_per_shard,
                   imported=dict(format=fmt, sources=[str(p) for p in sources], sha256=file_digest(sources),
                                 dropped=dropped))
    manifest = dict(format=FORMAT, uspx_version=uspx.__version__, model=model_info(opened), workload=workload,
                    options=options, shards=entries, complete=False)
    write_json(out / "manifest.json", manifest)
    summary = dict(items=len(routed), families={family: len(routed)}, splits={"calibration": len(routed)},
                   duplicates=dropped.get("duplicate requests", 0) + dropped.get("duplicate passes", 0),
                   skipped_empty=0, truncated=0, truncated_tokens=0)
    return finish_manifest(out, manifest, summary, encoded, time.perf_counter() - started)


def _write_workload(path: Path, routed: list[Routed], tokenizer, family: str):
    """The items' text decoded by the model's tokenizer (prompt and, when known, completion)."""
    from uspx.workload import load_workload

    if tokenizer is None:
        raise UspxError("the model has no tokenizer files; uspx needs one to write the imported items' text")
    lines = []
    for r in routed:
        cut = r.completion_start or len(r.tokens)
        row = dict(id=r.id, family=family, split="calibration", prompt=tokenizer.decode(r.tokens[:cut].tolist()))
        if r.completion_start:
            row["completion"] = tokenizer.decode(r.tokens[cut:].tolist())
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    write_text(path, "".join(lines))
    return load_workload(path)
