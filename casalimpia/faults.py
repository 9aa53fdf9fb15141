"""Faults injected on purpose, for the fault-tolerance tests only.

Everything here is off unless the driver's environment sets ``CASALIMPIA_FAULTS``, a
comma-separated list of ``NAME=MARKER`` pairs:

    inpainter=PATH     the first inpainting actor to receive a batch dies before painting it
    train_worker=PATH  the training worker of world rank 1 dies after its first step
    driver=PATH        a photo job's driver dies once it has persisted its first processed rows

A fault fires once: the process that creates the MARKER file dies with ``os._exit``, as a worker
killed by the kernel's OOM killer or a pre-empted node would (no exception, no cleanup), and every
later process finds the file and carries on, so the replacement actor or worker, or the rerun
driver, does the work.
Markers are local files, so the processes must share a disk: a cluster on one machine.

The environment is read on the driver only; the markers travel to the workers as arguments.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

FAULTS_ENV = "CASALIMPIA_FAULTS"
NAMES = ("inpainter", "train_worker", "driver")


def armed(name: str) -> str | None:
    """The marker path of fault ``name`` when the environment arms it, else None."""
    if name not in NAMES:
        raise ValueError(f"unknown fault {name!r} (known: {', '.join(NAMES)})")
    return _parse(os.environ.get(FAULTS_ENV, "")).get(name)


def _parse(value: str) -> dict[str, str]:
    faults = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, _, marker = item.partition("=")
        # A typo must not pass silently: the test would then prove nothing.
        if name not in NAMES or not marker:
            raise ValueError(f"{FAULTS_ENV}: {item!r} is not NAME=MARKER with NAME one of {', '.join(NAMES)}")
        faults[name] = marker
    return faults


def die_once(marker: str | None, who: str) -> None:
    """Kill this process if it is the first to claim ``marker``; return otherwise (and when unarmed)."""
    if marker is None:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    log.warning("injected fault: %s dies now (%s=%s)", who, FAULTS_ENV, marker)
    logging.shutdown()
    os._exit(1)


def stage(name: str, cls: type, kwargs: dict[str, Any]) -> tuple[type, dict[str, Any]]:
    """``map_batches`` arguments for a callable stage: ``cls`` itself, or a dying wrapper when ``name`` is armed."""
    marker = armed(name)
    if marker is None:
        return cls, kwargs
    return DiesOnFirstBatch, {"stage": cls, "marker": marker, "stage_kwargs": kwargs}


class DiesOnFirstBatch:
    """A callable stage whose first batch, across all its actors, kills the actor holding it."""

    def __init__(self, stage: type, marker: str, stage_kwargs: dict[str, Any]) -> None:
        self.stage = stage(**stage_kwargs)
        self.marker = marker

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        die_once(self.marker, f"{type(self.stage).__name__} actor")
        return self.stage(batch)
