"""Progress when stderr is not a terminal: plain lines at tenths of the work and on a heartbeat."""

import io

from uspx.progress import LineProgress, progress_bar


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_non_terminal_stream_gets_plain_lines_not_a_bar():
    out = io.StringIO()  # isatty() is False, as for a log file
    with progress_bar("recovering", total=4, unit="steps", stream=out) as bar:
        for _ in range(4):
            bar.advance()
    lines = out.getvalue().splitlines()
    # the work took well under the minimum gap: only the closing line
    assert len(lines) == 1
    assert lines[0].startswith("recovering: 4/4 steps (100%), took ")
    assert "\x1b" not in out.getvalue()  # no terminal control codes in a log


def test_lines_at_tenths_with_a_minimum_gap():
    out, clock = io.StringIO(), _Clock()
    p = LineProgress("tracing", total=100, unit="tok", stream=out, clock=clock, every_s=60, min_gap_s=5)
    for _ in range(100):
        clock.now += 1.0  # 1 s per token: a tenth every 10 s, above the 5 s gap
        p.advance()
    p.finish()
    lines = out.getvalue().splitlines()
    assert len(lines) == 11  # 10%, 20%, ..., 100%, then the closing line
    assert lines[0] == "tracing: 10/100 tok (10%), 10s elapsed, about 1m30s left"
    assert lines[4] == "tracing: 50/100 tok (50%), 50s elapsed, about 50s left"
    assert lines[-1] == "tracing: 100/100 tok (100%), took 1m40s"


def test_fast_tenths_share_a_line_and_slow_work_gets_a_heartbeat():
    out, clock = io.StringIO(), _Clock()
    p = LineProgress("evaluating", total=1000, unit="batches", stream=out, clock=clock, every_s=60, min_gap_s=5)
    for _ in range(500):  # half the work in 1 s: no line yet (gap not reached)
        clock.now += 0.002
        p.advance()
    assert out.getvalue() == ""
    clock.now += 5.0
    p.advance()  # the tenths reached meanwhile are reported once
    assert out.getvalue().splitlines() == ["evaluating: 501/1000 batches (50%), 6s elapsed, about 6s left"]
    for _ in range(3):  # then stalls: 70 s per batch, no new tenth, one line per heartbeat
        clock.now += 70.0
        p.advance()
    assert len(out.getvalue().splitlines()) == 4


def test_unknown_total_and_renamed_work():
    out, clock = io.StringIO(), _Clock()
    p = LineProgress("loss", total=None, unit="", stream=out, clock=clock, every_s=60)
    clock.now += 61
    p.advance(2)
    p.describe("loss (candidate)")
    clock.now += 3600
    p.advance(1)
    assert out.getvalue().splitlines() == ["loss: 2, 1m01s elapsed", "loss (candidate): 3, 1h01m elapsed"]


def test_disabled_prints_nothing():
    out = io.StringIO()
    with progress_bar("x", total=3, stream=out, enabled=False) as bar:
        bar.advance(3)
    assert out.getvalue() == ""
