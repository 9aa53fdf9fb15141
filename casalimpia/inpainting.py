"""Inpainting stage: paint the empty room behind the mask, at the photo's own resolution.

The model paints a square crop around the mask (with context around it) at its own resolution;
the result is scaled back and blended into the original photo with a ramp that lies entirely
inside the mask, so every pixel outside the mask keeps its exact original value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from casalimpia.config import TOY, InpaintConfig
from casalimpia.masking import distance_to_outside
from casalimpia.models import in_halves, load_inpainting_pipeline, local_path, resolve_placement
from casalimpia.toy import TOY_LORA

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
"""File name of a diffusers-format LoRA inside a checkpoint folder."""

_SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
    "pndm": "PNDMScheduler",
}


def photo_seed(source: str, base_seed: int) -> int:
    """A seed per photo from its path, so a rerun paints the same pixels whatever the batching."""
    digest = hashlib.sha256(f"{base_seed}:{source}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class Crop:
    """The square window of a photo the model paints: top/left corner and side, in photo pixels."""

    top: int
    left: int
    height: int
    width: int

    @property
    def window(self) -> tuple[slice, slice]:
        """The crop as an index into the photo's array."""
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)


def crop_around(mask: np.ndarray, *, context: float, min_side: int) -> Crop:
    """The window around the mask's bounding box plus context, as square as the photo allows."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    pad_y, pad_x = context * (bottom - top), context * (right - left)
    side = max(bottom - top + 2 * pad_y, right - left + 2 * pad_x, min_side)
    height, width = mask.shape
    crop_h, crop_w = min(height, round(side)), min(width, round(side))
    center_y, center_x = (top + bottom) / 2, (left + right) / 2
    crop_top = int(np.clip(round(center_y - crop_h / 2), 0, height - crop_h))
    crop_left = int(np.clip(round(center_x - crop_w / 2), 0, width - crop_w))
    return Crop(crop_top, crop_left, crop_h, crop_w)


def letterbox(image: Image.Image, mask: Image.Image, size: int) -> tuple[Image.Image, Image.Image, tuple[int, int]]:
    """Scale a crop to fit a size x size square, padding the short side with mirrored pixels.

    The padding is unmasked, so the model treats it as context and never paints it. Returns the
    scaled size (width, height) of the real content, which sits in the top-left corner.
    """
    scale = size / max(image.size)
    content = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    pixels = np.asarray(image.resize(content, Image.Resampling.LANCZOS))
    pad = ((0, size - content[1]), (0, size - content[0]), (0, 0))
    padded = np.pad(pixels, pad, mode="symmetric")
    mask_pixels = np.zeros((size, size), dtype=np.uint8)
    mask_pixels[: content[1], : content[0]] = np.asarray(mask.resize(content, Image.Resampling.BOX)) > 0
    return Image.fromarray(padded), Image.fromarray(mask_pixels * 255), content


def composite(original: np.ndarray, painted: np.ndarray, mask: np.ndarray, feather: int) -> np.ndarray:
    """Blend painted into original inside mask; pixels outside mask are returned bit-identical.

    The blend weight rises from 1/feather at the mask's edge to 1 at `feather` pixels inside it,
    which hides the seam without letting painted pixels leak outside the mask.
    """
    result = original.copy()
    if not mask.any():
        return result
    if feather:
        # The distances only need the mask's bounding box grown by one pixel: every pixel outside it is
        # background, and the nearest background pixel of a masked one is never farther than that ring.
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        box = (
            slice(max(rows[0] - 1, 0), min(rows[-1] + 2, mask.shape[0])),
            slice(max(cols[0] - 1, 0), min(cols[-1] + 2, mask.shape[1])),
        )
        distance = distance_to_outside(mask[box])
        weight = np.clip(distance[mask[box]].astype(np.float64) / feather, 0.0, 1.0)[:, None]
    else:
        weight = 1.0
    blended = weight * painted[mask].astype(np.float32) + (1 - weight) * original[mask].astype(np.float32)
    result[mask] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return result


def to_paint(batch: Batch) -> list[int]:
    """Rows of a batch the model paints: decoded without error, with furniture masked."""
    return [i for i in range(len(batch["source"])) if not batch["error"][i] and batch["mask_fraction"][i] > 0]


@dataclass(frozen=True)
class ModelInput:
    """One photo's crop as the model paints it, and where it goes back."""

    image: np.ndarray
    """The letterboxed crop, resolution x resolution x 3, uint8."""
    mask: np.ndarray
    """Its mask, resolution x resolution, uint8 0 or 255."""
    crop: Crop
    """The window of the photo the crop was cut from."""
    content: tuple[int, int]
    """Width and height of the scaled crop inside the letterbox (its top-left corner)."""


def model_input(image: np.ndarray, mask: np.ndarray, config: InpaintConfig) -> ModelInput:
    """The square crop around a photo's mask, with context, scaled to the model's resolution."""
    crop = crop_around(mask, context=config.context, min_side=config.resolution)
    model_image, model_mask, content = letterbox(
        Image.fromarray(image[crop.window]), Image.fromarray(mask[crop.window]), config.resolution
    )
    return ModelInput(np.asarray(model_image), np.asarray(model_mask), crop, content)


def blend_back(
    image: np.ndarray, mask: np.ndarray, painted: np.ndarray, crop: Crop, content: tuple[int, int], feather: int
) -> np.ndarray:
    """The photo with the model's painted crop scaled back into its window and blended inside the mask."""
    tile = Image.fromarray(painted).crop((0, 0, *content)).resize((crop.width, crop.height), Image.Resampling.LANCZOS)
    full = image.copy()
    full[crop.window] = np.asarray(tile)
    return composite(image, full, mask, feather)


def crop_for_painting(batch: Batch, *, config: InpaintConfig) -> Batch:
    """CPU stage before the painting actors: adds each photo's crop as the model paints it.

    Cropping, scaling and blending are image work for the CPU; done here and in ``blend_painted``
    they overlap with the GPU's painting instead of stalling it. Rows not painted get blank crops,
    so the columns have one shape. Adds ``model_image``, ``model_mask``, ``crop`` and ``content``.
    """
    count, size = len(batch["source"]), config.resolution
    model_images = np.zeros((count, size, size, 3), dtype=np.uint8)
    model_masks = np.zeros((count, size, size), dtype=np.uint8)
    crops = np.zeros((count, 4), dtype=np.int64)
    contents = np.zeros((count, 2), dtype=np.int64)
    for i in to_paint(batch):
        prepared = model_input(batch["image"][i], batch["mask"][i], config)
        model_images[i], model_masks[i] = prepared.image, prepared.mask
        crops[i] = dataclasses.astuple(prepared.crop)
        contents[i] = prepared.content
    return {**batch, "model_image": model_images, "model_mask": model_masks, "crop": crops, "content": contents}


def blend_painted(batch: Batch, *, feather: int) -> Batch:
    """CPU stage after the painting actors: each painted crop blended back into its photo.

    Replaces ``image`` and drops the columns ``crop_for_painting`` and the Inpainter added.
    """
    images = batch["image"].copy()
    for i in to_paint(batch):
        crop = Crop(*(int(value) for value in batch["crop"][i]))
        content = (int(batch["content"][i][0]), int(batch["content"][i][1]))
        images[i] = blend_back(images[i], batch["mask"][i], batch["painted"][i], crop, content, feather)
    kept = {key: value for key, value in batch.items() if key not in ("painted", "crop", "content")}
    return {**kept, "image": images}


class Inpainter:
    """Callable batch stage on the painting actors: paints the crops ``crop_for_painting`` made.

    Replaces ``model_image`` and ``model_mask`` with ``painted`` (the painted crops) and adds
    ``seconds_inpaint``. Rows with an error or an empty mask are left out. A batch that runs out of
    accelerator memory is painted in halves, down to single photos; a photo that runs out alone, or a
    batch the model fails on otherwise, gets the error on each of its rows. In-process callers paint
    whole photos with ``paint``.
    """

    def __init__(
        self,
        config: InpaintConfig,
        dtype: str = "auto",
        pipeline: Any = None,
        *,
        channels_last: bool = False,
        compile_unet: bool = False,
    ) -> None:
        """Load config.model on the resolved placement, or paint with ``pipeline`` when one is given.

        Training validation passes the pipeline it is training, so it measures what users will get.
        ``channels_last`` and ``compile_unet`` are speed settings (see RayConfig), applied after any
        LoRA is fused; training validation leaves them off.
        """
        self.config = config
        if pipeline is None:
            placement = resolve_placement(dtype)
            log.info("inpainting on %s", placement.reason)
            pipeline = load_inpainting_pipeline(config.model, placement)
        self.pipe = pipeline
        if config.scheduler != "default":
            import diffusers

            scheduler_cls = getattr(diffusers, _SCHEDULERS[config.scheduler])
            self.pipe.scheduler = scheduler_cls.from_config(self.pipe.scheduler.config)
        if config.lora is not None:
            self._load_lora(config.lora, config.lora_scale)
        speed_up(self.pipe, channels_last=channels_last, compile_unet=compile_unet)

    def _load_lora(self, uri: str, scale: float) -> None:
        if uri == TOY:
            uri = str(TOY_LORA)
        if uri.endswith(".safetensors"):
            folder_uri, _, weight_name = uri.rpartition("/")
        else:
            folder_uri, weight_name = uri, LORA_WEIGHTS
        folder = local_path(folder_uri)
        self.pipe.load_lora_weights(folder, weight_name=weight_name, adapter_name="casalimpia")
        # Fusing folds the adapter into the UNet weights: inference then costs what the base model does.
        self.pipe.fuse_lora(lora_scale=scale, adapter_names=["casalimpia"])
        self.pipe.unload_lora_weights()
        log.info("LoRA %s fused at scale %.2f", uri, scale)

    def __call__(self, batch: Batch) -> Batch:
        start = time.perf_counter()
        count = len(batch["source"])
        errors = batch["error"].astype(object).copy()
        todo = to_paint(batch)
        painted = np.zeros_like(batch["model_image"])

        def paint_rows(rows: list[int]) -> np.ndarray:
            sources = [batch["source"][i] for i in rows]
            return self.paint_crops(batch["model_image"][rows], batch["model_mask"][rows], sources)

        try:
            # Out of memory, the batch is painted in halves: only a photo that fails alone fails.
            outcomes = in_halves(paint_rows, todo, "inpainting") if todo else []
        except (RuntimeError, ValueError) as error:
            log.warning("inpainting a batch of %d failed: %s", len(todo), error)
            outcomes = [error] * len(todo)
        for i, outcome in zip(todo, outcomes, strict=True):
            if isinstance(outcome, Exception):
                errors[i] = f"inpainting failed: {str(outcome).splitlines()[0][:200]}"
            else:
                painted[i] = outcome
        seconds = (time.perf_counter() - start) / max(1, len(todo))
        done = np.zeros(count, dtype=np.float64)
        done[todo] = seconds
        kept = {key: value for key, value in batch.items() if key not in ("model_image", "model_mask")}
        return {**kept, "painted": painted, "error": errors, "seconds_inpaint": done}

    def paint(self, images: list[np.ndarray], masks: list[np.ndarray], sources: list[str]) -> list[np.ndarray]:
        """De-furnished photos at their own size, one per (photo, mask, source path), all in this process.

        A photo whose mask is empty is returned as it is, as the de-furnishing job writes it.
        """
        outputs = list(images)
        rows = [i for i, mask in enumerate(masks) if mask.any()]
        if not rows:
            return outputs
        inputs = {i: model_input(images[i], masks[i], self.config) for i in rows}
        painted = self.paint_crops(
            np.stack([inputs[i].image for i in rows]),
            np.stack([inputs[i].mask for i in rows]),
            [sources[i] for i in rows],
        )
        for i, tile in zip(rows, painted, strict=True):
            item = inputs[i]
            outputs[i] = blend_back(images[i], masks[i], tile, item.crop, item.content, self.config.feather)
        return outputs

    @torch.inference_mode()
    def paint_crops(self, images: np.ndarray, masks: np.ndarray, sources: list[str]) -> np.ndarray:
        """The model's painting of square crops (N x size x size x 3 uint8, masks 0/255) as uint8."""
        size = self.config.resolution
        generators = [torch.Generator().manual_seed(photo_seed(source, self.config.seed)) for source in sources]
        output = self.pipe(
            prompt=[self.config.prompt] * len(sources),
            negative_prompt=[self.config.negative_prompt] * len(sources),
            image=[Image.fromarray(image) for image in images],
            mask_image=[Image.fromarray(mask) for mask in masks],
            height=size,
            width=size,
            num_inference_steps=self.config.steps,
            guidance_scale=self.config.guidance_scale,
            strength=self.config.strength,
            generator=generators,
            output_type="np",
        ).images
        return np.clip(np.rint(output * 255), 0, 255).astype(np.uint8)


def speed_up(pipe: Any, *, channels_last: bool, compile_unet: bool) -> None:
    """Apply the inference speed settings to a loaded pipeline (after any LoRA is fused into it)."""
    if channels_last:
        # NHWC lets cuDNN pick tensor-core convolution kernels without transposing every activation.
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if compile_unet:
        # Compiled on the first batch; a second batch size recompiles once with a dynamic batch dimension.
        pipe.unet = torch.compile(pipe.unet, fullgraph=True)
    if channels_last or compile_unet:
        log.info("UNet speed settings: channels_last=%s, compile=%s", channels_last, compile_unet)
