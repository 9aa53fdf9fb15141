"""Inpainting stage: paint the empty room behind the mask, at the photo's own resolution.

The model paints a square crop around the mask (with context around it) at its own resolution;
the result is scaled back and blended into the original photo with a ramp that lies entirely
inside the mask, so every pixel outside the mask keeps its exact original value.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from casalimpia.config import InpaintConfig
from casalimpia.models import load_inpainting_pipeline, local_path, resolve_placement

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
    weight = np.clip(ndimage.distance_transform_edt(mask) / feather, 0.0, 1.0)[mask][:, None] if feather else 1.0
    blended = weight * painted[mask].astype(np.float32) + (1 - weight) * original[mask].astype(np.float32)
    result[mask] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return result


class Inpainter:
    """Callable batch stage: replaces ``image`` with the de-furnished photo and adds ``seconds_inpaint``.

    Rows with an error pass through untouched; rows with an empty mask are copied through unpainted.
    """

    def __init__(self, config: InpaintConfig, dtype: str = "auto", pipeline: Any = None) -> None:
        """Load config.model on the resolved placement, or paint with ``pipeline`` when one is given.

        Training validation passes the pipeline it is training, so it measures what users will get.
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

    def _load_lora(self, uri: str, scale: float) -> None:
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
        images = batch["image"].copy()
        errors = batch["error"].astype(object).copy()
        todo = [i for i in range(count) if not errors[i] and batch["mask_fraction"][i] > 0]
        try:
            painted = self.paint(
                [images[i] for i in todo], [batch["mask"][i] for i in todo], [batch["source"][i] for i in todo]
            )
            for i, result in zip(todo, painted, strict=True):
                images[i] = result
        except (RuntimeError, ValueError) as error:
            log.warning("inpainting a batch of %d failed: %s", len(todo), error)
            for i in todo:
                errors[i] = f"inpainting failed: {str(error).splitlines()[0][:200]}"
        seconds = (time.perf_counter() - start) / max(1, len(todo))
        done = np.zeros(count, dtype=np.float64)
        done[todo] = seconds
        return {**batch, "image": images, "error": errors, "seconds_inpaint": done}

    @torch.inference_mode()
    def paint(self, images: list[np.ndarray], masks: list[np.ndarray], sources: list[str]) -> list[np.ndarray]:
        """De-furnished photos at their own size, one per (photo, mask, source path)."""
        if not images:
            return []
        size = self.config.resolution
        crops, model_images, model_masks, contents = [], [], [], []
        for image, mask in zip(images, masks, strict=True):
            crop = crop_around(mask, context=self.config.context, min_side=size)
            window = (slice(crop.top, crop.top + crop.height), slice(crop.left, crop.left + crop.width))
            model_image, model_mask, content = letterbox(
                Image.fromarray(image[window]), Image.fromarray(mask[window]), size
            )
            crops.append(crop)
            model_images.append(model_image)
            model_masks.append(model_mask)
            contents.append(content)
        generators = [torch.Generator().manual_seed(photo_seed(s, self.config.seed)) for s in sources]
        output = self.pipe(
            prompt=[self.config.prompt] * len(images),
            negative_prompt=[self.config.negative_prompt] * len(images),
            image=model_images,
            mask_image=model_masks,
            height=size,
            width=size,
            num_inference_steps=self.config.steps,
            guidance_scale=self.config.guidance_scale,
            strength=self.config.strength,
            generator=generators,
            output_type="np",
        ).images
        results = []
        for image, mask, crop, content, painted in zip(images, masks, crops, contents, output, strict=True):
            tile = Image.fromarray(np.clip(np.rint(painted * 255), 0, 255).astype(np.uint8))
            tile = tile.crop((0, 0, *content)).resize((crop.width, crop.height), Image.Resampling.LANCZOS)
            full = image.copy()
            window = (slice(crop.top, crop.top + crop.height), slice(crop.left, crop.left + crop.width))
            full[window] = np.asarray(tile)
            results.append(composite(image, full, mask, self.config.feather))
        return results
