"""A GGUF file of an exported checkpoint, through llama.cpp's own converter.

``convert_hf_to_gguf.py`` holds llama.cpp's per-architecture tables (tensor names, metadata,
MXFP4 handling for gpt-oss); uspx runs it rather than writing them again. It ships in llama.cpp's
source, which the ``llama-cpp-python`` source package vendors: ``pip download llama-cpp-python
--no-binary :all: --no-deps`` and pass the ``.tar.gz`` (or any llama.cpp checkout) as
``llama_cpp``.

The converter recognises a BPE tokenizer's pre-tokenization by hashing its output on a test string,
and stops on tokenizers it does not know (the bundled teacher's, for one). uspx then declares it
from the tokenizer's own definition: a byte-level BPE whose only pre-tokenizer is the GPT-2 split
pattern is llama.cpp's ``gpt-2``; anything else must be named by the user (``pre_tokenizer``), and
the runtime benchmark checks the choice by comparing llama.cpp's token ids with the tokenizer's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from uspx.io import UspxError, atomic_path

# Runs inside the converter's process: its own gguf-py and conversion package come first on the path.
_WRAPPER = r"""
import runpy, sys
root, pre = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
sys.argv = [root + "/convert_hf_to_gguf.py"] + sys.argv[3:]
if pre:
    from conversion import base
    known = base.TextModel.get_vocab_base_pre
    def declared(self, tokenizer):
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            return pre
    base.TextModel.get_vocab_base_pre = declared
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def declared_pre_tokenizer(model_dir: str | Path) -> str | None:
    """llama.cpp's name for the model's BPE pre-tokenization, from ``tokenizer.json``; None when uspx
    cannot tell (the user names it)."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        return None
    spec = json.loads(path.read_text()).get("pre_tokenizer") or {}
    if spec.get("type") == "ByteLevel" and spec.get("use_regex", True) and not spec.get("add_prefix_space", False):
        return "gpt-2"  # the GPT-2 split pattern on bytes, nothing before it
    return None


def converter_root(llama_cpp: str | Path, work: Path) -> Path:
    """The llama.cpp source folder holding ``convert_hf_to_gguf.py``: ``llama_cpp`` itself, its
    ``vendor/llama.cpp``, or the same inside a source package (``.tar.gz``, extracted into ``work``)."""
    path = Path(llama_cpp)
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(path) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and
                       (m.name.endswith(".py") or "/gguf-py/" in m.name or "/conversion/" in m.name)]
            tar.extractall(work, members=members, filter="data")
        found = sorted(work.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))
        if not found:
            raise UspxError(f"{path}: no vendor/llama.cpp/convert_hf_to_gguf.py inside")
        return found[0].parent
    for candidate in (path, path / "vendor" / "llama.cpp"):
        if (candidate / "convert_hf_to_gguf.py").exists():
            return candidate
    raise UspxError(f"{path}: not a llama.cpp source folder (no convert_hf_to_gguf.py); pass a llama.cpp "
                    "checkout or the llama-cpp-python source package (.tar.gz)")


def export_gguf(model_dir: str | Path, out: str | Path, *, llama_cpp: str | Path, outtype: str = "auto",
                pre_tokenizer: str | None = None, timeout: float | None = None) -> dict:
    """Convert the checkpoint in ``model_dir`` to the GGUF file ``out`` with llama.cpp's converter.
    Returns what was done; the file appears only when the converter succeeded."""
    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "config.json").exists():
        raise UspxError(f"{model_dir}: no config.json (not a model folder)")
    if out.exists():
        raise UspxError(f"{out} exists; refusing to overwrite it")
    pre = pre_tokenizer or declared_pre_tokenizer(model_dir) or ""
    with tempfile.TemporaryDirectory(prefix="uspx-llama-") as work:
        root = converter_root(llama_cpp, Path(work))
        with atomic_path(out) as tmp:
            cmd = [sys.executable, "-c", _WRAPPER, str(root), pre, str(model_dir), "--outfile", str(tmp),
                   "--outtype", outtype]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            if res.returncode != 0:
                if "pre-tokenizer was not recognized" in res.stderr + res.stdout:
                    raise UspxError(f"llama.cpp's converter does not know the pre-tokenization of {model_dir}'s "
                                    "tokenizer and uspx cannot tell it from tokenizer.json; name it with "
                                    "--pre-tokenizer (llama.cpp's names: gpt-2, llama-bpe, qwen2, ...); nothing written")
                tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-12:])
                raise UspxError(f"llama.cpp's converter failed on {model_dir} (nothing written):\n{tail}")
    return dict(model=str(model_dir), out=str(out), converter=str(root), outtype=outtype,
                pre_tokenizer=pre or None, bytes=out.stat().st_size)
