"""The virtual experts' tools against hostile input: nothing executes model text in-process, sizes
are bounded and read in one pass; the Python sandbox's attacks are in test_sandbox.py."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from fractions import Fraction

import pytest

from uspx.virtual.tools import ToolRefusal, calc, datetime_tool, python_tool, units


def test_calc_is_exact_and_whitelisted():
    assert calc("654 + 30937").text == "31591"
    assert calc("-(3 - 10) * 2").text == "14"
    assert calc("7 / 3").value == Fraction(7, 3) and calc("7 / 3").text == "7/3"
    assert calc("0.1 + 0.2").value == Fraction(3, 10)  # decimals as written, not binary floats
    assert calc("2 ** 100").text == str(2**100)
    assert calc("17 // 5 + 17 % 5").text == "5"
    for hostile in ("__import__('os').system('echo hi')", "().__class__", "x + 1", "[1, 2]", "'a' * 3",
                    "lambda: 1", "print(1)", "1 if 1 else 2", "2 < 3", "open('/etc/passwd')"):
        with pytest.raises(ToolRefusal):
            calc(hostile)


def test_calc_refuses_huge_work_before_doing_it():
    t0 = time.perf_counter()
    for huge in ("9 ** 9 ** 9", "10 ** 100000", "2 ** -100000", "(10 ** 999) * (10 ** 999)", "1 / 0", "0 ** -1",
                 "1" * 600):
        with pytest.raises(ToolRefusal):
            calc(huge)
    assert time.perf_counter() - t0 < 5  # refused by size checks, not computed


def test_datetime_with_an_injected_clock():
    today = lambda: dt.date(2026, 11, 29)  # noqa: E731
    assert datetime_tool("today", today).text == "2026-11-29"
    assert datetime_tool("weekday of 2026-11-29", today).text == "Sunday"
    assert datetime_tool("days between 2026-01-01 and 2026-11-29").text == "332"
    assert datetime_tool("2026-11-29 + 33 days").text == "2027-01-01"
    for bad in ("weekday of 2026-13-45", "9999-12-31 + 5 days", "rm -rf /", "days between x and y"):
        with pytest.raises(ToolRefusal):
            datetime_tool(bad, today)


def test_units_by_pint_with_checked_input():
    pytest.importorskip("pint")
    assert units("3 miles to km").text == "4.82803 km"
    assert units("100 degC to degF").value == pytest.approx(212.0)
    assert units("2 * 60 minute to hour").value == pytest.approx(2.0)
    for bad in ("3 miles to kg", "__import__('os') to km", "9**9**9 m to km", "3 m**99 to km", "3 parsecs_x to m"):
        with pytest.raises(ToolRefusal):
            units(bad)


def test_python_is_off_unless_enabled():
    with pytest.raises(ToolRefusal, match="off"):
        python_tool("print(1)")


def test_python_refuses_without_bubblewrap_and_never_runs_unsandboxed(monkeypatch):
    from uspx.virtual import sandbox

    sandbox.sandbox.cache_clear()
    monkeypatch.setattr(sandbox, "_bwrap_candidates", lambda: [])
    try:
        with pytest.raises(ToolRefusal, match="bubblewrap"):
            python_tool("open('/tmp/uspx-unsandboxed', 'w')", enabled=True)
    finally:
        sandbox.sandbox.cache_clear()
    assert not os.path.exists("/tmp/uspx-unsandboxed")


def test_units_input_that_used_to_backtrack_is_read_in_one_pass():
    # 40 factors made the old regular expression backtrack for days; run apart so a hang cannot
    # stop the suite, under a limit far above what a linear reader needs
    query = "1 m" + " * m" * 39 + " to m!"
    code = f"from uspx.virtual.tools import ToolRefusal, units\ntry:\n    units({query!r})\nexcept ToolRefusal as e:\n    print(e)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert "'!' cannot be part of a unit" in done.stdout
    for factors in (1, 2, 40):  # the same shape without the bad character converts
        assert units("1 m" + " * m" * (factors - 1) + " to m" + " * m" * (factors - 1)).value == pytest.approx(1.0)
    assert units("3 in to cm").text == "7.62 cm"  # 'in' as a unit and as the separator
    assert units("5 m / s in km / hour").value == pytest.approx(18.0)
    with pytest.raises(ToolRefusal, match="longer than"):
        units("1 m" + " * m" * 200 + " to m")


def test_calc_reads_decimal_literals_exactly_however_large():
    assert calc("1e309").value == Fraction(10**309)  # beyond a double: exact, not an overflow
    assert calc("1" + "0" * 309 + ".5 * 2").value == Fraction(2 * 10**309 + 1)
    assert calc("2.5e-3").value == Fraction(1, 400)
    for huge in ("1e999999999", "1e1200", "1e-1200"):
        with pytest.raises(ToolRefusal):
            calc(huge)


def test_generation_survives_a_literal_that_overflows_a_double():
    import torch

    from uspx.models import load_model
    from uspx.virtual.generate import generate_with_tools
    from uspx.virtual.probe import Probe

    lm = load_model("default")
    hidden = lm.model.config.hidden_size
    always = Probe(layer=1, weight=torch.zeros(hidden), bias=10.0, mean=torch.zeros(hidden), std=torch.ones(hidden))
    literal = "1" + "0" * 309 + ".5"
    g = generate_with_tools(lm.model, lm.tokenizer, f"{literal} * 2 =", always, max_new_tokens=3)
    assert g.calls and g.calls[0].result == str(2 * 10**309 + 1)


def test_cli_prints_tool_text_verbatim():
    from typer.testing import CliRunner

    from uspx.cli import app

    runner = CliRunner()
    done = runner.invoke(app, ["tool", "python", "print('a:x:b [bold]c[/bold] :smile:')", "--allow-python"])
    if "bubblewrap" in done.output:
        pytest.skip("no sandbox here")
    assert done.exit_code == 0 and done.output == "a:x:b [bold]c[/bold] :smile:\n"
    done = runner.invoke(app, ["tool", "calc", "1e309"])
    assert done.exit_code == 0 and done.output == "1" + "0" * 309 + "\n"
