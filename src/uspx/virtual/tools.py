"""The tools a virtual expert hands work to. None of them runs model text as Python in this process.

- ``calc``: arithmetic parsed with :mod:`ast` against a whitelist (numbers, ``+ - * / // % **``,
  parentheses, unary signs), computed exactly on integers and fractions, with limits on sizes.
- ``datetime``: today, weekdays, differences and offsets between dates, with an injectable clock.
- ``units``: conversions by pint, the number parsed by ``calc``, the units checked before pint
  sees them.
- ``python``: a program run in a separate interpreter with limits on CPU time, memory, processes
  and output, in a fresh temporary folder, without network, killed on timeout; off unless enabled.

Every tool returns a :class:`ToolResult` or raises :class:`ToolRefusal` with the reason.
"""

from __future__ import annotations

import ast
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

from uspx.io import UspxError

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


def _eval(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if type(node.value) is float:
            return Fraction(repr(node.value))  # the decimal the text wrote, exactly
        return _check_size(Fraction(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        a, b = _eval(node.left), _eval(node.right)
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
    value = _eval(tree)
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
_UNIT = r"[A-Za-z_][A-Za-z_ ]*(?:(?:\*\*|\^)[1-3])?(?:\s*[*/]\s*[A-Za-z_][A-Za-z_ ]*(?:(?:\*\*|\^)[1-3])?)*"
_REGISTRY = None


def units(query: str) -> ToolResult:
    """``<number> <unit> to <unit>`` (or ``in``), converted by pint; the number goes through
    ``calc``, the units must be names with powers 1-3, so nothing else reaches pint's parser."""
    global _REGISTRY
    m = re.fullmatch(r"\s*([-+0-9.()/* ]+?)\s+(" + _UNIT + r")\s+(?:to|in)\s+(" + _UNIT + r")\s*", query)
    if not m or len(query) > MAX_INPUT:
        raise ToolRefusal(f"units: cannot read {query!r} (expected '<number> <unit> to <unit>')")
    amount = calc(m.group(1)).value
    try:
        import pint
    except ImportError:
        raise ToolRefusal("units: needs pint (pip install 'uspx[tools]')") from None
    if _REGISTRY is None:
        _REGISTRY = pint.UnitRegistry()
    try:
        q = _REGISTRY.Quantity(float(amount), m.group(2).strip()).to(m.group(3).strip())
    except Exception as exc:  # pint's own errors: unknown unit, incompatible dimensions
        raise ToolRefusal(f"units: {exc}") from None
    value = float(q.magnitude)
    return ToolResult("units", f"{value:.6g} {m.group(3).strip()}", value)


# ----- python -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SandboxLimits:
    cpu_seconds: int = 2
    wall_seconds: float = 5.0
    memory_bytes: int = 256 << 20
    output_bytes: int = 64 << 10
    processes: int = 16


def _as_sandbox_user() -> None:
    """Root ignores the process limit: a sandboxed program started by root runs as ``nobody``."""
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)


_SANDBOX: list[str] | None = None


def _sandbox_command() -> list[str]:
    """``unshare -rn -- PYTHON -I -S``: a new user and network namespace (no network) around a
    Python interpreter the sandbox user can run (this one, else the system's), checked as that user."""
    global _SANDBOX
    if _SANDBOX is not None:
        return _SANDBOX
    unshare = shutil.which("unshare")
    if unshare is None:
        raise ToolRefusal("python: no `unshare` on this machine to run code without network; refused")
    candidates = [os.path.realpath(sys.executable)] + [p for p in (shutil.which("python3"), "/usr/bin/python3") if p]
    for interpreter in dict.fromkeys(candidates):
        cmd = [unshare, "-rn", "--", interpreter, "-I", "-S"]
        try:
            if subprocess.run(cmd + ["-c", "pass"], capture_output=True, timeout=10, preexec_fn=_as_sandbox_user,
                              cwd="/").returncode == 0:
                _SANDBOX = cmd
                return cmd
        except (OSError, subprocess.TimeoutExpired):
            continue
    raise ToolRefusal("python: cannot run an interpreter in a network namespace here (unshare -rn failed, or no "
                      "Python the sandbox user may run); refused")


def python_tool(code: str, *, enabled: bool = False, limits: SandboxLimits = SandboxLimits()) -> ToolResult:
    """Run ``code`` in a separate, isolated interpreter (``python -I -S``) and return its stdout.

    Limits: CPU seconds, address space, processes (fork bombs stop there), output bytes (a program
    writing more is killed), wall time (the whole process group is killed); a fresh temporary
    working folder, an empty environment, no network (its own network namespace). As root the
    program runs as ``nobody``, so that the process limit applies. Refused unless ``enabled``.
    """
    if not enabled:
        raise ToolRefusal("python: running code is off; enable it explicitly (--allow-python)")
    if len(code) > 20_000:
        raise ToolRefusal("python: program longer than 20000 characters")
    command = _sandbox_command()
    with tempfile.TemporaryDirectory(prefix="uspx-sandbox-") as work:
        os.chmod(work, 0o777)
        out_path = os.path.join(work, "stdout")
        program = os.path.join(work, "program.py")
        with open(program, "w") as fh:
            fh.write(code)
        os.chmod(program, 0o644)

        def limit() -> None:
            import resource

            os.setsid()  # its own process group: killed whole on timeout
            resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
            resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
            resource.setrlimit(resource.RLIMIT_FSIZE, (limits.output_bytes, limits.output_bytes))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            _as_sandbox_user()
            resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))

        with open(out_path, "wb") as out:
            os.chmod(out_path, 0o666)
            proc = subprocess.Popen(command + [program], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.PIPE, cwd=work, env={}, preexec_fn=limit)
            try:
                _, err = proc.communicate(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise ToolRefusal(f"python: killed after {limits.wall_seconds:g} s of wall time") from None
            finally:
                _kill_group(proc)  # anything it left behind (forked children) goes too
        with open(out_path, "rb") as fh:
            output = fh.read(limits.output_bytes + 1)
    if proc.returncode != 0:
        reason = (err or b"").decode(errors="replace").strip().splitlines()[-1:] or [f"signal {-proc.returncode}"]
        raise ToolRefusal(f"python: the program failed ({reason[0][:200]})")
    return ToolResult("python", output.decode(errors="replace").strip(), None)


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


TOOLS = {"calc": calc, "datetime": datetime_tool, "units": units, "python": python_tool}
