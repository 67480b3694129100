"""The tools a virtual expert hands work to. None of them runs model text as Python in this process.

- ``calc``: arithmetic parsed with :mod:`ast` against a whitelist (numbers, ``+ - * / // % **``,
  parentheses, unary signs), computed exactly on integers and fractions, with limits on sizes.
- ``datetime``: today, weekdays, differences and offsets between dates, with an injectable clock.
- ``units``: conversions by pint, the number parsed by ``calc``, the units checked before pint
  sees them.
- ``python``: a program run in a bubblewrap sandbox (:mod:`uspx.virtual.sandbox`): no file of the
  host but the interpreter's, no network, limits on CPU, memory, processes, output and wall time,
  nothing left running; off unless enabled.

Every tool returns a :class:`ToolResult` or raises :class:`ToolRefusal` with the reason.
"""

from __future__ import annotations

import ast
import datetime as dt
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

from uspx.io import UspxError
from uspx.virtual.sandbox import SandboxLimits, SandboxUnavailable, run_python

MAX_DIGITS = 1000  # digits of any number a calculation may produce
MAX_EXPONENT = 10_000
MAX_INPUT = 500  # characters of a tool's input


class ToolRefusal(UspxError):
    """A tool declined its input (unsafe, too large, or not its kind of task)."""


@dataclass(frozen=True)
class ToolResult:
    tool: str
    text: str  # what is spliced into the output
    value: object = None


# ----- calc ---------------------------------------------------------------------------------------
_BINOPS: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: Fraction(a // b), ast.Mod: lambda a, b: a % b,
}


def _check_size(x: Fraction) -> Fraction:
    if max(abs(x.numerator), x.denominator).bit_length() > MAX_DIGITS * 3.33:
        raise ToolRefusal(f"calc: a result of more than {MAX_DIGITS} digits")
    return x


def _pow(a: Fraction, b: Fraction) -> Fraction:
    if b.denominator != 1:
        raise ToolRefusal("calc: only whole-number exponents are exact")
    e = int(b)
    if abs(e) > MAX_EXPONENT:
        raise ToolRefusal(f"calc: exponent {e} beyond the limit of {MAX_EXPONENT}")
    size = max(abs(a.numerator), a.denominator).bit_length()
    if size * abs(e) > MAX_DIGITS * 3.33 + 64:
        raise ToolRefusal(f"calc: the power would have more than {MAX_DIGITS} digits")
    if a == 0 and e < 0:
        raise ToolRefusal("calc: zero to a negative power")
    return a**e


_DECIMAL = re.compile(r"(\d*)\.?(\d*)(?:[eE]([+-]?\d+))?")


def _decimal(literal: str) -> Fraction:
    """A decimal literal as an exact fraction; its exponent is bounded before any digit is made."""
    literal = literal.replace("_", "")
    m = _DECIMAL.fullmatch(literal)
    if m is None:
        raise ToolRefusal(f"calc: {literal!r} is not a decimal number")
    if abs(int(m.group(3) or 0)) > MAX_DIGITS + len(m.group(1)) + len(m.group(2)):
        raise ToolRefusal(f"calc: {literal} has more than {MAX_DIGITS} digits")
    return _check_size(Fraction(literal))


def _eval(node: ast.AST, text: str) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval(node.body, text)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if type(node.value) is float:  # the decimal the text wrote, exactly (a double may overflow)
            return _decimal(ast.get_source_segment(text, node) or repr(node.value))
        return _check_size(Fraction(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval(node.operand, text)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        a, b = _eval(node.left, text), _eval(node.right, text)
        if isinstance(node.op, ast.Pow):
            return _check_size(_pow(a, b))
        op = _BINOPS.get(type(node.op))
        if op is None:
            raise ToolRefusal(f"calc: operator {type(node.op).__name__} is not arithmetic")
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
            raise ToolRefusal("calc: division by zero")
        return _check_size(op(a, b))
    raise ToolRefusal(f"calc: {type(node).__name__} is not allowed (numbers and + - * / // % ** only)")


def calc(expression: str) -> ToolResult:
    """Exact arithmetic on ``expression``: an integer, or a fraction ``p/q`` when not whole."""
    text = expression.strip().replace("×", "*").replace("÷", "/").replace("^", "**")
    if not text or len(text) > MAX_INPUT:
        raise ToolRefusal(f"calc: input empty or longer than {MAX_INPUT} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ToolRefusal(f"calc: {expression!r} is not an arithmetic expression") from None
    value = _eval(tree, text)
    shown = str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    return ToolResult("calc", shown, value)


# ----- datetime -----------------------------------------------------------------------------------
_DATE = r"(\d{4}-\d{2}-\d{2})"


def datetime_tool(query: str, today: Callable[[], dt.date] = dt.date.today) -> ToolResult:
    """``today``; ``weekday of 2026-11-29``; ``days between 2026-01-01 and 2026-11-29``;
    ``2026-11-29 + 30 days`` (or ``- N days``). ``today`` is injectable (tests, reproducible runs)."""
    q = query.strip().lower()
    if len(q) > MAX_INPUT:
        raise ToolRefusal("datetime: input too long")

    def date(s: str) -> dt.date:
        try:
            return dt.date.fromisoformat(s)
        except ValueError:
            raise ToolRefusal(f"datetime: {s!r} is not a date (YYYY-MM-DD)") from None

    if q in ("today", "date today", "today's date"):
        d = today()
        return ToolResult("datetime", d.isoformat(), d)
    if m := re.fullmatch(r"weekday (?:of )?" + _DATE, q):
        d = date(m.group(1))
        return ToolResult("datetime", d.strftime("%A"), d.weekday())
    if m := re.fullmatch(r"days between " + _DATE + r" and " + _DATE, q):
        n = (date(m.group(2)) - date(m.group(1))).days
        return ToolResult("datetime", str(n), n)
    if m := re.fullmatch(_DATE + r" ([+-]) (\d{1,6}) days?", q):
        delta = dt.timedelta(days=int(m.group(3)))
        try:
            d = date(m.group(1)) + (delta if m.group(2) == "+" else -delta)
        except OverflowError:
            raise ToolRefusal("datetime: the date falls outside years 1-9999") from None
        return ToolResult("datetime", d.isoformat(), d)
    raise ToolRefusal(f"datetime: cannot read {query!r}")


# ----- units --------------------------------------------------------------------------------------
_UNIT_TOKEN = re.compile(r"\s*(?:(?P<word>[A-Za-z_]+)|(?P<pow>(?:\*\*|\^)[1-3](?![0-9]))|(?P<op>[*/])|(?P<other>\S))")
_REGISTRY = None


def _unit_tokens(text: str, offset: int) -> list[re.Match]:
    tokens = list(_UNIT_TOKEN.finditer(text, offset))
    if bad := [t.group() for t in tokens if t.lastgroup == "other"]:
        raise ToolRefusal(f"units: {bad[0].strip()!r} cannot be part of a unit (names, * / and powers 1-3)")
    return tokens


def _split_units(tokens: list[re.Match]) -> tuple[int, int, int, int]:
    """Token ranges (a, b) of the two units around the last ``to``/``in`` that leaves a well-formed
    unit on each side. A unit is ``name+ [power] ((* | /) name+ [power])*``: every rule is about two
    neighbouring tokens, so counting the bad neighbours once makes each candidate split O(1)."""
    kinds = [t.lastgroup for t in tokens]
    allowed = {("word", "word"), ("word", "pow"), ("word", "op"), ("pow", "op"), ("op", "word")}
    bad_before = [0]  # bad_before[i]: bad neighbour pairs among tokens[0 .. i]
    for i in range(1, len(kinds)):
        bad_before.append(bad_before[-1] + ((kinds[i - 1], kinds[i]) not in allowed))

    def ok(a: int, b: int) -> bool:
        return b > a and kinds[a] == "word" and kinds[b - 1] in ("word", "pow") and bad_before[b - 1] == bad_before[a]

    for i in range(len(tokens) - 1, -1, -1):
        if kinds[i] == "word" and tokens[i].group("word") in ("to", "in") and ok(0, i) and ok(i + 1, len(tokens)):
            return 0, i, i + 1, len(tokens)
    raise ToolRefusal("units: expected '<number> <unit> to <unit>'")


def units(query: str) -> ToolResult:
    """``<number> <unit> to <unit>`` (or ``in``), converted by pint; the number goes through
    ``calc``, the units must be names with powers 1-3, so nothing else reaches pint's parser.
    The input is read by one pass of a tokenizer (length checked first), never by backtracking."""
    global _REGISTRY
    if len(query) > MAX_INPUT:
        raise ToolRefusal(f"units: input longer than {MAX_INPUT} characters")
    first = next((i for i, ch in enumerate(query) if ch.isalpha() or ch == "_"), len(query))
    number = query[:first]
    if not number.strip() or not number[-1].isspace() or set(number) - set("-+0123456789.()/* \t"):
        raise ToolRefusal(f"units: cannot read {query!r} (expected '<number> <unit> to <unit>')")
    tokens = _unit_tokens(query, first)
    a, b, c, d = _split_units(tokens)
    source = query[tokens[a].start(): tokens[b - 1].end()].strip()
    target = query[tokens[c].start(): tokens[d - 1].end()].strip()
    amount = calc(number).value
    try:
        import pint
    except ImportError:
        raise ToolRefusal("units: needs pint (pip install 'uspx[tools]')") from None
    if _REGISTRY is None:
        _REGISTRY = pint.UnitRegistry()
    try:
        q = _REGISTRY.Quantity(float(amount), source).to(target)
    except Exception as exc:  # pint's own errors: unknown unit, incompatible dimensions
        raise ToolRefusal(f"units: {exc}") from None
    value = float(q.magnitude)
    return ToolResult("units", f"{value:.6g} {target}", value)


# ----- python -------------------------------------------------------------------------------------
MAX_PROGRAM = 20_000  # bytes of a program (it reaches the sandbox through a pipe)


def python_tool(code: str, *, enabled: bool = False, limits: SandboxLimits = SandboxLimits()) -> ToolResult:
    """Run ``code`` in the bubblewrap sandbox (:mod:`uspx.virtual.sandbox`) and return its stdout.

    Refused unless ``enabled``; refused where the sandbox cannot start (never run without it); a
    program that fails, runs past the wall time or prints more than the output cap is refused too.
    """
    if not enabled:
        raise ToolRefusal("python: running code is off; enable it explicitly (--allow-python)")
    program = code.encode()
    if len(program) > MAX_PROGRAM:
        raise ToolRefusal(f"python: program longer than {MAX_PROGRAM} bytes")
    try:
        run = run_python(code, limits)
    except SandboxUnavailable as exc:
        raise ToolRefusal(str(exc)) from None
    if run.timed_out:
        raise ToolRefusal(f"python: killed after {limits.wall_seconds:g} s of wall time")
    if run.overflowed:
        raise ToolRefusal(f"python: killed for printing more than {limits.output_bytes} bytes")
    if run.returncode != 0:
        last = run.stderr.decode(errors="replace").strip().splitlines()[-1:]
        reason = last[0][:200] if last else f"exit status {run.returncode}"
        raise ToolRefusal(f"python: the program failed ({reason})")
    return ToolResult("python", run.stdout.decode(errors="replace").strip(), None)


TOOLS = {"calc": calc, "datetime": datetime_tool, "units": units, "python": python_tool}
