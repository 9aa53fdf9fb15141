"""Sweeps on Ray Tune: every trial a training run, ASHA stopping the weak, an interrupted sweep resuming."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from casalimpia.config import ConfigError, TrainConfig, TuneConfig, load_config, to_dict
from casalimpia.training import trainer
from casalimpia.tuning import best_train_yaml, read_results, search_space, trial_config
from casalimpia.tuning import prepare as prepare_sweep
from casalimpia.tuning import run as run_sweep

ROOT = Path(__file__).resolve().parents[1]
# Three trials one after the other, in grid order. Guidance 50 makes the tiny model's validation
# paintings about 0.8 dB worse inside the mask than guidance 1 or 4 (measured), far more than one
# epoch of training moves them: ASHA must stop that trial at epoch 1 and let the others finish.
CONSTRUCTED = [
    "samples=1",
    "space={inpaint: {guidance_scale: {grid: [1.0, 50.0, 4.0]}}}",
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


def test_sweep_stops_the_weak_trial_and_resumes_without_rerunning_finished_ones(ray_local, tmp_path):
    sweep = tmp_path / "demo-sweep"
    command = [sys.executable, "jobs/tune.py", "--config", "configs/tune_demo.yaml", "--output", str(tmp_path)]
    for item in CONSTRUCTED:
        command += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE", "RAY_ADDRESS")}
    # Its own Ray instance, as users run it; stopped with Ctrl-C once the first trial has ended.
    job = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    output = []
    try:
        deadline = time.monotonic() + 400
        for line in job.stdout:
            output.append(line)
            if "_00001 started" in line or time.monotonic() > deadline:
                break
        job.send_signal(signal.SIGINT)
        output += job.stdout.readlines()
        job.wait(timeout=120)
    finally:
        job.kill()
    text = "".join(output)
    assert "_00001 started" in text, text[-3000:]
    assert job.returncode == 130 and "run the same command again to resume" in text, text[-3000:]
    (first,) = [run for run in (sweep / "runs").iterdir() if (run / "lora").is_dir()]
    finished = {path: path.stat().st_mtime_ns for path in first.rglob("*") if path.is_file()}
    assert not (sweep / "results.parquet").exists()

    plan = prepare_sweep(sweep_config(tmp_path))
    assert plan.resuming
    summary = run_sweep(plan)
    assert not summary.interrupted
    print(summary.table())
    by_guidance = {row["param:inpaint.guidance_scale"]: row for row in summary.trials}
    assert set(by_guidance) == {"1.0", "50.0", "4.0"}
    assert by_guidance["1.0"]["trial"] == first.name and by_guidance["1.0"]["status"] == "finished"
    assert by_guidance["50.0"]["status"] == "stopped early" and by_guidance["50.0"]["epochs"] == 1
    assert by_guidance["4.0"]["status"] == "finished" and by_guidance["4.0"]["epochs"] == 2
    # The trial that had finished before the interruption was not trained again.
    assert {path: path.stat().st_mtime_ns for path in finished} == finished
    assert [row["trial"] for row in read_results(str(sweep))] == [row["trial"] for row in summary.trials]

    best = summary.best
    assert best["param:inpaint.guidance_scale"] != "50.0" and best["lora"]
    # best_train.yaml is a training config the training job takes as it is.
    best_config = load_config(summary.best_config_uri, cls=TrainConfig)
    assert best_config.inpaint.guidance_scale == float(best["param:inpaint.guidance_scale"])
    assert trainer.prepare(best_config).config.name == "demo-sweep-best"
    assert yaml.safe_load(Path(summary.best_config_uri).read_text())["storage"] == str(tmp_path)
    assert best_train_yaml(plan.config, best).startswith("# Best trial")


def test_a_changed_config_does_not_resume_someone_elses_sweep(tmp_path):
    plan = prepare_sweep(sweep_config(tmp_path))
    (Path(plan.sweep_uri) / "config.yaml").parent.mkdir(parents=True)
    (Path(plan.sweep_uri) / "config.yaml").write_text(yaml.safe_dump(to_dict(plan.config)))
    assert prepare_sweep(sweep_config(tmp_path)).resuming
    with pytest.raises(Exception, match="different search or training config"):
        prepare_sweep(sweep_config(tmp_path, "train.epochs=3"))
