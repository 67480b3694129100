"""``uspx eval`` on GGUF files: a candidate run by llama.cpp, judged as any uspx candidate.

Either side may be a GGUF file (run in this process by llama.cpp through either binding that
:mod:`uspx.trace.llama_runtime` drives: llama-cpp-python or the prebuilt xllamacpp) or a Hugging Face
folder (run by transformers). The metrics (loss on completion tokens and its delta,
perplexity ratio, top-1 agreement, KL(teacher || candidate)), their per-family summary and the
verdict are :mod:`uspx.evaluate`'s own: the logits of both sides at every target position go through
the same observer that ``uspx eval`` uses, and the verdict is :func:`uspx.evaluate.run.acceptance`.

Both models must read the same token ids. With a Hugging Face side its tokenizer encodes the
workload, and llama.cpp's tokenization of every item's text is checked against it first (a GGUF
whose pre-tokenizer differs would otherwise be judged on other tokens and look worse than it is).
With two GGUF files the teacher file's tokenizer encodes, and the candidate's must give the same ids.

A Hugging Face side computes in float32 by default (``dtype``): llama.cpp computes activations in
float32 whatever its weights' type, so a float32 reference charges the candidate with its weights'
precision and pruning alone, not with the reference's own rounding.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from uspx.engine.batches import make_batches, pad_id_of
from uspx.engine.forward import forward
from uspx.evaluate import speed as speed_mod
from uspx.evaluate.metrics import _Compare
from uspx.evaluate.run import _per_family, _result, _speedups, _write, acceptance
from uspx.io import UspxError
from uspx.prune.gguf_export import gguf_tensors
from uspx.prune.gguf_file import kv_cache_bytes
from uspx.workload import DEFAULT_MAX_LENGTH, EncodedItem, Workload, default_max_length, encode, load_workload


def is_gguf(model: str | Path) -> bool:
    """Whether ``model`` names a GGUF file (by its magic bytes, or its name when it does not exist)."""
    path = Path(model)
    if path.is_file():
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"
    return path.suffix.lower() == ".gguf"


# ----- the two sides ---------------------------------------------------------------------------------
@dataclass
class _Side:
    """One model as evaluation runs it: a GGUF through llama.cpp, or a Hugging Face model whole."""

    path: str
    runtime: str  # "llama.cpp (BINDING)" or "transformers"
    fingerprint: str
    label: str
    vocab: int
    model: torch.nn.Module | None = None  # transformers
    tokenizer: object | None = None  # transformers
    rt: object | None = None  # uspx.trace.llama_runtime.Runtime: llama.cpp in this process
    gguf: str | None = None
    threads: int | None = None
    binding: str | None = None
    info: dict = field(default_factory=dict)

    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """[len(ids), V] float32 next-token logits at every position of ``ids``."""
        if self.rt is not None:
            self.rt.decode(ids)
            return torch.from_numpy(self.rt.logits(len(ids)))
        return forward(self.model, torch.tensor([list(ids)])).logits[0].float().cpu()


def _runtime(path: Path, n_ctx: int, threads: int | None, binding: str | None):
    from uspx.trace.llama_runtime import Runtime

    try:
        return Runtime(path, n_ctx=n_ctx, n_threads=threads, binding=binding)
    except UspxError as exc:
        raise UspxError(f"{path}: llama.cpp cannot load this GGUF file ({exc})") from None


def _open_side(model: str | Path, n_ctx: int, threads: int | None, dtype: str, trust_remote_code: bool,
               binding: str | None = None) -> _Side:
    if is_gguf(model):
        path = Path(model)
        if not path.is_file():
            raise UspxError(f"{path}: no such GGUF file")
        rt = _runtime(path, n_ctx, threads, binding)
        info = gguf_tensors(path)
        return _Side(str(path), f"llama.cpp ({rt.binding})", info["fingerprint"], str(path), rt.n_vocab, rt=rt,
                     gguf=str(path), threads=threads, binding=rt.binding, info=info)
    from uspx.evaluate.run import _open

    opened = _open(model, None, dtype, trust_remote_code)
    if opened.tokenizer is None:
        raise UspxError(f"{opened.path}: no tokenizer files; uspx needs one to read a text workload")
    return _Side(opened.path, "transformers", opened.fingerprint, opened.label, int(opened.source.config.vocab_size),
                 model=opened.source.model.eval(), tokenizer=opened.tokenizer,
                 info={"config": opened.source.config, "opened": opened})


def _check_tokens(part: Workload, tokenizer, side: _Side, items: list[EncodedItem]) -> dict:
    """llama.cpp's ids for every item's prompt and completion text equal ``tokenizer``'s; the first
    difference is an error naming the item and position."""
    checked = 0
    for item, enc in zip(part.items, items):
        for what, text in (("prompt", item.prompt if item.messages is None or not getattr(tokenizer, "chat_template", None)
                            else None), ("completion", item.completion)):
            if not text:
                continue
            want = tokenizer.encode(text, add_special_tokens=False)
            got = side.rt.tokenize(text, False)
            if got != want:
                at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                raise UspxError(
                    f"{side.path}: llama.cpp tokenizes item {item.id!r} ({what}) differently from the tokenizer "
                    f"at token {at} ({got[at:at + 4]} vs {want[at:at + 4]}); the GGUF's pre-tokenizer does not "
                    "match (convert it again with the right --pre-tokenizer)")
            checked += 1
    return {"texts": checked, "identical": checked}


# ----- speed -------------------------------------------------------------------------------------------
class _LlamaTimer:
    """Prefill and decode timing of a GGUF through llama.cpp, as :mod:`uspx.evaluate.speed` times a
    transformers model: prefill of whole prompts with the last position's logits only, then greedy
    decode steps one token at a time on the KV cache."""

    def __init__(self, side: "_Side", n_ctx: int):
        self.rt = _runtime(Path(side.gguf), n_ctx, side.threads, side.binding)

    def prefill_seconds(self, prompts: Sequence[Sequence[int]]) -> float:
        start = time.perf_counter()
        for ids in prompts:
            self.rt.decode(ids, outputs="last")
        return time.perf_counter() - start

    def decode_seconds(self, prompt: Sequence[int], new_tokens: int) -> float:
        self.rt.decode(prompt, outputs="last")
        start = time.perf_counter()
        for i in range(new_tokens):
            self.rt.decode([int(np.argmax(self.rt.last_logits()))], start=len(prompt) + i, outputs="last")
        return time.perf_counter() - start


def _speed(sides: dict[str, _Side], token_lists: Sequence[Sequence[int]], new_tokens: int, repeats: int = 3) -> dict:
    """Tokens per second of both models, with :func:`uspx.evaluate.speed.measure`'s prompts and
    rule (best of ``repeats``, the models alternating)."""
    prompts = speed_mod.prompts_of(token_lists)
    if not prompts:
        return {"skipped": "no prompt with at least 2 tokens"}
    n_ctx = max(len(p) for p in prompts) + new_tokens + 8
    timers = {name: (_LlamaTimer(s, n_ctx) if s.gguf else speed_mod.TorchTimer(speed_mod.Runner(s.model)))
              for name, s in sides.items()}
    try:
        out = speed_mod.rates(timers, prompts, new_tokens, repeats,
                              threads={n: (s.threads or os.cpu_count()) if s.gguf else torch.get_num_threads()
                                       for n, s in sides.items()},
                              runtimes={n: s.runtime for n, s in sides.items()})
    finally:
        for t in timers.values():
            if isinstance(t, _LlamaTimer):
                t.rt.close()
    _speedups(out, restricted=False)
    if sides["teacher"].gguf is None or sides["candidate"].gguf is None:
        out["note"] = ("the two models run in different runtimes (transformers and llama.cpp): the speed-up "
                       "includes the runtime's own difference; evaluate against the original's GGUF to see "
                       "what the candidate alone changes")
    return out


# ----- sizes and memory ----------------------------------------------------------------------------------
def _size(side: _Side) -> dict:
    if side.gguf:
        return {k: side.info[k] for k in ("parameter_bytes", "file_bytes", "tensor_types")} | {"dtype": "gguf"}
    from uspx.evaluate.run import _disk

    return _disk(side.info["opened"])


def _memory(c: _Side, t: _Side, size: dict, budget: int | str | None, context: int, kv_dtype: str) -> dict | None:
    if budget is None:
        return None
    from uspx.plan import memory as mem

    budget_bytes = mem.parse_size(budget)
    weights = int(size["parameter_bytes"])
    if c.gguf is None or t.gguf is None:
        config = (t if t.gguf is None else c).info["config"]
        kv, how = mem.kv_cache_bytes(mem.count_params(config), context, kv_dtype), "from the config"
    else:
        kv, how = kv_cache_bytes(c.gguf, context, kv_dtype)
    return {"budget_bytes": budget_bytes, "weights_bytes": weights, "kv_bytes": kv, "kv_from": how,
            "context": context, "kv_dtype": kv_dtype, "total_bytes": weights + kv, "fits": weights + kv <= budget_bytes}


# ----- the evaluation ------------------------------------------------------------------------------------
def evaluate_gguf(
    teacher: str | Path,
    candidate: str | Path,
    workload: str | Path | Workload,
    *,
    split: str = "heldout",
    max_length: int | None = None,
    epsilon: float | Mapping[str, float] = 0.05,
    memory_budget: int | str | None = None,
    context: int = 2048,
    kv_dtype: str = "bf16",
    speed: bool = True,
    decode_tokens: int = 32,
    threads: int | None = None,
    dtype: str = "fp32",
    out: str | Path | None = None,
    progress: bool = False,
    trust_remote_code: bool = False,
    binding: str | None = None,
) -> dict:
    """Compare ``candidate`` with ``teacher`` on ``workload``'s ``split`` when either (or both) is a
    GGUF file; returns (and writes to ``out``, a folder or a .json path) the evaluation in
    ``uspx eval``'s format, verdict included.

    ``teacher`` and ``candidate`` are GGUF files or Hugging Face folders (``"default"``: the bundled
    teacher). ``threads``: llama.cpp's threads (default: llama.cpp's choice). ``dtype``: the precision
    a Hugging Face side computes in (float32 by default, as llama.cpp's activations). ``epsilon``,
    ``memory_budget``, ``context`` and ``kv_dtype`` are :func:`uspx.evaluate.evaluate`'s. ``binding``:
    ``"llama_cpp"`` (llama-cpp-python) or ``"xllamacpp"``; default the first installed.
    """
    wl = load_workload(workload)
    if not (part := wl.part(split)).items:
        raise UspxError(f"{wl.source}: the {split!r} split is empty; nothing to evaluate on")
    n_ctx = (max_length or DEFAULT_MAX_LENGTH) + 8  # encode cuts items to max_length, at most the default
    with contextlib.ExitStack() as opened:  # llama.cpp's models and contexts are C memory: freed here, not by the GC
        t = _open_side(teacher, n_ctx, threads, dtype, trust_remote_code, binding)
        opened.callback(_close, t)
        c = _open_side(candidate, n_ctx, threads, dtype, trust_remote_code, binding)
        opened.callback(_close, c)
        return _evaluate(t, c, wl, part, split, max_length, epsilon, memory_budget, context, kv_dtype, speed,
                         decode_tokens, threads, dtype, out, progress)


def _close(side: _Side) -> None:
    if side.rt is not None:
        side.rt.close()
        side.rt = None


def _evaluate(t: _Side, c: _Side, wl: Workload, part: Workload, split: str, max_length: int | None, epsilon,
              memory_budget, context: int, kv_dtype: str, speed: bool, decode_tokens: int, threads: int | None,
              dtype: str, out, progress: bool) -> dict:
    if t.vocab != c.vocab:
        raise UspxError(f"teacher ({t.path}) and candidate ({c.path}) have different vocabularies "
                        f"({t.vocab} vs {c.vocab})")
    hf = next((s for s in (t, c) if s.tokenizer is not None), None)
    if hf is not None:
        tokenizer = hf.tokenizer
        max_length = max_length or default_max_length(hf.info["config"])
        tokenizer_from = hf.path
    else:
        from uspx.trace.llama_runtime import LlamaTokenizer

        tokenizer = LlamaTokenizer(t.rt)
        max_length = max_length or DEFAULT_MAX_LENGTH
        tokenizer_from = f"{t.gguf} (llama.cpp)"
    items = encode(part, tokenizer, max_length)
    checks = {s.path: _check_tokens(part, tokenizer, s, items) for s in (t, c) if s.rt is not None}
    eps = _per_family(epsilon, part.families, "epsilon")

    observer = _Compare(len(items))
    batches = make_batches(items, 1, pad_id_of(tokenizer), by_length=False)
    for n, batch in enumerate(batches):
        ids = items[batch.rows[0]].input_ids
        mask = batch.loss_mask[0]
        if mask.any():
            observer.pair_logits(batch, t.logits(ids)[mask], c.logits(ids)[mask])
        if progress and (n + 1) % 20 == 0:
            print(f"evaluating: {n + 1}/{len(batches)} items", flush=True)

    def record(s: _Side) -> dict:
        return {"source": s.path, "fingerprint": s.fingerprint, "label": s.label, "runtime": s.runtime}

    result = _result(record(t), {**record(c), "kind": "gguf" if c.gguf else "model", "kept": None, "plan": None,
                                 "export": None}, wl, part, split, items, observer.stats,
                     {"max_length": max_length, "batch_size": 1, "dtype": dtype if hf is not None else None,
                      "streaming": False, "epsilon": eps, "context": context, "kv_dtype": kv_dtype, "threads": threads,
                      "tokenizer": tokenizer_from, "tokenizer_check": checks})
    sizes = {"teacher": _size(t), "candidate": _size(c)}
    result["size"] = {**sizes, "ratio": sizes["candidate"]["parameter_bytes"] / sizes["teacher"]["parameter_bytes"]}
    result["memory"] = _memory(c, t, sizes["candidate"], memory_budget, context, kv_dtype)
    if speed:
        result["speed"] = _speed({"teacher": t, "candidate": c}, [e.input_ids for e in items], decode_tokens)
    result["acceptance"] = acceptance(result["families"], eps, result["memory"])
    if out is not None:
        _write(Path(out), result, [])
    return result


__all__ = ["evaluate_gguf", "gguf_tensors", "is_gguf"]
