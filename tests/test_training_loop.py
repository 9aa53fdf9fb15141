"""The training worker without Ray: precision, steps, accumulation, non-finite losses, checkpoints."""

import dataclasses

import numpy as np
import pytest
import torch

from casalimpia.config import TrainConfig, build
from casalimpia.inpainting import LORA_WEIGHTS, Inpainter
from casalimpia.synthetic import render_room
from casalimpia.training.data import Pair
from casalimpia.training.loop import TRAINING_STATE, LoraTrainer, NonFiniteLossError, resolve_precision

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


def lora_weights(trainer: LoraTrainer) -> dict[str, torch.Tensor]:
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
    trainer = LoraTrainer(tiny_config(precision=precision, optim__learning_rate=1e-3), CPU, total_steps=3)
    frozen = {name: p.detach().clone() for name, p in trainer.unet.named_parameters() if not p.requires_grad}
    before = lora_weights(trainer)
    assert all(p.dtype == torch.float32 for p in trainer.parameters), "LoRA weights stay fp32"
    losses = [trainer.train_batch(batch_of(room_pair())) for _ in range(3)]
    assert all(loss is not None and np.isfinite(loss) for loss in losses)
    assert trainer.step == 3 and trainer.nonfinite == 0
    after = lora_weights(trainer)
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert all(torch.equal(frozen[name], p) for name, p in trainer.unet.named_parameters() if name in frozen)


def test_gradient_accumulation_steps_once_per_window():
    trainer = LoraTrainer(tiny_config(optim__grad_accum=2), CPU, total_steps=2)
    pair = room_pair()
    trainer.train_batch(batch_of(pair))
    assert trainer.step == 0
    trainer.train_batch(batch_of(pair))
    assert trainer.step == 1
    trainer.train_batch(batch_of(pair))
    trainer.finish_epoch()  # the partial window left at the end of an epoch still counts
    assert trainer.step == 2
    trainer.finish_epoch()
    assert trainer.step == 2


def test_nonfinite_losses_skip_steps_then_stop_the_run():
    trainer = LoraTrainer(tiny_config(optim__max_nonfinite=3), CPU, total_steps=10)
    assert trainer.train_batch(batch_of(room_pair())) is not None
    with torch.no_grad():
        trainer.parameters[0].fill_(float("nan"))  # a diverged adapter
    assert trainer.train_batch(batch_of(room_pair())) is None
    assert trainer.train_batch(batch_of(room_pair())) is None
    assert trainer.nonfinite == 2 and trainer.step == 1
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
    trainer = LoraTrainer(config, CPU, total_steps=8)
    for _ in range(4):
        trainer.train_batch(batch_of(room_pair()))
    trainer.save_checkpoint(tmp_path, epoch=1)
    assert {LORA_WEIGHTS, TRAINING_STATE, "config.yaml"} <= {p.name for p in tmp_path.iterdir()}

    resumed = LoraTrainer(config, CPU, total_steps=8)
    state = torch.load(tmp_path / TRAINING_STATE, weights_only=False)
    resumed.load_state_dict(state)
    assert state["epoch"] == 1 and resumed.step == 4
    assert resumed.learning_rate == pytest.approx(trainer.learning_rate)
    original, restored = lora_weights(trainer), lora_weights(resumed)
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


def test_validation_is_repeatable_and_scored():
    trainer = LoraTrainer(tiny_config(), CPU, total_steps=1)
    pairs = [room_pair(1), room_pair(2)]
    first, outputs = trainer.validate(pairs)
    second, _ = trainer.validate(pairs)
    assert first == second
    assert {"val/psnr", "val/psnr_mask", "val/ssim", "val/ssim_mask"} <= set(first)
    assert all(np.array_equal(out[~p.mask], p.image[~p.mask]) for out, p in zip(outputs, pairs, strict=True))
    assert trainer.unet.training, "validation puts the UNet back in training mode"
