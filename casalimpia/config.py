"""Typed configuration of the de-furnishing job.

One dataclass per section; the YAML files in ``configs/`` mirror them and every default lives here.
``load_config`` reads a YAML file, applies ``--set section.key=value`` overrides (parsed as YAML
scalars) and validates everything, naming the offending key in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from casalimpia.classes import PRESETS, STRUCTURE, check_class_names, normalize_label
from casalimpia.images import IMAGE_SUFFIXES

TINY = "tiny"
"""Model reference that builds small random models in code: offline tests and demos."""
RANDOM_FULL = "random-full"
"""Model reference that builds the default model's full-size architecture with random weights: benchmarks."""
RANDOM_WEIGHTS = (TINY, RANDOM_FULL)
"""Model references whose outputs are noise."""
TOY = "toy"
"""Model reference of the shipped toy models, trained on synthetic rooms (casalimpia.toy): offline demos."""
MANIFEST_EVERY = 1000
"""Manifest rows a photo job persists at a time by default."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and fits on one line."""


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass
class DecodeConfig:
    """How input files become RGB photos."""

    max_pixels: int = 100_000_000
    """Refuse images with more pixels than this before decoding them (decompression bombs)."""
    min_side: int = 64
    """Refuse images whose shorter side is below this many pixels."""
    suffixes: list[str] = field(default_factory=lambda: list(IMAGE_SUFFIXES))
    """File suffixes treated as photos (case-insensitive); other files become failed rows."""

    def __post_init__(self) -> None:
        _check(self.max_pixels > 0, "decode.max_pixels", "must be positive")
        _check(self.min_side >= 8, "decode.min_side", "must be at least 8")
        _check(bool(self.suffixes), "decode.suffixes", "must name at least one suffix")
        self.suffixes = [s.lower() if s.startswith(".") else f".{s.lower()}" for s in self.suffixes]


@dataclass
class MaskingConfig:
    """Which pixels are furniture: OneFormer semantic segmentation and a class policy."""

    model: str = "shi-labs/oneformer_ade20k_swin_large"
    """OneFormer weights: hub id, local folder, s3:// prefix, 'toy' (trained on synthetic rooms) or 'tiny' (random)."""
    preset: str = "movable"
    """Classes removed by default: 'movable' or 'movable+builtin'."""
    remove: list[str] = field(default_factory=list)
    """ADE20K class names removed in addition to the preset."""
    keep: list[str] = field(default_factory=list)
    """ADE20K class names never removed, even if the preset lists them."""
    masks: str | None = None
    """URI of user-supplied masks (PNG, matched by relative path) used instead of segmentation."""
    resolution: int = 512
    """Shorter side, in pixels, of the image given to the segmenter."""
    dilation: float = 0.015
    """Mask growth as a fraction of the image's shorter side (catches edges and shadows)."""
    min_component: float = 0.0005
    """Connected mask regions smaller than this fraction of the image are dropped."""
    fill_holes: bool = True
    """Fill enclosed holes in the mask (gaps between chair legs, inside a frame)."""
    batch_size: int = 4
    """Photos per segmentation batch."""

    def __post_init__(self) -> None:
        _check(self.preset in PRESETS, "masking.preset", f"must be one of {sorted(PRESETS)}")
        for key in ("remove", "keep"):
            unknown = check_class_names(getattr(self, key))
            _check(not unknown, f"masking.{key}", f"unknown ADE20K class names {unknown}")
        structural = sorted({normalize_label(n) for n in self.remove} & set(STRUCTURE))
        _check(not structural, "masking.remove", f"the room's structure is never removed: {structural}")
        _check(64 <= self.resolution <= 2048, "masking.resolution", "must be in [64, 2048]")
        _check(0 <= self.dilation <= 0.2, "masking.dilation", "must be in [0, 0.2]")
        _check(0 <= self.min_component < 0.5, "masking.min_component", "must be in [0, 0.5)")
        _check(self.batch_size >= 1, "masking.batch_size", "must be at least 1")


SCHEDULERS = ("default", "ddim", "dpm++", "euler", "euler_a", "unipc", "pndm")


@dataclass
class InpaintConfig:
    """How the empty room is painted behind the mask."""

    model: str = "stabilityai/stable-diffusion-2-inpainting"
    """Inpainting weights: hub id, local folder, s3:// prefix, 'toy' (trained on synthetic rooms) or 'tiny' (random)."""
    lora: str | None = None
    """URI of a LoRA folder or .safetensors file in diffusers format (from jobs/train.py), or 'toy' (the toy one)."""
    lora_scale: float = 1.0
    """Strength of the LoRA adapter."""
    prompt: str = (
        "an empty room, bare floor, bare walls, nothing in the room, "
        "clean minimalist interior, real estate photography, natural light"
    )
    """Text the model paints towards."""
    negative_prompt: str = (
        "furniture, sofa, couch, chair, table, bed, cabinet, shelf, rug, carpet, lamp, plant, "
        "painting, decoration, person, clutter, objects, text, watermark, blurry"
    )
    """Text the model paints away from (classifier-free guidance)."""
    steps: int = 25
    """Denoising steps."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale; 1 switches guidance off (half the UNet work)."""
    strength: float = 1.0
    """How much of the masked area is re-noised (1 = paint from scratch)."""
    scheduler: str = "default"
    """Noise scheduler: 'default' keeps the model's own, or one of ddim, dpm++, euler, euler_a, unipc, pndm."""
    resolution: int = 512
    """Side of the square crop the model paints (a multiple of 8)."""
    context: float = 0.5
    """Context added around the mask's bounding box, as a fraction of its size, before cropping."""
    feather: int = 4
    """Width in pixels of the blend ramp just inside the mask edge."""
    batch_size: int = 4
    """Photos per inpainting batch."""
    seed: int = 0
    """Base seed; each photo's seed is derived from it and its path, so reruns reproduce."""

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "inpaint.steps", "must be at least 1")
        _check(self.guidance_scale >= 1.0, "inpaint.guidance_scale", "must be at least 1")
        _check(0 < self.strength <= 1, "inpaint.strength", "must be in (0, 1]")
        _check(self.scheduler in SCHEDULERS, "inpaint.scheduler", f"must be one of {list(SCHEDULERS)}")
        _check(
            self.resolution >= 64 and self.resolution % 8 == 0,
            "inpaint.resolution",
            "must be a multiple of 8, at least 64",
        )
        _check(self.context >= 0, "inpaint.context", "must be non-negative")
        _check(self.feather >= 0, "inpaint.feather", "must be non-negative")
        _check(self.batch_size >= 1, "inpaint.batch_size", "must be at least 1")
        _check(0 <= self.lora_scale <= 2, "inpaint.lora_scale", "must be in [0, 2]")


OUTPUT_FORMATS = ("same", "png", "jpeg", "webp", "heif", "avif")


@dataclass
class WriteConfig:
    """What is written for each photo."""

    format: str = "same"
    """Output format: 'same' as the input (JPEG blocks outside the mask kept), or png, jpeg, webp, heif, avif."""
    quality: int = 95
    """Quality of lossy outputs in another format than the input's; the most a lossy input is matched up to."""
    save_masks: bool = True
    """Write the removal mask of each photo under masks/."""

    def __post_init__(self) -> None:
        _check(self.format in OUTPUT_FORMATS, "write.format", f"must be one of {list(OUTPUT_FORMATS)}")
        _check(1 <= self.quality <= 100, "write.quality", "must be in [1, 100]")


SPEED_SETTINGS = ("channels_last", "compile_unet")
"""RayConfig's boolean speed settings of the painting actors, which the benchmark can compare."""


@dataclass
class ActorPoolConfig:
    """How many actors one stage's pool holds: ``min`` from the start, more while all of them are busy.

    In YAML a mapping (``{min: 1, max: null}``) or an integer N, which fixes the pool at N actors.
    RayConfig checks the values, so that its errors name the pool.
    """

    min: int = 1
    """Actors started with the job and kept until its input runs out."""
    max: int | None = None
    """Most actors Ray Data grows the pool to while they are all busy; null: as many as the cluster can give."""

    @classmethod
    def from_scalar(cls, value: Any, key: str) -> dict[str, Any]:
        """The mapping a plain integer N stands for: a fixed pool of N actors."""
        ok = isinstance(value, int) and not isinstance(value, bool)
        _check(ok, key, f"expected {{min: N, max: M or null}} or an integer, got {value!r}")
        return {"min": value, "max": value}


@dataclass
class RayConfig:
    """Where the job runs, how much of the cluster each stage takes, and how its models run there.

    None of it changes which photos count as done: a rerun with other resources or speed settings
    skips what an earlier run finished.
    """

    address: str | None = None
    """Ray cluster address; unset uses RAY_ADDRESS or a running local cluster, else starts one."""
    masking_actors: ActorPoolConfig = field(default_factory=ActorPoolConfig)
    """Segmentation actors: the pool grows from min to max while they are busy (an integer fixes its size)."""
    inpainting_actors: ActorPoolConfig = field(default_factory=ActorPoolConfig)
    """Inpainting actors: the pool grows from min to max while they are busy (an integer fixes its size)."""
    masking_gpus: float = 0.0
    """GPUs per segmentation actor (fractions share a GPU with inpainting)."""
    inpainting_gpus: float = 0.0
    """GPUs per inpainting actor."""
    masking_cpus: float = 1.0
    """CPUs per segmentation actor (use fractions on small machines)."""
    inpainting_cpus: float = 1.0
    """CPUs per inpainting actor (use fractions on small machines)."""
    io_cpus: float = 1.0
    """CPUs per image task: read and decode, crop before painting, blend back, encode and write."""
    dtype: str = "auto"
    """Model dtype: 'auto' (bf16 or fp16 on a GPU, fp32 on CPU), 'bf16', 'fp16' or 'fp32'."""
    channels_last: bool = False
    """Keep the inpainting UNet and VAE in channels-last memory format (a GPU speed setting; see BENCHMARKS.md)."""
    compile_unet: bool = False
    """torch.compile the inpainting UNet in each actor: its first batches pay the compile time (see BENCHMARKS.md)."""

    def __post_init__(self) -> None:
        for key in ("masking_actors", "inpainting_actors"):
            pool = getattr(self, key)
            _check(pool.min >= 1, f"ray.{key}.min", "must be at least 1")
            _check(pool.max is None or pool.max >= pool.min, f"ray.{key}.max", "must be at least min, or null")
        for key in ("masking_gpus", "inpainting_gpus"):
            _check(getattr(self, key) >= 0, f"ray.{key}", "must be non-negative")
        for key in ("masking_cpus", "inpainting_cpus", "io_cpus"):
            _check(getattr(self, key) > 0, f"ray.{key}", "must be positive")
        _check(self.dtype in ("auto", "bf16", "fp16", "fp32"), "ray.dtype", "must be auto, bf16, fp16 or fp32")


@dataclass
class QaConfig:
    """Quality gate: re-segment each output and flag photos where furniture remains."""

    max_residual: float | None = None
    """Flag a photo for review when more than this fraction of its mask is still furniture; unset: no gate."""

    def __post_init__(self) -> None:
        ok = self.max_residual is None or 0 <= self.max_residual < 1
        _check(ok, "qa.max_residual", "must be in [0, 1) or unset")


@dataclass
class DefurnishConfig:
    """The bulk de-furnishing job."""

    input: str = ""
    """URI of the photos: a local folder, file:// or s3://bucket/prefix."""
    output: str = ""
    """URI the results, manifest, report and resolved config are written under."""
    overwrite: bool = False
    """Redo photos already done with the same config (otherwise they are skipped)."""
    limit: int | None = None
    """Process at most this many photos (in listing order); unset processes all."""
    report_samples: int = 24
    """Photos shown in report.html."""
    manifest_every: int = MANIFEST_EVERY
    """Persist manifest rows every this many photos: a killed driver redoes at most this many on rerun."""
    progress_every: float = 30.0
    """Seconds between the driver's progress lines (done/total, rate, ETA, failed); 0: none."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    """Decoding and input checks."""
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    """Furniture segmentation."""
    inpaint: InpaintConfig = field(default_factory=InpaintConfig)
    """Inpainting."""
    write: WriteConfig = field(default_factory=WriteConfig)
    """Output files."""
    qa: QaConfig = field(default_factory=QaConfig)
    """Quality gate (runs on the masking actors' model; photos already done keep their status)."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Cluster resources."""

    # Sections whose values change the pixels written; their hash identifies a result.
    HASHED_SECTIONS: typing.ClassVar[tuple[str, ...]] = ("decode", "masking", "inpaint", "write")

    def __post_init__(self) -> None:
        _check_job_uris(self.input, self.output)
        _check(self.limit is None or self.limit >= 1, "limit", "must be at least 1")
        _check(self.manifest_every >= 1, "manifest_every", "must be at least 1")
        _check(self.progress_every >= 0, "progress_every", "must be non-negative")
        _check(self.report_samples >= 0, "report_samples", "must be non-negative")

    def config_hash(self) -> str:
        """Short hash of everything that changes the output pixels."""
        return _hash_sections(self, self.HASHED_SECTIONS)


@dataclass
class MaskLibraryConfig:
    """The mask library job: furniture masks and margin rings cut from furnished photos, for training."""

    input: str = ""
    """URI of the furnished-room photos to cut masks from."""
    output: str = ""
    """URI the masks, rings, manifest (the library's index) and resolved config are written under."""
    overwrite: bool = False
    """Redo photos already done with the same config (otherwise they are skipped)."""
    limit: int | None = None
    """Process at most this many photos (in listing order); unset processes all."""
    ring: int = 20
    """Width in pixels of the margin ring: the band of real pixels just outside the mask that is kept."""
    manifest_every: int = MANIFEST_EVERY
    """Persist manifest rows every this many photos: a killed driver redoes at most this many on rerun."""
    progress_every: float = 30.0
    """Seconds between the driver's progress lines (done/total, rate, ETA, failed); 0: none."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    """Decoding and input checks."""
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    """Furniture segmentation."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Cluster resources (the inpainting settings are not used)."""

    HASHED_SECTIONS: typing.ClassVar[tuple[str, ...]] = ("decode", "masking", "ring")

    def __post_init__(self) -> None:
        _check_job_uris(self.input, self.output)
        _check(self.limit is None or self.limit >= 1, "limit", "must be at least 1")
        _check(self.manifest_every >= 1, "manifest_every", "must be at least 1")
        _check(self.progress_every >= 0, "progress_every", "must be non-negative")
        _check(0 <= self.ring <= 512, "ring", "must be in [0, 512] pixels")

    def config_hash(self) -> str:
        """Short hash of everything that changes the masks and rings written."""
        return _hash_sections(self, self.HASHED_SECTIONS)


OPTIMIZERS = ("adamw", "adagrad", "sgd")
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
)
DEFAULT_SPLIT = [10000 / 13000, 1500 / 13000, 1500 / 13000]


@dataclass
class TrainDataConfig:
    """Synthetic training pairs: empty rooms with furniture silhouettes from the mask library."""

    rooms: str = ""
    """URI of the empty-room photos (split into train/validation/test by a hash of each path)."""
    library: str = ""
    """URI of a mask library written by jobs/masks.py."""
    split: list[float] = field(default_factory=lambda: list(DEFAULT_SPLIT))
    """Fractions of rooms in train, validation and test (10000/1500/1500 of 13000 by default)."""
    resolution: int = 512
    """Side of the square training image in pixels (a multiple of 8)."""
    min_mask_fraction: float = 0.01
    """Library masks covering less of their photo than this are not used."""
    max_mask_fraction: float = 0.7
    """Library masks covering more of their photo than this are not used."""
    ring_probability: float = 1.0
    """Probability that a pair gets the mask's margin ring pasted as real pixels around the hole."""
    flip: bool = True
    """Randomly flip rooms and masks left-right."""
    shape_warmup_pct: float = 0.0
    """Fraction of the epochs, at the start, that use random rectangles, ellipses and blobs as masks."""
    overfit: bool = False
    """Train and validate on a single room with a fixed mask, to prove the loop can memorise."""
    overfit_repeats: int = 16
    """Copies of the single room per epoch when overfitting."""
    validation_rooms: int = 16
    """At most this many validation rooms are inpainted after each epoch (fixed masks and seeds)."""
    limit: int | None = None
    """Use at most this many training rooms; unset uses all."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    """Decoding and input checks of the room photos."""

    def __post_init__(self) -> None:
        _check(bool(self.rooms), "data.rooms", "is required (in the config or with --input)")
        needs_library = self.shape_warmup_pct < 1.0
        _check(bool(self.library) or not needs_library, "data.library", "is required (or shape_warmup_pct: 1)")
        _check(
            len(self.split) == 3 and all(f >= 0 for f in self.split) and abs(sum(self.split) - 1) < 1e-6,
            "data.split",
            "must be three non-negative fractions (train, validation, test) summing to 1",
        )
        _check(self.split[0] > 0, "data.split", "the train fraction must be positive")
        _check(self.resolution >= 64 and self.resolution % 8 == 0, "data.resolution", "must be a multiple of 8, >= 64")
        _check(0 <= self.min_mask_fraction < self.max_mask_fraction <= 1, "data.min_mask_fraction", "must be below max")
        _check(0 <= self.ring_probability <= 1, "data.ring_probability", "must be in [0, 1]")
        _check(0 <= self.shape_warmup_pct <= 1, "data.shape_warmup_pct", "must be in [0, 1]")
        _check(self.overfit_repeats >= 1, "data.overfit_repeats", "must be at least 1")
        _check(self.validation_rooms >= 1, "data.validation_rooms", "must be at least 1")
        _check(self.limit is None or self.limit >= 1, "data.limit", "must be at least 1")


@dataclass
class LoraConfig:
    """The LoRA adapter injected into the inpainting UNet's attention layers."""

    rank: int = 8
    """Rank of the low-rank update."""
    alpha: float = 8.0
    """Scale numerator: the update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the LoRA input during training."""
    target_modules: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    """UNet module names that get an adapter."""

    def __post_init__(self) -> None:
        _check(self.rank >= 1, "lora.rank", "must be at least 1")
        _check(self.alpha > 0, "lora.alpha", "must be positive")
        _check(0 <= self.dropout < 1, "lora.dropout", "must be in [0, 1)")
        _check(bool(self.target_modules), "lora.target_modules", "must name at least one module")


@dataclass
class OptimConfig:
    """Optimizer, learning-rate schedule and step hygiene."""

    optimizer: str = "adamw"
    """One of adamw, adagrad, sgd."""
    learning_rate: float = 1e-4
    """Initial (peak) learning rate."""
    lr_scheduler: str = "constant"
    """diffusers schedule name: linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, ..."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up (schedules that have one)."""
    weight_decay: float = 0.01
    """Weight decay (decoupled for AdamW)."""
    momentum: float = 0.9
    """Momentum for SGD."""
    grad_accum: int = 1
    """Micro-batches whose gradients are summed before each optimizer step."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this; 0 switches clipping off."""
    max_nonfinite: int = 20
    """Stop the run after this many consecutive non-finite losses (each one skips its step)."""
    ema_decay: float = 0.0
    """Decay of an exponential moving average of the trained weights, which validation and export use (0: off)."""

    def __post_init__(self) -> None:
        _check(self.optimizer in OPTIMIZERS, "optim.optimizer", f"must be one of {list(OPTIMIZERS)}")
        _check(self.lr_scheduler in LR_SCHEDULERS, "optim.lr_scheduler", f"must be one of {list(LR_SCHEDULERS)}")
        _check(self.learning_rate > 0, "optim.learning_rate", "must be positive")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be non-negative")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be non-negative")
        _check(0 <= self.momentum < 1, "optim.momentum", "must be in [0, 1)")
        _check(self.grad_accum >= 1, "optim.grad_accum", "must be at least 1")
        _check(self.max_grad_norm >= 0, "optim.max_grad_norm", "must be non-negative")
        _check(self.max_nonfinite >= 1, "optim.max_nonfinite", "must be at least 1")
        _check(0 <= self.ema_decay < 1, "optim.ema_decay", "must be in [0, 1)")


@dataclass
class TrackingConfig:
    """Experiment tracking with Weights & Biases (rank 0 only)."""

    wandb: bool = True
    """Log to W&B; without WANDB_API_KEY the run is written offline (sync it later with `wandb sync`)."""
    project: str = "casalimpia"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user); unset uses the key's default."""
    group: str | None = None
    """W&B group, e.g. one sweep; unset uses the run name."""
    dir: str = "wandb"
    """Local folder W&B writes its files to (offline runs stay here)."""
    log_every: int = 10
    """Log loss and learning rate every this many optimizer steps."""
    images: int = 4
    """Validation examples (input, output, target) shown in the per-epoch grid."""

    def __post_init__(self) -> None:
        _check(self.log_every >= 1, "tracking.log_every", "must be at least 1")
        _check(self.images >= 0, "tracking.images", "must be non-negative")


@dataclass
class TrainRayConfig:
    """Ray Train workers."""

    address: str | None = None
    """Ray cluster address; unset uses RAY_ADDRESS or a running local cluster, else starts one."""
    workers: int = 1
    """Data-parallel training workers (one per GPU)."""
    use_gpu: bool = False
    """Give each worker a GPU."""
    accelerator_type: str | None = None
    """Only schedule workers on nodes with this accelerator (e.g. A100, H100)."""
    cpus_per_worker: float = 1.0
    """CPUs per training worker (use fractions on small machines)."""
    data_cpus: float = 1.0
    """CPUs per pair-building actor of Ray Data (decodes rooms, fits masks, pastes rings)."""
    torch_threads: int | None = None
    """Threads each worker's torch computes with on a CPU; unset keeps Ray's: one per whole CPU reserved, min 1."""
    max_failures: int = 3
    """Times the workers are restarted from the latest checkpoint after a failure (-1: forever)."""

    def __post_init__(self) -> None:
        _check(self.workers >= 1, "ray.workers", "must be at least 1")
        _check(self.cpus_per_worker > 0, "ray.cpus_per_worker", "must be positive")
        _check(self.torch_threads is None or self.torch_threads >= 1, "ray.torch_threads", "must be at least 1")
        _check(self.data_cpus > 0, "ray.data_cpus", "must be positive")
        _check(self.max_failures >= -1, "ray.max_failures", "must be -1 (forever) or more")


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
TRAIN_MODES = ("lora", "full")


@dataclass
class RunConfig:
    """What every training job's run shares: its folder, length, precision, checkpoints and workers."""

    name: str = "run"
    """Run name; starting a run with the same name and storage resumes it."""
    storage: str = ""
    """URI the run folder (checkpoints, export, metrics, config) is written under: local path or s3://."""
    epochs: int = 10
    """Passes over the training examples."""
    batch_size: int = 4
    """Examples per worker per micro-batch."""
    precision: str = "auto"
    """Mixed precision: auto (bf16, else fp16 on a GPU; fp32 on CPU), bf16, fp16 (with a GradScaler) or fp32."""
    seed: int = 0
    """Seed of what training initialises and draws: new weights, noise, validation masks."""
    checkpoint_every: int = 1
    """Write a checkpoint every this many epochs (and always after the last)."""
    keep_checkpoints: int = 3
    """Checkpoints kept, the best by checkpoint_metric."""
    checkpoint_metric: str = "val/loss"
    """Reported metric that ranks checkpoints and chooses the exported one."""
    checkpoint_mode: str = "max"
    """Whether a higher ('max') or lower ('min') checkpoint_metric is better."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimisation."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Weights & Biases."""
    ray: TrainRayConfig = field(default_factory=TrainRayConfig)
    """Workers and fault tolerance."""

    def __post_init__(self) -> None:
        plain = bool(self.name) and "/" not in self.name and self.name not in (".", "..")
        _check(plain, "name", "must be a plain name (no '/')")
        _check(bool(self.storage), "storage", "is required (in the config or with --output)")
        _check(self.epochs >= 1, "epochs", "must be at least 1")
        _check(self.batch_size >= 1, "batch_size", "must be at least 1")
        _check(self.precision in PRECISIONS, "precision", f"must be one of {list(PRECISIONS)}")
        _check(self.checkpoint_every >= 1, "checkpoint_every", "must be at least 1")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be at least 1")
        _check(self.checkpoint_mode in ("max", "min"), "checkpoint_mode", "must be max or min")


@dataclass
class TrainConfig(RunConfig):
    """Fine-tuning of the inpainting UNet on synthetic pairs: a LoRA, or every weight."""

    name: str = "casalimpia-lora"
    """Run name; starting a run with the same name and storage resumes it."""
    checkpoint_metric: str = "val/psnr_mask"
    """Reported metric that ranks checkpoints and chooses the exported one."""
    mode: str = "lora"
    """lora: train the adapter below and export it for inpaint.lora; full: train every UNet weight, export a model."""
    prompt: str | None = None
    """Text the UNet is conditioned on while training; unset uses inpaint.prompt, '' trains unconditionally."""
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    """Training pairs."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """The adapter (mode: lora)."""
    inpaint: InpaintConfig = field(default_factory=InpaintConfig)
    """Base inpainting model, and how validation paints (the de-furnishing job's settings)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.mode in TRAIN_MODES, "mode", f"must be one of {list(TRAIN_MODES)}")
        _check(self.inpaint.lora is None, "inpaint.lora", "must be unset: training makes the LoRA")


@dataclass
class SegmenterDataConfig:
    """Photos and their label maps: ``images/<name>.<suffix>`` and ``labels/<name>.png`` under one folder."""

    dataset: str = ""
    """URI of the dataset folder holding images/ and labels/ (split into train/validation/test by name)."""
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    """Fractions of the examples in train, validation and test; test is never read (held out)."""
    crop: int = 512
    """Side of the square training crop in pixels (a multiple of 32)."""
    scale: list[float] = field(default_factory=lambda: [0.5, 2.0])
    """Range of the random zoom: each photo's short side is scaled to masking.resolution times a draw from it."""
    flip: bool = True
    """Randomly flip photos and labels left-right."""
    validation_images: int = 200
    """At most this many validation examples are segmented after each epoch (the first by name)."""
    limit: int | None = None
    """Train on at most this many examples; unset uses all."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    """Decoding and input checks of the photos (suffixes: which files under images/ are photos)."""

    def __post_init__(self) -> None:
        _check(bool(self.dataset), "data.dataset", "is required (in the config or with --input)")
        _check(
            len(self.split) == 3 and all(f >= 0 for f in self.split) and abs(sum(self.split) - 1) < 1e-6,
            "data.split",
            "must be three non-negative fractions (train, validation, test) summing to 1",
        )
        _check(self.split[0] > 0 and self.split[1] > 0, "data.split", "train and validation fractions must be positive")
        _check(self.crop >= 32 and self.crop % 32 == 0, "data.crop", "must be a multiple of 32, at least 32")
        ok = len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 8
        _check(ok, "data.scale", "must be [low, high] with 0 < low <= high <= 8")
        _check(self.validation_images >= 1, "data.validation_images", "must be at least 1")
        _check(self.limit is None or self.limit >= 1, "data.limit", "must be at least 1")


@dataclass
class SegmenterTrainConfig(RunConfig):
    """Fine-tuning of the OneFormer segmenter on photos with label maps (ADE20K ids), e.g. corrected masks."""

    name: str = "casalimpia-segmenter"
    """Run name; starting a run with the same name and storage resumes it."""
    checkpoint_metric: str = "val/furniture_iou"
    """Reported metric that ranks checkpoints and chooses the exported one."""
    data: SegmenterDataConfig = field(default_factory=SegmenterDataConfig)
    """Training and validation examples."""
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    """The model to start from (masking.model), and how validation segments and which classes count as furniture."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.masking.masks is None, "masking.masks", "must be unset: training validates the segmenter")


EVALUATION_METHODS = ("diffusion", "telea", "navier-stokes")
EVALUATION_MASKS = ("exact", "segmenter")
ROOM_SUBSETS = ("test", "validation", "train", "all")


@dataclass
class EvalDataConfig:
    """What is evaluated: held-out empty rooms with fixed synthetic masks, and synthetic rooms with exact truth."""

    rooms: str | None = None
    """URI of empty-room photos; the subset below is taken with the training job's hash split."""
    subset: str = "test"
    """Rooms evaluated: 'test' (held out from training and validation), 'validation', 'train' or 'all'."""
    split: list[float] = field(default_factory=lambda: list(DEFAULT_SPLIT))
    """Train, validation and test fractions; must equal the training run's data.split to stay held out."""
    library: str = ""
    """URI of a mask library for the rooms' masks (furniture silhouettes); empty uses random shapes."""
    pairs: str | None = None
    """URI of synthetic furnished/empty room pairs with exact masks (python -m casalimpia.synthetic --pairs)."""
    resolution: int = 512
    """Side of the square crop of each room that is evaluated (a multiple of 8)."""
    min_mask_fraction: float = 0.01
    """Library masks covering less of their photo than this are not used."""
    max_mask_fraction: float = 0.7
    """Library masks covering more of their photo than this are not used."""
    limit: int | None = None
    """Evaluate at most this many rooms and this many pairs; unset evaluates all."""
    seed: int = 0
    """Seed of the rooms' fixed masks: the same seed gives every set-up the same holes."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    """Decoding and input checks."""

    def __post_init__(self) -> None:
        _check(bool(self.rooms or self.pairs), "data.rooms", "set data.rooms (or --input), data.pairs, or both")
        _check(self.subset in ROOM_SUBSETS, "data.subset", f"must be one of {list(ROOM_SUBSETS)}")
        self.pair_config()  # validates split, resolution and mask fractions under the training keys' names

    def pair_config(self) -> TrainDataConfig:
        """The training data settings that make the same fixed-mask pairs as training validation does."""
        return TrainDataConfig(
            rooms=self.rooms or "-",
            library=self.library,
            split=self.split,
            resolution=self.resolution,
            min_mask_fraction=self.min_mask_fraction,
            max_mask_fraction=self.max_mask_fraction,
            ring_probability=0.0,
            flip=False,
            shape_warmup_pct=0.0 if self.library else 1.0,
            decode=self.decode,
        )


@dataclass
class SetupConfig:
    """One inpainting set-up compared by the evaluation job."""

    method: str = "diffusion"
    """'diffusion' paints with the inpainting model; 'telea' and 'navier-stokes' are OpenCV's classical methods."""
    inpaint: dict[str, Any] = field(default_factory=dict)
    """Changes to the shared inpaint section for this set-up (e.g. lora, model, guidance_scale)."""
    radius: int = 5
    """Neighbourhood radius in pixels of the OpenCV methods."""
    masks: str = "exact"
    """Mask painted in synthetic pairs: 'exact' (the furniture's) or 'segmenter' (what de-furnishing would paint)."""


@dataclass
class EvaluateConfig:
    """The evaluation job: inpainting set-ups side by side on rooms with known empty ground truth."""

    output: str = ""
    """URI the scores, summary, report and resolved config are written under."""
    price_per_hour: float = 2.0
    """Price of one accelerator-hour (of one CPU node without one), for the cost per 1,000 images."""
    report_examples: int = 6
    """Examples shown side by side for every set-up in report.html."""
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """Evaluation examples."""
    inpaint: InpaintConfig = field(default_factory=InpaintConfig)
    """Inpainting settings shared by the diffusion set-ups."""
    setups: dict[str, SetupConfig] = field(default_factory=lambda: {"base": SetupConfig()})
    """Set-ups compared, by name; each diffusion set-up is the inpaint section with its own changes."""
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    """Segmentation that finds the pairs' furniture (set-ups with masks: segmenter) and measures what outputs hold."""
    qa: QaConfig = field(default_factory=QaConfig)
    """The quality gate whose verdicts are counted (flagged, caught); unset max_residual counts none."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Cluster resources: masking_* sizes the segmentation pool, inpainting_* the painting pool."""

    def __post_init__(self) -> None:
        _check(bool(self.output), "output", "is required (in the config or with --output)")
        for source in (self.data.rooms, self.data.pairs):
            if source:
                _check_job_uris(source, self.output)
        _check(self.price_per_hour >= 0, "price_per_hour", "must be non-negative")
        _check(self.report_examples >= 0, "report_examples", "must be non-negative")
        _check(bool(self.setups), "setups", "must name at least one set-up")
        for name, setup in self.setups.items():
            plain = bool(name) and all(c.isalnum() or c in "-_." for c in name) and name not in (".", "..")
            _check(plain, f"setups.{name}", "set-up names use letters, digits, '-', '_' and '.' only")
            methods = list(EVALUATION_METHODS)
            _check(setup.method in methods, f"setups.{name}.method", f"must be one of {methods}")
            _check(setup.radius >= 1, f"setups.{name}.radius", "must be at least 1")
            masks = list(EVALUATION_MASKS)
            _check(setup.masks in masks, f"setups.{name}.masks", f"must be one of {masks}")
            if setup.method == "diffusion":
                self.setup_inpaint(name)
            else:
                _check(not setup.inpaint, f"setups.{name}.inpaint", f"has no meaning for method {setup.method!r}")

    def setup_inpaint(self, name: str) -> InpaintConfig:
        """The inpaint settings of one diffusion set-up: the shared section with the set-up's changes."""
        merged = {**to_dict(self.inpaint), **self.setups[name].inpaint}
        try:
            return build(InpaintConfig, merged, prefix=f"setups.{name}.inpaint.")
        except ConfigError as error:
            message = str(error)
            raise ConfigError(message if message.startswith("setups.") else f"setups.{name}.{message}") from None


SEARCH_KINDS = ("loguniform", "uniform", "randint", "choice", "grid")
SCHEDULERS_TUNE = ("asha", "fifo")


@dataclass
class BenchConfig:
    """The throughput benchmark: the inpainting stage alone, the whole job, and a naive baseline."""

    output: str = "outputs/bench"
    """Local folder the synthetic photos, the job's outputs, config.yaml and the JSON records go under."""
    record: str | None = "BENCHMARKS.md"
    """Markdown file a row of results is appended to; unset (``--set record=``) appends nothing."""
    rates: str | None = "casalimpia/data/painting_rates.yaml"
    """YAML file the job's steady rate is appended to, which --dry-run estimates from; unset appends nothing."""
    quick: bool = False
    """Two batches, one baseline photo, no scaling sweep: checks that everything runs (CI)."""
    photos: int = 64
    """Synthetic photos timed through the whole job and the stage alone."""
    photo_size: list[int] = field(default_factory=lambda: [1024, 768])
    """Width and height of the synthetic furnished photos (JPEG)."""
    write_photo_size: list[int] = field(default_factory=lambda: [4000, 3000])
    """Width and height of the photo whose JPEG output is timed (a phone's 12 MP): block-exact against whole."""
    segment: bool = True
    """Mask with the segmentation model, as the job does; false gives the job the synthetic rooms' true
    furniture masks, so that every photo is painted even by a segmenter with random weights that finds
    no furniture (the masking rate is measured on its own either way)."""
    baseline_photos: int = 4
    """Photos the naive baseline paints, one at a time in fp32 (it is slow)."""
    variants: list[str] = field(default_factory=list)
    """Speed settings to time the stage alone with, each switched on against the config as set: names of
    ray's boolean speed settings (channels_last, compile_unet), '+' joining several."""
    scaling: list[int] = field(default_factory=list)
    """Catalogue sizes for the scaling sweep of the whole job (small photos); empty: no sweep."""
    price_per_hour: float = 3.0
    """Price of one GPU-hour, for the cost per 1,000 images (GPU runs only)."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    """Decoding and input checks of the job."""
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    """Furniture segmentation of the job."""
    inpaint: InpaintConfig = field(default_factory=InpaintConfig)
    """Inpainting, for the job, the stage alone and the baseline."""
    write: WriteConfig = field(default_factory=WriteConfig)
    """Output files of the job."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Cluster resources of the job."""

    def __post_init__(self) -> None:
        _check(bool(self.output), "output", "is required (in the config or with --output)")
        _check("://" not in self.output, "output", "must be a local folder (the benchmark times local disk I/O)")
        _check(self.photos >= 1, "photos", "must be at least 1")
        _check(self.baseline_photos >= 1, "baseline_photos", "must be at least 1")
        ok = len(self.photo_size) == 2 and all(side >= self.decode.min_side for side in self.photo_size)
        _check(ok, "photo_size", f"must be [width, height], each at least decode.min_side ({self.decode.min_side})")
        ok = len(self.write_photo_size) == 2 and all(side >= 16 for side in self.write_photo_size)
        _check(ok, "write_photo_size", "must be [width, height], each at least 16")
        _check(all(size >= 1 for size in self.scaling), "scaling", "sizes must be at least 1")
        for variant in self.variants:
            names = variant.split("+")
            known = all(name in SPEED_SETTINGS for name in names)
            _check(known, "variants", f"{variant!r}: each must join some of {list(SPEED_SETTINGS)} with '+'")
            _check(not all(getattr(self.ray, name) for name in names), "variants", f"{variant!r} is already on in ray")
        _check(self.price_per_hour >= 0, "price_per_hour", "must be non-negative")
        for key in ("masking_actors", "inpainting_actors"):
            # The job's rate is compared with one actor's and priced per GPU held: it needs a known count.
            pool = getattr(self.ray, key)
            _check(pool.max == pool.min, f"ray.{key}", "the benchmark times a fixed pool: give an integer")


@dataclass
class TuneConfig:
    """A hyperparameter sweep: many training runs sampled from a search space, weak ones stopped early.

    The sweep lives in ``<train.storage>/<name>/``: Ray Tune's state, every trial's training run
    under ``runs/<trial id>/`` (with its exported LoRA), ``results.parquet`` and ``best_train.yaml``.
    """

    name: str = "casalimpia-sweep"
    """Sweep name; starting a sweep with the same name and storage resumes it."""
    samples: int = 16
    """Trials drawn from the space; with grid keys, every grid combination is drawn this many times."""
    metric: str = "val/psnr_mask"
    """Reported metric the trials are compared on (per epoch) and the best trial is chosen by."""
    mode: str = "max"
    """Whether a higher ('max') or lower ('min') metric is better."""
    scheduler: str = "asha"
    """'asha' stops weak trials early at epoch milestones; 'fifo' runs every trial to the end."""
    grace_period: int = 1
    """Epochs every trial trains before ASHA may stop it."""
    reduction_factor: float = 3.0
    """ASHA keeps training the best 1/reduction_factor of the trials at each milestone."""
    max_concurrent_trials: int | None = None
    """Trials running at once; unset: as many as the cluster's GPUs (or CPUs, on a CPU sweep) hold."""
    seed: int | None = 0
    """Seed of the draws from the search space; unset draws differently every sweep."""
    space: dict[str, Any] = field(default_factory=dict)
    """Search space shaped like the training config; each searched key holds one of
    {loguniform|uniform|randint: [low, high]} or {choice|grid: [values]}."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training config every trial starts from; train.storage holds the sweep, train.name is per trial."""

    def __post_init__(self) -> None:
        plain = bool(self.name) and "/" not in self.name and self.name not in (".", "..")
        _check(plain, "name", "must be a plain name (no '/')")
        _check(self.samples >= 1, "samples", "must be at least 1")
        _check(self.train.mode == "lora", "train.mode", "must be lora: a sweep compares LoRA runs")
        _check(self.mode in ("max", "min"), "mode", "must be max or min")
        _check(self.scheduler in SCHEDULERS_TUNE, "scheduler", f"must be one of {list(SCHEDULERS_TUNE)}")
        _check(1 <= self.grace_period <= self.train.epochs, "grace_period", "must be in [1, train.epochs]")
        _check(self.reduction_factor > 1, "reduction_factor", "must be above 1")
        _check(
            self.max_concurrent_trials is None or self.max_concurrent_trials >= 1,
            "max_concurrent_trials",
            "must be at least 1 or unset",
        )
        _check(bool(self.space), "space", "must name at least one training key to search")
        for key, spec in self.search_space().items():
            _check_search_key(key, spec, self.train)

    def search_space(self) -> dict[str, dict[str, Any]]:
        """The space flattened to dotted training keys, each with its {kind: values} spec."""
        flat: dict[str, dict[str, Any]] = {}

        def walk(node: Any, path: str) -> None:
            if isinstance(node, dict) and len(node) == 1 and next(iter(node)) in SEARCH_KINDS:
                kind, values = next(iter(node.items()))
                if kind in ("loguniform", "uniform", "randint") and isinstance(values, list):
                    values = [_yaml_number(value) for value in values]
                flat[path] = {kind: values}
            elif isinstance(node, dict) and node:
                for key, child in node.items():
                    walk(child, f"{path}.{key}" if path else str(key))
            else:
                raise ConfigError(
                    f"space.{path}: expected {{{'|'.join(SEARCH_KINDS)}: ...}} or a section of them, got {node!r}"
                )

        walk(self.space, "")
        return flat

    def config_hash(self) -> str:
        """Short hash of what decides the trials; a resumed sweep must have the same."""
        return _hash_sections(
            self,
            ("samples", "metric", "mode", "scheduler", "grace_period", "reduction_factor", "seed", "space", "train"),
        )


def _check_search_key(key: str, spec: dict[str, Any], train: TrainConfig) -> None:
    """One search dimension is well formed and every value it can take makes a valid training config."""
    where = f"space.{key}"
    _check(key not in ("name", "storage"), where, "is set by the sweep for every trial")
    kind, values = next(iter(spec.items()))
    _check(isinstance(values, list) and len(values) >= 1, where, f"{kind} takes a list")
    if kind in ("loguniform", "uniform", "randint"):
        numeric = len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        _check(numeric and values[0] < values[1], where, f"{kind} takes [low, high] with low < high")
        _check(kind != "loguniform" or values[0] > 0, where, "loguniform needs a positive low")
        _check(kind != "randint" or all(isinstance(v, int) for v in values), where, "randint takes integers")
        values = [values[0], values[1] - 1] if kind == "randint" else values
    base = to_dict(train)
    node: Any = base
    for part in key.split("."):
        _check(isinstance(node, dict) and part in node, where, "is not a key of the training config")
        node = node[part]
    _check(not isinstance(node, dict), where, "names a section; search one of its keys")
    for value in values:
        try:
            with_values(train, {key: value})
        except ConfigError as error:
            raise ConfigError(f"{where}: value {value!r} is not valid ({error})") from None


def _check_job_uris(source: str, target: str) -> None:
    _check(bool(source), "input", "is required (in the config or with --input)")
    _check(bool(target), "output", "is required (in the config or with --output)")
    source, target = _comparable(source), _comparable(target)
    _check(source != target, "output", "must differ from input (outputs would be read back as inputs)")
    _check(not target.startswith(source + "/"), "output", "must not be inside input (outputs would be read back)")


def _hash_sections(config: Any, names: tuple[str, ...]) -> str:
    hashed = {name: _plain(getattr(config, name)) for name in names}
    canonical = json.dumps(hashed, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _comparable(uri: str) -> str:
    """The URI with local paths absolute and normalised (``./in/../in/x`` is ``in/x``) and no trailing slash."""
    if uri.lower().startswith("s3://"):
        return uri.rstrip("/")
    return os.path.abspath(uri.removeprefix("file://"))


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data, in field order, for YAML."""
    return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
    """The resolved config as YAML, ready to save beside the output."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split 'a.b=value' into (['a', 'b'], value parsed as a YAML scalar)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {key}: cannot parse {raw!r} as a YAML value") from error
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of data with each 'a.b=value' override applied."""
    merged = json.loads(json.dumps(data))  # deep copy of plain YAML data
    for item in overrides:
        _set_path(merged, *parse_override(item))
    return merged


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for depth, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {'.'.join(path[: depth + 1])} is not a section")
        node = child
    node[path[-1]] = value


def build(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass cls from plain data, checking keys and types; errors name the full key."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(fields)})")
    values = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        # A section with a short form (ActorPoolConfig's integer) says what mapping the short form means.
        if not isinstance(value, dict) and hasattr(hint, "from_scalar"):
            value = hint.from_scalar(value, key)
        return build(hint, value, f"{key}.")
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(name): _coerce(args[1], item, f"{key}.{name}") for name, item in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], item, key) for item in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        value = _yaml_number(value)
    if hint is Any:
        return value
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def with_values(config: Any, values: dict[str, Any]) -> Any:
    """A copy of config with dotted keys ('optim.learning_rate') set to values, validated like a loaded one."""
    data = json.loads(json.dumps(to_dict(config)))
    for key, value in values.items():
        _set_path(data, key.split("."), value)
    return build(type(config), data)


def _yaml_number(value: Any) -> Any:
    """'1e-4' as the float it means: YAML 1.1 reads exponents without a dot ('1e-4') as strings."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    cls: type = DefurnishConfig,
    values: dict[str, Any] | None = None,
) -> Any:
    """Load cls from a YAML file (or defaults when path is None).

    ``overrides`` are 'a.b=value' strings parsed as YAML scalars; ``values`` map keys ('a.b') to
    values set verbatim afterwards (URIs from dedicated flags, which must not be YAML-parsed).
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    data = apply_overrides(data, overrides or [])
    for key, value in (values or {}).items():
        if value is not None:
            _set_path(data, key.split("."), value)
    return build(cls, data)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every job shares: --config, --input, --output and --set."""
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument("--input", help="input URI: a folder, file:// or s3://bucket/prefix (overrides the config)")
    parser.add_argument("--output", help="output URI (overrides the config)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, parsed as YAML (repeatable), e.g. --set inpaint.steps=30",
    )


def config_from_args(
    args: argparse.Namespace, cls: type, *, input_key: str = "input", output_key: str = "output", **values: Any
) -> Any:
    """The config named by parsed job arguments, with --input/--output and extra values applied.

    ``input_key`` and ``output_key`` name the config keys the two URI flags set (e.g. 'data.rooms').
    """
    uris = {input_key: args.input, output_key: args.output}
    return load_config(args.config, args.overrides, cls, {**uris, **values})
