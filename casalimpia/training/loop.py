"""One data-parallel training worker: the inpainting UNet, trained to paint empty rooms.

``InpaintingTrainer`` holds everything a worker trains with (frozen VAE and text encoder, the UNet
with a LoRA adapter or trained in full, optimizer, learning-rate schedule, gradient scaler, the
weights' moving average) and works without Ray, so tests can drive it step by step.
``train_loop_per_worker`` is the Ray Train entry point around it: it reads the worker's dataset
shard, resumes from the latest checkpoint, validates on rank 0 after every epoch with the
de-furnishing inpainter, and reports metrics and checkpoints.

The UNet's input is the SD2 inpainting layout: 4 noisy latents + 1 mask at latent size + 4
latents of the masked image; the loss target follows the noise scheduler's ``prediction_type``.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from casalimpia.config import TrainConfig, build, to_yaml
from casalimpia.inpainting import Inpainter
from casalimpia.models import Placement, load_inpainting_pipeline
from casalimpia.training.worker import (
    TRAINING_STATE,
    Optimisation,
    mean_everywhere,
    resolve_precision,
    set_cpu_threads,
)

log = logging.getLogger(__name__)

MODEL_DIR = "model"
"""Folder in a full-training checkpoint with the whole inpainting pipeline, ready for ``inpaint.model``."""


class InpaintingTrainer:
    """The inpainting UNet of one worker, LoRA-adapted or trained in full, and its optimisation state.

    ``wrap`` turns the UNet into what the forward pass calls (``ray.train.torch.prepare_model``
    for DDP); the unwrapped UNet is what is saved and what validation paints with. Trained weights
    are kept in fp32 whatever the precision; with ``optim.ema_decay`` their moving average is what
    validation paints with and what is exported.
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
        from diffusers.training_utils import cast_training_params

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
        if config.mode == "lora":
            self._add_adapter()
        else:
            self.unet.requires_grad_(True)
        cast_training_params(self.unet, dtype=torch.float32)
        self.parameters = [p for p in self.unet.parameters() if p.requires_grad]
        self.unet.train()
        self.model = wrap(self.unet) if wrap is not None else self.unet
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        prompt = config.inpaint.prompt if config.prompt is None else config.prompt
        self.prompt_embeddings = self._encode_prompt(prompt)
        self.optimisation = Optimisation(
            config.optim, self.parameters, self.precision, total_steps, device, precision_name=config.precision
        )
        # Noise, timesteps and latent samples come from one generator per worker: a run is
        # reproducible, and a resumed run draws what the uninterrupted one would have.
        self.generator = torch.Generator(device).manual_seed(config.seed * 1000 + rank)
        self._inpainter: Inpainter | None = None
        trained = sum(p.numel() for p in self.parameters)
        if config.mode == "lora":
            lora = config.lora
            where = f"LoRA rank {lora.rank} alpha {lora.alpha:g} on {', '.join(lora.target_modules)}"
        else:
            where = "the whole UNet"
        decay = config.optim.ema_decay
        log.info("training %s: %d parameters%s", where, trained, f", EMA decay {decay:g}" if decay else "")

    def _add_adapter(self) -> None:
        from peft import LoraConfig

        lora = self.config.lora
        with torch.random.fork_rng(devices=[]):
            # Every worker starts from the same adapter; DDP also broadcasts rank 0's weights.
            torch.manual_seed(self.config.seed)
            self.unet.add_adapter(
                LoraConfig(
                    r=lora.rank,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    target_modules=lora.target_modules,
                    init_lora_weights="gaussian",
                )
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
        elif prediction_type == "sample":
            expected = latents
        else:
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        unet_input = torch.cat([noisy, latent_mask, masked_latents], dim=1)
        context = self.prompt_embeddings.expand(latents.shape[0], -1, -1)
        with self._autocast():
            predicted = self.model(unet_input.to(weights), timesteps, encoder_hidden_states=context).sample
        return F.mse_loss(predicted.float(), expected.float())

    def train_batch(self, batch: dict[str, torch.Tensor]) -> float | None:
        """One micro-batch through :meth:`Optimisation.backward`: the loss, or None when it was skipped."""
        return self.optimisation.backward(self.loss(batch), self.model)

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
            with self._autocast(), self.optimisation.averaged():
                outputs = self._inpainter.paint(
                    [pair.image for pair in pairs], [pair.mask for pair in pairs], [pair.source for pair in pairs]
                )
        finally:
            self.unet.train()
        scores = score(outputs, [pair.target for pair in pairs], [pair.mask for pair in pairs], lpips)
        return {f"val/{name}": value for name, value in scores.items()}, outputs

    def save_weights(self, folder: str | Path) -> None:
        """Export what was trained (averaged, with EMA) in the form the de-furnishing job loads.

        LoRA: ``pytorch_lora_weights.safetensors`` in folder, PEFT keys with the LoraConfig as
        metadata. Not converted to diffusers' older key names: they exist for attention projections
        only, so an adapter on convolutions too would be written in two formats, and the loader,
        reading the first key, would drop the half in the other one. The metadata carries alpha,
        which shapes cannot. Full: the whole pipeline under ``model/``, for ``inpaint.model``.
        """
        from diffusers import StableDiffusionInpaintPipeline
        from peft.utils import get_peft_model_state_dict

        with self.optimisation.averaged():
            if self.config.mode == "full":
                self.pipe.save_pretrained(Path(folder) / MODEL_DIR, safe_serialization=True)
                return
            StableDiffusionInpaintPipeline.save_lora_weights(
                folder,
                unet_lora_layers=get_peft_model_state_dict(self.unet),
                unet_lora_adapter_metadata=self.unet.peft_config["default"].to_dict(),
            )

    def _trained_weights(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return self.unet.state_dict() if self.config.mode == "full" else get_peft_model_state_dict(self.unet)

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs: the trained weights (as trained, not averaged) and the optimisation state."""
        return {
            self.config.mode: self._trained_weights(),
            "generator": self.generator.get_state(),
            **self.optimisation.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from peft import set_peft_model_state_dict

        if self.config.mode not in state:
            raise ValueError(f"checkpoint was not trained with mode {self.config.mode!r}")
        if self.config.mode == "full":
            self.unet.load_state_dict(state["full"])
        else:
            result = set_peft_model_state_dict(self.unet, state["lora"])
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise ValueError(f"checkpoint LoRA does not match lora.* settings: unexpected keys {unexpected[:3]}")
        self.optimisation.load_state_dict(state)
        self.generator.set_state(state["generator"].cpu())

    def save_checkpoint(self, folder: str | Path, epoch: int) -> None:
        """A checkpoint folder: the export (LoRA or model), resumable state, and the config it was trained with."""
        folder = Path(folder)
        self.save_weights(folder)
        torch.save({**self.state_dict(), "epoch": epoch}, folder / TRAINING_STATE)
        (folder / "config.yaml").write_text(to_yaml(self.config))


def _to_unit_range(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1], the VAE's input range."""
    return pixels.to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0


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
    set_cpu_threads(config.ray.torch_threads, device)
    trainer = InpaintingTrainer(
        config, device, loop_config["total_steps"], wrap=ray.train.torch.prepare_model, rank=context.get_world_rank()
    )
    optimisation = trainer.optimisation
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / TRAINING_STATE, map_location=device, weights_only=False)
        trainer.load_state_dict(state)
        start_epoch = state["epoch"] + 1
        log.info("resumed from %s: epoch %d, step %d", checkpoint.path, start_epoch, optimisation.step)

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
                if optimisation.step % config.tracking.log_every == 0:
                    tracker.log({"train/loss": loss, "train/lr": optimisation.learning_rate}, optimisation.step)
            optimisation.finish_epoch()
            metrics: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": optimisation.step,
                "train/loss": mean_everywhere(losses, device),
                "train/lr": optimisation.learning_rate,
                "train/nonfinite_steps": optimisation.nonfinite,
                "train/shape_warmup": int(warmup),
                "train/seconds": time.perf_counter() - started,
            }
            if is_main:
                scores, outputs = trainer.validate(pairs, lpips)
                metrics.update(scores)
                tracker.log(metrics, optimisation.step)
                tracker.log_outputs(pairs, outputs, config.tracking.images, optimisation.step)
            last = epoch + 1 == config.epochs
            with tempfile.TemporaryDirectory() as folder:
                saved = None
                if is_main and ((epoch + 1) % config.checkpoint_every == 0 or last):
                    trainer.save_checkpoint(folder, epoch)
                    saved = ray.train.Checkpoint.from_directory(folder)
                ray.train.report(metrics, checkpoint=saved)
    finally:
        tracker.finish()
