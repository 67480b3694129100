"""Shared fixtures: a character-level tokenizer and tiny random models saved as folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from uspx.testing import CHARS, char_tokenizer as make_tokenizer  # noqa: F401  (tests import both from here)


def save_tiny(family: str, path: Path, seed: int = 0) -> Path:
    from uspx.testing import tiny_model

    model = tiny_model(family, seed=seed)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads; on a shared 2-core machine they only contend."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_gpt_oss_dir(tmp_path_factory) -> Path:
    return save_tiny("gpt_oss", tmp_path_factory.mktemp("tiny_gpt_oss"))


def gpu_growth(run) -> int:
    """GPU bytes ``run()`` leaves allocated on its second call beyond what its first call left.

    An absolute check cannot work: cuBLAS keeps a workspace per stream (32 MiB on Hopper) from its
    first matrix product to the end of the process, counted as allocated. A layer left on the GPU
    is read from the files anew on every call, so it grows this on each one.
    """
    import gc

    import torch

    def settled() -> int:
        gc.collect()  # a source caught in a reference cycle still holds its buffers until collected
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    run()
    before = settled()
    run()
    return settled() - before


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def small_workload(tmp_path) -> Path:
    rows = [
        {"prompt": f"def f{i}(x):", "completion": f" return x + {i}", "family": "code"} for i in range(7)
    ] + [{"text": f"the quick brown fox {i} jumps over the lazy dog " * (1 + i % 3), "family": "prose"} for i in range(6)]
    return write_jsonl(tmp_path / "w.jsonl", rows)


def require_sandbox() -> None:
    """Skip the calling test module where bubblewrap cannot start a sandbox; on CI, which installs
    it, fail instead: there the sandbox tests must run."""
    import os

    from uspx.virtual.sandbox import is_available

    if is_available():
        return
    if os.environ.get("CI"):
        raise RuntimeError("the python sandbox cannot start on this CI machine (`uspx tool python --check` says why)")
    pytest.skip("bubblewrap cannot start a sandbox here", allow_module_level=True)


def needs_llama_cpp(reason: str):
    """Skip where llama.cpp is not set up; on CI fail instead: its `make test` sets llama.cpp up
    (tests/llama_cpp.sh) and installs xllamacpp, so these tests must run there."""
    import os

    if os.environ.get("CI"):
        pytest.fail(f"on CI this must run: {reason}")
    pytest.skip(reason)


def llama_cpp_source() -> str:
    """llama.cpp's source, for its converter, where uspx looks for it ($USPX_LLAMA_CPP)."""
    from uspx.io import UspxError
    from uspx.llamacpp import source

    try:
        path = source()
    except UspxError as exc:
        needs_llama_cpp(f"{exc} (`make test` sets it up with tests/llama_cpp.sh)")
    if not path.exists():
        needs_llama_cpp(f"llama.cpp's source is not at {path} (`make test` sets it up with tests/llama_cpp.sh)")
    return str(path)


def llama_cpp_program(name: str) -> Path:
    """llama.cpp's program ``name`` from $USPX_LLAMA_CPP or PATH (tests/llama_cpp.sh builds
    llama-quantize, llama-imatrix and the tests' reference run llama-logits)."""
    from uspx.io import UspxError
    from uspx.llamacpp import program

    try:
        return program(name)
    except UspxError as exc:
        needs_llama_cpp(str(exc))
