"""What a model folder holds on disk: validated safetensors headers, dtypes, sizes, tokenizer files.

Headers are read by hand (8-byte length, JSON) so that a truncated or corrupt weight file is
reported with its name before transformers fails somewhere deep inside loading.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from uspx.models.tensorfiles import DTYPES, INDEX_NAME
from uspx.io import UspxError, read_json
from uspx.models import is_mxfp4_tensor

_MAX_HEADER = 100 << 20  # safetensors itself refuses headers over 100 MB
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "chat_template.jinja",
    "chat_template.json", "generation_config.json",
)  # fmt: skip


@dataclass
class WeightFiles:
    """The safetensors files of a folder with their headers (tensor name -> dtype tag, shape, bytes)."""

    folder: Path
    files: dict[str, int] = field(default_factory=dict)  # file name -> size in bytes
    headers: dict[str, int] = field(default_factory=dict)  # file name -> header bytes (incl. 8)
    tensors: dict[str, tuple[str, list[int], int]] = field(default_factory=dict)

    @property
    def file_bytes(self) -> int:
        return sum(self.files.values())

    @property
    def tensor_bytes(self) -> int:
        """Bytes of tensor data: the files minus their headers (what a size prediction models)."""
        return sum(n for _, _, n in self.tensors.values())

    def main_float_dtype(self) -> torch.dtype:
        """The floating dtype holding the most bytes: the checkpoint's precision."""
        by_tag: dict[str, int] = {}
        for tag, _, n in self.tensors.values():
            if tag in DTYPES and DTYPES[tag].is_floating_point:
                by_tag[tag] = by_tag.get(tag, 0) + n
        if not by_tag:
            raise UspxError(f"{self.folder}: no floating-point tensors in the weight files")
        return DTYPES[max(by_tag, key=by_tag.__getitem__)]

    def is_mxfp4(self) -> bool:
        """Whether any stored tensor holds MXFP4 blocks (the families' layouts say which do)."""
        return any(is_mxfp4_tensor(name, tag) for name, (tag, _, _) in self.tensors.items())


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, header bytes incl. the 8-byte length) of one safetensors file, fully checked."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise UspxError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise UspxError(f"{path}: corrupt or truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UspxError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise UspxError(f"{path}: corrupt safetensors header (not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            info["dtype"], list(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise UspxError(f"{path}: corrupt safetensors header (entry {name!r})") from None
        end = max(end, int(stop))
    if 8 + n + end > size:
        raise UspxError(
            f"{path}: truncated safetensors file: {size} bytes on disk, the header describes {8 + n + end}"
        )
    return header, 8 + n


def weight_files(folder: str | Path) -> WeightFiles:
    """Every safetensors file of a model folder (single file or sharded index), headers checked."""
    folder = Path(folder)
    if (folder / INDEX_NAME).exists():
        index = read_json(folder / INDEX_NAME)
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise UspxError(f"{folder / INDEX_NAME}: no weight_map object; not a safetensors index")
        names = sorted(set(index["weight_map"].values()))
        missing = [f for f in names if not (folder / f).is_file()]
        if missing:
            raise UspxError(f"{folder / INDEX_NAME}: names weight files that are missing: {missing}")
    else:
        names = sorted(p.name for p in folder.glob("*.safetensors"))
    if not names:
        raise UspxError(f"{folder}: no *.safetensors weights (uspx never loads pickle checkpoints)")
    out = WeightFiles(folder)
    for name in names:
        header, hbytes = read_header(folder / name)
        out.files[name] = (folder / name).stat().st_size
        out.headers[name] = hbytes
        for tname, info in header.items():
            if tname != "__metadata__":
                start, stop = info["data_offsets"]
                out.tensors[tname] = (info["dtype"], list(info["shape"]), int(stop) - int(start))
    return out


def check_config(folder: str | Path) -> dict:
    """config.json parsed, with an error naming the file when it is missing or corrupt."""
    cfg = read_json(Path(folder) / "config.json")
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise UspxError(f"{Path(folder) / 'config.json'}: not a Hugging Face config (no model_type)")
    return cfg


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer (and generation config) byte for byte: re-saving could change it."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
