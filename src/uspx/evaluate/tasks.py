"""Task success on checked items: both models generate for every item that carries a check, each
generation is judged (:mod:`uspx.evaluate.checks`), and the two are compared item by item.

Per family and model: pass@1 (and pass@k from ``samples`` draws, the unbiased estimator) with a
Wilson interval; the loop rate; the mean generated length in tokens; the format-valid rate where a
``regex`` or ``json`` check is given. Against the teacher: the difference in pass@1 with a paired
bootstrap interval, the items lost and gained, and McNemar's exact test when each model answers
once. With virtual experts the items are answered once more with the tools, greedily, and the
difference the tools make is reported the same way.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import numpy as np
import torch

from uspx.evaluate.checks import ProgramRunner, judge, loop_period
from uspx.evaluate.stats import mcnemar_exact, paired_bootstrap, pass_at_k, wilson
from uspx.io import UspxError, write_text
from uspx.workload import WorkloadItem, generation_prompt

DEFAULT_MAX_NEW_TOKENS = 128
TEXT_KEPT = 2000  # characters of each generation kept in the per-item file


@dataclass(frozen=True)
class TaskSettings:
    """How checked items are generated: greedy (``temperature`` 0) or ``samples`` draws at
    ``temperature``; pass@k for each k in ``pass_k``."""

    samples: int = 1
    temperature: float = 0.0
    pass_k: tuple[int, ...] = (1,)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # for items that do not set their own
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise UspxError(f"samples must be >= 1, not {self.samples}")
        if self.temperature < 0:
            raise UspxError(f"temperature must be >= 0, not {self.temperature}")
        if self.samples > 1 and self.temperature == 0:
            raise UspxError("several greedy samples are copies of one: give a temperature above 0 with samples > 1")
        if bad := [k for k in self.pass_k if not 1 <= k <= self.samples]:
            raise UspxError(f"pass@k needs 1 <= k <= samples ({self.samples}); got k = {bad}")


@dataclass
class Generation:
    """One generated answer, judged."""

    text: str
    tokens: int
    loops: bool
    passed: bool
    format_valid: bool | None
    failed: tuple[str, ...] = ()
    tool_calls: int | None = None  # generations with virtual experts only


ToolGeneration = Callable[[torch.nn.Module, object, str, int], object]  # -> .text, .calls
# every checked item's generations by one model (``samples`` each, in the items' order)
Answers = list[list[Generation]]


def checked(items: Sequence[WorkloadItem]) -> list[WorkloadItem]:
    return [i for i in items if i.checks is not None]


def _limit(item: WorkloadItem, settings: TaskSettings) -> int:
    return item.checks.max_new_tokens or settings.max_new_tokens


def _judged(item: WorkloadItem, text: str, tokens: Sequence[int], runner: ProgramRunner | None,
            calls: int | None = None) -> Generation:
    o = judge(item, text, runner)
    return Generation(text, len(tokens), loop_period(list(tokens)) is not None, o.passed, o.format_valid,
                      o.failed, calls)


def _ended(row: list[int], eos: set[int], pad: int) -> list[int]:
    """The generated tokens up to (not including) the first end-of-sequence token; for a model
    without one, without the padding that fills a row stopped early by a stop string."""
    for i, t in enumerate(row):
        if t in eos:
            return row[:i]
    end = len(row)
    while not eos and end and row[end - 1] == pad:
        end -= 1
    return row[:end]


def _eos_ids(module: torch.nn.Module, tokenizer) -> set[int]:
    eos = getattr(getattr(module, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def generate_answers(module: torch.nn.Module, tokenizer, items: Sequence[WorkloadItem], settings: TaskSettings,
                     max_length: int, runner: ProgramRunner | None,
                     context: Callable[[], ContextManager] = contextlib.nullcontext) -> Answers:
    """Each item's ``samples`` continuations through the engine's generation, in left-padded
    batches of items that share a token limit and stop strings, judged."""
    from uspx.engine.forward import Sampling, generate

    eos = _eos_ids(module, tokenizer)
    pad = min(eos) if eos else (tokenizer.pad_token_id or 0)  # finished rows fill with an end token
    sampling = Sampling(temperature=settings.temperature) if settings.temperature > 0 else None
    prompts = [generation_prompt(i, tokenizer, max_length) for i in items]
    jobs = [(n, s) for n in range(len(items)) for s in range(settings.samples)]

    def limit_and_stop(job: tuple[int, int]) -> tuple:
        return _limit(items[job[0]], settings), items[job[0]].checks.stop

    # batches of one limit and one stop list, longest prompts together (less padding)
    jobs.sort(key=lambda j: (*limit_and_stop(j), -len(prompts[j[0]]), j))
    rows: dict[tuple[int, int], list[int]] = {}
    device = next(module.parameters()).device
    gpus = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus), context():  # seeded draws, the caller's generators untouched
        torch.manual_seed(settings.seed)
        for (limit, stop), group in itertools.groupby(jobs, limit_and_stop):
            group = list(group)
            for batch in (group[b : b + settings.batch_size] for b in range(0, len(group), settings.batch_size)):
                width = max(len(prompts[n]) for n, _ in batch)
                ids = torch.tensor([[pad] * (width - len(prompts[n])) + prompts[n] for n, _ in batch])
                mask = torch.tensor([[0] * (width - len(prompts[n])) + [1] * len(prompts[n]) for n, _ in batch])
                out = generate(module, ids, mask, max_new_tokens=limit, sampling=sampling, pad_token_id=pad,
                               stop_strings=stop, tokenizer=tokenizer if stop else None)
                for r, job in enumerate(batch):
                    rows[job] = _ended(out[r, width:].tolist(), eos, pad)
    return [[_judged(item, tokenizer.decode(rows[(n, s)], skip_special_tokens=True), rows[(n, s)], runner)
             for s in range(settings.samples)] for n, item in enumerate(items)]


def generate_with_tools(tool_generation: ToolGeneration, module: torch.nn.Module, tokenizer,
                        items: Sequence[WorkloadItem], settings: TaskSettings, runner: ProgramRunner | None,
                        context: Callable[[], ContextManager] = contextlib.nullcontext) -> Answers:
    """Each item answered once, greedily, by ``tool_generation`` (generation with virtual experts:
    the tools' exact results spliced in)."""
    answers = []
    with context():
        for item in items:
            g = tool_generation(module, tokenizer, item.prompt, _limit(item, settings))
            tokens = tokenizer.encode(g.text, add_special_tokens=False)
            answers.append([_judged(item, g.text, tokens, runner, len(g.calls))])
    return answers


# ----- summaries ---------------------------------------------------------------------------------
def _pass_at(gens: list[Generation], k: int) -> float:
    return pass_at_k(len(gens), sum(g.passed for g in gens), k)


def model_summary(answers: Answers, pass_k: Sequence[int]) -> dict:
    """pass@k with Wilson intervals (items as trials), loop rate, mean length, format-valid rate."""
    m = len(answers)
    flat = [g for gens in answers for g in gens]
    out: dict = {}
    for k in pass_k:
        total = sum(_pass_at(gens, k) for gens in answers)
        out[f"pass@{k}"] = total / m
        out[f"pass@{k}_ci95"] = list(wilson(total, m))
    fmt = [g.format_valid for g in flat if g.format_valid is not None]
    out.update(loop_rate=sum(g.loops for g in flat) / len(flat),
               mean_tokens=sum(g.tokens for g in flat) / len(flat),
               format_valid=sum(fmt) / len(fmt) if fmt else None, format_checked=len(fmt))
    calls = [g.tool_calls for g in flat if g.tool_calls is not None]
    if calls:
        out["tool_calls_per_answer"] = sum(calls) / len(calls)
    return out


def paired(base: Answers, other: Answers, seed: int = 0) -> dict:
    """``other`` minus ``base`` in pass@1, item by item: the difference, its paired bootstrap
    interval, the items lost and gained, and McNemar's exact p when each model answered once."""
    a = np.array([_pass_at(g, 1) for g in base])
    b = np.array([_pass_at(g, 1) for g in other])
    single = all(len(g) == 1 for g in [*base, *other])
    lost, gained = int((b < a).sum()), int((b > a).sum())  # with one answer each: the discordant pairs
    ci = paired_bootstrap(b - a, seed=seed)
    return {"pass@1": float(b.mean() - a.mean()), "pass@1_ci95": list(ci) if ci else None,
            "lost": lost, "gained": gained, "mcnemar_p": mcnemar_exact(lost, gained) if single else None}


def family_report(items: Sequence[WorkloadItem], answers: dict[str, Answers], pass_k: Sequence[int],
                  families: Sequence[str], seed: int = 0) -> dict:
    """Per family (and ``all``): each model's summary and the paired differences (candidate vs
    teacher; each ``*_tools`` run vs the same model without tools)."""
    out = {}
    for fam in [*families, "all"]:
        idx = [n for n, i in enumerate(items) if fam == "all" or i.family == fam]
        if not idx:
            continue
        row: dict = {"items": len(idx), "checks": dict(Counter(k for n in idx for k in items[n].checks.kinds))}
        picked = {name: [a[n] for n in idx] for name, a in answers.items()}
        for name, ans in picked.items():
            row[name] = model_summary(ans, pass_k if not name.endswith("_tools") else (1,))
        row["difference"] = paired(picked["teacher"], picked["candidate"], seed)
        for name in [n for n in picked if n.endswith("_tools")]:
            row[f"difference_{name}"] = paired(picked[name.removesuffix("_tools")], picked[name], seed)
        out[fam] = row
    return out


def item_rows(items: Sequence[WorkloadItem], answers: dict[str, Answers]) -> list[dict]:
    """One record per checked item: every model's verdicts and first answer, and whether the
    candidate lost or gained the item against the teacher."""
    rows = []
    for n, item in enumerate(items):
        row: dict = {"id": item.id, "family": item.family, "checks": item.checks.kinds}
        for name, a in answers.items():
            gens = a[n]
            first = asdict(gens[0])
            first["text"] = first["text"][:TEXT_KEPT]
            row[name] = {"passed": [g.passed for g in gens], "pass@1": _pass_at(gens, 1), "first": first}
        t, c = row["teacher"]["pass@1"], row["candidate"]["pass@1"]
        row["flip"] = "lost" if c < t else "gained" if c > t else None
        rows.append(row)
    return rows


def write_items(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def task_lines(tasks: dict) -> list[str]:
    """Task success per checked family, teacher -> candidate (and with the tools), in words."""
    if "skipped" in tasks:
        return [f"checked items not generated: {why}" for why in tasks["skipped"].values()]

    def ci(iv) -> str:
        return f"[{iv[0]:.2f}, {iv[1]:.2f}]" if iv else "[n/a]"

    lines = [f"task success on {tasks['items']} checked items ({tasks['settings']['decoding']}; teacher -> candidate):"]
    for fam, row in {**tasks["families"], "all": tasks["overall"]}.items():
        t, c, d = row["teacher"], row["candidate"], row["difference"]
        ks = [k for k in t if k.startswith("pass@") and not k.endswith("_ci95")]
        parts = [f"{k} {t[k]:.3f} {ci(t[k + '_ci95'])} -> {c[k]:.3f} {ci(c[k + '_ci95'])}" for k in ks]
        mc = f", McNemar p {d['mcnemar_p']:.3g}" if d["mcnemar_p"] is not None else ""
        parts.append(f"diff {d['pass@1']:+.3f} {ci(d['pass@1_ci95'])} (lost {d['lost']}, gained {d['gained']}{mc})")
        parts.append(f"loops {t['loop_rate']:.2f} -> {c['loop_rate']:.2f}; tokens {t['mean_tokens']:.1f} -> {c['mean_tokens']:.1f}")
        if t["format_valid"] is not None:
            parts.append(f"format valid {t['format_valid']:.2f} -> {c['format_valid']:.2f}")
        for name in ("teacher", "candidate"):
            if f"{name}_tools" in row:
                tl, dt = row[f"{name}_tools"], row[f"difference_{name}_tools"]
                parts.append(f"{name} with calc {tl['pass@1']:.3f} {ci(tl['pass@1_ci95'])} "
                             f"(diff {dt['pass@1']:+.3f} {ci(dt['pass@1_ci95'])})")
        lines.append(f"  {fam} ({row['items']} items): " + "; ".join(parts))
    return lines


__all__ = ["Answers", "DEFAULT_MAX_NEW_TOKENS", "Generation", "TaskSettings", "ToolGeneration", "checked",
           "family_report", "generate_answers", "generate_with_tools", "item_rows", "model_summary", "paired",
           "task_lines", "write_items"]
