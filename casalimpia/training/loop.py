"""One data-parallel training worker: a LoRA on the inpainting UNet, trained to paint empty rooms.

``LoraTrainer`` holds everything a worker trains with (frozen VAE, text encoder and UNet, the
LoRA adapter, optimizer, learning-rate schedule, gradient scaler) and works without Ray, so tests
can drive it step by step. ``train_loop_per_worker`` is the Ray Train entry point around it: it
reads the worker's dataset shard, resumes from the latest checkpoint, validates on rank 0 after
every epoch with the de-furnishing inpainter, and reports metrics and checkpoints.

The UNet's input is the SD2 inpainting layout: 4 noisy latents + 1 mask at latent size + 4
latents of the masked image; the loss target follows the noise scheduler's ``prediction_type``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from casalimpia.config import TrainConfig, build, to_yaml
from casalimpia.inpainting import Inpainter
from casalimpia.models import Placement, load_inpainting_pipeline

log = logging.getLogger(__name__)

TRAINING_STATE = "training_state.pt"
"""File in a checkpoint folder with what resuming needs besides the LoRA: optimizer, schedule, step."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses: the run has diverged."""


@dataclass(frozen=True)
class Precision:
    """How a worker computes: the autocast dtype (None for fp32), the frozen weights' dtype, the scaler."""

    autocast: torch.dtype | None
    weights: torch.dtype
    scaler: bool
    reason: str


def resolve_precision(name: str, device: torch.device) -> Precision:
    """Mixed precision for a worker on device; trainable LoRA weights always stay in fp32.

    Frozen weights take the half dtype on an accelerator (half the memory and bandwidth) and stay
    fp32 on the CPU, where half-precision kernels are slow; autocast picks per-op dtypes either way.
    """
    on_cpu = device.type == "cpu"
    if name == "auto":
        if on_cpu:
            return Precision(None, torch.float32, False, "fp32: training on the CPU")
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            name, why = "bf16", "bf16: supported by this GPU, no loss scaling needed"
        else:
            name, why = "fp16", "fp16 with loss scaling: this accelerator has no bf16"
    else:
        why = f"{name} as configured"
    if name == "fp32":
        return Precision(None, torch.float32, False, why)
    half = torch.bfloat16 if name == "bf16" else torch.float16
    return Precision(half, torch.float32 if on_cpu else half, name == "fp16", why)


class LoraTrainer:
    """The LoRA-adapted inpainting model of one worker and its optimisation state.

    ``wrap`` turns the UNet into what the forward pass calls (``ray.train.torch.prepare_model``
    for DDP); the unwrapped UNet is what is saved and what validation paints with.
    """

    def __init__(
        self,
        config: TrainConfig,
        device: torch.device,
        total_steps: int,
        wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        rank: int = 0,
    ) -> None:
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        self.config = config
        self.device = device
        self.precision = resolve_precision(config.precision, device)
        log.info("training on %s, %s", device, self.precision.reason)
        self.pipe = load_inpainting_pipeline(
            config.inpaint.model, Placement(device, self.precision.weights, self.precision.reason)
        )
        for model in (self.pipe.vae, self.pipe.text_encoder, self.pipe.unet):
            model.requires_grad_(False)
        self.unet = self.pipe.unet
        lora = config.lora
        with torch.random.fork_rng(devices=[]):
            # Every worker starts from the same adapter; DDP also broadcasts rank 0's weights.
            torch.manual_seed(config.seed)
            self.unet.add_adapter(
                LoraConfig(
                    r=lora.rank,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    target_modules=lora.target_modules,
                    init_lora_weights="gaussian",
                )
            )
        cast_training_params(self.unet, dtype=torch.float32)
        self.parameters = [p for p in self.unet.parameters() if p.requires_grad]
        self.unet.train()
        self.model = wrap(self.unet) if wrap is not None else self.unet
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        prompt = config.inpaint.prompt if config.prompt is None else config.prompt
        self.prompt_embeddings = self._encode_prompt(prompt)
        self.optimizer = _make_optimizer(config.optim, self.parameters)
        self.lr_scheduler = get_scheduler(
            config.optim.lr_scheduler,
            self.optimizer,
            num_warmup_steps=config.optim.warmup_steps,
            num_training_steps=max(1, total_steps),
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision.scaler)
        # Noise, timesteps and latent samples come from one generator per worker: a run is
        # reproducible, and a resumed run draws what the uninterrupted one would have.
        self.generator = torch.Generator(device).manual_seed(config.seed * 1000 + rank)
        self.step = 0
        self.nonfinite = 0
        self._consecutive_nonfinite = 0
        self._micro = 0
        self._inpainter: Inpainter | None = None
        log.info(
            "LoRA rank %d alpha %g on %s: %d trainable parameters",
            lora.rank,
            lora.alpha,
            ", ".join(lora.target_modules),
            sum(p.numel() for p in self.parameters),
        )

    @torch.no_grad()
    def _encode_prompt(self, prompt: str) -> torch.Tensor:
        tokens = self.pipe.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.pipe.text_encoder(tokens.input_ids.to(self.device))[0]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision.autocast)

    @property
    def learning_rate(self) -> float:
        return self.lr_scheduler.get_last_lr()[0]

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The denoising loss of a batch of pairs (``image``, ``target``: uint8 NHWC; ``mask``: NHW)."""
        image = _to_unit_range(batch["image"], self.device)
        target = _to_unit_range(batch["target"], self.device)
        mask = batch["mask"].to(self.device)[:, None].float()
        vae = self.pipe.vae
        weights = self.precision.weights
        with torch.no_grad(), self._autocast():
            latents = vae.encode(target.to(weights)).latent_dist.sample(self.generator) * vae.config.scaling_factor
            # The hole is zeroed (mid-grey), exactly as the inpainting pipeline prepares it at inference.
            masked = image * (mask < 0.5)
            masked_latents = vae.encode(masked.to(weights)).latent_dist.sample(self.generator)
            masked_latents = masked_latents * vae.config.scaling_factor
        latents, masked_latents = latents.float(), masked_latents.float()
        latent_mask = F.interpolate(mask, size=latents.shape[-2:])
        noise = torch.randn(latents.shape, generator=self.generator, device=self.device)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=self.generator, device=self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            expected = noise
        elif prediction_type == "v_prediction":
            expected = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        unet_input = torch.cat([noisy, latent_mask, masked_latents], dim=1)
        context = self.prompt_embeddings.expand(latents.shape[0], -1, -1)
        with self._autocast():
            predicted = self.model(unet_input.to(weights), timesteps, encoder_hidden_states=context).sample
        return F.mse_loss(predicted.float(), expected.float())

    def train_batch(self, batch: dict[str, torch.Tensor]) -> float | None:
        """One micro-batch: backward, and an optimizer step every ``grad_accum`` micro-batches.

        Returns the loss, or None when it was not finite (on any worker): that accumulation window
        is dropped on every worker alike, so DDP stays in step.
        """
        loss = self.loss(batch)
        if not _finite_everywhere(loss):
            self._skip_nonfinite()
            return None
        self._consecutive_nonfinite = 0
        accumulate = self.config.optim.grad_accum
        last = (self._micro + 1) % accumulate == 0
        # Gradients are all-reduced once per window, on its last micro-batch.
        no_sync = getattr(self.model, "no_sync", None)
        with no_sync() if (no_sync is not None and not last) else contextlib.nullcontext():
            self.scaler.scale(loss / accumulate).backward()
        self._micro += 1
        if last:
            self._optimizer_step()
        return float(loss.detach())

    def finish_epoch(self) -> None:
        """Step on a partial accumulation window left at the end of an epoch."""
        if self._micro % self.config.optim.grad_accum == 0:
            return
        if _distributed():
            # The window's micro-batches all ran under no_sync: average their gradients by hand.
            for parameter in self.parameters:
                if parameter.grad is not None:
                    dist.all_reduce(parameter.grad)
                    parameter.grad /= dist.get_world_size()
        self._optimizer_step()

    def _optimizer_step(self) -> None:
        if self.config.optim.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters, self.config.optim.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._micro = 0
        self.step += 1

    def _skip_nonfinite(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._micro = 0
        self.nonfinite += 1
        self._consecutive_nonfinite += 1
        limit = self.config.optim.max_nonfinite
        log.warning("non-finite loss at step %d: step skipped (%d in a row)", self.step, self._consecutive_nonfinite)
        if self._consecutive_nonfinite >= limit:
            raise NonFiniteLossError(
                f"{limit} non-finite losses in a row at step {self.step} (optim.max_nonfinite): the run diverged. "
                f"Lower optim.learning_rate (now {self.config.optim.learning_rate:g}), keep optim.max_grad_norm on, "
                f"or train in bf16 or fp32 (precision is {self.config.precision})."
            )

    def validate(self, pairs: list[Any], lpips: Any = None) -> tuple[dict[str, float], list[np.ndarray]]:
        """Inpaint the validation pairs as the de-furnishing job would; returns (metrics, outputs).

        Metric keys are prefixed ``val/``; the inpainter's seeds depend only on each room's path,
        so epochs are comparable.
        """
        from casalimpia.metrics import score

        if not pairs:
            return {}, []
        if self._inpainter is None:
            self._inpainter = Inpainter(self.config.inpaint, pipeline=self.pipe)
        self.unet.eval()
        try:
            with self._autocast():
                outputs = self._inpainter.paint(
                    [pair.image for pair in pairs], [pair.mask for pair in pairs], [pair.source for pair in pairs]
                )
        finally:
            self.unet.train()
        scores = score(outputs, [pair.target for pair in pairs], [pair.mask for pair in pairs], lpips)
        return {f"val/{name}": value for name, value in scores.items()}, outputs

    def save_lora(self, folder: str | Path) -> None:
        """Write ``pytorch_lora_weights.safetensors`` into folder: PEFT keys, the LoraConfig as metadata.

        Not converted to diffusers' older key names: they exist for attention projections only, so an
        adapter on convolutions too would be written in two formats, and the loader, reading the first
        key, would drop the half in the other one. The metadata carries alpha, which shapes cannot.
        """
        from diffusers import StableDiffusionInpaintPipeline
        from peft.utils import get_peft_model_state_dict

        StableDiffusionInpaintPipeline.save_lora_weights(
            folder,
            unet_lora_layers=get_peft_model_state_dict(self.unet),
            unet_lora_adapter_metadata=self.unet.peft_config["default"].to_dict(),
        )

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs: adapter, optimizer, schedule, scaler and counters."""
        from peft.utils import get_peft_model_state_dict

        return {
            "lora": get_peft_model_state_dict(self.unet),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "nonfinite": self.nonfinite,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.unet, state["lora"])
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"checkpoint LoRA does not match lora.* settings: unexpected keys {unexpected[:3]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.nonfinite = state["nonfinite"]
        self.generator.set_state(state["generator"].cpu())

    def save_checkpoint(self, folder: str | Path, epoch: int) -> None:
        """A checkpoint folder: diffusers LoRA, resumable state, and the config it was trained with."""
        folder = Path(folder)
        self.save_lora(folder)
        torch.save({**self.state_dict(), "epoch": epoch}, folder / TRAINING_STATE)
        (folder / "config.yaml").write_text(to_yaml(self.config))


def _make_optimizer(optim: Any, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=optim.learning_rate, weight_decay=optim.weight_decay)
    if optim.optimizer == "adagrad":
        return torch.optim.Adagrad(parameters, lr=optim.learning_rate, weight_decay=optim.weight_decay)
    return torch.optim.SGD(parameters, lr=optim.learning_rate, momentum=optim.momentum, weight_decay=optim.weight_decay)


def _to_unit_range(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1], the VAE's input range."""
    return pixels.to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _finite_everywhere(loss: torch.Tensor) -> bool:
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if _distributed():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def _mean_everywhere(values: list[float], device: torch.device) -> float:
    """Mean of the values of all workers (NaN when no worker had any)."""
    totals = torch.tensor([sum(values), len(values)], dtype=torch.float64, device=device)
    if _distributed():
        dist.all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] > 0 else math.nan


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: train for the configured epochs, validating and checkpointing after each.

    ``loop_config`` holds the resolved config as plain data (``config``), the optimizer steps of
    the whole run (``total_steps``), the shape warm-up epochs (``warmup_epochs``), the
    validation rooms (``validation_rooms``) and the marker of the test-only fault that kills
    worker 1 after its first step (``fault_marker``, see ``casalimpia.faults``).
    """
    import ray.train
    import ray.train.torch

    from casalimpia.faults import die_once
    from casalimpia.training.data import validation_pairs
    from casalimpia.training.tracking import open_tracker

    config: TrainConfig = build(TrainConfig, loop_config["config"])
    context = ray.train.get_context()
    is_main = context.get_world_rank() == 0
    fault_marker = loop_config.get("fault_marker") if context.get_world_rank() == 1 else None
    device = ray.train.torch.get_device()
    trainer = LoraTrainer(
        config, device, loop_config["total_steps"], wrap=ray.train.torch.prepare_model, rank=context.get_world_rank()
    )
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / TRAINING_STATE, map_location=device, weights_only=False)
        trainer.load_state_dict(state)
        start_epoch = state["epoch"] + 1
        log.info("resumed from %s: epoch %d, step %d", checkpoint.path, start_epoch, trainer.step)

    tracker = open_tracker(config, enabled=is_main)
    pairs, lpips = [], None
    if is_main:
        from casalimpia.metrics import LPIPS

        pairs = validation_pairs(config.data, loop_config["validation_rooms"], config.seed)
        lpips = LPIPS(device)
    try:
        for epoch in range(start_epoch, config.epochs):
            started = time.perf_counter()
            warmup = epoch < loop_config["warmup_epochs"]
            shard = ray.train.get_dataset_shard("warmup" if warmup else "train")
            losses: list[float] = []
            for batch in shard.iter_torch_batches(batch_size=config.batch_size):
                loss = trainer.train_batch(batch)
                die_once(fault_marker, "training worker 1")
                if loss is None:
                    continue
                losses.append(loss)
                if trainer.step % config.tracking.log_every == 0:
                    tracker.log({"train/loss": loss, "train/lr": trainer.learning_rate}, trainer.step)
            trainer.finish_epoch()
            metrics: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": trainer.step,
                "train/loss": _mean_everywhere(losses, device),
                "train/lr": trainer.learning_rate,
                "train/nonfinite_steps": trainer.nonfinite,
                "train/shape_warmup": int(warmup),
                "train/seconds": time.perf_counter() - started,
            }
            if is_main:
                scores, outputs = trainer.validate(pairs, lpips)
                metrics.update(scores)
                tracker.log(metrics, trainer.step)
                tracker.log_outputs(pairs, outputs, config.tracking.images, trainer.step)
            last = epoch + 1 == config.epochs
            with tempfile.TemporaryDirectory() as folder:
                saved = None
                if is_main and ((epoch + 1) % config.checkpoint_every == 0 or last):
                    trainer.save_checkpoint(folder, epoch)
                    saved = ray.train.Checkpoint.from_directory(folder)
                ray.train.report(metrics, checkpoint=saved)
    finally:
        tracker.finish()
