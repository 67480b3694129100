"""Where llama.cpp is on this machine: its programs (``llama-quantize``, ``llama-imatrix``, ...) and
its source (the GGUF converter). The Python bindings that run a GGUF in this process are found by
:mod:`uspx.trace.llama_runtime`.

uspx never builds llama.cpp itself. A user who runs GGUF models already has it; the programs are
looked up in the folder given on the command line (``--llama-cpp DIR``: a folder of programs, or a
checkout with ``build/bin``), then ``$USPX_LLAMA_CPP``, then ``PATH``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from uspx.io import UspxError

ENV = "USPX_LLAMA_CPP"
GET_IT = ("install llama.cpp (https://github.com/ggml-org/llama.cpp: a release, a package manager's "
          "`llama.cpp`, or `cmake -B build && cmake --build build`) and pass its folder with --llama-cpp "
          f"or ${ENV}")


def _folders(where: str | Path | None) -> list[Path]:
    out = []
    for base in (where, os.environ.get(ENV)):
        if base:
            base = Path(base)
            out += [base, base / "bin", base / "build" / "bin"]
    return out


def program(name: str, where: str | Path | None = None) -> Path:
    """The path of llama.cpp's program ``name`` (e.g. ``"llama-quantize"``)."""
    for folder in _folders(where):
        path = folder / name
        if path.is_file() and os.access(path, os.X_OK):
            return path
    if where is not None and not Path(where).exists():
        raise UspxError(f"--llama-cpp {where}: no such folder")
    found = shutil.which(name)
    if found is not None:
        return Path(found)
    searched = ", ".join(str(f) for f in _folders(where)) or "nothing given"
    raise UspxError(f"llama.cpp's {name} was not found (searched {searched} and PATH): {GET_IT}")


def source(where: str | Path | None = None) -> Path:
    """llama.cpp's source (a checkout, or the llama-cpp-python source package) for its converter:
    ``where``, else ``$USPX_LLAMA_CPP``."""
    found = where or os.environ.get(ENV)
    if not found:
        raise UspxError(f"converting to GGUF needs llama.cpp's source (its convert_hf_to_gguf.py): pass a "
                        f"checkout with --llama-cpp or set ${ENV}")
    return Path(found)
