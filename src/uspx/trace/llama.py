"""Routing statistics from llama.cpp: a GGUF model's own routing on the user's tokens, recorded in
this process, and the importance-matrix files of llama.cpp's ``llama-imatrix``.

**The evaluation callback** (:func:`record`). llama.cpp builds every MoE layer with one function
(``build_moe_ffn`` in src/llama-graph.cpp) that names its nodes ``ffn_moe_<what>-<layer>``:
``ffn_moe_topk`` holds the chosen expert ids ``[tokens, k]``, ``ffn_moe_weights`` the gate values
of those experts, then, depending on the family's gating, ``ffn_moe_weights_softmax`` (gpt-oss:
softmax over the top-k logits), ``_norm`` (renormalised to sum 1) and ``_scaled``; the last of these
is the weight the layer multiplies each expert's output by. ``ffn_moe_down`` (then ``_scaled``,
``_biased``) is each routed expert's output ``[tokens, k, hidden]`` before that weight, so its norm
is uspx's ``expert_norms``; the activation that enters the down projection (``ffn_moe_swiglu``,
``ffn_moe_swiglu_oai``, ``ffn_moe_geglu``, ...) gives each expert channel's energy, the sum of its
squares over the tokens routed to the expert (what ``llama-imatrix`` stores for ``ffn_down_exps``).
Every position is decoded as an output, since llama.cpp otherwise runs the last layer only on the
positions whose logits are asked for. The result is a uspx trace (:func:`write_trace`): expert ids,
weights and, with ``norms``, expert output norms per real token and MoE layer.

**Importance matrices** (:func:`read_imatrix`). ``llama-imatrix`` (tools/imatrix/imatrix.cpp) adds,
for every matrix multiplication of a weight ``W``, the squares of its input columns: for a MoE
layer's expert tensors (``ggml_mul_mat_id``), per expert, over the (token, slot) pairs routed to it,
and counts those pairs per expert. Its GGUF output (the default) holds, per weight name, the
tensors ``<name>.in_sum2`` (``[experts, columns]`` raw sums, float32) and ``<name>.counts``
(``[experts, 1]``, float32), with ``imatrix.datasets``, ``imatrix.chunk_count`` and
``imatrix.chunk_size``. The legacy ``.dat`` output holds, per entry, the name, ``ncall`` and
``(sum / count) * ncall`` for every value, the per-expert counts lost (an unrouted expert's values
stored as 1); from it only the mean energies are known. So an imatrix gives per-expert routed-token
counts (``frequency``, over the whole text: one sample, no interval) and channel energy: the input
of ``ffn_down_exps`` is the expert's activation, of ``ffn_gate_exps`` / ``ffn_up_exps`` the layer's
input. It holds no gate weights and no expert outputs, so no REAP or EAN.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from uspx.io import UspxError

# the nodes build_moe_ffn names, in the order it computes them (a later one supersedes an earlier)
TOPK = "ffn_moe_topk"
WEIGHTS = ("ffn_moe_weights", "ffn_moe_weights_softmax", "ffn_moe_weights_norm", "ffn_moe_weights_scaled")
OUTPUTS = ("ffn_moe_down", "ffn_moe_down_scaled", "ffn_moe_down_biased")
ACTIVATIONS = ("ffn_moe_swiglu", "ffn_moe_swiglu_limited", "ffn_moe_swiglu_oai", "ffn_moe_silu", "ffn_moe_geglu",
               "ffn_moe_gelu", "ffn_moe_reglu", "ffn_moe_relu", "ffn_moe_relu_sqr", "ffn_moe_situ")

IMATRIX_KEYS = ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")  # common/imatrix-loader.h


@dataclass
class GGUFModel:
    """What uspx reads of a GGUF file without running it (``uspx.prune.gguf_file.read_model``)."""

    path: str
    arch: str
    blocks: int
    num_experts: int
    top_k: int
    moe_layers: list[int]
    expert_tensors: dict[str, tuple[int, str]]  # tensor name -> (layer, part: gate, up, down, gate_up, router, ...)
    expert_bytes: int  # stored bytes of one expert of one layer (every expert tensor's slice)
    fixed_bytes: int  # every other tensor
    file_bytes: int
    fingerprint: str
    context_length: int
    kv_bytes_per_token: int  # at f16 keys and values (llama.cpp's default cache type), every layer

    def info(self) -> dict:
        """The ``model`` entry of a trace manifest or score table."""
        return dict(source=self.path, label=Path(self.path).name, fingerprint=self.fingerprint, family=self.arch,
                    model_type=self.arch, moe_layers=list(self.moe_layers), num_experts=self.num_experts,
                    top_k=self.top_k, format="gguf")


# ----- the evaluation callback ------------------------------------------------------------------------
@dataclass
class Routed:
    """One item's routing through llama.cpp: per token and MoE layer."""

    ids: np.ndarray  # [T, L, k] int16
    weights: np.ndarray  # [T, L, k] float32
    norms: np.ndarray | None  # [T, L, k] float32: each routed expert's output norm


@dataclass
class Recording:
    """What :func:`record` measured."""

    items: list[Routed]
    energy: np.ndarray | None  # [L, E, width] sum of squared down-projection inputs, over routed tokens
    counts: np.ndarray  # [L, E] routed (token, slot) pairs
    seconds: float
    binding: str
    nodes: dict[str, str] = field(default_factory=dict)  # what each quantity was read from


class _Collector:
    """The callback's state: the nodes of one decode, by (kind, layer)."""

    def __init__(self, model: GGUFModel, norms: bool, energy: bool):
        self.layers = {l: i for i, l in enumerate(model.moe_layers)}
        wanted = [TOPK, *WEIGHTS] + (list(OUTPUTS) if norms else []) + (list(ACTIVATIONS) if energy else [])
        self.rank = {name: i for i, name in enumerate(wanted)}
        self.norms, self.energy = norms, energy
        self.found: dict[tuple[str, int], tuple[str, np.ndarray]] = {}
        self.read: Callable[[int], np.ndarray] | None = None
        self.error: BaseException | None = None

    def kind(self, name: str) -> str:
        return "topk" if name == TOPK else "weights" if name in WEIGHTS else "out" if name in OUTPUTS else "act"

    def __call__(self, address: int, ask: bool) -> bool:
        from uspx.trace.llama_runtime import tensor_name

        try:
            name, _, layer = tensor_name(address).rpartition("-")
            wanted = name in self.rank and layer.isdigit() and int(layer) in self.layers
            if ask or not wanted:
                return wanted
            key = (self.kind(name), int(layer))
            old = self.found.get(key)
            if old is None or self.rank[name] >= self.rank[old[0]]:
                self.found[key] = (name, self.read(address))
            return True
        except BaseException as exc:  # never raise through C: remember it and stop the graph
            self.error = exc
            return False


def record(model: GGUFModel, token_lists: list[list[int]], *, norms: bool = True, energy: bool = False,
           n_threads: int | None = None, n_gpu_layers: int = 0, binding: str | None = None,
           progress: Callable[[int], None] | None = None) -> Recording:
    """Run every token list through ``model`` in llama.cpp and read its routing (module doc)."""
    from uspx.trace.llama_runtime import Runtime

    if not token_lists or any(len(t) == 0 for t in token_lists):
        raise UspxError("llama.cpp routing needs at least one non-empty token list")
    started = time.perf_counter()
    col = _Collector(model, norms, energy)
    n_ctx = max(len(t) for t in token_lists)
    L, E, k = len(model.moe_layers), model.num_experts, model.top_k
    items: list[Routed] = []
    counts = np.zeros((L, E), np.int64)
    total_energy: np.ndarray | None = None
    nodes: dict[str, str] = {}
    need = ("topk", "weights") + (("out",) if norms else ()) + (("act",) if energy else ())
    with Runtime(model.path, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, callback=col,
                 binding=binding) as rt:
        col.read = rt.ggml.read
        for n, tokens in enumerate(token_lists):
            col.found.clear()
            try:
                rt.decode(tokens)
            except UspxError:
                if col.error is not None:
                    raise col.error from None
                raise
            if col.error is not None:
                raise col.error
            T = len(tokens)
            ids = np.zeros((T, L, k), np.int16)
            weights = np.zeros((T, L, k), np.float32)
            out_norms = np.zeros((T, L, k), np.float32) if norms else None
            for layer, i in col.layers.items():
                got = {kind: col.found.get((kind, layer)) for kind in ("topk", "weights", "out", "act")}
                if missing := [kind for kind in need if got[kind] is None]:
                    raise UspxError(f"{model.path}: llama.cpp's graph of layer {layer} has no {', '.join(missing)} "
                                    f"node (looked for {TOPK}, {', '.join(WEIGHTS)}, {', '.join(OUTPUTS)}); this "
                                    "architecture does not route through llama.cpp's build_moe_ffn")
                sel = got["topk"][1].reshape(T, k)
                ids[:, i] = sel
                weights[:, i] = got["weights"][1].reshape(T, k)
                nodes.update(ids=got["topk"][0], weights=got["weights"][0])
                counts[i] += np.bincount(sel.reshape(-1), minlength=E)[:E]
                if norms:
                    out = got["out"][1].reshape(T, k, -1)
                    out_norms[:, i] = np.linalg.norm(out.astype(np.float64), axis=-1)
                    nodes["norms"] = got["out"][0]
                if energy:
                    act = got["act"][1].reshape(T, k, -1).astype(np.float64)
                    if total_energy is None:
                        total_energy = np.zeros((L, E, act.shape[-1]))
                    np.add.at(total_energy[i], sel.reshape(-1), (act ** 2).reshape(T * k, -1))
                    nodes["energy"] = got["act"][0]
            items.append(Routed(ids, weights, out_norms))
            if progress is not None:
                progress(n + 1)
        used = rt.binding
    return Recording(items, total_energy, counts, time.perf_counter() - started, used, nodes)


# ----- the trace --------------------------------------------------------------------------------------
def write_trace(model: GGUFModel, encoded, recording: Recording, out: str | Path, workload_info: dict,
                wl_summary: dict, options: dict, items_per_shard: int = 64) -> dict:
    """A uspx trace folder (``uspx-trace/1``) of the recorded routing; ``encoded`` are the workload's
    :class:`uspx.workload.EncodedItem` in the order recorded."""
    from uspx.trace.format import finish_manifest, items_table, open_manifest, write_items, write_shard

    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    options = dict(options, weights=True, norms=recording.items[0].norms is not None, logits=False,
                   items_per_shard=items_per_shard, runtime=dict(name="llama.cpp", binding=recording.binding,
                                                                 nodes=recording.nodes))
    manifest = open_manifest(out, model.info(), workload_info, options)
    write_items(out / "items.parquet", encoded)
    done = {s["index"] for s in manifest["shards"]}
    for s in range(0, len(encoded), items_per_shard):
        if s // items_per_shard in done:
            continue
        chunk, routed = encoded[s: s + items_per_shard], recording.items[s: s + items_per_shard]
        per_layer = dict(expert_ids=np.concatenate([r.ids for r in routed]),
                         expert_weights=np.concatenate([r.weights for r in routed]))
        if options["norms"]:
            per_layer["expert_norms"] = np.concatenate([r.norms for r in routed])
        write_shard(out, manifest, s // items_per_shard, chunk, items_table(chunk, model.moe_layers, per_layer))
    return finish_manifest(out, manifest, wl_summary, encoded, time.perf_counter() - started)


# ----- importance matrices ----------------------------------------------------------------------------
@dataclass
class ImatrixEntry:
    sums: np.ndarray  # [matrices, columns] summed squares of the input columns (legacy: mean * ncall)
    counts: np.ndarray | None  # [matrices] rows summed into each (None in the legacy format: lost)
    ncall: int = 0  # the legacy format's chunk count the means were multiplied by


@dataclass
class Imatrix:
    path: str
    legacy: bool
    entries: dict[str, ImatrixEntry]
    datasets: list[str]
    chunk_count: int
    chunk_size: int


def read_imatrix(path: str | Path) -> Imatrix:
    """An importance-matrix file of ``llama-imatrix``, GGUF or legacy (module doc)."""
    path = Path(path)
    if not path.is_file():
        raise UspxError(f"{path}: no such imatrix file")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    return _read_gguf_imatrix(path) if magic == b"GGUF" else _read_legacy_imatrix(path)


def _read_gguf_imatrix(path: Path) -> Imatrix:
    try:
        import gguf
    except ImportError:
        raise UspxError("reading a GGUF imatrix needs the gguf package: pip install 'uspx[gguf]'") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the gguf package's own errors for a damaged file
        raise UspxError(f"{path}: cannot read GGUF imatrix file ({exc})") from None

    def value(key: str, default):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    sums, counts = {}, {}
    for t in reader.tensors:
        for suffix, into in ((".in_sum2", sums), (".counts", counts)):
            if t.name.endswith(suffix):
                if t.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise UspxError(f"{path}: {t.name} is {t.tensor_type.name}, llama.cpp writes float32")
                into[t.name[: -len(suffix)]] = np.array(t.data, np.float64)
    if not sums:
        raise UspxError(f"{path}: a GGUF file without <tensor>.in_sum2 tensors: not an importance matrix")
    if set(sums) != set(counts):
        odd = sorted(set(sums) ^ set(counts))[:3]
        raise UspxError(f"{path}: sums and counts do not pair up (e.g. {odd})")
    entries = {}
    for name, s in sums.items():
        c = np.rint(counts[name].reshape(-1)).astype(np.int64)
        s = s.reshape(len(c), -1) if s.size % max(len(c), 1) == 0 else None
        if s is None:
            raise UspxError(f"{path}: {name}.in_sum2 holds {sums[name].size} values, not a whole row per count "
                            f"({len(c)} counts)")
        entries[name] = ImatrixEntry(s, c)
    return Imatrix(str(path), False, entries, list(value(IMATRIX_KEYS[0], [])), int(value(IMATRIX_KEYS[1], 0)),
                   int(value(IMATRIX_KEYS[2], 0)))


def _read_legacy_imatrix(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise UspxError(f"{path}: truncated legacy imatrix (at byte {pos}); neither GGUF nor a whole .dat file")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n,) = take("<i")
    if n < 1 or n > 1_000_000:
        raise UspxError(f"{path}: not an importance matrix (neither GGUF nor a legacy .dat with entries)")
    entries = {}
    for _ in range(n):
        (length,) = take("<i")
        if not 0 < length < 4096:
            raise UspxError(f"{path}: a legacy imatrix entry name of {length} bytes; the file is damaged")
        name = take(f"<{length}s")[0].decode("utf-8", "replace")
        ncall, nval = take("<ii")
        values = np.array(take(f"<{nval}f"), np.float64)
        entries[name] = ImatrixEntry(values[None, :], None, ncall)  # experts folded in one row: split by the caller
    chunks, datasets = 0, []
    if pos + 4 <= len(data):
        (chunks,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            if 0 < length and pos + length <= len(data):
                datasets.append(take(f"<{length}s")[0].decode("utf-8", "replace"))
    return Imatrix(str(path), True, entries, datasets, int(chunks), 0)


@dataclass
class ImatrixExperts:
    """Per MoE layer, what an imatrix says of each expert."""

    layers: list[int]
    counts: np.ndarray | None  # [L, E] routed (token, slot) pairs; None from a legacy file
    down_energy: np.ndarray  # [L, E, width] mean squared activation entering each expert's down projection
    input_energy: np.ndarray | None  # [L, E, hidden] mean squared layer input of the tokens routed to it
    tokens: int | None  # tokens behind the counts (routed pairs / top-k), per layer the same


def imatrix_experts(imatrix: Imatrix, model: GGUFModel) -> ImatrixExperts:
    """The expert entries of ``imatrix`` by layer, checked against ``model`` (the GGUF it was made on)."""
    L, E = len(model.moe_layers), model.num_experts
    pos = {l: i for i, l in enumerate(model.moe_layers)}
    counts = None if imatrix.legacy else np.zeros((L, E), np.int64)
    down: list[np.ndarray | None] = [None] * L
    inp: list[np.ndarray | None] = [None] * L
    for name, entry in imatrix.entries.items():
        where = model.expert_tensors.get(name)
        if where is None or where[1] not in ("gate", "up", "down", "gate_up"):
            continue
        layer, part = where
        sums = entry.sums
        if imatrix.legacy:
            if sums.size % E:
                raise UspxError(f"{imatrix.path}: {name} holds {sums.size} values, not a multiple of the model's "
                                f"{E} experts; was this imatrix made on {model.path}?")
            ncall = max(entry.ncall, 1)
            mean = sums.reshape(E, -1) / ncall  # (sum / count) * ncall, stored
        else:
            if sums.shape[0] != E:
                raise UspxError(f"{imatrix.path}: {name} has {sums.shape[0]} experts, {model.path} has {E}; "
                                "was this imatrix made on this model?")
            c = entry.counts
            if counts is not None:  # gate, up and down each count the same routed pairs
                counts[pos[layer]] = np.maximum(counts[pos[layer]], c)
            with np.errstate(divide="ignore", invalid="ignore"):
                mean = np.where(c[:, None] > 0, sums / np.maximum(c[:, None], 1), 0.0)
        if part == "down":
            down[pos[layer]] = mean
        else:
            inp[pos[layer]] = mean
    missing = [model.moe_layers[i] for i, d in enumerate(down) if d is None]
    if missing:
        raise UspxError(f"{imatrix.path}: no ffn_down_exps entry for MoE layers {missing[:5]} of {model.path}; "
                        "was it made on this model, with every layer computed?")
    widths = {d.shape[1] for d in down}
    if len(widths) != 1:
        raise UspxError(f"{imatrix.path}: expert widths differ between layers ({sorted(widths)})")
    input_energy = None if any(x is None for x in inp) else np.stack(inp)
    tokens = None
    if counts is not None:
        per_layer = counts.sum(1)
        if (per_layer % model.top_k).any() or len(set(per_layer.tolist())) != 1:
            raise UspxError(f"{imatrix.path}: routed counts per layer {per_layer.tolist()} are not one number of "
                            f"tokens times top-k {model.top_k}; was it made on {model.path}?")
        tokens = int(per_layer[0] // model.top_k)
    return ImatrixExperts(list(model.moe_layers), counts, np.stack(down), input_energy, tokens)
