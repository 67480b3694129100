"""Judging one generated continuation against its item's checks, and spotting loops.

The text judged is the generation cut at the item's first ``stop`` string (all of it without one).

- ``answer``: the first non-empty line of that text, normalised (Unicode NFKC, surrounding
  whitespace stripped, inner whitespace runs made one space, case folded, one trailing ``.``
  dropped), equals the normalised answer; or, when the answer is a number, the line is the same
  number (integers, decimals, ``p/q`` fractions and ``1,234``-style thousands compared exactly).
- ``regex``: the text, stripped of surrounding whitespace, matches the pattern in full.
- ``json``: the stripped text is one JSON document; with a schema it also validates against it.
- ``tests``: the program ``prompt + text + "\\n\\n" + tests`` (only ``text + tests`` for a chat
  item, whose prompt is not code) exits with status 0 in the sandbox, within its limits. The
  program never runs outside the sandbox; where none can start, the evaluation refuses.

An item passes when every check it carries passes; it is format-valid when its ``regex`` and
``json`` checks pass (None without either).

A generation *loops* when it ends, but for at most :data:`LOOP_TAIL` final tokens, in one cycle of
1 to :data:`LOOP_MAX_PERIOD` tokens repeated at least :data:`LOOP_MIN_REPEATS` times over a stretch
of at least :data:`LOOP_MIN_SPAN` tokens (the last cycle may be cut short by the token limit, and
a model that breaks off a long repetition with a token or two, ``name, name, ..., name)``, still
counts as looping).
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Protocol, Sequence

from uspx.io import UspxError
from uspx.workload import Checks, WorkloadItem

LOOP_MAX_PERIOD = 32
LOOP_MIN_REPEATS = 3
LOOP_MIN_SPAN = 16
LOOP_TAIL = 4


class ProgramRun(Protocol):
    """What a sandbox run reports (:class:`uspx.virtual.sandbox.SandboxRun` has these)."""

    returncode: int | None
    timed_out: bool
    stderr: bytes


ProgramRunner = Callable[[str], ProgramRun]  # a program -> its run in the sandbox


@dataclass(frozen=True)
class Outcome:
    """One generation judged: whether it passed, whether its format checks held, and why not."""

    passed: bool
    format_valid: bool | None
    failed: tuple[str, ...] = ()  # the checks that failed, each with a short reason


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest of the ``stop`` strings."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(ends)] if ends else text


def normalise(text: str) -> str:
    """The answer normalisation stated in the module docstring."""
    s = " ".join(unicodedata.normalize("NFKC", text).split()).casefold()
    return s[:-1] if s.endswith(".") else s


_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d{1,4})?")
_FRACTION = re.compile(r"([+-]?\d+)\s*/\s*(\d+)")


def parse_number(text: str) -> Fraction | None:
    """``text`` as an exact number, or None when it is not one."""
    s = text.strip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if _DECIMAL.fullmatch(s):
        return Fraction(s)
    if (m := _FRACTION.fullmatch(s)) and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    return None


def first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "")


def answer_matches(text: str, answer: str) -> bool:
    line = first_line(text)
    expected = parse_number(answer)
    if expected is not None:
        got = parse_number(line) if len(line) <= 200 else None  # a huge exponent is not an answer
        if got is not None:
            return got == expected
    return normalise(line) == normalise(answer)


def _json_problem(text: str, schema: bool | dict) -> str | None:
    try:
        doc = json.loads(text.strip())
    except (json.JSONDecodeError, RecursionError) as exc:
        return f"json: does not parse ({getattr(exc, 'msg', 'too deeply nested')})"
    if isinstance(schema, dict):
        try:
            import jsonschema
        except ImportError:
            raise UspxError("a 'json' schema check needs the jsonschema package: pip install 'uspx[checks]'") from None
        error = jsonschema.exceptions.best_match(jsonschema.validators.validator_for(schema)(schema).iter_errors(doc))
        if error is not None:
            return f"json: fails the schema ({error.message[:200]})"
    return None


def tests_program(item: WorkloadItem, text: str) -> str:
    """The program a ``tests`` check runs: the prompt (code the generation continues), the
    generation, then the tests."""
    head = "" if item.messages is not None else item.prompt
    return f"{head}{text}\n\n{item.checks.tests}\n"


def _tests_problem(item: WorkloadItem, text: str, runner: ProgramRunner | None) -> str | None:
    if runner is None:
        raise UspxError("'tests' checks run only in uspx's sandbox: pass a sandbox runner "
                        "(uspx.virtual.sandbox.run_python; `uspx eval` does)")
    run = runner(tests_program(item, text))
    if run.timed_out:
        return "tests: stopped at the sandbox's time limit"
    if run.returncode is not None and (run.returncode < 0 or run.returncode in (128 + 9, 128 + 24)):
        return f"tests: killed at the sandbox's CPU or memory limit (exit status {run.returncode})"
    if run.returncode != 0:
        last = run.stderr.decode(errors="replace").strip().splitlines()[-1:]
        return f"tests: failed ({last[0][:200] if last else f'exit status {run.returncode}'})"
    return None


def judge(item: WorkloadItem, generation: str, runner: ProgramRunner | None = None) -> Outcome:
    """``generation`` (the raw continuation) judged by every check ``item`` carries."""
    checks: Checks = item.checks
    text = cut_at_stop(generation, checks.stop)
    failed: list[str] = []
    fmt: list[bool] = []
    if checks.answer is not None and not answer_matches(text, checks.answer):
        failed.append(f"answer: got {first_line(text).strip()[:80]!r}")
    if checks.regex is not None:
        ok = re.fullmatch(checks.regex, text.strip()) is not None
        fmt.append(ok)
        if not ok:
            failed.append("regex: no full match")
    if checks.json is not False:
        problem = _json_problem(text, checks.json)
        fmt.append(problem is None)
        if problem:
            failed.append(problem)
    if checks.tests is not None and (problem := _tests_problem(item, text, runner)):
        failed.append(problem)
    return Outcome(not failed, all(fmt) if fmt else None, tuple(failed))


def loop_period(tokens: Sequence, max_period: int = LOOP_MAX_PERIOD, min_repeats: int = LOOP_MIN_REPEATS,
                min_span: int = LOOP_MIN_SPAN, tail: int = LOOP_TAIL) -> int | None:
    """The shortest cycle the end of ``tokens`` repeats (the rule in the module docstring), or
    None when it does not loop. Works on any sequence: token ids, or characters for a test."""
    for cut in range(min(tail, max(len(tokens) - 1, 0)) + 1):
        n = len(tokens) - cut
        for p in range(1, min(max_period, n // min_repeats) + 1):
            run = 0  # positions from the end that equal the one a period earlier
            while run < n - p and tokens[n - 1 - run] == tokens[n - 1 - run - p]:
                run += 1
            if run + p >= min_repeats * p and run + p >= min_span:
                return p
    return None


__all__ = ["LOOP_MAX_PERIOD", "LOOP_MIN_REPEATS", "LOOP_MIN_SPAN", "LOOP_TAIL", "Outcome", "ProgramRun", "ProgramRunner",
           "answer_matches", "cut_at_stop", "judge", "loop_period", "normalise", "parse_number",
           "tests_program"]
