"""Load a model safely (safetensors only, remote code behind a flag) and fingerprint it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from uspx.io import UspxError, sha256_json

DEFAULT_MODEL = "default"
BUNDLED_TEACHER = Path(__file__).resolve().parent.parent / "data" / "teacher"
_SAMPLE = 1 << 20  # bytes hashed from each end of every weight file


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object | None
    source: str  # folder the model came from
    fingerprint: str
    label: str  # what to print in outputs, e.g. "uspx teacher (trained)"


def resolve_model_path(name: str | Path) -> Path:
    if str(name) == DEFAULT_MODEL:
        if not (BUNDLED_TEACHER / "config.json").exists():
            raise UspxError(f"the bundled teacher is missing from {BUNDLED_TEACHER}; reinstall uspx")
        return BUNDLED_TEACHER
    path = Path(name)
    if not path.is_dir():
        raise UspxError(
            f"{path}: not a model folder (uspx loads local Hugging Face folders with config.json and "
            "*.safetensors; downloads are out of scope)"
        )
    if not (path / "config.json").exists():
        raise UspxError(f"{path}: no config.json")
    return path


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate computes these from free memory
DeviceMap = str | dict[str, int | str]


def parse_device_map(value: str | Path | dict | None) -> DeviceMap | None:
    """A device map for ``from_pretrained``: one of :data:`DEVICE_MAPS`, a dict, or a JSON file
    holding a dict of module name -> device (an int GPU index, ``"cuda:1"``, ``"cpu"``, ``"disk"``)."""
    if value is None or isinstance(value, dict):
        return value
    if str(value) in DEVICE_MAPS:
        return str(value)
    path = Path(value)
    if not path.is_file():
        raise UspxError(f"--device-map {value!r}: not one of {', '.join(DEVICE_MAPS)} and not a JSON file")
    try:
        mapping = json.loads(path.read_text())
    except ValueError as exc:
        raise UspxError(f"--device-map {path}: not JSON ({exc})") from None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, (int, str)) for k, v in mapping.items()):
        raise UspxError(f"--device-map {path}: expected an object of module name -> device (int or string)")
    return mapping


def parse_max_memory(value: str | dict | None) -> dict[int | str, str] | None:
    """``"0=20GiB,1=20GiB,cpu=60GiB"`` as accelerate's ``max_memory`` (GPU indices as ints)."""
    if value is None or isinstance(value, dict):
        return value
    out: dict[int | str, str] = {}
    for part in str(value).split(","):
        device, sep, size = part.strip().partition("=")
        if not sep or not device.strip() or not size.strip():
            raise UspxError(f"--max-memory {value!r}: expected DEVICE=SIZE pairs such as 0=20GiB,cpu=60GiB")
        device = device.strip()
        out[int(device) if device.isdigit() else device] = size.strip()
    return out


AUTO = "auto"
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                                  "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
_SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
_TAGS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}  # safetensors float tags uspx computes in
_MAX_HEADER = 100 << 20
DtypeChoice = str | torch.dtype | None


def parse_dtype(choice: DtypeChoice) -> torch.dtype | None:
    """A precision choice as a torch dtype; None for ``"auto"`` (or None): the checkpoint's own."""
    if choice is None or isinstance(choice, torch.dtype) and choice in _SHORT:
        return choice
    if isinstance(choice, str):
        if choice.lower() == AUTO:
            return None
        if choice.lower() in DTYPES:
            return DTYPES[choice.lower()]
    raise UspxError(f"dtype must be one of auto, bf16, fp16, fp32, not {choice!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"``: how outputs and manifests name a precision."""
    return _SHORT.get(dtype, str(dtype).removeprefix("torch."))


def stored_dtype(path: str | Path) -> torch.dtype:
    """The float type a checkpoint stores its weights in: the one holding the most bytes across the
    safetensors headers (fp32 stays fp32, bf16 stays bf16). MXFP4 expert blocks are not floats and
    do not count: they decode exactly into the type of the rest (every MXFP4 value is a bf16 value).
    A folder holding only a config says it in ``dtype`` / ``torch_dtype``; one that says nothing,
    or is quantized, computes in bf16."""
    path = Path(path)
    by_dtype: dict[torch.dtype, int] = {}
    for file in sorted(path.glob("*.safetensors")):
        for dtype, n in _float_bytes(file).items():
            by_dtype[dtype] = by_dtype.get(dtype, 0) + n
    if by_dtype:
        return max(by_dtype, key=by_dtype.__getitem__)
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    declared = str(config.get("dtype") or config.get("torch_dtype") or "").removeprefix("torch.").lower()
    return DTYPES.get(declared, torch.bfloat16) if not config.get("quantization_config") else torch.bfloat16


def _float_bytes(file: Path) -> dict[torch.dtype, int]:
    """Bytes per float type in one safetensors file, from its header alone."""
    import struct

    with open(file, "rb") as fh:
        raw = fh.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < n <= _MAX_HEADER:
            raise UspxError(f"{file}: corrupt or truncated safetensors file (no readable header)")
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError):
            raise UspxError(f"{file}: corrupt safetensors header (not JSON)") from None
    out: dict[torch.dtype, int] = {}
    for name, info in header.items():
        if name != "__metadata__" and isinstance(info, dict) and info.get("dtype") in _TAGS:
            start, stop = info.get("data_offsets", (0, 0))
            out[_TAGS[info["dtype"]]] = out.get(_TAGS[info["dtype"]], 0) + int(stop) - int(start)
    return out


def resolve_dtype(choice: DtypeChoice, path: str | Path) -> torch.dtype:
    """The precision a run of the model in ``path`` computes in: ``choice``, or for ``"auto"`` the
    checkpoint's stored float type (:func:`stored_dtype`)."""
    dtype = parse_dtype(choice)
    return dtype if dtype is not None else stored_dtype(path)


def load_model(
    name: str | Path = DEFAULT_MODEL,
    *,
    dtype: DtypeChoice = torch.float32,
    trust_remote_code: bool = False,
    device: str | None = None,
    with_tokenizer: bool = True,
    device_map: str | Path | dict | None = None,
    max_memory: str | dict | None = None,
) -> LoadedModel:
    """Load a causal LM from a local folder; ``"default"`` is the bundled uspx teacher.

    ``dtype``: bf16, fp16, fp32 (a torch dtype or its name), or ``"auto"`` for the checkpoint's
    stored float type (:func:`stored_dtype`), what the engine's :func:`~uspx.engine.open_source`
    uses by default. The default stays fp32 here: training callers keep fp32 master weights.

    Weights load from safetensors only (``use_safetensors=True`` refuses pickle files), and a model
    that needs its own Python code loads only with ``trust_remote_code=True``.

    ``device_map`` (see :func:`parse_device_map`) places the modules across devices with accelerate,
    for a model larger than one device; modules mapped to ``"disk"`` stay in the files and are read
    at each forward. ``max_memory`` bounds what the computed maps put on each device.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(name)
    if not any(path.glob("*.safetensors")):
        raise UspxError(f"{path}: no *.safetensors weights (uspx never loads pickle checkpoints)")
    dtype = resolve_dtype(dtype, path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UspxError(f"{path}: this model needs its own code; pass --trust-remote-code to allow it") from None
        raise UspxError(f"{path}: cannot read config: {exc}") from None
    from uspx.models import adapter_class

    adapter_class(config.model_type)  # fail before loading gigabytes
    extra = {}
    quant = getattr(config, "quantization_config", None) or {}
    if isinstance(quant, dict) and quant.get("quant_method") == "mxfp4":
        from transformers import Mxfp4Config

        # Without GPU kernels transformers can only run MXFP4 experts dequantized; say so explicitly,
        # since its automatic fallback needs accelerate.
        extra["quantization_config"] = Mxfp4Config(dequantize=True)
    device_map = parse_device_map(device_map)
    if max_memory is not None and not isinstance(device_map, str):
        raise UspxError(f"--max-memory bounds a computed device map ({', '.join(DEVICE_MAPS)}); got device map {device_map!r}")
    if device_map is not None:
        if device:
            raise UspxError(f"give a device ({device}) or a device map, not both")
        extra.update(device_map=device_map, max_memory=parse_max_memory(max_memory), offload_folder=_offload_folder())
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, **extra
        )
    except (ValueError, KeyError) as exc:
        if device_map is None:
            raise
        raise UspxError(f"{path}: cannot place the model with device map {device_map!r}: {exc}") from None
    if device:
        model.to(device)
    model.eval()
    tokenizer = load_tokenizer(path, trust_remote_code) if with_tokenizer else None
    return LoadedModel(model, tokenizer, str(path), model_fingerprint(path), model_label(path))


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> object | None:
    """The tokenizer saved in model folder ``path``; None where the folder has none."""
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def _offload_folder() -> str:
    """Where accelerate may write modules mapped to ``"disk"`` (safetensors weights are read from
    their own files, so it usually stays empty); removed when the process exits."""
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="uspx-offload-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def model_from_state(config, state: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """A model of ``config``'s own class holding exactly ``state`` (eval mode): how a structurally
    changed copy of a model (narrower experts, fewer heads, a dense student) is built. An error names
    the tensors that do not fit the class."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    result = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UspxError(f"the changed tensors do not fit {type(model).__name__} (missing {result.missing_keys[:4]}, "
                        f"unexpected {result.unexpected_keys[:4]})")
    return model.eval()


def model_label(path: Path) -> str:
    """What outputs call the model in ``path``."""
    return "uspx teacher (trained on real text)" if Path(path) == BUNDLED_TEACHER else str(path)


def model_fingerprint(path: str | Path) -> str:
    """Hash of the config and of every weight file's size, header and first and last MiB.

    Cheap on a 13 GB checkpoint, and it changes when weights change (sizes alone would not: two
    trainings of one architecture have identical headers and sizes).
    """
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    config.pop("transformers_version", None)
    files = []
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            h.update(fh.read(_SAMPLE))
            if size > 2 * _SAMPLE:
                fh.seek(size - _SAMPLE)
            h.update(fh.read(_SAMPLE))
        files.append([f.name, size, h.hexdigest()])
    return sha256_json({"config": config, "files": files})
