"""Prune a GGUF file a user already has, by a uspx plan, without dequantizing anything.

In a GGUF file the experts of a MoE layer are the outermost dimension of their tensors
(``blk.N.ffn_{gate,up,down,gate_up}_exps`` weights and biases, the router ``blk.N.ffn_gate_inp``
and ``blk.N.exp_probs_b``): whatever the quantization type, expert ``e``'s bytes are one contiguous
slice, since quantization blocks run along the innermost dimension. So the kept experts are copied
byte for byte, ``{arch}.expert_count`` is set to the kept count, and every other tensor and
metadata field is copied as it is. Reading and writing go through the ``gguf`` package (llama.cpp's
own), which memory-maps the source: memory stays at one tensor.

A plan with different counts per layer is padded to its largest count with dropped experts whose
router bias is set to -inf, so that no runtime routes to them (only where the router has a float32
bias, as gpt-oss's has); the record says which and what they cost.

A plan made on the Hugging Face model applies to its GGUF: layers match by decoder layer index
(``blk.N``) and experts by index, as llama.cpp's converter keeps both. llama.cpp holds one expert
count for the whole model, so the plan must keep the same count in every layer, and at least the
file's ``expert_used_count``.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from uspx.io import UspxError, atomic_path

if TYPE_CHECKING:
    from uspx.trace.llama import GGUFModel


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UspxError("GGUF files need the gguf package: pip install 'uspx[gguf]'") from None
    return gguf


@functools.cache
def _expert_parts() -> dict:
    """llama.cpp's expert tensor kinds by the part of the expert each holds."""
    t = _gguf().MODEL_TENSOR
    return {t.FFN_GATE_EXP: "gate", t.FFN_UP_EXP: "up", t.FFN_DOWN_EXP: "down", t.FFN_GATE_UP_EXP: "gate_up",
            t.FFN_GATE_INP: "router", t.FFN_EXP_PROBS_B: "router_bias"}


@functools.cache
def _expert_tensor_pattern() -> re.Pattern:
    """llama.cpp's names of the tensors that hold a layer's experts on their outermost dimension:
    one group (the layer) per kind of :func:`_expert_parts`, in its order."""
    names = [_gguf().TENSOR_NAMES[t].replace(".", r"\.").replace("{bid}", r"(\d+)") for t in _expert_parts()]
    return re.compile("(?:" + "|".join(names) + r")\.(?:weight|bias)")


def expert_tensor_part(name: str) -> str | None:
    """Which part of a layer's experts tensor ``name`` holds (gate, up, down, gate_up, router,
    router_bias), else None."""
    m = _expert_tensor_pattern().fullmatch(name)
    return None if m is None else list(_expert_parts().values())[m.lastindex - 1]


def expert_tensor_layer(name: str) -> int | None:
    """The layer whose experts tensor ``name`` holds on its outermost dimension, else None."""
    m = _expert_tensor_pattern().fullmatch(name)
    return None if m is None else int(m.group(m.lastindex))


def _open(src: Path):
    """A GGUF reader of ``src``, or an error naming it."""
    try:
        return _gguf().GGUFReader(str(src))
    except Exception as exc:  # the gguf package's own errors for a damaged or foreign file
        raise UspxError(f"{src}: cannot read GGUF file ({exc})") from None


def _field(reader, key: str, default=None, *, arch: str = ""):
    """The value of metadata field ``key`` (``{arch}`` filled in), or ``default``."""
    f = reader.fields.get(key.format(arch=arch))
    return default if f is None else f.contents()


def read_counts(reader) -> tuple[str, int, int, int]:
    """(architecture, block count, expert count, experts used per token) of a GGUF file."""
    gguf = _gguf()
    arch = _field(reader, gguf.Keys.General.ARCHITECTURE)
    if arch is None:
        raise UspxError("the GGUF file names no general.architecture")
    values = [_field(reader, k, arch=arch) for k in (gguf.Keys.LLM.BLOCK_COUNT, gguf.Keys.LLM.EXPERT_COUNT,
                                                     gguf.Keys.LLM.EXPERT_USED_COUNT)]
    if values[1] is None:
        raise UspxError(f"the GGUF file has no {arch}.expert_count: not a MoE model")
    return arch, int(values[0]), int(values[1]), int(values[2] or 0)


def prune_gguf(source: str | Path, kept: dict[int, list[int]], out: str | Path, *,
               num_experts: int | None = None) -> dict:
    """Write ``out``: ``source`` with only the ``kept`` experts of every MoE layer; returns a record
    (counts, bytes, the check that every kept expert's bytes equal the source's). ``num_experts``:
    the expert count the plan was made for (the file must have it)."""
    gguf = _gguf()
    src, dst = Path(source), Path(out)
    if dst.exists():
        raise UspxError(f"{dst} exists; refusing to overwrite it (choose another name or delete it)")
    if src.resolve() == dst.resolve():
        raise UspxError("the pruned GGUF must go to another file than its source")
    reader = _open(src)
    arch, blocks, n_experts, used = read_counts(reader)
    if num_experts is not None and int(num_experts) != n_experts:
        raise UspxError(f"the plan was made for {num_experts} experts per layer, {src} has {n_experts}")
    tensors = {t.name: t for t in reader.tensors}
    layers_in_file = sorted({l for t in reader.tensors if (l := expert_tensor_layer(t.name)) is not None})
    if set(kept) != set(layers_in_file):
        raise UspxError(f"the plan keeps experts in layers {sorted(kept)}, the GGUF file has MoE layers {layers_in_file}")
    bad = {l: v for l, v in kept.items() if len(set(v)) != len(v) or not all(0 <= e < n_experts for e in v)}
    if bad:
        raise UspxError(f"the plan names experts outside 0..{n_experts - 1} or twice: {dict(list(bad.items())[:3])}")
    for t in reader.tensors:
        if expert_tensor_layer(t.name) is not None and t.data.shape[0] != n_experts:
            raise UspxError(f"{src}: tensor {t.name} has {t.data.shape[0]} rows on its outermost dimension, "
                            f"not the file's expert count {n_experts}")
    count = max(len(v) for v in kept.values())
    if min(len(v) for v in kept.values()) < used:
        raise UspxError(f"the plan keeps {min(len(v) for v in kept.values())} experts in a layer, fewer than the "
                        f"{used} the model routes each token to; llama.cpp refuses top-k above the expert count")
    fillers = _fillers(kept, count, n_experts, tensors)
    rows = {l: sorted(list(v) + fillers.get(l, [])) for l, v in kept.items()}

    def expected(t) -> np.ndarray:
        """What the pruned file holds for tensor ``t``: its kept (and filler) experts' bytes, and a
        router bias of -inf for every filler, so that no runtime routes to it."""
        layer = expert_tensor_layer(t.name)
        if layer is None:
            return t.data
        data = t.data[np.array(rows[layer])]
        if fillers.get(layer) and t.name == f"blk.{layer}.ffn_gate_inp.bias":
            data = data.copy()
            data[[rows[layer].index(e) for e in fillers[layer]]] = -np.inf
        return data

    writer = gguf.GGUFWriter(None, arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by the writer itself
        value = field.contents()
        if field.name == gguf.Keys.LLM.EXPERT_COUNT.format(arch=arch):
            value = count
        kind = field.types[0]
        writer.add_key_value(field.name, value, kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)

    for t in reader.tensors:
        data = expected(t)
        writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, t.tensor_type)
    with atomic_path(dst) as tmp:
        writer.write_header_to_file(path=Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            writer.write_tensor_data(np.ascontiguousarray(expected(t)), tensor_endianess=reader.endianess)
        writer.close()
        check = _check(reader, gguf.GGUFReader(str(tmp)), expected, count, arch)
    per_expert = sum(t.n_bytes for t in reader.tensors if expert_tensor_layer(t.name) is not None) / (
        n_experts * len(kept))
    return dict(source=str(src), out=str(dst), arch=arch, blocks=blocks, experts=n_experts, kept_count=count,
                expert_used_count=used, kept={str(l): sorted(v) for l, v in kept.items()},
                padding={str(l): v for l, v in fillers.items() if v},
                padding_bytes=round(per_expert * sum(len(v) for v in fillers.values())),
                source_bytes=src.stat().st_size, bytes=dst.stat().st_size, check=check)


def _fillers(kept: dict[int, list[int]], count: int, n_experts: int, tensors: dict) -> dict[int, list[int]]:
    """For a plan with different counts per layer: per layer, the dropped experts (lowest ids) that
    pad it to ``count``. Only a router with a float32 bias can make them unroutable (-inf)."""
    short = {l: count - len(v) for l, v in kept.items() if len(v) < count}
    if not short:
        return {}
    gguf = _gguf()
    for l in short:
        bias = tensors.get(f"blk.{l}.ffn_gate_inp.bias")
        if bias is None or bias.tensor_type != gguf.GGMLQuantizationType.F32:
            raise UspxError("llama.cpp holds one expert count for the whole model, and this file's router has no "
                            f"float32 bias to disable padded experts; the plan keeps {sorted({len(v) for v in kept.values()})} "
                            "experts in different layers (select with the same count everywhere)")
    return {l: sorted(set(range(n_experts)) - set(kept[l]))[:n] for l, n in short.items()}


def _check(old, new, expected, count: int, arch: str) -> dict:
    """Every tensor of the pruned file equals what the plan asks of the source's bytes (kept experts
    byte for byte, everything else whole, filler router biases -inf), types unchanged; the expert
    count reads back."""
    gguf = _gguf()
    source = {t.name: t for t in old.tensors}
    if set(source) != {t.name for t in new.tensors}:
        raise UspxError("the pruned GGUF does not hold the source's tensors; nothing was written")
    compared = 0
    for t in new.tensors:
        s = source[t.name]
        want = expected(s)
        if t.tensor_type != s.tensor_type or t.data.shape != want.shape or \
                t.data.tobytes() != np.ascontiguousarray(want).tobytes():
            raise UspxError(f"tensor {t.name} of the pruned GGUF differs from the source's kept bytes; nothing was written")
        compared += int(t.n_bytes)
    got = new.fields[gguf.Keys.LLM.EXPERT_COUNT.format(arch=arch)].contents()
    if int(got) != count:
        raise UspxError(f"the pruned GGUF's expert count reads {got}, not {count}; nothing was written")
    return dict(tensors=len(new.tensors), bytes_compared=compared, expert_count=int(got))


def fingerprint(path: str | Path, header_bytes: int) -> str:
    """A GGUF file's fingerprint without reading all of it (a model file is many GiB): its size, its
    header (metadata and tensor table: its first ``header_bytes``, the reader's ``data_offset``) and 16
    samples of 64 KiB spread over the tensor data."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(header_bytes))
        for i in range(16):
            fh.seek(header_bytes + (size - header_bytes) * i // 16)
            h.update(fh.read(65536))
    return h.hexdigest()[:16]


def read_model(path: str | Path) -> "GGUFModel":
    """What uspx needs of a MoE GGUF file without running it: counts, MoE layers, the expert
    tensors by layer and part, bytes per expert and of the rest, the KV cache per token."""
    from uspx.trace.llama import GGUFModel

    gguf = _gguf()
    src = Path(path)
    if not src.is_file():
        raise UspxError(f"{src}: no such GGUF file")
    reader = _open(src)
    arch, blocks, n_experts, used = read_counts(reader)
    field = functools.partial(_field, reader, arch=arch)

    experts = {t.name: (layer, expert_tensor_part(t.name)) for t in reader.tensors
               if (layer := expert_tensor_layer(t.name)) is not None}
    layers = sorted({layer for layer, _ in experts.values()})
    if not layers:
        raise UspxError(f"{src}: no expert tensors (blk.N.ffn_*_exps); not a MoE GGUF uspx can read")
    expert_total = sum(int(t.n_bytes) for t in reader.tensors if t.name in experts)
    fixed = sum(int(t.n_bytes) for t in reader.tensors if t.name not in experts)
    return GGUFModel(
        path=str(src), arch=arch, blocks=blocks, num_experts=n_experts, top_k=used, moe_layers=layers,
        expert_tensors=experts, expert_bytes=round(expert_total / (n_experts * len(layers))), fixed_bytes=fixed,
        file_bytes=src.stat().st_size, fingerprint=fingerprint(src, int(reader.data_offset)),
        context_length=int(field(gguf.Keys.LLM.CONTEXT_LENGTH, 0) or 0),
        kv_bytes_per_token=blocks * _kv_per_layer(field) * 2)


# llama.cpp's default sliding-window period of architectures whose files may not record it
# (src/models/openai-moe.cpp: load_swa_pattern(ml, 2))
SLIDING_PATTERN = {"gpt-oss": 2}


def _kv_per_layer(field) -> int:
    """K and V elements one token takes in one layer (the largest per-layer head count), from the
    metadata ``field`` reads."""
    gguf = _gguf()
    heads = field(gguf.Keys.Attention.HEAD_COUNT, 1) or 1
    heads_kv = field(gguf.Keys.Attention.HEAD_COUNT_KV, None) or heads
    heads, heads_kv = (max(h) if isinstance(h, list) else h for h in (heads, heads_kv))
    k_len = field(gguf.Keys.Attention.KEY_LENGTH, None) or int(field(gguf.Keys.LLM.EMBEDDING_LENGTH, 0)) // int(heads)
    v_len = field(gguf.Keys.Attention.VALUE_LENGTH, None) or k_len
    return int(heads_kv) * (int(k_len) + int(v_len))


def kv_cache_bytes(path: str | Path, context: int, kv_dtype: str) -> tuple[int, str]:
    """KV cache bytes of ``context`` tokens from a GGUF's metadata, and how they were counted: a
    sliding layer holds at most its window (the file's pattern: one flag per layer, or a period n
    where layer i slides when i % n < n - 1, as llama.cpp's set_swa_pattern reads it; else the
    architecture's default); without either every layer at the full context, an upper bound."""
    from uspx.plan.memory import KV_BYTES

    gguf = _gguf()
    reader = _open(Path(path))
    arch = _field(reader, gguf.Keys.General.ARCHITECTURE)
    field = functools.partial(_field, reader, arch=arch)
    layers, per_layer = int(field(gguf.Keys.LLM.BLOCK_COUNT)), _kv_per_layer(field)
    window = field(gguf.Keys.Attention.SLIDING_WINDOW)
    pattern = field(gguf.Keys.Attention.SLIDING_WINDOW_PATTERN, SLIDING_PATTERN.get(arch))
    if window and pattern is not None:
        flags = ([bool(f) for f in pattern] if isinstance(pattern, list) else
                 [int(pattern) == 0 or i % int(pattern) < int(pattern) - 1 for i in range(layers)])
        tokens = sum(min(context, int(window)) if f else context for f in flags[:layers])
        return int(per_layer * tokens * KV_BYTES[kv_dtype]), "from the GGUF's metadata (sliding layers at their window)"
    return int(per_layer * layers * context * KV_BYTES[kv_dtype]), "from the GGUF's metadata, every layer at the full context"
