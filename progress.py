"""Progress of long commands, fit for a terminal and for a log file (Slurm, a pipe, nohup).

On a terminal: a tqdm bar. Off one (stderr is not a tty): no carriage-return updates, but a plain
line on stderr at most every ``every`` seconds (default :data:`LOG_EVERY`, and once at the end)
with the count, the rate and the ETA::

    2026-12-03 13:10:00 extract: 120/1000 videos (12%), 3.21 videos/s, ETA 4m34s
    2026-12-03 13:15:12 extract: 1000/1000 videos (100%), 3.20 videos/s, done in 5m12s

Every long command (extract, pack, predict, train-clip and fit epochs, evaluate, ablate) uses this
one class; ``--no-progress`` (``enabled=False``) turns both forms off. The lines go to stderr
directly, not through logging, so that they appear at the default log level.
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

LOG_EVERY = 60.0  # seconds between two lines in a log file


def _duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # NaN or no rate yet
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """``total`` units of work named ``desc`` (``unit``: "video", "step", "cell"); ``done``: already
    done (a resumed epoch). ``update(n, **postfix)`` after each piece (postfix: e.g. loss=0.41,
    shown on the bar and in the lines); ``close()`` (or a with-block) at the end."""

    def __init__(self, total: int, desc: str, *, unit: str = "it", enabled: bool = True, every: float = LOG_EVERY,
                 done: int = 0, leave: bool = False, stream: TextIO | None = None):
        self.total, self.desc, self.unit, self.every = int(total), desc, unit, float(every)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(enabled) and self.total > 0
        self.done = self.first = int(done)
        self.postfix: dict[str, Any] = {}
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        self._closed = False
        if self.enabled and _isatty(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.done, desc=desc, unit=unit, leave=leave,
                            dynamic_ncols=True, file=self.stream)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.done += n
        if postfix:
            self.postfix.update(postfix)
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: _fmt(v) for k, v in self.postfix.items()}, refresh=False)
            return
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every:
            self._line(now, final=False)
            self.last = now

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.done > self.first:
            self._line(time.perf_counter(), final=True)

    def _line(self, now: float, final: bool) -> None:
        elapsed = now - self.t0
        rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        tail = (f"done in {_duration(elapsed)}" if final else
                f"ETA {_duration((self.total - self.done) / rate if rate > 0 else float('nan'))}")
        extra = "".join(f", {k} {_fmt(v)}" for k, v in self.postfix.items())
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.stream.write(f"{stamp} {self.desc}: {self.done}/{self.total} {self.unit}s{pct}, "
                          f"{rate:.3g} {self.unit}s/s{extra}, {tail}\n")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or foreign stream
        return False


def track(iterable: Any, desc: str, *, total: int | None = None, unit: str = "it", enabled: bool = True) -> Any:
    """Iterate ``iterable`` with a :class:`Progress` (total: ``len(iterable)`` when it has one)."""
    if total is None:
        try:
            total = len(iterable)
        except TypeError:
            total = 0
    with Progress(total, desc, unit=unit, enabled=enabled) as p:
        for x in iterable:
            yield x
            p.update(1)
