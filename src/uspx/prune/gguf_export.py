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
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

from uspx.io import UspxError, atomic_path
from uspx.llamacpp import program, source

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


def converter_root(llama_cpp: str | Path | None, work: Path) -> Path:
    """The llama.cpp source folder holding ``convert_hf_to_gguf.py``: ``llama_cpp`` (default
    ``$USPX_LLAMA_CPP``) itself, its ``vendor/llama.cpp``, or the same inside a source package
    (``.tar.gz``, extracted into ``work``)."""
    path = source(llama_cpp)
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


def export_gguf(model_dir: str | Path, out: str | Path, *, llama_cpp: str | Path | None = None, outtype: str = "auto",
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


def gguf_tensors(path: str | Path) -> dict:
    """Stored bytes of a GGUF file's tensors, how many tensors of each type it holds, and its
    fingerprint, from one reading of its header (a large vocabulary takes seconds to parse)."""
    from uspx.prune.gguf_file import _open, fingerprint

    reader = _open(Path(path))
    tensors = reader.tensors
    return {"parameter_bytes": sum(int(t.n_bytes) for t in tensors), "file_bytes": Path(path).stat().st_size,
            "tensor_types": dict(Counter(t.tensor_type.name for t in tensors)),
            "fingerprint": fingerprint(path, int(reader.data_offset))}


# ----- quantization by llama.cpp --------------------------------------------------------------------
def _llama_env(program: Path) -> dict:
    """The environment a llama.cpp program runs in: its shared libraries sit beside it in a build
    folder (``libllama.so``, ``libggml*.so``) and are found there even when not installed."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(program.parent), env.get("LD_LIBRARY_PATH")) if p)
    return env


def _run_program(cmd: list[str], what: str, timeout: float | None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_llama_env(Path(cmd[0])))
    except subprocess.TimeoutExpired:
        raise UspxError(f"{what} did not finish within {timeout:g} s (nothing written)") from None


def _tail(res: subprocess.CompletedProcess, lines: int = 12) -> str:
    return "\n".join((res.stderr + res.stdout).strip().splitlines()[-lines:])


def quantize_gguf(source: str | Path, out: str | Path, quant: str, *, imatrix: str | Path | None = None,
                  llama_cpp: str | Path | None = None, threads: int | None = None, allow_requantize: bool = False,
                  dry_run: bool = False, timeout: float | None = None) -> dict:
    """Quantize the GGUF file ``source`` to ``quant`` (``Q8_0``, ``Q4_K_M``, ... : llama-quantize's
    names) with llama.cpp's own ``llama-quantize``, optionally guided by an importance matrix
    (:func:`make_imatrix`). Returns what was written: bytes, tensor types, llama.cpp's fallbacks.

    ``dry_run`` writes nothing and returns llama.cpp's own prediction of the quantized size (its
    per-tensor choice of types, the same code path as a real run). The file appears only when
    llama-quantize succeeded.
    """
    from uspx.plan.memory import GGUF_QUANTS

    source, out = Path(source), Path(out)
    key = quant.upper()
    if key not in GGUF_QUANTS:
        raise UspxError(f"--quant {quant!r}: not a llama-quantize type; known: {', '.join(GGUF_QUANTS)}")
    if not source.is_file():
        raise UspxError(f"{source}: no such GGUF file")
    if imatrix is not None and not Path(imatrix).is_file():
        raise UspxError(f"{imatrix}: no such importance-matrix file")
    if not dry_run and out.exists():
        raise UspxError(f"{out} exists; refusing to overwrite it")
    exe = program("llama-quantize", llama_cpp)
    flags = (["--allow-requantize"] if allow_requantize else []) + (["--imatrix", str(imatrix)] if imatrix else [])
    tail = [key] + ([str(threads)] if threads else [])
    if dry_run:
        res = _run_program([str(exe), "--dry-run", *flags, str(source), *tail], "llama-quantize --dry-run", timeout)
        if res.returncode != 0:
            raise UspxError(f"llama-quantize --dry-run failed on {source}:\n{_tail(res)}")
        return dict(source=str(source), quant=key, **_quantize_log(res.stderr + res.stdout))
    with atomic_path(out) as tmp:
        res = _run_program([str(exe), *flags, str(source), str(tmp), *tail], "llama-quantize", timeout)
        if res.returncode != 0:
            text = res.stderr + res.stdout
            hint = ""
            if "requantizing from type mxfp4" in text:
                hint = (" (its experts are MXFP4, as gpt-oss stores them: --quant MXFP4_MOE keeps them and "
                        "quantizes the rest to Q8_0; another type would requantize them, which loses quality)")
            elif "requantiz" in text:
                hint = (" (the source is already quantized: requantizing loses quality; quantize from the f16/f32 "
                        "export, or pass allow_requantize)")
            raise UspxError(f"llama-quantize failed on {source} (nothing written){hint}:\n{_tail(res)}")
    log = _quantize_log(res.stderr + res.stdout)
    return dict(source=str(source), out=str(out), quant=key, imatrix=str(imatrix) if imatrix else None,
                program=str(exe), bytes=out.stat().st_size, **gguf_tensors(out),
                fallback_tensors=log["fallback_tensors"], fallbacks=log["fallbacks"])


def _quantize_log(text: str) -> dict:
    """What llama-quantize printed about sizes and fallbacks (its per-tensor lines end
    ``-> 0.21 MiB (q4_K)``; its summary ``quant size = 6.68 MiB (5.37 BPW)``)."""
    types = dict(Counter(m.group(1).upper() for m in re.finditer(r"->\s+[0-9.]+ MiB \((\w+)\)", text)))
    size = re.search(r"quant size\s*=\s*([0-9.]+) MiB \(([0-9.]+) BPW\)", text)
    fb = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback", text)
    fallbacks = re.findall(r"warning: (\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\w+)\)\s*"
                           r"-> falling back to\s+(\w+)", text)
    return dict(predicted_mib=float(size.group(1)) if size else None, bits_per_weight=float(size.group(2)) if size else None,
                quantized_types=types, fallback_tensors=int(fb.group(1)) if fb else 0,
                fallbacks=[dict(tensor=t, columns=int(c), block=int(b), wanted=w.upper(), used=u.upper())
                           for t, c, b, w, u in fallbacks])


def calibration_text(workload, split: str = "calibration") -> str:
    """The workload's ``split`` items as one text (prompt and completion, items apart by a blank
    line): what llama-imatrix reads to weigh each weight column by the user's own activations."""
    from uspx.workload import load_workload

    wl = load_workload(workload)
    items = wl.part(split).items
    if not items:
        raise UspxError(f"{wl.source}: the {split!r} split is empty; an importance matrix needs the user's text")
    return "\n\n".join(it.prompt + (it.completion or "") for it in items)


def make_imatrix(model_gguf: str | Path, workload, out: str | Path, *, split: str = "calibration",
                 llama_cpp: str | Path | None = None, threads: int | None = None, context: int = 512,
                 timeout: float | None = None) -> dict:
    """An importance matrix of ``model_gguf`` on the user's calibration items, by llama.cpp's
    ``llama-imatrix`` (per weight column, the mean squared activation it sees; per expert for MoE
    tensors), for :func:`quantize_gguf`'s ``imatrix``.

    llama-imatrix reads its text in chunks of ``context`` tokens and needs two at least; a smaller
    workload gets the largest power-of-two chunk that fits it twice (down to 32 tokens).
    """
    model_gguf, out = Path(model_gguf), Path(out)
    if not model_gguf.is_file():
        raise UspxError(f"{model_gguf}: no such GGUF file")
    exe = program("llama-imatrix", llama_cpp)
    text = calibration_text(workload, split)
    with tempfile.TemporaryDirectory(prefix="uspx-imatrix-") as work:
        data, written = Path(work) / "calibration.txt", Path(work) / "imatrix.gguf"
        data.write_text(text)
        n_ctx = context
        while True:
            cmd = [str(exe), "-m", str(model_gguf), "-f", str(data), "-o", str(written), "-c", str(n_ctx),
                   "-b", str(n_ctx)] + (["-t", str(threads)] if threads else [])
            res = _run_program(cmd, "llama-imatrix", timeout)
            if res.returncode == 0 and written.is_file():
                break
            # too short a text for two chunks: llama-imatrix says how many tokens it has, but its log
            # is written by a thread that an early exit may cut off, so without the count the chunk
            # is halved and tried again
            short = re.search(r"tokenizes to only (\d+) tokens", res.stderr + res.stdout)
            if short is not None:
                tokens = int(short.group(1))
                fit = 1 << max(0, (tokens // 2).bit_length() - 1)  # the largest power of two <= tokens / 2
                if fit < 32 or fit >= n_ctx:
                    raise UspxError(f"the {split!r} items of the workload are {tokens} tokens; an importance "
                                    "matrix needs at least 64 (two chunks of 32)")
            elif n_ctx > 32:
                fit = n_ctx // 2
            else:
                raise UspxError(f"llama-imatrix failed on {model_gguf} (nothing written):\n{_tail(res)}")
            n_ctx = fit
        with atomic_path(out) as tmp:
            shutil.copyfile(written, tmp)
    chunks = re.search(r"computing over (\d+) chunks", res.stderr + res.stdout)
    return dict(model=str(model_gguf), out=str(out), split=split, chunk_tokens=n_ctx,
                chunks=int(chunks.group(1)) if chunks else None, characters=len(text), program=str(exe),
                bytes=out.stat().st_size)


def export_quantized(model_dir: str | Path, out: str | Path, quant: str, *, llama_cpp: str | Path | None = None,
                     outtype: str = "auto", pre_tokenizer: str | None = None, workload=None,
                     imatrix: str | Path | None = None, threads: int | None = None, timeout: float | None = None) -> dict:
    """Convert ``model_dir`` with llama.cpp's converter (``outtype``, unquantized), then quantize it to
    ``quant`` with llama-quantize: guided by ``imatrix`` (a file), or by one made with llama-imatrix
    on ``workload``'s calibration items, or by none. The intermediate file lives in a temporary
    folder beside ``out`` (a model's full size on disk, gone afterwards); only ``out`` remains.
    """
    out = Path(out)
    if out.exists():
        raise UspxError(f"{out} exists; refusing to overwrite it")
    _one_guide(workload, imatrix)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".uspx-quant-", dir=out.parent) as work:
        plain = Path(work) / "unquantized.gguf"
        conversion = export_gguf(model_dir, plain, llama_cpp=llama_cpp, outtype=outtype, pre_tokenizer=pre_tokenizer,
                                 timeout=timeout)
        rec = quantize_guided(plain, out, quant, workload=workload, imatrix=imatrix, llama_cpp=llama_cpp,
                              threads=threads, timeout=timeout)
    return dict(rec, source=str(model_dir), conversion={**conversion, "out": None})


def quantize_guided(source: str | Path, out: str | Path, quant: str, *, workload=None,
                    imatrix: str | Path | None = None, llama_cpp: str | Path | None = None,
                    threads: int | None = None, timeout: float | None = None) -> dict:
    """:func:`quantize_gguf` guided by ``imatrix`` (a file), or by one made with llama-imatrix on
    ``workload``'s calibration items (in a temporary folder beside ``out``), or by none; the record's
    ``imatrix`` says which."""
    out = Path(out)
    _one_guide(workload, imatrix)
    with tempfile.TemporaryDirectory(prefix=".uspx-imatrix-", dir=out.parent if out.parent.exists() else None) as work:
        made = None
        if workload is not None:
            made = make_imatrix(source, workload, Path(work) / "imatrix.gguf", llama_cpp=llama_cpp, threads=threads,
                                timeout=timeout)
            imatrix = made["out"]
        rec = quantize_gguf(source, out, quant, imatrix=imatrix, llama_cpp=llama_cpp, threads=threads, timeout=timeout)
    return dict(rec, imatrix=made or ({"file": str(imatrix)} if imatrix else None))


def _one_guide(workload, imatrix) -> None:
    if imatrix is not None and workload is not None:
        raise UspxError("give an importance matrix file or a workload to make one from, not both")
