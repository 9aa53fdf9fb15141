"""Experiment tracking with Weights & Biases, on rank 0 only.

Without ``WANDB_API_KEY`` (and no explicit ``WANDB_MODE``) runs are written offline to
``tracking.dir`` and can be uploaded later with ``wandb sync``. The W&B run id derives from the
training run's name and storage, so a resumed training run continues the same W&B run.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from casalimpia.config import TrainConfig, to_dict

log = logging.getLogger(__name__)


class Tracker:
    """Logs metrics and example grids to a W&B run; does nothing when there is no run."""

    def __init__(self, run: Any = None) -> None:
        self.run = run

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_outputs(self, pairs: list[Any], outputs: list[np.ndarray], count: int, step: int) -> None:
        """One image per example: the input with its hole, the painted output and the target, side by side."""
        if self.run is None or not count or not outputs:
            return
        import wandb

        shown = zip(pairs[:count], outputs[:count], strict=False)
        images = [wandb.Image(example_row(pair, output), caption=pair.source) for pair, output in shown]
        self.run.log({"val/examples": images}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def example_row(pair: Any, output: np.ndarray) -> np.ndarray:
    """Input (hole shown mid-grey, as the model sees it) | output | target, as one uint8 image."""
    shown = pair.image.copy()
    shown[pair.mask] = 128
    return np.concatenate([shown, output, pair.target], axis=1)


def open_tracker(config: TrainConfig, *, enabled: bool) -> Tracker:
    """A tracker for this worker: a W&B run on the main worker when tracking.wandb is on."""
    if not (enabled and config.tracking.wandb):
        return Tracker()
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    folder = Path(config.tracking.dir)
    folder.mkdir(parents=True, exist_ok=True)
    run_id = hashlib.sha256(f"{config.storage.rstrip('/')}/{config.name}".encode()).hexdigest()[:16]
    run = wandb.init(
        project=config.tracking.project,
        entity=config.tracking.entity,
        group=config.tracking.group or config.name,
        name=config.name,
        id=run_id,
        resume="allow",
        config=to_dict(config),
        dir=str(folder),
        mode=mode,
    )
    if mode == "offline":
        log.info(
            "W&B is offline (no WANDB_API_KEY): run written to %s; upload it with `wandb sync %s`",
            Path(run.dir).parent,
            Path(run.dir).parent,
        )
    return Tracker(run)
