"""Image quality of inpainted photos against their targets: PSNR, SSIM and LPIPS, whole and inside the mask;
and the scores of a segmenter's label maps against true ones (``SegmentationScores``).

A masked score averages a per-pixel map over the masked pixels. For PSNR that map is the squared error,
so only masked pixels count; SSIM's map at a pixel also sees its 11x11 window and LPIPS's map the receptive
field of AlexNet (about 200 pixels), so those two also judge how the painted region meets its surroundings.

LPIPS needs torchvision's ImageNet AlexNet. Nothing here downloads it: when its file is not in the torch
hub cache the backbone is untrained (seeded), which keeps scores reproducible between runs of this code but
not comparable with published LPIPS, and a warning says so.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from scipy import ndimage

from casalimpia.classes import IGNORE_LABEL

log = logging.getLogger(__name__)

MAX_PSNR = 100.0
"""PSNR in dB given to identical images, and the cap, so that means over a set stay finite."""

DATA_RANGE = 255.0
LPIPS_SEED = 0
"""Seed of the untrained AlexNet backbone used when the pretrained one is not cached."""

LPIPS_MIN_SIDE = 31
"""Smallest image side AlexNet's pooling layers accept."""

_SSIM_SIGMA = 1.5
# scipy's window radius is int(truncate * sigma + 0.5) = 5, i.e. the 11x11 window of Wang et al.
_SSIM_TRUNCATE = 3.5
_C1 = (0.01 * DATA_RANGE) ** 2
_C2 = (0.03 * DATA_RANGE) ** 2


def _check_pair(output: np.ndarray, target: np.ndarray) -> None:
    if output.shape != target.shape or output.ndim != 3 or output.shape[2] != 3:
        raise ValueError(f"expected two (H, W, 3) images of one size, got {output.shape} and {target.shape}")
    if output.dtype != np.uint8 or target.dtype != np.uint8:
        # The data range of 255 is only right for uint8; a float image in [0, 1] would score absurdly well.
        raise ValueError(f"expected uint8 images, got {output.dtype} and {target.dtype}")


def _check_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != shape[:2]:
        raise ValueError(f"mask of shape {mask.shape} does not fit an image of shape {shape}")
    if not mask.any():
        raise ValueError("empty mask: a masked score over no pixels is undefined")
    return mask


def psnr(output: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB of two uint8 (H, W, 3) images (data range 255), over the masked pixels when a mask is given.

    Capped at MAX_PSNR, which identical images get. An empty mask raises ValueError.
    """
    _check_pair(output, target)
    error = (output.astype(np.float64) - target) ** 2
    if mask is not None:
        error = error[_check_mask(mask, output.shape)]
    mse = float(error.mean())
    if mse == 0.0:
        return MAX_PSNR
    return min(MAX_PSNR, 10.0 * float(np.log10(DATA_RANGE**2 / mse)))


def _ssim_map(output: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM, averaged over the RGB channels: (H, W) float64."""
    x, y = output.astype(np.float64), target.astype(np.float64)

    def local_mean(image: np.ndarray) -> np.ndarray:
        # Mirrored borders keep the map full-size, so that a mask can select any pixel of it.
        return ndimage.gaussian_filter(
            image, sigma=(_SSIM_SIGMA, _SSIM_SIGMA, 0), truncate=_SSIM_TRUNCATE, mode="reflect"
        )

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov = local_mean(x * y) - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + _C1) / (mu_x**2 + mu_y**2 + _C1)
    contrast_structure = (2 * cov + _C2) / (var_x + var_y + _C2)
    return (luminance * contrast_structure).mean(axis=2)


def ssim(output: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean SSIM of two uint8 (H, W, 3) images, per RGB channel and averaged; over the mask when one is given.

    Wang et al. 2004: Gaussian window of sigma 1.5 cut at 11x11, K1=0.01, K2=0.03, data range 255. The map
    is kept full-size with mirrored borders (skimage instead drops a 5-pixel border), so a mask covering the
    whole image gives the whole-image score. An empty mask raises ValueError.
    """
    _check_pair(output, target)
    values = _ssim_map(output, target)
    if mask is not None:
        values = values[_check_mask(mask, output.shape)]
    return float(values.mean())


def alexnet_checkpoint() -> Path:
    """Where torchvision keeps its ImageNet AlexNet weights in the torch hub cache (the file may be absent)."""
    from torchvision.models import AlexNet_Weights

    name = os.path.basename(urlparse(AlexNet_Weights.IMAGENET1K_V1.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def _load_backbone(net: torch.nn.Module, checkpoint: Path) -> None:
    """Put a torchvision AlexNet state dict's feature layers into the lpips package's sliced copy of them."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    # lpips splits torchvision's `features` into slices but keeps each layer's index as its name.
    slice_of = {index: name for name, part in net.named_children() for index, _ in part.named_children()}
    own = {}
    for key, value in state.items():
        if key.startswith("features."):
            index, param = key.removeprefix("features.").split(".", 1)
            if index not in slice_of:
                raise RuntimeError(f"{checkpoint}: layer features.{index} is not part of the LPIPS backbone")
            own[f"{slice_of[index]}.{index}.{param}"] = value
    try:
        net.load_state_dict(own)
    except RuntimeError as exc:
        raise RuntimeError(f"{checkpoint} is not a torchvision AlexNet state dict: {exc}") from exc


class LPIPS:
    """LPIPS distance (the `lpips` package: AlexNet, version 0.1) with its spatial map, on a torch device.

    The calibrated linear layers always come from the package. The AlexNet backbone is torchvision's
    pretrained one when its file is already in the torch hub cache (`alexnet_checkpoint()`), else an untrained
    one seeded with LPIPS_SEED; `pretrained_backbone` says which. Nothing is ever downloaded. Pairs of one
    size go through the network `batch_size` at a time.
    """

    def __init__(self, device: torch.device | str = "cpu", batch_size: int = 8):
        # Imported here so that PSNR and SSIM do not pay for torchvision.
        import lpips

        self.device = torch.device(device)
        self.batch_size = batch_size
        checkpoint = alexnet_checkpoint()
        self.pretrained_backbone = checkpoint.is_file()
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(LPIPS_SEED)
            # lpips still calls torchvision with the deprecated `pretrained=` argument; the warning is noise.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.models\._utils")
            # pnet_rand=True always: with False the package asks torchvision for the ImageNet weights, which
            # downloads them when they are not cached. The cached file is loaded below instead.
            model = lpips.LPIPS(net="alex", version="0.1", pnet_rand=True, verbose=False)
        if self.pretrained_backbone:
            _load_backbone(model.net, checkpoint)
            log.info("LPIPS: pretrained AlexNet backbone from %s", checkpoint)
        else:
            log.warning(
                "LPIPS: no pretrained AlexNet backbone at %s, so the backbone is untrained (seed %d). Scores are "
                "comparable only between runs of this code, not with published LPIPS. For standard scores put "
                "torchvision's AlexNet weights (%s) under $TORCH_HOME/hub/checkpoints.",
                checkpoint,
                LPIPS_SEED,
                checkpoint.name,
            )
        self.model = model.to(self.device).eval()

    def _distances(self, outputs: np.ndarray, targets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole-image distances (N,) and spatial maps (N, H, W) of a batch of same-size uint8 pairs."""
        import lpips

        pixels = torch.from_numpy(np.concatenate([outputs, targets])).to(self.device)
        images = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        features = self.model.net(self.model.scaling_layer(images))
        count, size = len(outputs), images.shape[2:]
        # The package's forward gives either the average or the map; one pass through the backbone gives both.
        layers = []
        for lin, feature in zip(self.model.lins, features, strict=True):
            normalized = lpips.normalize_tensor(feature)
            layers.append(lin((normalized[:count] - normalized[count:]) ** 2))
        whole = sum(layer.mean(dim=(2, 3)) for layer in layers)[:, 0]
        spatial = sum(lpips.upsample(layer, out_HW=size) for layer in layers)[:, 0]
        return whole, spatial

    def __call__(
        self,
        outputs: Sequence[np.ndarray],
        targets: Sequence[np.ndarray],
        masks: Sequence[np.ndarray] | None = None,
    ) -> tuple[list[float], list[float]]:
        """Per pair of uint8 (H, W, 3) images: the whole-image distance and the spatial map's mean over the mask.

        Pairs may differ in size from each other; they are batched by size. Without masks the second list
        equals the first.
        """
        if len(outputs) != len(targets) or (masks is not None and len(masks) != len(outputs)):
            raise ValueError("outputs, targets and masks must have the same length")
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, (output, target) in enumerate(zip(outputs, targets, strict=True)):
            _check_pair(output, target)
            if min(output.shape[:2]) < LPIPS_MIN_SIDE:
                raise ValueError(f"LPIPS needs images of at least {LPIPS_MIN_SIDE} pixels a side, got {output.shape}")
            by_shape.setdefault(output.shape, []).append(index)
        checked = None
        if masks is not None:
            checked = [_check_mask(mask, output.shape) for mask, output in zip(masks, outputs, strict=True)]

        whole, masked = [0.0] * len(outputs), [0.0] * len(outputs)
        with torch.inference_mode():
            for indices in by_shape.values():
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    distances, maps = self._distances(
                        np.stack([outputs[i] for i in chunk]), np.stack([targets[i] for i in chunk])
                    )
                    for row, index in enumerate(chunk):
                        whole[index] = distances[row].item()
                        if checked is None:
                            masked[index] = whole[index]
                        else:
                            mask = torch.tensor(checked[index], device=self.device)
                            masked[index] = maps[row][mask].mean().item()
        return whole, masked


def score(
    outputs: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    masks: Sequence[np.ndarray] | None,
    lpips: LPIPS | None = None,
) -> dict[str, float]:
    """Means over a set of uint8 image pairs: psnr, psnr_mask, ssim, ssim_mask, and lpips, lpips_mask when given.

    Without masks the masked keys equal the whole-image ones.
    """
    if len(outputs) == 0 or len(outputs) != len(targets) or (masks is not None and len(masks) != len(outputs)):
        raise ValueError("score needs a non-empty set of outputs, with as many targets (and masks)")
    values: dict[str, list[float]] = {key: [] for key in ("psnr", "psnr_mask", "ssim", "ssim_mask")}
    for index, (output, target) in enumerate(zip(outputs, targets, strict=True)):
        mask = None if masks is None else masks[index]
        values["psnr"].append(psnr(output, target))
        values["psnr_mask"].append(psnr(output, target, mask))
        # One SSIM map serves both scores; it is the costly part.
        ssim_map = _ssim_map(output, target)
        values["ssim"].append(float(ssim_map.mean()))
        inside = ssim_map if mask is None else ssim_map[_check_mask(mask, output.shape)]
        values["ssim_mask"].append(float(inside.mean()))
    if lpips is not None:
        values["lpips"], values["lpips_mask"] = lpips(outputs, targets, masks)
    return {key: float(np.mean(series)) for key, series in values.items()}


class SegmentationScores:
    """Semantic segmentation scores of predicted label maps against true ones, pooled over a set of photos.

    ``removable`` and ``structure`` are bool lookups by class id: what the masking stage removes
    and the room's structure. ``add`` takes one photo's predicted and true label maps of the same
    shape; ``result`` gives, NaN where undefined:

    - ``miou``: mean over the classes present in the true maps of intersection over union;
    - ``pixel_accuracy``: fraction of labelled pixels given their true class;
    - ``furniture_recall``, ``furniture_precision``, ``furniture_iou``: the removable pixels as one
      class, pooled over all pixels (what a removal mask built from the prediction would cover);
    - ``furniture_recall_median``: the median over photos that have furniture of their own recall;
    - ``structure_removed``: fraction of true structure pixels predicted as removable (must be ~0).
    """

    def __init__(self, removable: np.ndarray, structure: np.ndarray) -> None:
        if removable.shape != structure.shape or removable.dtype != bool or structure.dtype != bool:
            raise ValueError("removable and structure must be bool lookups of the same length, one per class")
        self.removable = removable
        self.structure = structure
        classes = len(removable)
        self.intersection = np.zeros(classes, dtype=np.int64)
        self.predicted = np.zeros(classes, dtype=np.int64)
        self.truth = np.zeros(classes, dtype=np.int64)
        self.furniture = np.zeros(3, dtype=np.int64)  # true positives, false positives, false negatives
        self.structure_counts = np.zeros(2, dtype=np.int64)  # structure pixels, of them predicted removable
        self.recalls: list[float] = []

    def add(self, predicted: np.ndarray, truth: np.ndarray) -> None:
        if predicted.shape != truth.shape:
            raise ValueError(f"predicted {predicted.shape} and true {truth.shape} label maps differ in shape")
        labelled = truth != IGNORE_LABEL
        predicted, truth = predicted[labelled].astype(np.int64), truth[labelled].astype(np.int64)
        classes = len(self.removable)
        if truth.size and max(int(truth.max()), int(predicted.max())) >= classes:
            raise ValueError(f"label maps hold class ids outside [0, {classes}) and {IGNORE_LABEL}")
        self.intersection += np.bincount(truth[predicted == truth], minlength=classes)
        self.predicted += np.bincount(predicted, minlength=classes)
        self.truth += np.bincount(truth, minlength=classes)
        found, wanted = self.removable[predicted], self.removable[truth]
        hits = int((found & wanted).sum())
        self.furniture += [hits, int((found & ~wanted).sum()), int((~found & wanted).sum())]
        room = self.structure[truth]
        self.structure_counts += [int(room.sum()), int((room & found).sum())]
        if wanted.any():
            self.recalls.append(hits / int(wanted.sum()))

    def result(self) -> dict[str, float]:
        present = self.truth > 0
        union = self.predicted + self.truth - self.intersection
        hits, false_alarms, misses = (int(count) for count in self.furniture)
        structure, removed = (int(count) for count in self.structure_counts)
        return {
            "miou": float(np.mean(self.intersection[present] / union[present])) if present.any() else math.nan,
            "pixel_accuracy": _ratio(int(self.intersection.sum()), int(self.truth.sum())),
            "furniture_recall": _ratio(hits, hits + misses),
            "furniture_precision": _ratio(hits, hits + false_alarms),
            "furniture_iou": _ratio(hits, hits + false_alarms + misses),
            "furniture_recall_median": float(np.median(self.recalls)) if self.recalls else math.nan,
            "structure_removed": _ratio(removed, structure),
        }


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else math.nan
