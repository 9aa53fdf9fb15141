"""The training job's driver: check and plan on the driver, run a Ray Train TorchTrainer, export the result.

Everything under one run folder, ``<storage>/<name>/``::

    checkpoint_*/          Ray Train checkpoints (export, trained weights and optimizer state, config.yaml); best N kept
    lora/                  mode lora: the best checkpoint's LoRA and config.yaml, ready for ``inpaint.lora``
    model/                 mode full: the best checkpoint's inpainting pipeline folder, ready for ``inpaint.model``
    metrics.jsonl          one line of metrics per epoch
    config.yaml            the resolved config of the latest start

Starting a run with the same name and storage resumes it: Ray Train restores its checkpoint
bookkeeping from the run folder and the workers continue from the latest checkpoint's step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ray.train import UserCallback

from casalimpia import faults, storage
from casalimpia.config import TINY, TrainConfig, to_dict, to_yaml
from casalimpia.inpainting import LORA_WEIGHTS
from casalimpia.pipeline import JobError, absolute_model, absolute_uri, check_model
from casalimpia.training.loop import MODEL_DIR
from casalimpia.training.runs import RunPlan, RunSummary, fit_and_export, has_checkpoints, torch_trainer

log = logging.getLogger(__name__)

LORA_DIR = "lora"
IMAGE_COLUMNS = ["image", "target", "mask"]
COLUMNS = ("epoch", "step", "train/loss", "val/psnr", "val/psnr_mask", "val/ssim_mask", "val/lpips_mask")
"""Metrics of a training run shown in its log and table."""


@dataclass
class TrainPlan(RunPlan):
    """What a training run will do, decided on the driver before any Ray work."""

    config: TrainConfig
    train_rooms: list[str]
    validation_rooms: list[str]
    repeats: int
    """Times each training room appears per epoch (overfitting repeats its single room)."""
    warmup_epochs: int


def prepare(config: TrainConfig) -> TrainPlan:
    """Check the run can start and plan it; raises JobError with one line otherwise."""
    from casalimpia.training.data import load_library, overfit_rooms, split_rooms

    config = _absolute(config)
    check_model(config.inpaint.model, "inpaint.model")
    try:
        splits = split_rooms(config.data.rooms, config.data)
        load_library(config.data)
    except (ValueError, storage.StorageError) as error:
        raise JobError(f"data: {error}") from None
    if config.data.overfit:
        train, validation = overfit_rooms(splits)
        repeats = config.data.overfit_repeats
    else:
        train, validation, repeats = splits["train"], splits["validation"], 1
    if not validation:
        raise JobError(
            f"data.split: no validation rooms among {sum(map(len, splits.values()))} photos; "
            "raise the validation fraction or add rooms"
        )
    try:
        storage.ensure_writable(config.storage)
    except storage.StorageError as error:
        raise JobError(f"storage: {error}") from None
    # Ray Data splits the rows equally between workers, dropping the remainder.
    rows_per_worker = len(train) * repeats // config.ray.workers
    if rows_per_worker == 0:
        raise JobError(f"ray.workers: {config.ray.workers} workers but only {len(train) * repeats} training rows")
    micro_batches = math.ceil(rows_per_worker / config.batch_size)
    steps_per_epoch = math.ceil(micro_batches / config.optim.grad_accum)
    warmup_epochs = round(config.data.shape_warmup_pct * config.epochs)
    resuming = has_checkpoints(storage.join(config.storage, config.name))
    return TrainPlan(
        config=config,
        steps_per_epoch=steps_per_epoch,
        resuming=resuming,
        train_rooms=train,
        validation_rooms=validation,
        repeats=repeats,
        warmup_epochs=warmup_epochs,
    )


def _absolute(config: TrainConfig) -> TrainConfig:
    """Local paths made absolute: Ray workers do not share the driver's working directory."""
    data = config.data
    return dataclasses.replace(
        config,
        storage=absolute_uri(config.storage),
        data=dataclasses.replace(
            data, rooms=absolute_uri(data.rooms), library=data.library and absolute_uri(data.library)
        ),
        inpaint=dataclasses.replace(config.inpaint, model=absolute_model(config.inpaint.model)),
        tracking=dataclasses.replace(config.tracking, dir=str(Path(config.tracking.dir).resolve())),
    )


def fit(plan: TrainPlan, callbacks: Sequence[UserCallback] = ()) -> RunSummary:
    """Train on the connected Ray cluster; returns the summary after exporting the best LoRA.

    ``callbacks`` are added to the run's own (a sweep passes Tune's, which forwards every report).
    """
    import ray.train

    from casalimpia.training.data import train_dataset
    from casalimpia.training.loop import train_loop_per_worker

    config = plan.config
    if config.inpaint.model == TINY:
        log.warning("the tiny preset is in use: random weights, what is trained is for tests and demos only")
    storage.write_bytes(storage.join(plan.run_uri, "config.yaml"), to_yaml(config).encode())
    data, resources = config.data, config.ray
    datasets = {
        "train": train_dataset(
            data,
            plan.train_rooms,
            masks="fixed" if data.overfit else "library",
            seed=config.seed if data.overfit else None,
            num_cpus=resources.data_cpus,
            epoch_repeats=plan.repeats,
        ).select_columns(IMAGE_COLUMNS, num_cpus=resources.data_cpus)
    }
    if plan.warmup_epochs:
        datasets["warmup"] = train_dataset(
            data, plan.train_rooms, masks="shapes", seed=None, num_cpus=resources.data_cpus, epoch_repeats=plan.repeats
        ).select_columns(IMAGE_COLUMNS, num_cpus=resources.data_cpus)
    for dataset in datasets.values():
        # Each epoch re-executes the datasets in the workers' data coordinator; a progress bar
        # per epoch and operator would drown the run's log.
        dataset.context.enable_progress_bars = False
    trainer = torch_trainer(
        train_loop_per_worker,
        {
            "config": to_dict(config),
            "total_steps": plan.total_steps,
            "warmup_epochs": plan.warmup_epochs,
            "validation_rooms": plan.validation_rooms,
            "fault_marker": faults.armed("train_worker"),
        },
        config,
        datasets=datasets,
        shown=COLUMNS[2:],
        callbacks=callbacks,
        dataset_config=ray.train.DataConfig(datasets_to_split="all"),
    )
    full = config.mode == "full"

    def export(checkpoint: Path, output_uri: str) -> None:
        exported = checkpoint / MODEL_DIR if full else checkpoint
        files = [p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file()]
        for name in files if full else [LORA_WEIGHTS]:
            storage.write_bytes(storage.join(output_uri, name), (exported / name).read_bytes())
        storage.write_bytes(storage.join(output_uri, "config.yaml"), (checkpoint / "config.yaml").read_bytes())

    return fit_and_export(
        trainer,
        plan,
        export,
        output=MODEL_DIR if full else LORA_DIR,
        output_key="inpaint.model" if full else "inpaint.lora",
        columns=COLUMNS,
    )
