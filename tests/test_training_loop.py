"""The training worker without Ray: precision, steps, accumulation, non-finite losses, checkpoints."""

import dataclasses

import numpy as np
import pytest
import torch

from casalimpia.config import TrainConfig, build
from casalimpia.inpainting import LORA_WEIGHTS, Inpainter
from casalimpia.synthetic import render_room
from casalimpia.training.data import Pair
from casalimpia.training.loop import MODEL_DIR, InpaintingTrainer
from casalimpia.training.worker import TRAINING_STATE, NonFiniteLossError, resolve_precision

CPU = torch.device("cpu")
SIZE = 64


def tiny_config(**values) -> TrainConfig:
    data = {
        "storage": "/tmp/unused",
        "data": {"rooms": "/tmp/unused", "library": "/tmp/unused", "resolution": SIZE},
        "inpaint": {"model": "tiny", "resolution": SIZE, "steps": 2},
        "batch_size": 2,
        "tracking": {"wandb": False},
    }
    for key, value in values.items():
        section, _, name = key.rpartition("__")
        (data.setdefault(section, {}) if section else data)[name] = value
    return build(TrainConfig, data)


def room_pair(seed: int = 1) -> Pair:
    room = render_room(seed, SIZE, SIZE)
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[20:48, 12:40] = True
    return Pair(source=f"room_{seed}.png", image=room.empty, target=room.empty, mask=mask)


def batch_of(pair: Pair, count: int = 2) -> dict[str, torch.Tensor]:
    return {
        "image": torch.from_numpy(np.stack([pair.image] * count)),
        "target": torch.from_numpy(np.stack([pair.target] * count)),
        "mask": torch.from_numpy(np.stack([pair.mask] * count).astype(np.uint8)),
    }


def trained_weights(trainer: InpaintingTrainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.unet.named_parameters() if p.requires_grad}


def test_precision_on_the_cpu():
    auto = resolve_precision("auto", CPU)
    assert auto.autocast is None and auto.weights == torch.float32 and not auto.scaler
    bf16 = resolve_precision("bf16", CPU)
    assert bf16.autocast == torch.bfloat16 and bf16.weights == torch.float32 and not bf16.scaler
    fp16 = resolve_precision("fp16", CPU)
    assert fp16.autocast == torch.float16 and fp16.scaler
    if torch.cuda.is_available():
        gpu = resolve_precision("fp16", torch.device("cuda"))
        assert gpu.weights == torch.float16


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_mixed_precision_steps_stay_finite_and_train_only_the_lora(precision):
    trainer = InpaintingTrainer(tiny_config(precision=precision, optim__learning_rate=1e-3), CPU, total_steps=3)
    frozen = {name: p.detach().clone() for name, p in trainer.unet.named_parameters() if not p.requires_grad}
    before = trained_weights(trainer)
    assert all(p.dtype == torch.float32 for p in trainer.parameters), "LoRA weights stay fp32"
    losses = [trainer.train_batch(batch_of(room_pair())) for _ in range(3)]
    assert all(loss is not None and np.isfinite(loss) for loss in losses)
    assert trainer.optimisation.step == 3 and trainer.optimisation.nonfinite == 0
    after = trained_weights(trainer)
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert all(torch.equal(frozen[name], p) for name, p in trainer.unet.named_parameters() if name in frozen)


def test_gradient_accumulation_steps_once_per_window():
    trainer = InpaintingTrainer(tiny_config(optim__grad_accum=2), CPU, total_steps=2)
    pair = room_pair()
    trainer.train_batch(batch_of(pair))
    assert trainer.optimisation.step == 0
    trainer.train_batch(batch_of(pair))
    assert trainer.optimisation.step == 1
    trainer.train_batch(batch_of(pair))
    trainer.optimisation.finish_epoch()  # the partial window left at the end of an epoch still counts
    assert trainer.optimisation.step == 2
    trainer.optimisation.finish_epoch()
    assert trainer.optimisation.step == 2


def test_nonfinite_losses_skip_steps_then_stop_the_run():
    trainer = InpaintingTrainer(tiny_config(optim__max_nonfinite=3), CPU, total_steps=10)
    assert trainer.train_batch(batch_of(room_pair())) is not None
    with torch.no_grad():
        trainer.parameters[0].fill_(float("nan"))  # a diverged adapter
    assert trainer.train_batch(batch_of(room_pair())) is None
    assert trainer.train_batch(batch_of(room_pair())) is None
    assert trainer.optimisation.nonfinite == 2 and trainer.optimisation.step == 1
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite losses in a row.*optim\.learning_rate"):
        trainer.train_batch(batch_of(room_pair()))


ATTENTION = ["to_k", "to_q", "to_v", "to_out.0"]


# Attention and convolutions are keyed differently in diffusers' older LoRA format: the saved adapter must
# load back whole either way, and with its alpha (which the weights' shapes cannot tell).
@pytest.mark.parametrize("targets", [ATTENTION, [*ATTENTION, "conv1", "conv2"]], ids=["attention", "with_convs"])
def test_checkpoint_round_trip_and_the_lora_paints_in_the_defurnishing_inpainter(tmp_path, targets):
    config = tiny_config(
        optim__learning_rate=5e-2,
        optim__lr_scheduler="cosine",
        optim__warmup_steps=1,
        lora__rank=4,
        lora__alpha=8,
        lora__target_modules=targets,
    )
    trainer = InpaintingTrainer(config, CPU, total_steps=8)
    for _ in range(4):
        trainer.train_batch(batch_of(room_pair()))
    trainer.save_checkpoint(tmp_path, epoch=1)
    assert {LORA_WEIGHTS, TRAINING_STATE, "config.yaml"} <= {p.name for p in tmp_path.iterdir()}

    resumed = InpaintingTrainer(config, CPU, total_steps=8)
    state = torch.load(tmp_path / TRAINING_STATE, weights_only=False)
    resumed.load_state_dict(state)
    assert state["epoch"] == 1 and resumed.optimisation.step == 4
    assert resumed.optimisation.learning_rate == pytest.approx(trainer.optimisation.learning_rate)
    original, restored = trained_weights(trainer), trained_weights(resumed)
    assert all(torch.equal(original[name], restored[name]) for name in original)

    pair = room_pair(2)
    plain = Inpainter(config.inpaint).paint([pair.image], [pair.mask], [pair.source])[0]
    with_lora = Inpainter(dataclasses.replace(config.inpaint, lora=str(tmp_path)))
    painted = with_lora.paint([pair.image], [pair.mask], [pair.source])[0]
    assert not np.array_equal(painted, plain)
    assert np.array_equal(painted[~pair.mask], pair.image[~pair.mask])
    # Validation paints with the adapter the trainer holds: the same pixels as the saved LoRA, fused.
    _, outputs = trainer.validate([pair])
    assert np.abs(outputs[0].astype(int) - painted.astype(int)).max() <= 2


def test_full_training_trains_every_unet_weight_and_exports_a_model_the_inpainter_loads(tmp_path):
    config = tiny_config(mode="full", optim__learning_rate=1e-3)
    trainer = InpaintingTrainer(config, CPU, total_steps=4)
    unet = dict(trainer.unet.named_parameters())
    assert {name for name, p in unet.items() if p.requires_grad} == set(unet)
    assert not any(p.requires_grad for p in trainer.pipe.vae.parameters())
    before = trained_weights(trainer)
    for _ in range(2):
        trainer.train_batch(batch_of(room_pair()))
    after = trained_weights(trainer)
    changed = sum(not torch.equal(before[name], after[name]) for name in before)
    assert changed > 0.9 * len(before)
    trainer.save_checkpoint(tmp_path, epoch=0)
    assert (tmp_path / MODEL_DIR / "model_index.json").is_file() and not (tmp_path / LORA_WEIGHTS).exists()

    resumed = InpaintingTrainer(config, CPU, total_steps=4)
    resumed.load_state_dict(torch.load(tmp_path / TRAINING_STATE, weights_only=False))
    assert all(torch.equal(after[name], p) for name, p in trained_weights(resumed).items())
    with pytest.raises(ValueError, match="mode 'lora'"):
        InpaintingTrainer(tiny_config(), CPU, total_steps=4).load_state_dict(
            torch.load(tmp_path / TRAINING_STATE, weights_only=False)
        )

    # The exported folder is a model like any other: the de-furnishing inpainter paints with it
    # exactly what validation painted.
    pair = room_pair(2)
    exported = Inpainter(dataclasses.replace(config.inpaint, model=str(tmp_path / MODEL_DIR)))
    painted = exported.paint([pair.image], [pair.mask], [pair.source])[0]
    _, outputs = trainer.validate([pair])
    assert np.array_equal(outputs[0], painted)
    base = Inpainter(config.inpaint).paint([pair.image], [pair.mask], [pair.source])[0]
    assert not np.array_equal(base, painted)


def test_moving_average_is_what_validation_paints_and_what_resumes(tmp_path):
    config = tiny_config(mode="full", optim__learning_rate=1e-2, optim__ema_decay=0.9)
    trainer = InpaintingTrainer(config, CPU, total_steps=6)
    for _ in range(3):
        trainer.train_batch(batch_of(room_pair()))
    raw = trained_weights(trainer)
    with trainer.optimisation.averaged():
        averaged = trained_weights(trainer)
    assert trained_weights(trainer).keys() == raw.keys()
    assert all(torch.equal(raw[name], p) for name, p in trained_weights(trainer).items()), "weights restored"
    assert any(not torch.equal(raw[name], averaged[name]) for name in raw)

    # Validation and the export both use the average.
    trainer.save_checkpoint(tmp_path, epoch=0)
    pair = room_pair(2)
    _, outputs = trainer.validate([pair])
    exported = Inpainter(dataclasses.replace(config.inpaint, model=str(tmp_path / MODEL_DIR)))
    assert np.array_equal(outputs[0], exported.paint([pair.image], [pair.mask], [pair.source])[0])

    # A resumed run continues the same average from the same raw weights.
    resumed = InpaintingTrainer(config, CPU, total_steps=6)
    resumed.load_state_dict(torch.load(tmp_path / TRAINING_STATE, weights_only=False))
    assert all(torch.equal(raw[name], p) for name, p in trained_weights(resumed).items())
    with resumed.optimisation.averaged():
        assert all(torch.equal(averaged[name], p) for name, p in trained_weights(resumed).items())
    with pytest.raises(ValueError, match="ema_decay"):
        InpaintingTrainer(tiny_config(mode="full"), CPU, total_steps=6).load_state_dict(
            torch.load(tmp_path / TRAINING_STATE, weights_only=False)
        )


def test_validation_is_repeatable_and_scored():
    trainer = InpaintingTrainer(tiny_config(), CPU, total_steps=1)
    pairs = [room_pair(1), room_pair(2)]
    first, outputs = trainer.validate(pairs)
    second, _ = trainer.validate(pairs)
    assert first == second
    assert {"val/psnr", "val/psnr_mask", "val/ssim", "val/ssim_mask"} <= set(first)
    assert all(np.array_equal(out[~p.mask], p.image[~p.mask]) for out, p in zip(outputs, pairs, strict=True))
    assert trainer.unet.training, "validation puts the UNet back in training mode"
