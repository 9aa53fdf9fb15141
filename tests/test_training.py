"""Training runs on the session's Ray instance: overfitting, two workers, resume, and the LoRA in use."""

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

from casalimpia import faults
from casalimpia.config import DefurnishConfig, TrainConfig, load_config
from casalimpia.images import decode_image, decode_mask
from casalimpia.inpainting import LORA_WEIGHTS, Inpainter
from casalimpia.pipeline import JobError, execute, prepare
from casalimpia.synthetic import render_room, write_room_pairs
from casalimpia.training import runs, trainer

ROOT = Path(__file__).resolve().parents[1]


def demo_config(storage: Path, *overrides: str) -> TrainConfig:
    return load_config(
        ROOT / "configs/train_demo.yaml",
        [
            f"storage={storage}",
            f"data.rooms={ROOT / 'casalimpia/data/empty_rooms'}",
            f"data.library={ROOT / 'casalimpia/data/mask_library'}",
            "tracking.wandb=false",
            *overrides,
        ],
        TrainConfig,
    )


def test_two_workers_then_a_restarted_run_resumes_past_a_worker_death(
    ray_local, load_job, tmp_path, capsys, monkeypatch
):
    arguments = [
        "--config",
        "configs/train_demo.yaml",
        "--output",
        str(tmp_path),
        "--set",
        "epochs=1",
        "--set",
        "ray.workers=2",
        "--set",
        "ray.cpus_per_worker=0.25",
        "--set",
        f"tracking.dir={tmp_path / 'wandb'}",
    ]
    # The job's command line, run in this process on the session's Ray instance; W&B runs offline
    # as it does without a key (the session's workers were started without one).
    monkeypatch.chdir(ROOT)
    assert load_job("train").main(arguments) == 0
    done = capsys.readouterr().out
    assert "starting run" in done and "val/psnr_mask" in done and "LoRA: " in done
    run = tmp_path / "demo"
    assert {LORA_WEIGHTS, "config.yaml"} <= {p.name for p in (run / "lora").iterdir()}
    assert list((tmp_path / "wandb").glob("wandb/offline-run-*")), "W&B wrote an offline run"
    first = runs.read_epochs(str(run))
    steps = first[0]["step"]
    assert [row["epoch"] for row in first] == [1] and steps >= 1

    # Started again for a second epoch, in which worker 1 dies after its first step: FailureConfig
    # restarts both workers from the epoch 1 checkpoint and the run finishes.
    marker = tmp_path / "worker-died"
    monkeypatch.setenv(faults.FAULTS_ENV, f"train_worker={marker}")
    again = trainer.prepare(demo_config(tmp_path, "ray.workers=2", "ray.cpus_per_worker=0.25", "epochs=2"))
    assert again.resuming and again.steps_per_epoch == steps
    resumed = trainer.fit(again)
    assert marker.exists(), "a training worker died"
    # Epoch 1 is not trained again: its row is the first run's, and epoch 2 continues its step count.
    assert [(row["epoch"], row["step"]) for row in resumed.epochs] == [(1, steps), (2, 2 * steps)]
    assert resumed.epochs[0] == first[0]
    checkpoints = [p for p in run.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")]
    assert len(checkpoints) == 2
    # Every worker holds the AWS credentials in its environment; none of them reaches a file the
    # runs wrote: checkpoints, config.yaml, metrics, W&B's run files.
    secrets = [os.environ["AWS_SECRET_ACCESS_KEY"].encode(), os.environ["AWS_ACCESS_KEY_ID"].encode()]
    written = [path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()]
    assert len(written) > 10 and not any(secret in data for secret in secrets for data in written)


def test_overfitting_one_room_then_its_lora_changes_what_the_defurnishing_job_paints(ray_local, tmp_path):
    config = demo_config(
        tmp_path / "train", "data.overfit=true", "data.overfit_repeats=24", "data.shape_warmup_pct=0", "epochs=3"
    )
    plan = trainer.prepare(config)
    assert plan.train_rooms == plan.validation_rooms and len(plan.train_rooms) == 1
    summary = trainer.fit(plan)
    first, last = summary.epochs[0], summary.epochs[-1]
    print(
        f"overfit: loss {first['train/loss']:.4f} -> {last['train/loss']:.4f}, "
        f"psnr_mask {first['val/psnr_mask']:.3f} -> {last['val/psnr_mask']:.3f} dB"
    )
    assert [row["epoch"] for row in summary.epochs] == [1, 2, 3]
    assert last["train/loss"] < 0.7 * first["train/loss"]
    assert last["val/psnr_mask"] > first["val/psnr_mask"]
    # The exported LoRA is the best epoch's by checkpoint_metric (train_demo keeps the best two).
    assert summary.best_epoch == max(summary.epochs, key=lambda row: row["val/psnr_mask"])["epoch"]

    rooms = tmp_path / "rooms"
    write_room_pairs(rooms, count=2, seed=300)
    defurnish = load_config(
        ROOT / "configs/demo.yaml",
        [
            f"masking.masks={rooms / 'masks'}",
            "write.format=png",
            f"inpaint.lora={summary.output_uri}",
            "qa.max_residual=null",
        ],
        DefurnishConfig,
        {"input": str(rooms / "furnished"), "output": str(tmp_path / "out")},
    )
    assert execute(prepare(defurnish)).counts.get("ok") == 2
    names = sorted(path.name for path in (rooms / "furnished").iterdir())
    painted = [
        decode_image((tmp_path / "out/images" / name).read_bytes(), max_pixels=10**8, min_side=8) for name in names
    ]
    # What the job paints without the LoRA: the same stage, settings and per-photo seeds.
    photos = [decode_image((rooms / "furnished" / name).read_bytes(), max_pixels=10**8, min_side=8) for name in names]
    masks = [
        decode_mask((rooms / "masks" / f"{name}.png").read_bytes(), size=photo.shape[1::-1])
        for name, photo in zip(names, photos, strict=True)
    ]
    base = Inpainter(dataclasses.replace(defurnish.inpaint, lora=None)).paint(photos, masks, names)
    assert len(painted) == 2
    assert all(not np.array_equal(a, b) for a, b in zip(base, painted, strict=True))


def test_full_training_job_exports_a_model_for_inpaint_model(ray_local, load_job, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    arguments = ["--config", "configs/train_demo.yaml", "--output", str(tmp_path), "--set", "mode=full"]
    overrides = ["name=base", "epochs=1", "data.limit=2", "data.validation_rooms=1", "tracking.wandb=false"]
    assert load_job("train").main([*arguments, *(f"--set={item}" for item in overrides)]) == 0
    model = tmp_path / "base" / "model"
    assert f"model: {model}  (use it with --set inpaint.model={model})" in capsys.readouterr().out
    assert {"model_index.json", "config.yaml"} <= {p.name for p in model.iterdir()}
    assert (model / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (tmp_path / "base" / "lora").exists()

    # The de-furnishing job accepts it as it accepts a hub id, and it paints differently from its base.
    room = render_room(7, 64, 64)
    config = demo_config(tmp_path).inpaint
    painted = Inpainter(dataclasses.replace(config, model=str(model))).paint([room.furnished], [room.mask], ["a"])[0]
    base = Inpainter(config).paint([room.furnished], [room.mask], ["a"])[0]
    assert not np.array_equal(painted, base)
    assert np.array_equal(painted[~room.mask], room.furnished[~room.mask])


def test_prepare_fails_fast_with_one_line(tmp_path):
    with pytest.raises(JobError, match=r"^data: "):
        trainer.prepare(demo_config(tmp_path, f"data.rooms={tmp_path / 'nothing'}"))
    with pytest.raises(JobError, match=r"^inpaint\.model: "):
        trainer.prepare(demo_config(tmp_path, "inpaint.model=./models/missing"))
