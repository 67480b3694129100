"""One progress style for every long-running stage, on stderr: a rich bar on a terminal, plain lines
elsewhere.

A rich bar redraws itself in place, which only a terminal can show: written to a file or a pipe it
appears once, when the run ends. So when stderr is not a terminal (a log file, a batch job, a CI
runner) the same calls print a plain line at each tenth of the work (at most one every
``min_gap_s``) and at least one every ``every_s`` seconds while work advances, and a last line when
the work ends.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)

EVERY_S = 60.0  # a line at least this often while work advances, whatever the share done
MIN_GAP_S = 5.0  # tenths reached faster than this share one line


class Clock:
    """Seconds per stage of a run, each stage timed from the end of the one before; with ``say``
    each is printed as it ends."""

    def __init__(self, say: bool = False) -> None:
        self.started = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.say = say

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage], self.last = round(now - self.last, 2), now
        if self.say:
            console.print(f"[green]done[/] {stage} ({self.seconds[stage]:.1f} s)")

    @property
    def total(self) -> float:
        """Seconds since the clock started."""
        return round(time.perf_counter() - self.started, 2)


class _Bar:
    def __init__(self, progress: Progress | None, task: int | None):
        self._progress, self._task = progress, task

    def advance(self, n: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def describe(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _count(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


class LineProgress:
    """Progress as plain lines on ``stream`` (the same ``advance``/``describe`` calls as the bar)."""

    def __init__(self, description: str, total: float | None, unit: str, stream: TextIO,
                 clock: Callable[[], float] = time.monotonic, every_s: float = EVERY_S,
                 min_gap_s: float = MIN_GAP_S):
        self.description, self.total, self.unit, self.stream = description, total, unit, stream
        self.clock, self.every_s, self.min_gap_s = clock, every_s, min_gap_s
        self.done = 0.0
        self.start = self.last = clock()
        self.tenth = 0  # tenths of the total already reported

    def advance(self, n: float = 1) -> None:
        self.done += n
        now = self.clock()
        tenth = self._tenth()
        if now - self.last >= self.every_s or (tenth > self.tenth and now - self.last >= self.min_gap_s):
            self._line(now)

    def describe(self, text: str) -> None:
        self.description = text

    def finish(self) -> None:
        """The last line: how much was done and how long it took."""
        self._line(self.clock(), final=True)

    def _tenth(self) -> int:
        return int(10 * self.done / self.total) if self.total else 0

    def _line(self, now: float, final: bool = False) -> None:
        elapsed = now - self.start
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            text = f"{self.description}: {_count(self.done)}/{_count(self.total)}{unit} ({100 * self.done / self.total:.0f}%)"
        else:
            text = f"{self.description}: {_count(self.done)}{unit}"
        if final:
            text += f", took {_duration(elapsed)}"
        else:
            text += f", {_duration(elapsed)} elapsed"
            if self.total and 0 < self.done < self.total:
                text += f", about {_duration(elapsed * (self.total - self.done) / self.done)} left"
        self.stream.write(text + "\n")
        self.stream.flush()  # a log read while the run goes on shows it now, not at exit
        self.last, self.tenth = now, max(self.tenth, self._tenth())


@contextlib.contextmanager
def progress_bar(description: str, total: float | None, unit: str = "", enabled: bool = True,
                 stream: TextIO | None = None) -> Iterator[_Bar | LineProgress]:
    """A progress display for ``total`` units of work (``None``: unknown) with ``advance(n)`` and
    ``describe(text)``: a rich bar when stderr (or ``stream``) is a terminal, else plain lines."""
    if not enabled:
        yield _Bar(None, None)
        return
    terminal = console.is_terminal if stream is None else _isatty(stream)
    if not terminal:
        lines = LineProgress(description, total, unit, console.file if stream is None else stream)
        yield lines
        lines.finish()
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console if stream is None else Console(file=stream), transient=False) as progress:
        yield _Bar(progress, progress.add_task(description, total=total))


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty is no terminal
        return False
