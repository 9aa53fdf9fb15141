"""Masking stage: which pixels of each photo are furniture to remove.

``FurnitureMasker`` runs OneFormer semantic segmentation on a batch of photos, turns the label map
into a removal mask with the class policy, and refines it (drop specks, fill holes, grow the edge).
It also names the removal classes found in each photo, for the mask library's index.
Refinement runs at segmentation resolution, where it is cheap and as precise as the labels are,
and only the final mask is upsampled to the photo's own size. With ``masking.masks`` set, masks are
read from the user's folder instead and no model is loaded.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from casalimpia import storage
from casalimpia.classes import join_class_names, normalize_label, removal_classes
from casalimpia.config import MaskingConfig
from casalimpia.images import ImageDecodeError, decode_mask
from casalimpia.models import Placement, in_halves, load_segmenter, resolve_placement

log = logging.getLogger(__name__)

# OneFormer's ADE20K checkpoints are trained on ImageNet-normalised inputs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TASK_PROMPT = "the task is semantic"

Batch = dict[str, np.ndarray]


def task_tokens(tokenizer: Any, length: int) -> torch.Tensor:
    """The token ids of TASK_PROMPT, (1, length): what OneFormer is told at inference and in training."""
    tokens = tokenizer(TASK_PROMPT, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return tokens["input_ids"]


def distance_to_outside(mask: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance of each pixel of a bool mask to the nearest pixel outside it (0 outside).

    OpenCV's transform: equal to scipy's ``distance_transform_edt`` to float32 precision and several
    times faster, which matters in the actors. The image border is not "outside": a mask without
    any outside pixel gets distances larger than any photo.
    """
    return cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def refine_mask(mask: np.ndarray, *, dilation_px: float, min_component_px: int, fill_holes: bool) -> np.ndarray:
    """Drop connected regions smaller than min_component_px, fill enclosed holes, grow by dilation_px."""
    if min_component_px > 0 and mask.any():
        labels, count = ndimage.label(mask)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        keep = sizes >= min_component_px
        keep[0] = False
        mask = keep[labels]
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    if dilation_px > 0 and mask.any():
        # A Euclidean distance threshold grows the mask by a true disc, at any radius, in one pass.
        mask = distance_to_outside(~mask) <= dilation_px
    return mask


def mask_candidates(source: str) -> list[str]:
    """Relative paths where a user-supplied mask for `source` may live, most specific first.

    The first form is what this job writes under masks/, so a previous run's masks can be fed back.
    """
    stem = source.rsplit(".", 1)[0] if "." in source.rsplit("/", 1)[-1] else source
    return list(dict.fromkeys([f"{source}.png", f"{stem}.png", source]))


class FurnitureMasker:
    """Callable batch stage: adds ``mask``, ``mask_fraction``, ``classes`` and ``seconds_mask`` columns.

    Input rows carry ``source`` (relative path), ``image`` ((H, W, 3) uint8) and ``error``
    (empty when the row is healthy). Rows that already failed pass through untouched.
    ``classes`` holds the sorted names of the removal classes in the photo's label map, joined by
    ``join_class_names``; it is empty for user-supplied masks and failed rows.
    """

    def __init__(self, config: MaskingConfig, dtype: str = "auto", segmenter: tuple[Any, Any] | None = None) -> None:
        """Load config.model on the resolved placement, or segment with ``segmenter`` (model, tokenizer).

        Segmenter training passes the model it trains (in its inference form), so that validation
        measures what this stage will do with the exported checkpoint.
        """
        self.config = config
        self.model = None
        if config.masks is not None:
            log.info("masking: using the masks under %s, no segmentation model", config.masks)
            return
        if segmenter is None:
            self.placement = resolve_placement(dtype)
            log.info("masking on %s", self.placement.reason)
            self.model, tokenizer = load_segmenter(config.model, self.placement)
        else:
            self.model, tokenizer = segmenter
            weight = next(self.model.parameters())
            self.placement = Placement(weight.device, weight.dtype, "the caller's model")
        id2label = self.model.config.id2label
        self.removal_ids = self._removal_ids(id2label)
        self.class_names = {int(i): normalize_label(label) for i, label in id2label.items()}
        self.task_inputs = task_tokens(tokenizer, self.model.config.task_seq_len).to(self.placement.device)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.placement.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.placement.device).view(1, 3, 1, 1)

    def _removal_ids(self, id2label: dict[int, str]) -> np.ndarray:
        label2id = {normalize_label(label): int(i) for i, label in id2label.items()}
        names = removal_classes(self.config.preset, self.config.remove, self.config.keep)
        missing = [name for name in names if name not in label2id]
        if missing:
            raise ValueError(f"masking.model {self.config.model!r} has no classes named {missing}")
        ids = np.zeros(len(id2label), dtype=bool)
        ids[[label2id[name] for name in names]] = True
        return ids

    def __call__(self, batch: Batch) -> Batch:
        start = time.perf_counter()
        count = len(batch["source"])
        masks = np.empty(count, dtype=object)
        classes = np.full(count, "", dtype=object)
        fractions = np.zeros(count, dtype=np.float64)
        errors = batch["error"].astype(object).copy()
        healthy = [i for i in range(count) if not errors[i]]
        if self.model is None:
            results = {i: self._read_user_mask(batch["source"][i], batch["image"][i].shape[:2]) for i in healthy}
        else:
            results = self._segment_in_halves(batch["image"], healthy)
        for i in range(count):
            outcome = results.get(i)
            if isinstance(outcome, tuple):
                masks[i], classes[i] = outcome
                fractions[i] = float(masks[i].mean())
            else:
                masks[i] = np.zeros((0, 0), dtype=bool)
                if outcome is not None:
                    errors[i] = outcome
        seconds = (time.perf_counter() - start) / max(1, len(healthy))
        return {
            **batch,
            "mask": masks,
            "mask_fraction": fractions,
            "classes": classes,
            "seconds_mask": np.where([bool(e) for e in errors], 0.0, seconds),
            "error": errors,
        }

    def _read_user_mask(self, source: str, shape: tuple[int, int]) -> tuple[np.ndarray, str] | str:
        for candidate in mask_candidates(source):
            uri = storage.join(self.config.masks, candidate)
            if storage.exists(uri):
                try:
                    return decode_mask(storage.read_bytes(uri), size=(shape[1], shape[0])), ""
                except ImageDecodeError as error:
                    return f"bad mask {candidate}: {error}"
        return f"no mask for {source} under {self.config.masks}"

    def _segment_in_halves(self, images: np.ndarray, rows: list[int]) -> dict[int, tuple[np.ndarray, str] | str]:
        """Segment the photos of these rows at once; if that fails (out of memory, a photo the model cannot
        take), in halves down to single photos, so that only a photo that fails alone fails.

        Each row maps to its mask and class names, or to a one-line error.
        """

        def segment_rows(part: list[int]) -> list[tuple[np.ndarray, str]]:
            photos = [images[i] for i in part]
            return [
                (self.removal_mask(labels, photo.shape[:2]), self.present_classes(labels))
                for photo, labels in zip(photos, self.label_maps(photos), strict=True)
            ]

        outcomes = in_halves(segment_rows, rows, "segmentation", (RuntimeError, ValueError))
        return {
            row: f"segmentation failed: {str(outcome).splitlines()[0][:200]}"
            if isinstance(outcome, Exception)
            else outcome
            for row, outcome in zip(rows, outcomes, strict=True)
        }

    def segment(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Removal masks, (H, W) bool at each photo's own size, for a list of RGB photos."""
        return [
            self.removal_mask(labels, image.shape[:2])
            for image, labels in zip(images, self.label_maps(images), strict=True)
        ]

    @torch.inference_mode()
    def label_maps(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Class id of every pixel, at segmentation resolution (aspect kept), for a list of RGB photos."""
        device, dtype = self.placement.device, self.placement.dtype
        short = self.config.resolution
        sizes = [_scaled_size(image.shape[:2], short) for image in images]
        height = max(h for h, _ in sizes)
        width = max(w for _, w in sizes)
        # Pad to a common size (multiple of 32 for the Swin backbone) so the batch is one tensor.
        height, width = -(-height // 32) * 32, -(-width // 32) * 32
        pixels = torch.zeros(len(images), 3, height, width, device=device)
        for i, (image, (h, w)) in enumerate(zip(images, sizes, strict=True)):
            # A copy: arrays from Ray are read-only, which torch.from_numpy warns about.
            tensor = torch.tensor(image, device=device).permute(2, 0, 1)[None].float() / 255
            resized = F.interpolate(tensor, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
            pixels[i, :, :h, :w] = ((resized - self.mean) / self.std)[0]
        task = self.task_inputs.expand(len(images), -1)
        outputs = self.model(pixel_values=pixels.to(dtype), task_inputs=task)
        class_probs = outputs.class_queries_logits.float().softmax(-1)[..., :-1]
        mask_probs = outputs.masks_queries_logits.float().sigmoid()
        mask_probs = F.interpolate(mask_probs, size=(height, width), mode="bilinear", align_corners=False)
        # Class ids fit int16: a quarter of argmax's int64 bytes to copy off the accelerator.
        labels = torch.einsum("bqc,bqhw->bchw", class_probs, mask_probs).argmax(1).to(torch.int16).cpu().numpy()
        return [labels[i, :h, :w] for i, (h, w) in enumerate(sizes)]

    def present_classes(self, labels: np.ndarray) -> str:
        """The removal classes found in a label map: sorted names joined by join_class_names."""
        found = np.unique(labels)
        return join_class_names(sorted(self.class_names[int(i)] for i in found[self.removal_ids[found]]))

    def removal_mask(self, labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """The refined removal mask of a label map, upsampled to the photo's (H, W) shape."""
        mask = self.removal_ids[labels]
        h, w = mask.shape
        mask = refine_mask(
            mask,
            dilation_px=self.config.dilation * min(h, w),
            min_component_px=int(self.config.min_component * h * w),
            fill_holes=self.config.fill_holes,
        )
        return _upsample_nearest(mask, shape)

    def furniture(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Pixels labelled as a removal class, unrefined, (H, W) bool at each photo's own size.

        This is what the segmenter sees, without the growth and hole filling that make a good
        removal mask: the measure of furniture left in (or painted into) an output.
        """
        return [
            _upsample_nearest(self.removal_ids[labels], image.shape[:2])
            for image, labels in zip(images, self.label_maps(images), strict=True)
        ]


class ResidualFurniture:
    """Callable batch stage, the quality gate: adds ``residual``, the fraction of each mask still furniture.

    It segments the painted ``image`` again with the masking model (also when the masks came from
    the user) and measures, inside the row's ``mask``, the pixels labelled as a removal class.
    Failed rows get NaN; a batch the segmenter cannot handle is measured in halves, and a photo it
    cannot handle alone gets NaN, which the gate treats as 'review', so nothing unmeasured passes as clean.
    """

    def __init__(self, config: MaskingConfig, dtype: str = "auto") -> None:
        self.masker = FurnitureMasker(dataclasses.replace(config, masks=None), dtype)

    def __call__(self, batch: Batch) -> Batch:
        count = len(batch["source"])
        residual = np.full(count, np.nan)
        healthy = [i for i in range(count) if not batch["error"][i]]
        residual[healthy] = 0.0  # an empty mask leaves nothing to check
        painted = [i for i in healthy if batch["mask"][i].any()]
        found = in_halves(
            lambda rows: self.masker.furniture([batch["image"][i] for i in rows]),
            painted,
            "quality gate segmentation",
            (RuntimeError, ValueError),
        )
        for i, furniture in zip(painted, found, strict=True):
            # A photo the segmenter fails on, alone, is unmeasured (NaN): the gate sends it to review.
            failed = isinstance(furniture, Exception)
            residual[i] = np.nan if failed else residual_fraction(furniture, batch["mask"][i])
        return {**batch, "residual": residual}


def residual_fraction(furniture: np.ndarray, region: np.ndarray, baseline: np.ndarray | None = None) -> float:
    """Fraction of region's pixels that are furniture, not counting those the baseline calls furniture too.

    With the ground-truth empty room's furniture as baseline, the segmenter's own false alarms on
    that room cancel out and what remains is furniture the inpainting left or painted. 0 for an
    empty region.
    """
    if not region.any():
        return 0.0
    found = furniture & region
    if baseline is not None:
        found &= ~baseline
    return float(found.sum() / region.sum())


def _upsample_nearest(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    h, w = mask.shape
    rows = (np.arange(shape[0]) * h // shape[0]).clip(max=h - 1)
    cols = (np.arange(shape[1]) * w // shape[1]).clip(max=w - 1)
    return np.ascontiguousarray(mask[rows[:, None], cols[None, :]])


def _scaled_size(shape: tuple[int, ...], short: int) -> tuple[int, int]:
    """Size with the shorter side at `short`, aspect kept, long side capped at 4x the short side."""
    h, w = shape[:2]
    scale = short / min(h, w)
    return max(1, min(round(h * scale), 4 * short)), max(1, min(round(w * scale), 4 * short))
