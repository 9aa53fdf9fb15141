"""The training job's driver: check and plan on the driver, run a Ray Train TorchTrainer, export the LoRA.

Everything under one run folder, ``<storage>/<name>/``::

    checkpoint_*/          Ray Train checkpoints (LoRA, optimizer/schedule state, config.yaml); best N kept
    lora/                  the best checkpoint's LoRA and config.yaml: ready for ``inpaint.lora``
    metrics.jsonl          one line of metrics per epoch
    config.yaml            the resolved config of the latest start

Starting a run with the same name and storage resumes it: Ray Train restores its checkpoint
bookkeeping from the run folder and the workers continue from the latest checkpoint's step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from casalimpia import faults, storage
from casalimpia.config import TINY, TrainConfig, to_dict, to_yaml
from casalimpia.inpainting import LORA_WEIGHTS
from casalimpia.pipeline import JobError, absolute_model, absolute_uri, check_model

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LORA_DIR = "lora"
IMAGE_COLUMNS = ["image", "target", "mask"]


@dataclass
class TrainPlan:
    """What a training run will do, decided on the driver before any Ray work."""

    config: TrainConfig
    train_rooms: list[str]
    validation_rooms: list[str]
    repeats: int
    """Times each training room appears per epoch (overfitting repeats its single room)."""
    steps_per_epoch: int
    warmup_epochs: int
    resuming: bool

    @property
    def run_uri(self) -> str:
        return storage.join(self.config.storage, self.config.name)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs


@dataclass
class TrainSummary:
    """What a finished run produced."""

    run_uri: str
    lora_uri: str
    best_epoch: int
    best_score: float
    epochs: list[dict[str, Any]]
    seconds: float

    def table(self) -> str:
        """Per-epoch metrics, one row per epoch."""
        columns = ["epoch", "step", "train/loss", "val/psnr", "val/psnr_mask", "val/ssim_mask", "val/lpips_mask"]
        lines = ["  ".join(f"{name:>13}" for name in columns)]
        for row in self.epochs:
            lines.append("  ".join(_cell(row.get(name)) for name in columns))
        return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:>13.4f}"
    return f"{'' if value is None else value:>13}"


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
    run_uri = storage.join(config.storage, config.name)
    resuming = any(path.startswith("checkpoint_") for path in _listing(run_uri))
    return TrainPlan(config, train, validation, repeats, steps_per_epoch, warmup_epochs, resuming)


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


def _listing(uri: str) -> list[str]:
    try:
        return storage.list_files(uri)
    except storage.StorageError:
        return []


def fit(plan: TrainPlan, callbacks: Sequence[UserCallback] = ()) -> TrainSummary:
    """Train on the connected Ray cluster; returns the summary after exporting the best LoRA.

    ``callbacks`` are added to the run's own (a sweep passes Tune's, which forwards every report).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from casalimpia.training.data import train_dataset
    from casalimpia.training.loop import train_loop_per_worker

    config = plan.config
    if config.inpaint.model == TINY:
        log.warning("the tiny preset is in use: random weights, the LoRA is for tests and demos only")
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
    worker_resources = {"CPU": resources.cpus_per_worker}
    if resources.use_gpu:
        worker_resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": to_dict(config),
            "total_steps": plan.total_steps,
            "warmup_epochs": plan.warmup_epochs,
            "validation_rooms": plan.validation_rooms,
            "fault_marker": faults.armed("train_worker"),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.workers,
            use_gpu=resources.use_gpu,
            resources_per_worker=worker_resources,
            accelerator_type=resources.accelerator_type,
        ),
        run_config=ray.train.RunConfig(
            name=config.name,
            storage_path=config.storage,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.keep_checkpoints,
                checkpoint_score_attribute=config.checkpoint_metric,
                checkpoint_score_order=config.checkpoint_mode,
            ),
            failure_config=ray.train.FailureConfig(max_failures=resources.max_failures),
            callbacks=[EpochLog(plan.run_uri), *callbacks],
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split="all"),
    )
    start = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - start
    best, metrics = _best_checkpoint(result, config)
    lora_uri = storage.join(plan.run_uri, LORA_DIR)
    with best.as_directory() as folder:
        for name in (LORA_WEIGHTS, "config.yaml"):
            storage.write_bytes(storage.join(lora_uri, name), Path(folder, name).read_bytes())
    return TrainSummary(
        run_uri=plan.run_uri,
        lora_uri=lora_uri,
        best_epoch=int(metrics.get("epoch", 0)),
        best_score=float(metrics.get(config.checkpoint_metric, math.nan)),
        epochs=read_epochs(plan.run_uri),
        seconds=seconds,
    )


def _best_checkpoint(result: Any, config: TrainConfig) -> tuple[Any, dict[str, Any]]:
    """The kept checkpoint with the best score; the latest one when no score is a number."""
    scored = [
        (checkpoint, metrics)
        for checkpoint, metrics in result.best_checkpoints or []
        if isinstance(metrics.get(config.checkpoint_metric), (int, float))
        and math.isfinite(metrics[config.checkpoint_metric])
    ]
    if not scored:
        return result.checkpoint, result.metrics or {}
    sign = 1 if config.checkpoint_mode == "max" else -1
    return max(scored, key=lambda item: sign * item[1][config.checkpoint_metric])


def read_epochs(run_uri: str) -> list[dict[str, Any]]:
    """The per-epoch metrics of a run, one dict per epoch (the latest report of each)."""
    uri = storage.join(run_uri, METRICS_FILE)
    if not storage.exists(uri):
        return []
    by_epoch = {}
    for line in storage.read_bytes(uri).decode().splitlines():
        row = json.loads(line)
        by_epoch[row["epoch"]] = row
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def _epoch_line(metrics: dict[str, Any]) -> str:
    shown = ("train/loss", "val/psnr", "val/psnr_mask", "val/ssim_mask", "val/lpips_mask")
    values = " ".join(f"{name}={metrics[name]:.4f}" for name in shown if name in metrics)
    return f"epoch {metrics.get('epoch')} step {metrics.get('step')}: {values}"


class EpochLog(UserCallback):
    """Ray Train callback (runs in the controller): prints each epoch's metrics and appends them to the run.

    Each report rewrites the whole ``metrics.jsonl``, which object storage needs (no appends) and
    which stays small (one line per epoch). A resumed run's repeated epochs replace the old lines.
    """

    def __init__(self, run_uri: str) -> None:
        self.run_uri = run_uri

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        main = {key: value for key, value in metrics[0].items() if isinstance(value, (int, float, str))}
        print(_epoch_line(main), flush=True)
        epochs = [row for row in read_epochs(self.run_uri) if row["epoch"] < main["epoch"]] + [main]
        text = "".join(json.dumps(row, allow_nan=True) + "\n" for row in epochs)
        storage.write_bytes(storage.join(self.run_uri, METRICS_FILE), text.encode())

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for rank, error in worker_exceptions.items():
            print(f"worker {rank} failed: {str(error).splitlines()[0][:300]}", flush=True)
