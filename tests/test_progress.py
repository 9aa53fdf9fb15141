"""The driver's progress lines and its stop on SIGINT and SIGTERM, in this process."""

import logging
import os
import signal
import time

import pytest

from casalimpia.progress import Progress, Stopped, format_duration, stop_on_signals


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_line_reports_done_rate_eta_and_problems_leaving_out_start_up():
    clock = Clock()
    progress = Progress(total=1000, every=30, clock=clock)
    clock.now += 95  # actors starting, models loading
    assert progress.line() == "progress: 0/1,000 photos, 95s in: waiting for the first results"
    progress.add(["ok"] * 10)
    clock.now += 20
    progress.add(["ok"] * 37 + ["failed"] * 2 + ["review"])
    # 40 photos in the 20 s since the first arrival: 2 per second, 950 left.
    assert progress.line() == ("progress: 50/1,000 photos (5%) at 2.00 images/s, ETA 7m 55s; failed 2, review 1")


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def progress_lines():
    """What the progress logger logs, whatever handlers and propagation earlier tests configured."""
    logger = logging.getLogger("casalimpia.progress")
    handler, level = Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_progress_logs_a_line_every_interval_from_its_thread(progress_lines):
    with Progress(total=4, every=0.05) as progress:
        progress.add(["ok", "ok"])
        time.sleep(0.3)
    assert len(progress_lines) >= 2 and all(line.startswith("progress: 2/4 photos (50%)") for line in progress_lines)
    count = len(progress_lines)
    time.sleep(0.15)
    assert len(progress_lines) == count, "the thread stopped"


def test_no_progress_lines_when_switched_off(progress_lines):
    with Progress(total=4, every=0):
        time.sleep(0.1)
    assert progress_lines == []


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (59.4, "59s"), (61, "1m 01s"), (3 * 3600 + 300, "3h 05m")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
    assert format_duration(float("inf")) == "unknown"


@pytest.mark.parametrize(("signal_number", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_stop_signals_raise_stopped_inside_and_restore_the_handlers_after(signal_number, exit_code):
    before = signal.getsignal(signal_number)
    with pytest.raises(Stopped) as stopped, stop_on_signals():
        os.kill(os.getpid(), signal_number)
        time.sleep(5)  # the handler runs before this returns
    assert stopped.value.exit_code == exit_code and str(stopped.value) == signal.Signals(signal_number).name
    assert signal.getsignal(signal_number) is before
