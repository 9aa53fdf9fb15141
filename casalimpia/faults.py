"""Faults injected on purpose, for the fault-tolerance tests only.

Everything here is off unless the driver's environment sets ``CASALIMPIA_FAULTS``, a
comma-separated list of ``NAME=VALUE`` pairs:

    inpainter=PATH           the first inpainting actor to receive a batch dies before painting it
    train_worker=PATH        the training worker of world rank 1 dies after its first step
    driver=PATH              a photo job's driver dies once it has persisted its first processed rows
    masker_oom=N[:PHOTO]     the segmentation model runs out of accelerator memory on more than N photos
                             at once, and on the photo whose source path is PHOTO even alone
    inpainter_oom=N[:PHOTO]  the same for the inpainting model
    inpainter_slow=SECONDS   every inpainting batch takes SECONDS longer, as on a slow accelerator: a run
                             that is still painting when a test interrupts it

A dying fault fires once: the process that creates the PATH file (its marker) dies with
``os._exit``, as a worker killed by the kernel's OOM killer or a pre-empted node would (no
exception, no cleanup), and every later process finds the file and carries on, so the replacement
actor or worker, or the rerun driver, does the work. Markers are local files, so the processes
must share a disk: a cluster on one machine.

An out-of-memory fault raises ``torch.OutOfMemoryError`` from the stage's model call every time
the call holds too many photos or the doomed one, as a GPU that is too small would: the stage's
own handling (retrying in halves) is what is tested.

The environment is read on the driver only; the values travel to the workers as arguments.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FAULTS_ENV = "CASALIMPIA_FAULTS"
NAMES = ("inpainter", "train_worker", "driver", "masker_oom", "inpainter_oom", "inpainter_slow")
MODEL_CALLS = {"masker": ("label_maps", "image"), "inpainter": ("paint_crops", "model_image")}
"""Per stage: the method through which it runs its model on a sequence of photos, and the batch column
those photos come from."""


def armed(name: str) -> str | None:
    """The value of fault ``name`` (a marker path, an out-of-memory limit) when the environment arms it, else None."""
    if name not in NAMES:
        raise ValueError(f"unknown fault {name!r} (known: {', '.join(NAMES)})")
    return _parse(os.environ.get(FAULTS_ENV, "")).get(name)


def _parse(value: str) -> dict[str, str]:
    faults = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, _, value = item.partition("=")
        # A typo must not pass silently: the test would then prove nothing.
        if name not in NAMES or not value:
            raise ValueError(f"{FAULTS_ENV}: {item!r} is not NAME=VALUE with NAME one of {', '.join(NAMES)}")
        if name.endswith("_oom") and not value.partition(":")[0].isdigit():
            raise ValueError(f"{FAULTS_ENV}: {item!r}: an out-of-memory fault is {name}=N or {name}=N:PHOTO")
        if name.endswith("_slow") and not value.replace(".", "", 1).isdigit():
            raise ValueError(f"{FAULTS_ENV}: {item!r}: a slow fault is {name}=SECONDS")
        faults[name] = value
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
    """``map_batches`` arguments for the callable stage ``name`` (a key of MODEL_CALLS): ``cls`` itself,
    or wrapped in the faults the environment arms for it."""
    if (limit := armed(f"{name}_oom")) is not None:
        most, _, photo = limit.partition(":")
        kwargs = {"stage": cls, "stage_kwargs": kwargs, "name": name, "most": int(most), "photo": photo or None}
        cls = RunsOutOfMemory
    if f"{name}_slow" in NAMES and (seconds := armed(f"{name}_slow")) is not None:
        cls, kwargs = Slow, {"stage": cls, "stage_kwargs": kwargs, "seconds": float(seconds)}
    if name in NAMES and (marker := armed(name)) is not None:
        cls, kwargs = DiesOnFirstBatch, {"stage": cls, "marker": marker, "stage_kwargs": kwargs}
    return cls, kwargs


class DiesOnFirstBatch:
    """A callable stage whose first batch, across all its actors, kills the actor holding it."""

    def __init__(self, stage: type, marker: str, stage_kwargs: dict[str, Any]) -> None:
        self.stage = stage(**stage_kwargs)
        self.marker = marker

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        die_once(self.marker, f"{type(self.stage).__name__} actor")
        return self.stage(batch)


class Slow:
    """A callable stage that takes ``seconds`` longer over every batch."""

    def __init__(self, stage: type, stage_kwargs: dict[str, Any], seconds: float) -> None:
        self.stage = stage(**stage_kwargs)
        self.seconds = seconds

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        time.sleep(self.seconds)
        return self.stage(batch)


class RunsOutOfMemory:
    """A callable stage whose model runs out of accelerator memory on more than ``most`` photos at once,
    and on ``photo`` (a source path) even alone.

    The error is raised from the stage's model call (MODEL_CALLS), where a real one would be, so the
    stage's own handling of it runs. The doomed photo is recognised by its pixels, whatever batch or
    half of one it travels in.
    """

    def __init__(self, stage: type, stage_kwargs: dict[str, Any], name: str, most: int, photo: str | None) -> None:
        self.stage = stage(**stage_kwargs)
        method, self.column = MODEL_CALLS[name]
        self.most, self.photo = most, photo
        self.doomed: list[Any] = []
        model_call = getattr(self.stage, method)

        def run_out_of_memory(photos: Any, *args: Any, **kwargs: Any) -> Any:
            import torch  # here, not at the top: the driver and the CPU tasks import this module too

            if len(photos) > self.most or any(np.array_equal(p, doomed) for p in photos for doomed in self.doomed):
                raise torch.OutOfMemoryError(f"injected fault: out of memory on {len(photos)} photo(s) ({FAULTS_ENV})")
            return model_call(photos, *args, **kwargs)

        setattr(self.stage, method, run_out_of_memory)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        self.doomed = [batch[self.column][i] for i, source in enumerate(batch["source"]) if source == self.photo]
        return self.stage(batch)
