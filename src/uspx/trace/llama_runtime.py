"""Running a GGUF file in this process through llama.cpp's C API, and reading the tensors its graph
computes as they are computed (llama.cpp's evaluation callback, ``cb_eval`` in the context
parameters: the mechanism of llama.cpp's own ``llama-eval-callback`` and ``llama-imatrix``).

Two packages give that API: llama-cpp-python (``llama_cpp``, ctypes; compiles llama.cpp when
installed) and xllamacpp (prebuilt manylinux wheels whose extension module exports llama.cpp's C
functions, with no Python binding of them: uspx declares the structs of its pinned build and checks
them against the build's own defaults). Both bind the same C functions, so :class:`Runtime` drives
either with the same calls; llama-cpp-python's own definition of ``llama_context_params`` is used
with it, since that struct changes between llama.cpp versions. The tensors themselves are read through
``struct ggml_tensor``, whose leading fields
(type, buffer, ne, nb, op, op_params, flags, src, view_src, view_offs, data, name) have kept their
layout across ggml versions, and ggml's ``ggml_backend_tensor_get`` (tensors on a GPU).
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from uspx.io import UspxError

BINDINGS = ("llama_cpp", "xllamacpp")
GET_BINDING = ("running a GGUF in uspx needs llama.cpp in Python: pip install 'uspx[llama]' (llama-cpp-python, "
               "which compiles llama.cpp: about 25 minutes on 2 cores), or the prebuilt xllamacpp==2026.10.11549 "
               "(Linux x86-64)")

GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME = 4, 10, 64, 64
# ggml_type values of the tensors read here (ggml.h's enum ggml_type)
GGML_TYPES = {0: np.float32, 1: np.float16, 26: np.int32, 30: "bf16"}


class GgmlTensor(ctypes.Structure):
    """The leading fields of ggml.h's ``struct ggml_tensor``."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
    ]


def tensor_name(address: int) -> str:
    return GgmlTensor.from_address(address).name.decode("utf-8", "replace")


@dataclass
class _Ggml:
    """ggml's functions for reading a computed tensor (from the binding's own libggml-base)."""

    lib: ctypes.CDLL

    def read(self, address: int) -> np.ndarray:
        """The tensor's values as an array of shape ``ne`` reversed (ggml's innermost dimension
        last), copied out, whatever its strides (views such as the top-k ids are not contiguous)."""
        t = GgmlTensor.from_address(address)
        kind = GGML_TYPES.get(t.type)
        if kind is None:
            raise UspxError(f"llama.cpp tensor {t.name.decode()} has ggml type {t.type}, which uspx does not read")
        item = 2 if kind == "bf16" else np.dtype(kind).itemsize
        ne, nb = list(t.ne), list(t.nb)
        span = item + sum((n - 1) * s for n, s in zip(ne, nb))  # ggml_nbytes of a tensor of 1-element blocks
        raw = np.empty(span, np.uint8)
        if self.lib.ggml_backend_buffer_is_host(t.buffer):
            ctypes.memmove(raw.ctypes.data, t.data, span)
        else:  # a GPU buffer: ggml copies it to the host
            self.lib.ggml_backend_tensor_get(address, raw.ctypes.data, 0, span)
        flat = raw.view(np.uint16 if kind == "bf16" else kind)
        out = np.array(np.lib.stride_tricks.as_strided(flat, shape=ne[::-1], strides=nb[::-1]))
        if kind == "bf16":
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out.astype(np.float32) if out.dtype == np.float16 else out


def _ggml(where: Path) -> _Ggml:
    """ggml's reading functions from ``where``: a folder holding libggml-base, or a library file."""
    names = [where] if where.is_file() else sorted(where.glob("libggml-base.so*")) + \
        sorted(where.glob("libggml-base.dylib")) + sorted(where.glob("ggml-base.dll"))
    if not names:
        raise UspxError(f"{where}: the llama.cpp binding ships no libggml-base library to read tensors with")
    lib = ctypes.CDLL(str(names[0]))
    lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_get.restype = None
    return _Ggml(lib)


def binding_name(prefer: str | None = None) -> str:
    """The binding uspx will use: ``prefer``, else llama-cpp-python where installed, else xllamacpp."""
    import importlib.util

    order = [prefer] if prefer else list(BINDINGS)
    for name in order:
        if name not in BINDINGS:
            raise UspxError(f"unknown llama.cpp binding {name!r}; choose from {', '.join(BINDINGS)}")
        if importlib.util.find_spec(name) is not None:
            return name
    raise UspxError(GET_BINDING if prefer is None else f"the llama.cpp binding {prefer} is not installed; {GET_BINDING}")


# llama.h's structs as the llama.cpp build inside the pinned xllamacpp wheel declares them
# (xllamacpp ships llama.cpp's C API in its extension module but no Python binding of it). Checked
# against the build's own defaults before use, so another build fails with a clear error.
XLLAMACPP_VERSION = "2026.10.11549"


class _XModelParams(ctypes.Structure):
    _fields_ = [("devices", ctypes.c_void_p), ("tensor_buft_overrides", ctypes.c_void_p),
                ("n_gpu_layers", ctypes.c_int32), ("split_mode", ctypes.c_int), ("load_mode", ctypes.c_int),
                ("lazy_mode", ctypes.c_int), ("main_gpu", ctypes.c_int32), ("tensor_split", ctypes.c_void_p),
                ("progress_callback", ctypes.c_void_p), ("progress_callback_user_data", ctypes.c_void_p),
                ("kv_overrides", ctypes.c_void_p), ("vocab_only", ctypes.c_bool), ("check_tensors", ctypes.c_bool),
                ("use_extra_bufts", ctypes.c_bool), ("no_host", ctypes.c_bool), ("no_alloc", ctypes.c_bool),
                ("load_mtp", ctypes.c_bool)]


_EVAL_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p)
_LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


class _XContextParams(ctypes.Structure):
    _fields_ = [("n_ctx", ctypes.c_uint32), ("n_batch", ctypes.c_uint32), ("n_ubatch", ctypes.c_uint32),
                ("n_seq_max", ctypes.c_uint32), ("n_rs_seq", ctypes.c_uint32), ("n_outputs_max", ctypes.c_uint32),
                ("n_outputs_max_per_seq", ctypes.c_uint32), ("n_threads", ctypes.c_int32),
                ("n_threads_batch", ctypes.c_int32), ("ctx_type", ctypes.c_int), ("rope_scaling_type", ctypes.c_int),
                ("pooling_type", ctypes.c_int), ("attention_type", ctypes.c_int), ("flash_attn_type", ctypes.c_int),
                ("rope_freq_base", ctypes.c_float), ("rope_freq_scale", ctypes.c_float),
                ("yarn_ext_factor", ctypes.c_float), ("yarn_attn_factor", ctypes.c_float),
                ("yarn_beta_fast", ctypes.c_float), ("yarn_beta_slow", ctypes.c_float),
                ("yarn_orig_ctx", ctypes.c_uint32), ("defrag_thold", ctypes.c_float), ("cb_eval", _EVAL_CALLBACK),
                ("cb_eval_user_data", ctypes.c_void_p), ("type_k", ctypes.c_int), ("type_v", ctypes.c_int),
                ("moe_cache_size", ctypes.c_size_t), ("abort_callback", ctypes.c_void_p),
                ("abort_callback_data", ctypes.c_void_p), ("embeddings", ctypes.c_bool), ("offload_kqv", ctypes.c_bool),
                ("no_perf", ctypes.c_bool), ("op_offload", ctypes.c_bool), ("swa_full", ctypes.c_bool),
                ("kv_unified", ctypes.c_bool), ("samplers", ctypes.c_void_p), ("n_samplers", ctypes.c_size_t),
                ("ctx_other", ctypes.c_void_p)]


class _XBatch(ctypes.Structure):
    _fields_ = [("n_tokens", ctypes.c_int32), ("token", ctypes.POINTER(ctypes.c_int32)),
                ("embd", ctypes.POINTER(ctypes.c_float)), ("pos", ctypes.POINTER(ctypes.c_int32)),
                ("n_seq_id", ctypes.POINTER(ctypes.c_int32)), ("seq_id", ctypes.POINTER(ctypes.POINTER(ctypes.c_int32))),
                ("logits", ctypes.POINTER(ctypes.c_int8))]


class _XApi:
    """llama.cpp's C functions from xllamacpp's extension module, named as llama-cpp-python names
    them, so :class:`Runtime` drives it as it drives llama-cpp-python."""

    llama_token = ctypes.c_int32
    ggml_backend_sched_eval_callback = _EVAL_CALLBACK

    def __init__(self, path: Path):
        lib = ctypes.CDLL(str(path))
        p, i32 = ctypes.c_void_p, ctypes.c_int32
        sigs = {
            "llama_backend_init": ([], None), "llama_model_default_params": ([], _XModelParams),
            "llama_context_default_params": ([], _XContextParams),
            "llama_model_load_from_file": ([ctypes.c_char_p, _XModelParams], p),
            "llama_init_from_model": ([p, _XContextParams], p), "llama_model_get_vocab": ([p], p),
            "llama_tokenize": ([p, ctypes.c_char_p, i32, ctypes.POINTER(i32), i32, ctypes.c_bool, ctypes.c_bool], i32),
            "llama_batch_init": ([i32, i32, i32], _XBatch), "llama_batch_free": ([_XBatch], None),
            "llama_decode": ([p, _XBatch], i32), "llama_get_memory": ([p], p),
            "llama_memory_clear": ([p, ctypes.c_bool], None), "llama_free": ([p], None),
            "llama_model_free": ([p], None), "llama_log_set": ([_LOG_CALLBACK, p], None),
            "llama_get_logits": ([p], ctypes.POINTER(ctypes.c_float)),
            "llama_get_logits_ith": ([p, i32], ctypes.POINTER(ctypes.c_float)),
            "llama_vocab_n_tokens": ([p], i32), "llama_vocab_eos": ([p], i32),
        }
        for name, (args, res) in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
            setattr(self, name, fn)
        self._check()

    def _check(self) -> None:
        """The build's defaults (src/llama-context.cpp, src/llama-model.cpp) read through these
        structs: a different layout reads other values."""
        c, m = self.llama_context_default_params(), self.llama_model_default_params()
        got = (c.n_ctx, c.n_batch, c.n_ubatch, c.n_seq_max, c.n_outputs_max_per_seq, c.yarn_ext_factor,
               c.defrag_thold, bool(c.cb_eval), c.type_k, c.type_v, c.abort_callback, c.offload_kqv, c.no_perf,
               c.n_samplers, m.n_gpu_layers, m.use_extra_bufts, m.vocab_only)
        want = (512, 2048, 512, 1, 1, -1.0, -1.0, False, 1, 1, None, True, True, 0, -1, True, False)
        if got != want:
            raise UspxError(f"the llama.cpp build in this xllamacpp lays out llama.h's parameters otherwise than "
                            f"uspx declares (defaults read {got}, expected {want}); install xllamacpp=={XLLAMACPP_VERSION}")


_QUIET: dict = {}  # per binding: the process-wide log callback set on it (and xllamacpp's checked API)
GGML_LOG_LEVEL_ERROR, GGML_LOG_LEVEL_CONT = 4, 5


def _errors_only() -> "_LOG_CALLBACK":
    """A llama.cpp log callback that prints errors (and their continued lines) to stderr and drops
    the rest: llama.cpp's notes on every load (cache layouts, tensor counts) are noise in uspx's
    output, while an error says why a file did not load."""
    last = [0]

    def log(level: int, text: bytes, data) -> None:
        if level != GGML_LOG_LEVEL_CONT:
            last[0] = level
        if last[0] == GGML_LOG_LEVEL_ERROR:
            sys.stderr.write(text.decode("utf-8", "replace"))

    return _LOG_CALLBACK(log)


def _xllamacpp() -> tuple[_XApi, Path]:
    """xllamacpp's extension module as llama.cpp's C API (checked), quieted once per process."""
    import importlib.util

    spec = importlib.util.find_spec("xllamacpp.xllamacpp")
    if spec is None or not spec.origin:
        raise UspxError(f"xllamacpp is not installed; {GET_BINDING}")
    if "xllamacpp" not in _QUIET:
        api = _XApi(Path(spec.origin))
        quiet = _errors_only()  # llama.cpp keeps it for the process
        api.llama_log_set(quiet, None)
        _QUIET["xllamacpp"] = (api, Path(spec.origin), quiet)
    api, path, _ = _QUIET["xllamacpp"]
    return api, path

EvalCallback = Callable[[int, bool], bool]
"""(address of the ggml_tensor, ask) -> bool, as llama.cpp's ``ggml_backend_sched_eval_callback``."""


class Runtime:
    """One GGUF model and context, decoding token ids with every position's output computed (so
    that the last layer runs on every token: llama.cpp skips it for positions without output)."""

    def __init__(self, path: str | Path, *, n_ctx: int, n_threads: int | None = None, n_gpu_layers: int = 0,
                 callback: EvalCallback | None = None, binding: str | None = None, vocab_only: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise UspxError(f"{self.path}: no such GGUF file")
        self.binding = binding_name(binding)
        self.n_ctx = int(n_ctx)
        self.vocab_only = vocab_only  # the vocabulary alone (to tokenize): no weights, no context
        self._keep: list = []  # callbacks and buffers that C holds pointers to
        if self.binding == "llama_cpp":
            import llama_cpp

            if "llama_cpp" not in _QUIET:  # the binding's own logger prints level-0 notes at any verbosity
                _QUIET["llama_cpp"] = _errors_only()
                llama_cpp.llama_log_set(_QUIET["llama_cpp"], None)
            L, lib = llama_cpp, Path(llama_cpp.__file__).parent / "lib"
        else:  # xllamacpp's C functions, declared the way llama-cpp-python declares them
            L, lib = _xllamacpp()
        self._L, self.ggml = L, _ggml(lib)
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        mp.vocab_only = self.vocab_only
        self.model = L.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self.model:
            raise UspxError(f"{self.path}: llama.cpp could not load this GGUF file")
        self.vocab = L.llama_model_get_vocab(self.model)
        if self.vocab_only:
            return
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = self.n_ctx
        cp.n_threads = cp.n_threads_batch = n_threads or os.cpu_count() or 1
        if callback is not None:
            cb = L.ggml_backend_sched_eval_callback(lambda t, ask, data: bool(callback(int(t), bool(ask))))
            self._keep.append(cb)
            cp.cb_eval = cb
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise UspxError(f"{self.path}: llama.cpp could not create a context of {self.n_ctx} tokens")

    # ----- the calls -------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """llama.cpp's token ids of ``text`` by the GGUF's own vocabulary (special tokens as text)."""
        data = text.encode("utf-8")
        room = len(data) + 16
        buf = (self._L.llama_token * room)()
        n = self._L.llama_tokenize(self.vocab, data, len(data), buf, room, add_special, False)
        return list(buf[:n])

    @property
    def n_vocab(self) -> int:
        return int(self._L.llama_vocab_n_tokens(self.vocab))

    @property
    def eos(self) -> int:
        return int(self._L.llama_vocab_eos(self.vocab))

    def decode(self, tokens: Sequence[int], start: int = 0, outputs: str = "all") -> None:
        """Run ``tokens`` at positions ``start``.. of one sequence (``start`` 0 clears the memory
        first; more continues what it holds); ``outputs``: every position's (``"all"``) or the last
        one's (``"last"``), as a prefill that needs only the next token computes."""
        n = len(tokens)
        if self.vocab_only:
            raise UspxError(f"{self.path} was opened for its vocabulary only")
        if n == 0 or start + n > self.n_ctx:
            raise UspxError(f"{n} tokens from position {start} for a llama.cpp context of {self.n_ctx}")
        api = self._L
        if start == 0:
            api.llama_memory_clear(api.llama_get_memory(self.ctx), True)
        batch = api.llama_batch_init(n, 0, 1)
        try:
            for i, tok in enumerate(tokens):
                batch.token[i] = int(tok)
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if outputs == "all" or i == n - 1 else 0
            batch.n_tokens = n
            rc = api.llama_decode(self.ctx, batch)
        finally:
            api.llama_batch_free(batch)
        if rc != 0:
            raise UspxError(f"{self.path}: llama.cpp failed to decode {n} tokens (llama_decode returned {rc})")

    def logits(self, n: int) -> np.ndarray:
        """[n, vocabulary] float32 logits of the last :meth:`decode` of ``n`` tokens with every
        position an output (a copy: llama.cpp reuses its buffer)."""
        flat = np.ctypeslib.as_array(self._L.llama_get_logits(self.ctx), shape=(n * self.n_vocab,))
        return flat.reshape(n, -1).copy()

    def last_logits(self) -> np.ndarray:
        """The logits of the last position decoded."""
        return np.ctypeslib.as_array(self._L.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,)).copy()

    def close(self) -> None:
        api = self._L
        if getattr(self, "ctx", None):
            api.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            api.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LlamaTokenizer:
    """A GGUF file's own vocabulary with the calls :func:`uspx.workload.encode` and evaluation make
    (``encode(text, add_special_tokens=False)``, the end token, the vocabulary's size). No chat
    template: chat items are read as plain ``role: content`` text."""

    chat_template = None
    pad_token_id = None

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.eos_token_id = runtime.eos
        self.vocab_size = runtime.n_vocab

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.runtime.tokenize(text, add_special_tokens) if text else []

    def __len__(self) -> int:
        return self.vocab_size
