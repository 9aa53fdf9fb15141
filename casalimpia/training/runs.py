"""What every training job's driver shares: the run folder, its per-epoch metrics, the best checkpoint.

A run lives in one folder, ``<storage>/<name>/``, where Ray Train keeps its ``checkpoint_*/`` and
:class:`EpochLog` writes ``metrics.jsonl``; starting a run with the same name and storage resumes it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from casalimpia import storage
from casalimpia.config import RunConfig

METRICS_FILE = "metrics.jsonl"


@dataclass
class RunPlan:
    """What a training run will do, decided on the driver before any Ray work."""

    config: RunConfig
    steps_per_epoch: int
    resuming: bool

    @property
    def run_uri(self) -> str:
        return storage.join(self.config.storage, self.config.name)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs


@dataclass
class RunSummary:
    """What a finished run produced."""

    run_uri: str
    output_uri: str
    """What the best epoch exported."""
    output_key: str
    """The setting of the de-furnishing job that takes output_uri (e.g. inpaint.lora)."""
    best_epoch: int
    best_score: float
    epochs: list[dict[str, Any]]
    seconds: float
    columns: Sequence[str]
    """Metrics shown per epoch in the table."""

    def table(self) -> str:
        """Per-epoch metrics, one row per epoch."""
        return epoch_table(self.epochs, self.columns)


def fit_and_export(
    trainer: Any,
    plan: RunPlan,
    export: Callable[[Path, str], None],
    *,
    output: str,
    output_key: str,
    columns: Sequence[str],
) -> RunSummary:
    """Run a TorchTrainer, then ``export(best checkpoint folder, output_uri)`` into ``<run>/<output>``."""
    config = plan.config
    start = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - start
    best, metrics = best_checkpoint(result, config.checkpoint_metric, config.checkpoint_mode)
    output_uri = storage.join(plan.run_uri, output)
    with best.as_directory() as folder:
        export(Path(folder), output_uri)
    return RunSummary(
        run_uri=plan.run_uri,
        output_uri=output_uri,
        output_key=output_key,
        best_epoch=int(metrics.get("epoch", 0)),
        best_score=float(metrics.get(config.checkpoint_metric, math.nan)),
        epochs=read_epochs(plan.run_uri),
        seconds=seconds,
        columns=columns,
    )


def has_checkpoints(run_uri: str) -> bool:
    """Whether a run folder holds a checkpoint, i.e. whether starting it again resumes it."""
    try:
        return any(path.startswith("checkpoint_") for path in storage.list_files(run_uri))
    except storage.StorageError:
        return False


def torch_trainer(
    loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    config: RunConfig,
    *,
    datasets: dict[str, Any],
    shown: Sequence[str],
    callbacks: Sequence[UserCallback] = (),
    **options: Any,
) -> Any:
    """A Ray Train TorchTrainer for a run: its workers, checkpoint ranking, fault tolerance and epoch log.

    ``shown`` names the metrics each epoch's log line prints; ``options`` go to the TorchTrainer.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    resources = config.ray
    worker_resources = {"CPU": resources.cpus_per_worker}
    if resources.use_gpu:
        worker_resources["GPU"] = 1
    run_uri = storage.join(config.storage, config.name)
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
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
            callbacks=[EpochLog(run_uri, shown), *callbacks],
        ),
        datasets=datasets,
        **options,
    )


def epoch_table(epochs: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """Per-epoch metrics as text, one row per epoch and one column per metric name."""
    lines = ["  ".join(f"{name:>13}" for name in columns)]
    for row in epochs:
        lines.append("  ".join(_cell(row.get(name)) for name in columns))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:>13.4f}"
    return f"{'' if value is None else value:>13}"


def best_checkpoint(result: Any, metric: str, mode: str) -> tuple[Any, dict[str, Any]]:
    """The kept checkpoint of a Ray Train result with the best metric, and its metrics.

    ``mode`` is 'max' or 'min'; when no kept checkpoint has a finite score, the latest one wins.
    """
    scored = [
        (checkpoint, metrics)
        for checkpoint, metrics in result.best_checkpoints or []
        if isinstance(metrics.get(metric), (int, float)) and math.isfinite(metrics[metric])
    ]
    if not scored:
        return result.checkpoint, result.metrics or {}
    sign = 1 if mode == "max" else -1
    return max(scored, key=lambda item: sign * item[1][metric])


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


def _epoch_line(metrics: dict[str, Any], shown: Sequence[str]) -> str:
    values = " ".join(f"{name}={metrics[name]:.4f}" for name in shown if name in metrics)
    return f"epoch {metrics.get('epoch')} step {metrics.get('step')}: {values}"


class EpochLog(UserCallback):
    """Ray Train callback (runs in the controller): prints each epoch's metrics and appends them to the run.

    Each report rewrites the whole ``metrics.jsonl``, which object storage needs (no appends) and
    which stays small (one line per epoch). A resumed run's repeated epochs replace the old lines.
    ``shown`` names the metrics printed.
    """

    def __init__(self, run_uri: str, shown: Sequence[str]) -> None:
        self.run_uri = run_uri
        self.shown = shown

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        main = {key: value for key, value in metrics[0].items() if isinstance(value, (int, float, str))}
        print(_epoch_line(main, self.shown), flush=True)
        epochs = [row for row in read_epochs(self.run_uri) if row["epoch"] < main["epoch"]] + [main]
        text = "".join(json.dumps(row, allow_nan=True) + "\n" for row in epochs)
        storage.write_bytes(storage.join(self.run_uri, METRICS_FILE), text.encode())

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for rank, error in worker_exceptions.items():
            print(f"worker {rank} failed: {str(error).splitlines()[0][:300]}", flush=True)
