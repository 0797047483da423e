"""Progress of a long step, shown on a terminal and in a job log alike.

A progress bar redraws one line with carriage returns, which only a terminal shows: in a cluster
job's log file it leaves one line (or none) for a step that may run for an hour. :class:`Progress`
draws a tqdm bar when stderr is a terminal, and otherwise writes a plain line, ``tune: step 12/100
(12%), elapsed 0:04:41, ETA 0:34:20``, once :data:`QUIET_SECONDS` have passed, then each time another
tenth of the steps is done or every :data:`EVERY_SECONDS`, whichever comes first; a step over within
:data:`QUIET_SECONDS` writes nothing.
Every long loop in the package (calibration statistics, compression per group, the tune, export,
the benchmark) reports through it, so a log reads the same whichever step is running.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

EVERY_SECONDS = 60.0
"""At most this long between two plain lines."""

QUIET_SECONDS = 5.0
"""No plain lines before a step has run this long: short steps stay silent in a log."""


def plural(unit: str) -> str:
    """``step`` -> ``steps``, ``batch`` -> ``batches``."""
    return unit + ("es" if unit.endswith(("ch", "sh", "s", "x")) else "s")


def clock(seconds: float) -> str:
    """Seconds as ``H:MM:SS``."""
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class Progress:
    """Steps done out of ``total``, with the time taken and an estimate of the time left.

    Args:
        total: how many steps the work takes (``None``: unknown, so no percentage or ETA).
        desc: what is running, the line's first word (``tune``, ``covariance``, ``compress``).
        unit: what one step is (``step``, ``batch``, ``group``).
        show: False to say nothing (a second rank under DDP).
    """

    def __init__(self, total: int | None, desc: str, unit: str = "step", show: bool = True):
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self.started = self.last = time.perf_counter()
        self.said, self.said_at, self.tenths, self.note = False, 0, 0, ""
        stream = sys.stderr
        self.bar = (tqdm(total=total, desc=desc, unit=unit, leave=False, file=stream, delay=QUIET_SECONDS)
                    if show and stream.isatty() else None)
        self.plain = show and self.bar is None

    def update(self, steps: int = 1, note: str = "") -> None:
        """Count ``steps`` more done; ``note`` (e.g. the current loss) ends the next line."""
        self.done += steps
        self.note = note or self.note
        if self.bar is not None:
            self.bar.update(steps)
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            return
        now = time.perf_counter()
        tenths = 10 * self.done // self.total if self.total else 0
        due = not self.said or tenths > self.tenths or now - self.last >= EVERY_SECONDS  # the first gives an ETA early
        self.tenths = max(self.tenths, tenths)
        if self.plain and due and now - self.started >= QUIET_SECONDS:
            self._say(now)

    def line(self, now: float | None = None) -> str:
        """The plain line for where the work stands now."""
        elapsed = (time.perf_counter() if now is None else now) - self.started
        if self.total:
            left = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
            eta = clock(left) if left == left else "unknown"
            where = f"{self.done}/{self.total} {plural(self.unit)} ({100 * self.done // self.total}%)"
            text = f"{self.desc}: {where}, elapsed {clock(elapsed)}, ETA {eta}"
        else:
            text = f"{self.desc}: {self.done} {plural(self.unit)}, elapsed {clock(elapsed)}"
        return text + (f", {self.note}" if self.note else "")

    def _say(self, now: float) -> None:
        print(self.line(now), file=sys.stderr, flush=True)
        self.last, self.said, self.said_at = now, True, self.done

    def close(self) -> None:
        """Finish: the bar is removed; a log that heard about the step hears it end."""
        if self.bar is not None:
            self.bar.close()
        elif self.said and self.said_at != self.done:
            self._say(time.perf_counter())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(items: Iterable[T], desc: str, unit: str = "step", total: int | None = None,
             show: bool = True) -> Iterator[T]:
    """``items``, one at a time, with their progress shown (see :class:`Progress`)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with Progress(total, desc, unit, show) as shown:
        for item in items:
            yield item
            shown.update()
