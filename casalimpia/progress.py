"""A photo job's driver during its run: progress lines for ``ray job logs``, and a clean stop on signals.

Ray Data's progress bars redraw a terminal line; in a submitted job's log they are noise or nothing.
``Progress`` logs one plain line every ``every`` seconds from a background thread, so a run that
is still loading models says so too. ``stop_on_signals`` turns SIGINT (Ctrl-C) and SIGTERM (what
``ray job stop`` and Kubernetes send first) into ``Stopped`` in the main thread, so that the driver
can persist the rows it holds before it exits.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """A stop signal arrived. A BaseException, like KeyboardInterrupt, so no ``except Exception`` swallows it."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by this signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signal_number


class Interrupted(RuntimeError):
    """A run stopped by a signal after persisting the manifest rows of everything it had received."""

    def __init__(self, stopped: Stopped, persisted: int) -> None:
        super().__init__(f"stopped by {stopped}: the manifest rows of {persisted} processed photos are persisted")
        self.exit_code = stopped.exit_code
        self.persisted = persisted


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Raise ``Stopped`` in the main thread on SIGINT or SIGTERM while inside; the previous handlers after.

    Outside the main thread (where Python cannot set handlers) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signal_number: int, frame: object) -> None:
        raise Stopped(signal_number)

    previous = {number: signal.signal(number, stop) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


class Progress:
    """Counts a run's rows as they arrive and logs where it stands every ``every`` seconds (0: never)."""

    def __init__(self, total: int, every: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.every = every
        self.counts: Counter[str] = Counter()
        self.arrivals: list[tuple[float, int]] = []
        """(seconds since the start, photos processed) at each arrival of rows: the run's rate over time."""
        self._clock = clock
        self.start = clock()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def processed(self) -> int:
        return self.arrivals[-1][1] if self.arrivals else 0

    def elapsed(self) -> float:
        """Seconds since the start."""
        return self._clock() - self.start

    def add(self, statuses: list[str]) -> None:
        """Count the rows of one arrival by status."""
        with self._lock:
            self.counts.update(statuses)
            self.arrivals.append((self.elapsed(), self.processed + len(statuses)))

    def line(self) -> str:
        """Where the run stands: done of total, rate, ETA, and the failed and review counts so far."""
        with self._lock:
            counts, first, processed = Counter(self.counts), self.arrivals[:1], self.processed
        now = self.elapsed()
        if not first:
            return f"progress: 0/{self.total:,} photos, {now:.0f}s in: waiting for the first results"
        # The rate since the first arrival leaves out start-up (actors starting, models loading).
        [(first_time, first_count)] = first
        rate = (processed - first_count) / (now - first_time) if processed > first_count else 0.0
        if rate <= 0:
            rate = processed / max(now, 1e-9)
        eta = (self.total - processed) / rate if rate > 0 else float("inf")
        share = processed / self.total if self.total else 1.0
        tail = ", ".join(f"{status} {counts[status]:,}" for status in ("failed", "review") if counts[status])
        return (
            f"progress: {processed:,}/{self.total:,} photos ({share:.0%}) at {rate:.2f} images/s, "
            f"ETA {format_duration(eta)}" + (f"; {tail}" if tail else "")
        )

    def __enter__(self) -> Progress:
        if self.every > 0:
            self._thread = threading.Thread(target=self._log_every, name="casalimpia-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _log_every(self) -> None:
        while not self._stop.wait(self.every):
            log.info("%s", self.line())


def format_duration(seconds: float) -> str:
    """'3h 05m', '4m 10s', '12s', or 'unknown' for an infinite or negative span."""
    if not 0 <= seconds < float("inf"):
        return "unknown"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"
