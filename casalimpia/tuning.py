"""Hyperparameter sweeps: many LoRA training runs drawn from a search space, weak ones stopped early.

Each Ray Tune trial is one full training run: the trial function starts a ``TorchTrainer`` with its
own workers (Ray's pattern now that ``Tuner(trainer)`` is deprecated) and Tune's
``TuneReportCallback`` forwards every epoch's report, so ASHA can compare trials at epoch
milestones and stop the weak ones. The trial function itself only waits on its trainer: it holds
a sliver of a CPU, and ``max_concurrent_trials`` keeps the workers of running trials within the
cluster (a trial's workers are invisible to Tune's own bookkeeping).

Everything lives under the sweep folder ``<train.storage>/<name>/``::

    tuner.pkl, experiment_state-*.json   Ray Tune's state: starting the same sweep again resumes it
    <trial id>/                          Tune's per-trial results (result.json, progress.csv)
    runs/<trial id>/                     the trial's training run: checkpoints, lora/, metrics.jsonl
    results.parquet                      one row per trial: status, epochs, best metric, parameters
    best_train.yaml                      the best trial's training config, ready for jobs/train.py
    config.yaml                          the sweep's resolved config

Resuming keeps finished trials as they are and restarts unfinished ones, whose training runs
continue from their latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import yaml
from ray.tune.schedulers import ASHAScheduler

from casalimpia import storage
from casalimpia.config import TuneConfig, build, to_yaml, with_values
from casalimpia.pipeline import JobError
from casalimpia.training import runs, trainer

log = logging.getLogger(__name__)

RUNS_DIR = "runs"
RESULTS_FILE = "results.parquet"
BEST_CONFIG_FILE = "best_train.yaml"
TRIAL_DRIVER_CPUS = 0.01
"""CPU held by each trial function: it only starts its trainer and waits for it."""
SHOWN_METRICS = ("train/loss", "val/psnr", "val/psnr_mask", "val/ssim_mask", "val/lpips_mask")


class ResumableASHA(ASHAScheduler):
    """ASHA whose milestones survive a resumed sweep.

    Tune saves its searcher's state but not its scheduler's, so a restored ASHA would judge the
    remaining trials against empty milestones. This one replays, for every trial Tune adds back,
    the epochs its training run recorded, so the milestones hold what they held before.
    """

    def __init__(self, *, sweep_uri: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sweep_uri = sweep_uri

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        bracket = self._trial_info[trial.trial_id]
        for row in runs.read_epochs(storage.join(self.sweep_uri, RUNS_DIR, trial.trial_id)):
            if _is_number(row.get(self._metric)):
                bracket.on_result(trial, row[self._time_attr], self._metric_op * row[self._metric])


@dataclass
class SweepPlan:
    """What a sweep will do, decided on the driver before any Ray work."""

    config: TuneConfig
    """The sweep's config, its base training config's local paths made absolute."""
    resuming: bool

    @property
    def sweep_uri(self) -> str:
        return storage.join(self.config.train.storage, self.config.name)


@dataclass
class SweepSummary:
    """What a finished sweep produced: one row per trial, best first."""

    sweep_uri: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_config_uri: str | None
    seconds: float
    interrupted: bool = False
    """Stopped before every trial ended: starting the same sweep again resumes it."""

    def table(self) -> str:
        """The trials as an aligned text table, best first."""
        if not self.trials:
            return "(no trials)"
        columns = ["trial", "status", "epochs", "best", *[c for c in self.trials[0] if c.startswith("param:")]]
        # Searched values are stored as JSON text; shown as the values they are.
        cells = [
            [_cell(json.loads(row[c]) if c.startswith("param:") else row.get(c)) for c in columns]
            for row in self.trials
        ]
        names = [column.removeprefix("param:") for column in columns]
        widths = [max(len(name), *(len(row[i]) for row in cells)) for i, name in enumerate(names)]
        lines = ["  ".join(name.ljust(width) for name, width in zip(names, widths, strict=True))]
        lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in cells]
        return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def prepare(config: TuneConfig) -> SweepPlan:
    """Check the sweep can start (its base training run can) and whether it resumes; raises JobError."""
    # The base run's own checks: data, model, storage. Its plan also pins local paths, which the
    # trials need: Tune starts them in folders of their own.
    base = trainer.prepare(dataclasses.replace(config.train, name=config.name)).config
    config = dataclasses.replace(config, train=dataclasses.replace(base, name=config.train.name))
    plan = SweepPlan(config, resuming=False)
    saved_uri = storage.join(plan.sweep_uri, "config.yaml")
    if storage.exists(saved_uri):
        saved = build(TuneConfig, yaml.safe_load(storage.read_bytes(saved_uri)))
        if saved.config_hash() != config.config_hash():
            raise JobError(
                f"name: sweep {plan.sweep_uri} was started with a different search or training config; "
                "resume it with the same config, or start a new sweep under another name"
            )
        plan.resuming = True
    return plan


def trial_config(config: TuneConfig, params: dict[str, Any], trial_id: str, sweep_uri: str) -> Any:
    """The training config of one trial: the base with the trial's values, its run under the sweep."""
    tracking = config.train.tracking
    return with_values(
        config.train,
        {
            **params,
            "name": trial_id,
            "storage": storage.join(sweep_uri, RUNS_DIR),
            # One W&B group per sweep; each trial's run is named by its trial id.
            "tracking.group": tracking.group or config.name,
        },
    )


def run_trial(params: dict[str, Any], *, config: TuneConfig, sweep_uri: str) -> None:
    """Tune function: one training run with the trial's parameters, its epochs reported to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    plan = trainer.prepare(trial_config(config, params, trial_id, sweep_uri))
    trainer.fit(plan, callbacks=[TuneReportCallback()])


def trial_dirname(trial: Any) -> str:
    """Tune's folder of a trial: its id, the same as its training run's name under runs/."""
    return trial.trial_id


def search_space(config: TuneConfig) -> dict[str, Any]:
    """Tune's param_space: one sampler per searched training key (dotted keys, as in the config)."""
    from ray import tune

    samplers = {
        "loguniform": lambda values: tune.loguniform(*values),
        "uniform": lambda values: tune.uniform(*values),
        "randint": lambda values: tune.randint(*values),
        "choice": tune.choice,
        "grid": tune.grid_search,
    }
    space = {}
    for key, spec in config.search_space().items():
        ((kind, values),) = spec.items()
        space[key] = samplers[kind](values)
    return space


def trial_count(config: TuneConfig) -> int:
    """Trials the sweep runs: the samples times the combinations of the grid keys."""
    grids = [spec["grid"] for spec in config.search_space().values() if "grid" in spec]
    return config.samples * math.prod(len(values) for values in grids)


def concurrent_trials(config: TuneConfig) -> int:
    """Trials that fit on the cluster at once: its GPUs (or CPUs) over what one trial's workers take."""
    import ray

    if config.max_concurrent_trials is not None:
        return config.max_concurrent_trials
    resources = ray.cluster_resources()
    workers = config.train.ray
    if workers.use_gpu:
        gpus_per_trial = workers.workers
        available = resources.get("GPU", 0.0)
        if available < gpus_per_trial:
            raise JobError(
                f"train.ray.workers: a trial needs {gpus_per_trial} GPU(s) and the cluster has {available:g}; "
                "set max_concurrent_trials to wait for an autoscaler to add GPU nodes"
            )
        return int(available // gpus_per_trial)
    cpus_per_trial = workers.workers * workers.cpus_per_worker + workers.data_cpus
    return max(1, int(resources.get("CPU", 1.0) // cpus_per_trial))


def run(plan: SweepPlan) -> SweepSummary:
    """Run (or resume) the sweep on the connected Ray cluster; writes the results and best config."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    config = plan.config
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, config=config, sweep_uri=plan.sweep_uri), {"CPU": TRIAL_DRIVER_CPUS}
    )
    start = time.perf_counter()
    if plan.resuming and tune.Tuner.can_restore(plan.sweep_uri):
        log.info("resuming sweep %s: finished trials are kept, unfinished ones continue", plan.sweep_uri)
        tuner = tune.Tuner.restore(plan.sweep_uri, trainable, resume_unfinished=True, resume_errored=True)
    else:
        storage.write_bytes(storage.join(plan.sweep_uri, "config.yaml"), to_yaml(config).encode())
        scheduler = (
            ResumableASHA(
                sweep_uri=plan.sweep_uri,
                time_attr="epoch",
                max_t=config.train.epochs,
                grace_period=config.grace_period,
                reduction_factor=config.reduction_factor,
                # A trial that reaches the last epoch ends on its own, after exporting its LoRA.
                stop_last_trials=False,
            )
            if config.scheduler == "asha"
            else FIFOScheduler()
        )
        concurrency = concurrent_trials(config)
        log.info("sweep %s: %d sample(s), %d trial(s) at a time", plan.sweep_uri, config.samples, concurrency)
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(config),
            tune_config=tune.TuneConfig(
                metric=config.metric,
                mode=config.mode,
                scheduler=scheduler,
                # The variant generator enforces the concurrency itself (Tune ignores
                # max_concurrent_trials next to it).
                search_alg=BasicVariantGenerator(random_state=config.seed, max_concurrent=concurrency),
                num_samples=config.samples,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(name=config.name, storage_path=config.train.storage, verbose=1),
        )
    grid = tuner.fit()
    seconds = time.perf_counter() - start
    trials = sorted(
        (trial_row(config, result, plan.sweep_uri) for result in grid),
        key=lambda row: _rank_key(row["best"], config.mode),
    )
    # After Ctrl-C (or SIGUSR1) Tune returns what it has; its saved state resumes the rest. A trial
    # that ended without an error reported at least one epoch, and every trial was generated.
    unfinished = [row for row in trials if row["status"] != "error" and row["epochs"] == 0]
    if unfinished or len(trials) < trial_count(config):
        return SweepSummary(plan.sweep_uri, [], None, None, seconds, interrupted=True)
    storage.write_rows(storage.join(plan.sweep_uri, RESULTS_FILE), trials)
    best = trials[0] if trials and _is_number(trials[0]["best"]) else None
    best_config_uri = None
    if best is not None:
        best_config_uri = storage.join(plan.sweep_uri, BEST_CONFIG_FILE)
        storage.write_bytes(best_config_uri, best_train_yaml(config, best).encode())
    return SweepSummary(plan.sweep_uri, trials, best, best_config_uri, seconds)


def trial_row(config: TuneConfig, result: Any, sweep_uri: str) -> dict[str, Any]:
    """One trial's row of the results table, read from its own training run's per-epoch metrics."""
    trial_id = (result.metrics or {}).get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1]
    run_uri = storage.join(sweep_uri, RUNS_DIR, trial_id)
    epochs = runs.read_epochs(run_uri)
    scored = [row for row in epochs if _is_number(row.get(config.metric))]
    sign = 1 if config.mode == "max" else -1
    best_epoch = max(scored, key=lambda row: sign * row[config.metric]) if scored else {}
    if result.error is not None:
        status = "error"
    elif len(epochs) < config.train.epochs:
        status = "stopped early"
    else:
        status = "finished"
    lora_uri = storage.join(run_uri, trainer.LORA_DIR)
    row: dict[str, Any] = {
        "trial": trial_id,
        "status": status,
        "epochs": len(epochs),
        "best": best_epoch.get(config.metric, math.nan),
        "best_epoch": best_epoch.get("epoch"),
        **{f"last:{name}": epochs[-1].get(name) if epochs else None for name in SHOWN_METRICS},
        **{f"param:{key}": _plain(value) for key, value in sorted(result.config.items())},
        "run": run_uri,
        "lora": lora_uri if storage.exists(storage.join(lora_uri, "config.yaml")) else "",
        "error": str(result.error).splitlines()[0][:300] if result.error is not None else "",
    }
    return row


def best_train_yaml(config: TuneConfig, best: dict[str, Any]) -> str:
    """The best trial's training config: the sweep's base with its values, named for a fresh run."""
    params = {key.removeprefix("param:"): json.loads(value) for key, value in best.items() if key.startswith("param:")}
    chosen = with_values(config.train, {**params, "name": f"{config.name}-best"})
    header = (
        f"# Best trial {best['trial']} of sweep {config.name}: {config.metric}={best['best']:.4f} "
        f"at epoch {best['best_epoch']}.\n# Its LoRA is already at {best['lora'] or best['run']}; "
        "train on with: python jobs/train.py --config best_train.yaml\n"
    )
    return header + to_yaml(chosen)


def read_results(sweep_uri: str) -> list[dict[str, Any]]:
    """The rows of a sweep's results.parquet, best first."""
    return storage.read_rows(storage.join(sweep_uri, RESULTS_FILE))


def _plain(value: Any) -> str:
    """A parameter value as JSON text: lists (target-module sets) and numbers in one string column."""
    return json.dumps(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rank_key(value: Any, mode: str) -> float:
    if not _is_number(value):
        return math.inf
    return -value if mode == "max" else value
