"""The virtual experts' tools against hostile input: nothing executes model text in-process, sizes
are bounded, and the Python sandbox holds its limits."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import time
from fractions import Fraction

import pytest

from uspx.virtual.tools import SandboxLimits, ToolRefusal, calc, datetime_tool, python_tool, units


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


needs_sandbox = pytest.mark.skipif(
    shutil.which("unshare") is None or subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode != 0,
    reason="no user and network namespaces here")


def test_python_is_off_unless_enabled():
    with pytest.raises(ToolRefusal, match="off"):
        python_tool("print(1)")


@needs_sandbox
def test_python_sandbox_runs_code_and_holds_its_limits(tmp_path):
    assert python_tool("print(sum(range(10)))", enabled=True).text == "45"
    limits = SandboxLimits(cpu_seconds=1, wall_seconds=3.0, memory_bytes=200 << 20, output_bytes=4096, processes=8)
    t0 = time.perf_counter()
    for hostile, why in (
            ("while True: pass", ""),  # CPU limit
            ("import time\ntime.sleep(60)", "wall time"),  # wall-time kill
            ("x = bytearray(1 << 30)", ""),  # memory limit
            ("print('x' * 100000)", ""),  # output limit
            ("import os\nwhile True:\n    os.fork()", ""),  # fork bomb: stopped at the process limit
            ("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)", ""),  # no network
            ("raise SystemExit(3)", "")):
        with pytest.raises(ToolRefusal, match=why):
            python_tool(hostile, enabled=True, limits=limits)
    assert time.perf_counter() - t0 < 60
    # the program's working folder is a fresh temporary one, not ours
    out = python_tool("import os\nprint(os.getcwd())", enabled=True).text
    assert "uspx-sandbox-" in out and str(tmp_path) not in out
    marker = tmp_path / "secret.txt"
    marker.write_text("s")
    with pytest.raises(ToolRefusal):  # another user's private file is out of reach
        marker.chmod(0o600)
        python_tool(f"print(open({str(marker)!r}).read())", enabled=True, limits=limits)
