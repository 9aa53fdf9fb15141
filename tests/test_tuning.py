"""Sweeps on Ray Tune: every trial a training run, ASHA stopping the weak, an interrupted sweep resuming."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from casalimpia.config import ConfigError, TrainConfig, TuneConfig, load_config, to_dict
from casalimpia.pipeline import JobError
from casalimpia.training import trainer
from casalimpia.tuning import concurrent_trials, read_results, search_space, trial_config, trial_count
from casalimpia.tuning import prepare as prepare_sweep

ROOT = Path(__file__).resolve().parents[1]
# Three trials one after the other, in grid order, on the fast random `tiny` painter (the demo's
# toy one is for people). Guidance 50 and 40 make its validation paintings worse inside the mask
# than guidance 1, far more than one epoch of training moves them. ASHA (reduction factor 2) lets
# the first trial finish, stops the second at epoch 1 against the first, and the third against
# their median.
CONSTRUCTED = [
    "train.inpaint.model=tiny",
    "samples=1",
    "space={inpaint: {guidance_scale: {grid: [1.0, 50.0, 40.0]}}}",
    "grace_period=1",
    "reduction_factor=2",
    "max_concurrent_trials=1",
    "train.epochs=2",
    "train.data.limit=4",
    "train.data.validation_rooms=2",
    "train.inpaint.steps=2",
    "train.tracking.wandb=false",
]


def sweep_config(storage: Path, *extra: str) -> TuneConfig:
    values = {"train.storage": str(storage)}
    return load_config(ROOT / "configs/tune_demo.yaml", [*CONSTRUCTED, *extra], TuneConfig, values)


def test_search_space_config_checks_every_value_against_the_training_config(tmp_path):
    config = sweep_config(
        tmp_path, "space={optim: {learning_rate: {loguniform: [1e-5, 1e-3]}}, lora.rank: {choice: [4, 8]}}"
    )
    assert config.search_space() == {
        "optim.learning_rate": {"loguniform": [1e-5, 1e-3]},
        "lora.rank": {"choice": [4, 8]},
    }
    space = search_space(config)
    assert 1e-5 <= space["optim.learning_rate"].sample() <= 1e-3 and space["lora.rank"].sample() in (4, 8)
    for bad, message in [
        ("space={optim: {nesterov: {choice: [true]}}}", "space.optim.nesterov: is not a key"),
        ("space={lora: {rank: {choice: [0, 8]}}}", r"space.lora.rank: value 0 is not valid \(lora.rank"),
        ("space={optim: {learning_rate: {uniform: [0.1]}}}", "uniform takes \\[low, high\\]"),
        ("space={storage: {choice: [a, b]}}", "set by the sweep"),
        ("grace_period=3", "grace_period: must be in \\[1, train.epochs\\]"),
    ]:
        with pytest.raises(ConfigError, match=message):
            sweep_config(tmp_path, bad)


def test_trial_config_puts_each_trial_under_the_sweep(tmp_path):
    config = sweep_config(tmp_path)
    trial = trial_config(config, {"optim.learning_rate": 0.003, "inpaint.guidance_scale": 4.0}, "abc_00001", "S")
    assert (trial.name, trial.storage, trial.tracking.group) == ("abc_00001", "S/runs", config.name)
    assert (trial.optim.learning_rate, trial.inpaint.guidance_scale) == (0.003, 4.0)
    assert to_dict(trial.data) == to_dict(config.train.data)


def test_concurrency_follows_what_one_trial_takes_of_the_cluster(ray_local, tmp_path):
    # The session's instance has 2 CPUs and no GPU; a demo trial takes 0.5 (worker) + 0.25 (data).
    assert concurrent_trials(sweep_config(tmp_path, "max_concurrent_trials=null")) == 2
    assert concurrent_trials(sweep_config(tmp_path, "max_concurrent_trials=null", "train.ray.workers=3")) == 1
    assert concurrent_trials(sweep_config(tmp_path)) == 1  # set explicitly
    gpu = sweep_config(tmp_path, "max_concurrent_trials=null", "train.ray.use_gpu=true", "train.ray.workers=2")
    with pytest.raises(JobError, match="a trial needs 2 GPU"):
        concurrent_trials(gpu)
    assert trial_count(sweep_config(tmp_path, "samples=2")) == 6  # 2 samples of a 3-value grid


def test_sweep_stops_the_weak_trial_and_resumes_without_rerunning_finished_ones(ray_local, load_job, tmp_path, capsys):
    sweep = tmp_path / "demo-sweep"
    arguments = ["--config", str(ROOT / "configs/tune_demo.yaml"), "--output", str(tmp_path)]
    for item in CONSTRUCTED:
        arguments += ["--set", item]
    tune_job = load_job("tune")

    def first_trial_done() -> bool:
        runs = list((sweep / "runs").glob("*")) if (sweep / "runs").is_dir() else []
        return len(runs) >= 2 and any((run / "lora" / "config.yaml").exists() for run in runs)

    # Ctrl-C once the first trial has ended and the second has started, as a user would press it.
    watcher = threading.Thread(target=_interrupt_when, args=(first_trial_done, 600), daemon=True)
    watcher.start()
    assert tune_job.main(arguments) == 130
    watcher.join()
    assert "run the same command again to resume" in capsys.readouterr().out
    (first,) = [run for run in (sweep / "runs").iterdir() if (run / "lora").is_dir()]
    finished = {path: path.stat().st_mtime_ns for path in first.rglob("*") if path.is_file()}
    assert not (sweep / "results.parquet").exists()

    assert tune_job.main(arguments) == 0
    printed = capsys.readouterr().out
    assert "resuming sweep" in printed and "stopped early" in printed and "best trial" in printed
    trials = read_results(str(sweep))
    by_guidance = {row["param:inpaint.guidance_scale"]: row for row in trials}
    assert set(by_guidance) == {"1.0", "50.0", "40.0"}
    assert by_guidance["1.0"]["trial"] == first.name and by_guidance["1.0"]["status"] == "finished"
    assert by_guidance["1.0"]["epochs"] == 2
    for weak in ("50.0", "40.0"):
        assert by_guidance[weak]["status"] == "stopped early" and by_guidance[weak]["epochs"] == 1
    # The trial that had finished before the interruption was not trained again.
    assert {path: path.stat().st_mtime_ns for path in finished} == finished
    assert [row["best"] for row in trials] == sorted((row["best"] for row in trials), reverse=True)

    best = trials[0]
    assert best["param:inpaint.guidance_scale"] == "1.0" and (Path(best["lora"]) / "config.yaml").exists()
    # best_train.yaml is a training config the training job takes as it is.
    best_uri = sweep / "best_train.yaml"
    assert best_uri.read_text().startswith(f"# Best trial {best['trial']}")
    best_config = load_config(best_uri, cls=TrainConfig)
    assert best_config.inpaint.guidance_scale == float(best["param:inpaint.guidance_scale"])
    assert best_config.storage == str(tmp_path)
    assert trainer.prepare(best_config).config.name == "demo-sweep-best"


def _interrupt_when(condition, timeout: float) -> None:
    """Send this process SIGINT once condition() holds (Tune, running in the main thread, catches it)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGINT)


def test_a_changed_config_does_not_resume_someone_elses_sweep(tmp_path):
    plan = prepare_sweep(sweep_config(tmp_path))
    (Path(plan.sweep_uri) / "config.yaml").parent.mkdir(parents=True)
    (Path(plan.sweep_uri) / "config.yaml").write_text(yaml.safe_dump(to_dict(plan.config)))
    assert prepare_sweep(sweep_config(tmp_path)).resuming
    with pytest.raises(JobError, match="different search or training config"):
        prepare_sweep(sweep_config(tmp_path, "train.epochs=3"))
