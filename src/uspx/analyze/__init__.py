"""Routing introspection: each analysis reports the number of tokens behind each figure, a
confidence interval, and a causal check where counting alone would be ambiguous.

``analyze(trace_dir, out_dir, model=None, workload=None, only=None)`` streams the trace once for
the trace-only sections and runs the model for the others; it writes ``report.html`` (one
self-contained file) and ``report.json`` (every figure's numbers) and returns the JSON object.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterable, Iterator

import torch

from uspx.analyze.attention import Contexts, attention_probe, split_masks
from uspx.analyze.blocks import Vocab, iter_blocks, n_samples
from uspx.analyze.circuits import Circuits
from uspx.analyze.prefetch import AccessLog, cache_table, early_prediction
from uspx.analyze.stats import torch_threads
from uspx.analyze.utilisation import Utilisation
from uspx.io import UspxError
from uspx.progress import console, progress_bar
from uspx.trace import Trace

SECTIONS: list[str] = ["utilisation", "circuits", "dynamics", "cooperation", "similarity", "attention", "prefetch"]
NEEDS_MODEL = {"dynamics", "cooperation", "similarity"}  # attention and prefetch have trace-only parts
ALIASES = {"cold": "utilisation", "usage": "utilisation", "coactivation": "circuits", "paths": "circuits",
           "generation": "dynamics", "k": "cooperation", "kablation": "cooperation", "merge": "similarity",
           "probe": "attention", "cache": "prefetch"}

__all__ = ["SECTIONS", "ALIASES", "NEEDS_MODEL", "analyze", "resolve_sections"]


def resolve_sections(only: str | Iterable[str] | None) -> list[str]:
    if only is None:
        return list(SECTIONS)
    names = [s.strip().lower() for s in (only.split(",") if isinstance(only, str) else only) if s.strip()]
    out = []
    for n in names:
        n = ALIASES.get(n, n)
        if n not in SECTIONS:
            raise UspxError(f"unknown section {n!r}; sections: {', '.join(SECTIONS)} (aliases: {', '.join(sorted(ALIASES))})")
        if n not in out:
            out.append(n)
    return [s for s in SECTIONS if s in out]


def analyze(
    trace_dir: str | Path,
    out_dir: str | Path,
    model=None,
    workload=None,
    only: str | Iterable[str] | None = None,
    progress: bool = True,
    *,
    cold_threshold: float = 0.01,
    max_items: int = 64,
    gen_prompts: int = 8,
    new_tokens: int = 32,
    cache_tokens: int = 20000,
    capacities: list[int] | None = None,
    threads: int | None = None,
) -> dict:
    """Analyse a trace (and a model, for the sections that need one); write report.html/.json.

    ``model``: None, a model folder / "default", or a LoadedModel. ``workload``: defaults to the
    trace's own workload. ``max_items``: items per split used by model sections (runtime bound).
    ``threads``: torch intra-op threads for the whole call (restored afterwards); None leaves torch's.
    """
    with torch_threads(threads):
        started = time.perf_counter()
        sections = resolve_sections(only)
        trace = Trace(trace_dir)
        say = console.print if progress else (lambda *a, **k: None)
        report: dict = dict(
            trace=str(trace.path), model=trace.manifest["model"], workload=trace.manifest["workload"],
            sections=sections, skipped={}, timings={},
            settings=dict(cold_threshold=cold_threshold, max_items=max_items, gen_prompts=gen_prompts,
                          new_tokens=new_tokens, cache_tokens=cache_tokens, threads=torch.get_num_threads()),
        )
        report.update(_trace_pass(trace, sections, cold_threshold, cache_tokens, capacities, progress, say,
                                  report))

        model_sections = [s for s in sections if s in NEEDS_MODEL or s in ("attention", "prefetch")]
        if model is None:
            for s in sections:
                if s in NEEDS_MODEL:
                    report["skipped"][s] = "needs a model (pass model=...)"
                elif s in ("attention", "prefetch"):
                    report["skipped"][s + "_model"] = ("the probe/predictor part needs a model; "
                                                       "the trace-only part ran")
        elif model_sections:
            _model_sections(trace, model, workload, sections, report, max_items, gen_prompts, new_tokens,
                            capacities, say)
        report["timings"]["total_s"] = round(time.perf_counter() - started, 3)
        from uspx.analyze.report import write_report

        write_report(report, Path(out_dir))
        say(f"report written to {Path(out_dir) / 'report.html'} and report.json")
        return report


def _trace_pass(trace: Trace, sections, threshold, cache_tokens, capacities, progress, say, report) -> dict:
    layers, E, k = trace.moe_layers, trace.num_experts, trace.top_k
    L = len(layers)
    acc: dict = {}
    if "utilisation" in sections:
        acc["utilisation"] = Utilisation(L, E, k, n_samples(trace))
    if "circuits" in sections:
        acc["circuits"] = Circuits(L, E, k)
    if "attention" in sections:
        acc["contexts"] = Contexts(L, E)
    if "prefetch" in sections:
        acc["cache"] = AccessLog(cache_tokens)
    if not acc:
        return {}
    vocab = Vocab()
    total = sum(s.get("rows", 0) for s in trace.manifest["shards"]) or None
    rows = 0
    with _timed(report["timings"], "trace_pass_s"), \
            progress_bar("analyze: streaming trace", total=total, unit="rows", enabled=progress) as bar:
        for blk in iter_blocks(trace, vocab):
            for a in acc.values():
                a.update(blk)
            bar.advance(blk.ids.shape[0] * L)
            rows += blk.ids.shape[0] * L
    report["timings"]["trace_rows"] = rows
    out: dict = {}
    if "utilisation" in acc:
        out["utilisation"] = acc["utilisation"].result(layers, vocab.families, threshold)
    if "circuits" in acc:
        out["circuits"] = acc["circuits"].result(layers)
    if "contexts" in acc:
        out["attention"] = dict(contexts=acc["contexts"].result(layers))
    if "cache" in acc:
        with _timed(report["timings"], "cache_sim_s"):
            sets = acc["cache"].sets()
            caps = _capacities(capacities, k, E)
            say(f"analyze: cache simulation over {len(sets)} tokens, capacities {caps}")
            rows = cache_table(sets, layers, caps)
            out["prefetch"] = dict(cache=dict(tokens=int(len(sets)), capacities=caps, rows=rows))
    return out


def _model_sections(trace, model, workload, sections, report, max_items, gen_prompts, new_tokens, capacities, say) -> None:
    from uspx.analyze.collect import capture, workload_items
    from uspx.analyze.cooperation import k_ablation
    from uspx.analyze.dynamics import dynamics
    from uspx.analyze.similarity import similarity
    from uspx.models import LoadedModel, adapter_for, load_model
    from uspx.engine.batches import pad_id_of

    lm = model if isinstance(model, LoadedModel) else load_model(model)
    trace.check(model=lm.fingerprint)  # numbers from another model's trace would mean nothing
    if lm.tokenizer is None:
        raise UspxError(f"{lm.source}: no tokenizer; the model sections need one to read the workload")
    adapter = adapter_for(lm.model)
    wl = workload if workload is not None else trace.manifest["workload"]["source"]
    pad = pad_id_of(lm.tokenizer)
    report["model_used"] = dict(source=lm.source, label=lm.label, family=adapter.family, workload=str(wl))
    held = workload_items(lm, wl, "heldout", max_items)
    cal = workload_items(lm, wl, "calibration", max_items)
    if not held:  # a workload without a held-out part: score on the calibration items, and say so
        held, report["heldout_note"] = cal, "no held-out items: model sections scored on calibration items"
    timings = report["timings"]
    torch.manual_seed(0)
    cap = None
    if {"similarity", "attention", "prefetch"} & set(sections):
        with _timed(timings, "capture_s"):
            say(f"analyze: capturing hidden states on {len(cal) + len(held)} items")
            cap = capture(lm, adapter, cal + [h for h in held if h not in cal])
    if "dynamics" in sections:
        with _timed(timings, "dynamics_s"):
            prompts = [_prompt_only(e) for e in held[:gen_prompts]]
            say(f"analyze: generation dynamics, {len(prompts)} prompts x {new_tokens} tokens")
            report["dynamics"] = dynamics(lm, adapter, prompts, new_tokens)
    if "cooperation" in sections:
        with _timed(timings, "cooperation_s"):
            say(f"analyze: k-ablation k=1..{adapter.top_k} on {len(held)} held-out items")
            try:
                report["cooperation"] = k_ablation(lm, adapter, held, pad)
            except UspxError as exc:
                report["skipped"]["cooperation"] = str(exc)
    if "similarity" in sections:
        with _timed(timings, "similarity_s"):
            say("analyze: expert similarity and merge cost")
            report["similarity"] = similarity(lm, adapter, cap, held, pad)
    if cap is not None and ({"attention", "prefetch"} & set(sections)):
        train, test = split_masks(cap)
        layers = [l.index for l in adapter.layers]
        if "attention" in sections:
            with _timed(timings, "attention_s"):
                say("analyze: attention -> routing probe")
                probe = attention_probe(cap, layers, adapter.num_experts)
                report.setdefault("attention", {})["probe"] = probe
        if "prefetch" in sections:
            with _timed(timings, "prefetch_s"):
                say("analyze: early prediction and cache with prefetch")
                pred = early_prediction(adapter, cap, train, test)
                sets = cap.ids[torch.from_numpy(test)].numpy()
                caps = _capacities(capacities, adapter.top_k, adapter.num_experts)
                rows = cache_table(sets, layers, caps, pred.pop("predicted"))
                with_prefetch = dict(tokens=int(len(sets)), rows=[r for r in rows if r["prefetch"] != "none"])
                report.setdefault("prefetch", {}).update(prediction=pred, cache_with_prefetch=with_prefetch)


@contextlib.contextmanager
def _timed(timings: dict, key: str) -> Iterator[None]:
    """Record the block's seconds under ``key`` (when it completes)."""
    t = time.perf_counter()
    yield
    timings[key] = round(time.perf_counter() - t, 3)


def _capacities(capacities: list[int] | None, k: int, E: int) -> list[int]:
    """The cache sizes simulated: as given, else k, 2k and E/2 (each within [k, E])."""
    return capacities or sorted({k, min(2 * k, E), max(k, E // 2)})


def _prompt_only(item):
    """The prompt part of an item (generation starts where the reference completion would)."""
    import dataclasses

    cut = item.completion_start if item.completion_start > 0 else max(1, len(item.input_ids) // 2)
    return dataclasses.replace(item, input_ids=item.input_ids[:cut])
