"""The evaluation job: inpainting set-ups side by side on rooms whose empty truth is known.

Two kinds of examples have a ground truth to score against:

- ``rooms/...``: held-out empty-room photos (the training job's hash split, ``data.subset``) with a
  furniture silhouette cut out of each, chosen from the room's path and ``data.seed`` exactly as
  training validation chooses it. The input is the empty room and the target too: whatever a
  set-up paints in the hole is scored against what was there.
- ``pairs/...``: synthetic furnished rooms with their empty twins and exact furniture masks
  (``python -m casalimpia.synthetic FOLDER --pairs``), at their own size. The input is the
  furnished photo, the target the empty one. The segmenter's removal mask of each furnished photo
  is scored against the exact mask, and a set-up with ``masks: segmenter`` paints it, as the
  de-furnishing job would: that set-up measures the whole job, finding and painting together.

``prepare`` checks on the driver everything that can fail for a whole-job reason. ``evaluate``
builds the examples once on Ray Data (rooms and masks, then a segmentation of every target) and
materializes them, so every set-up sees the same examples; then, one streaming pass per set-up,

    examples -> SetupPainter pool -> Scorer pool -> scalar scores on the driver

so only one set-up's model is loaded at a time. The scores land under ``output`` as
``scores.parquet`` (one row per example and set-up), ``summary.parquet`` and ``summary.md`` (one
row per set-up), ``report.html`` and ``config.yaml``.

The read functions run as Ray tasks in many short-lived workers, so this module imports
torch-based code only inside the stages and driver functions that need it.
"""

from __future__ import annotations

import dataclasses
import html
import itertools
import logging
import math
import posixpath
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from casalimpia import storage
from casalimpia.config import TINY, EvaluateConfig, InpaintConfig, MaskingConfig, SetupConfig, to_yaml
from casalimpia.images import ImageDecodeError, decode_image, decode_mask, encode_image
from casalimpia.pipeline import (
    MAX_INPUT_BLOCKS,
    JobError,
    absolute_lora,
    absolute_model,
    absolute_uri,
    actor_pool,
    check_lora,
    check_model,
    object_array,
    pin_masking,
    segmenter_pool,
)
from casalimpia.toy import BANNER, uses_toy

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]

PAIR_FOLDERS = ("furnished", "empty", "masks")
"""Sub-folders of ``data.pairs``: the input photos, their empty twins (targets) and exact masks."""

QUALITY = ("psnr", "psnr_mask", "ssim", "ssim_mask", "lpips", "lpips_mask")
SEGMENTATION = ("mask_recall", "mask_ratio", "structure_removed")
"""The segmenter's removal mask of a pair's furnished photo against the exact mask (NaN for rooms)."""
SCORE_COLUMNS = (
    "mask_fraction",
    *QUALITY,
    "outside_changed",
    "residual_furniture",
    "target_furniture",
    "closer_to_empty",
    "flagged",
    *SEGMENTATION,
)
"""The per-image scores the Scorer computes (scores.parquet adds set-up, source, kind and timing)."""

SUMMARY_COLUMNS = {
    "setup": "the set-up's name (setups.NAME)",
    "method": "diffusion, telea or navier-stokes",
    "images": "examples painted and scored",
    "psnr": "PSNR against the target over the whole image, in dB (higher is better)",
    "psnr_mask": "PSNR inside the mask, in dB (higher is better)",
    "ssim": "SSIM over the whole image (higher is better)",
    "ssim_mask": "SSIM inside the mask; its 11x11 window also judges the seam (higher is better)",
    "lpips": "LPIPS distance over the whole image (lower is better)",
    "lpips_mask": "LPIPS inside the mask (lower is better)",
    "outside_changed_max": "largest fraction of pixels outside the mask that differ from the input: must be 0",
    "residual_furniture": "mean fraction of the mask the segmenter calls furniture in the output but not in "
    "the target: furniture left behind or painted in (lower is better)",
    "target_furniture": "mean fraction of the mask the segmenter calls furniture in the empty target: its own "
    "false alarms, the noise floor of residual_furniture",
    "closer_to_empty": "fraction of synthetic pairs whose output inside the furniture mask is closer (mean squared "
    "error) to the empty room than to the furnished photo: furniture removed, not painted back (higher is better)",
    "flagged": "fraction of outputs the quality gate (qa.max_residual) would send to review (n/a without a gate)",
    "caught": "of the pairs painted back (not closer_to_empty), the fraction the gate flags (higher is better)",
    "mask_recall": "median fraction of a pair's furniture inside the mask painted (the segmenter's with masks: "
    "segmenter, else exact)",
    "mask_ratio": "median size of the mask painted over the furniture's: 1 is exact, the segmenter's dilation adds",
    "structure_removed": "mean fraction of a pair's non-furniture pixels inside the mask painted: walls, floor, "
    "windows and doors lost (must be near 0)",
    "seconds_per_image": "painting seconds per image on one actor, warm-up batches excluded",
    "images_per_second": "images one painting actor paints per second (1 / seconds_per_image)",
    "peak_memory_gb": "peak accelerator memory of a painting actor, GiB (n/a without an accelerator)",
    "cost_per_1000": "cost of painting 1,000 images at price_per_hour per actor-hour",
}
"""Columns of the summary, one row per set-up, with what each means (report.html shows this too)."""

_FORMATS = {
    "psnr": "{:.2f}",
    "psnr_mask": "{:.2f}",
    "outside_changed_max": "{:.2%}",
    "residual_furniture": "{:.2%}",
    "target_furniture": "{:.2%}",
    "closer_to_empty": "{:.0%}",
    "flagged": "{:.0%}",
    "caught": "{:.0%}",
    "mask_recall": "{:.2f}",
    "mask_ratio": "{:.2f}",
    "structure_removed": "{:.2%}",
    "seconds_per_image": "{:.3g}",
    "images_per_second": "{:.3g}",
    "peak_memory_gb": "{:.2f}",
    "cost_per_1000": "{:.3g}",
}
# Bar plots in report.html: (column, what is better).
_PLOTS = (
    ("psnr_mask", "higher is better"),
    ("lpips_mask", "lower is better"),
    ("residual_furniture", "lower is better"),
    ("seconds_per_image", "lower is better"),
)
# Context around the mask's bounding box in the report's crops, as a fraction of the box's side.
_CROP_CONTEXT = 0.5


@dataclass
class EvalPlan:
    """What one evaluation will do, decided on the driver before any Ray work."""

    config: EvaluateConfig
    """The job's config, its local paths made absolute."""
    rooms: list[str]
    """Relative paths under data.rooms of the rooms evaluated (data.subset, then data.limit)."""
    pairs: dict[str, str]
    """Relative path under data.pairs/furnished/ of each pair evaluated -> its mask's path under masks/."""
    listed_rooms: int
    """Photos found under data.rooms before the subset was taken."""

    def line(self) -> str:
        """What will be evaluated, in one line."""
        setups = ", ".join(f"{name} ({setup.method})" for name, setup in self.config.setups.items())
        data = self.config.data
        sources = []
        if data.rooms:
            sources.append(f"{len(self.rooms)} rooms ({data.subset} subset of {self.listed_rooms})")
        if data.pairs:
            sources.append(f"{len(self.pairs)} synthetic pairs")
        return f"{len(self.config.setups)} set-ups [{setups}] on {' and '.join(sources)}"


@dataclass
class EvalSummary:
    """What an evaluation measured."""

    rows: list[dict[str, Any]]
    """One row per set-up, with the SUMMARY_COLUMNS."""
    examples: int
    seconds: float
    output: str

    def table(self) -> str:
        """The summary as a markdown table: what the job prints and saves as summary.md."""
        return markdown_table(self.rows)


def prepare(config: EvaluateConfig) -> EvalPlan:
    """Check the evaluation can run and list its examples; raises JobError with one line otherwise."""
    config = _pinned(config)
    if config.masking.masks is not None:
        raise JobError("masking.masks: residual furniture is measured with the segmentation model; unset masks")
    check_model(config.masking.model, "masking.model")
    _check_setups(config)
    data = config.data
    rooms: list[str] = []
    listed = 0
    if data.rooms:
        rooms, listed = _list_rooms(config)
        _check_library(config)
    pairs = _list_pairs(config) if data.pairs else {}
    try:
        storage.ensure_writable(config.output)
    except storage.StorageError as error:
        raise JobError(f"output: {error}") from None
    return EvalPlan(config, rooms, pairs, listed)


def _pinned(config: EvaluateConfig) -> EvaluateConfig:
    """Local paths made absolute: Ray workers do not share the driver's working directory."""
    data = config.data
    lora = config.inpaint.lora
    return dataclasses.replace(
        config,
        output=absolute_uri(config.output),
        data=dataclasses.replace(
            data,
            rooms=data.rooms and absolute_uri(data.rooms),
            pairs=data.pairs and absolute_uri(data.pairs),
            library=data.library and absolute_uri(data.library),
        ),
        inpaint=dataclasses.replace(
            config.inpaint, model=absolute_model(config.inpaint.model), lora=lora and absolute_lora(lora)
        ),
        setups={name: _pinned_setup(setup) for name, setup in config.setups.items()},
        masking=pin_masking(config.masking),
    )


def _pinned_setup(setup: SetupConfig) -> SetupConfig:
    changes = dict(setup.inpaint)
    if isinstance(changes.get("model"), str):
        changes["model"] = absolute_model(changes["model"])
    if isinstance(changes.get("lora"), str):
        changes["lora"] = absolute_lora(changes["lora"])
    return dataclasses.replace(setup, inpaint=changes)


def _setup_key(config: EvaluateConfig, name: str, key: str) -> str:
    """The config key a set-up's inpaint value comes from: its own change, or the shared section."""
    return f"setups.{name}.inpaint.{key}" if key in config.setups[name].inpaint else f"inpaint.{key}"


def _check_setups(config: EvaluateConfig) -> None:
    """Every diffusion set-up's model and LoRA can be had, and OpenCV is there for the classical ones."""
    classical = [name for name, setup in config.setups.items() if setup.method != "diffusion"]
    if classical:
        try:
            import cv2  # noqa: F401
        except ImportError as error:
            raise JobError(
                f"setups.{classical[0]}.method: OpenCV is needed (pip install opencv-python-headless): {error}"
            ) from None
    checked: set[str] = set()
    for name in config.setups:
        if name in classical:
            continue
        inpaint = config.setup_inpaint(name)
        if inpaint.model not in checked:
            check_model(inpaint.model, _setup_key(config, name, "model"))
            checked.add(inpaint.model)
        if inpaint.lora is not None:
            check_lora(inpaint.lora, _setup_key(config, name, "lora"))


def _list_rooms(config: EvaluateConfig) -> tuple[list[str], int]:
    """The rooms of data.subset (the training job's hash split), data.limit applied, and how many were listed."""
    from casalimpia.training.data import split_of

    data = config.data
    try:
        files = storage.list_files(data.rooms)
    except storage.StorageError as error:
        raise JobError(f"data.rooms: {error}") from None
    photos = [path for path in files if posixpath.splitext(path)[1].lower() in data.decode.suffixes]
    if not photos:
        raise JobError(f"data.rooms: no photos ({', '.join(data.decode.suffixes)}) under {data.rooms}")
    rooms = [path for path in photos if data.subset == "all" or split_of(path, data.split) == data.subset]
    if not rooms:
        raise JobError(
            f"data.subset: none of the {len(photos)} rooms under {data.rooms} falls in the {data.subset} split "
            f"{data.split}; add rooms, or evaluate another subset"
        )
    return rooms[: data.limit], len(photos)


def _check_library(config: EvaluateConfig) -> None:
    from casalimpia.training.data import load_library

    try:
        load_library(config.data.pair_config())
    except (ValueError, storage.StorageError) as error:
        raise JobError(f"data.library: {error}") from None


def _list_pairs(config: EvaluateConfig) -> dict[str, str]:
    """Photos under furnished/ that have an empty/ twin of the same path and a mask under masks/."""
    from casalimpia.masking import mask_candidates

    data = config.data
    try:
        furnished, empty, masks = (storage.list_files(storage.join(data.pairs, folder)) for folder in PAIR_FOLDERS)
    except storage.StorageError as error:
        raise JobError(f"data.pairs: {error}") from None
    empty_set, mask_set = set(empty), set(masks)
    pairs = {}
    for path in furnished:
        if posixpath.splitext(path)[1].lower() not in data.decode.suffixes or path not in empty_set:
            continue
        mask = next((candidate for candidate in mask_candidates(path) if candidate in mask_set), None)
        if mask is not None:
            pairs[path] = mask
    if not pairs:
        raise JobError(
            f"data.pairs: no photo under {data.pairs}/furnished/ has both an empty/ twin and a masks/ mask "
            "(python -m casalimpia.synthetic FOLDER --pairs writes such pairs)"
        )
    return dict(itertools.islice(pairs.items(), data.limit))


# Examples: rooms and pairs as rows of (source, kind, image, target, mask).


def room_examples(batch: Batch) -> Batch:
    """CPU task: PairBuilder's fixed-mask pairs of rooms as examples (sources prefixed ``rooms/``)."""
    return _examples("room", batch["source"], batch["image"], batch["target"], batch["mask"])


def read_pairs(batch: Batch, *, pairs_uri: str, max_pixels: int, min_side: int) -> Batch:
    """CPU task: each synthetic pair's furnished photo (input), empty twin (target) and exact mask.

    Pairs that cannot be read are skipped with a warning, as unreadable rooms are.
    """
    sources, images, targets, masks = [], [], [], []
    for source, mask_path in zip(batch["source"], batch["mask_path"], strict=True):
        try:
            image, target = (
                decode_image(
                    storage.read_bytes(storage.join(pairs_uri, folder, source)),
                    max_pixels=max_pixels,
                    min_side=min_side,
                )
                for folder in PAIR_FOLDERS[:2]
            )
            if image.shape != target.shape:
                raise ImageDecodeError(f"furnished {image.shape[:2]} and empty {target.shape[:2]} differ in size")
            mask_bytes = storage.read_bytes(storage.join(pairs_uri, PAIR_FOLDERS[2], mask_path))
            mask = decode_mask(mask_bytes, size=(image.shape[1], image.shape[0]))
        except (ImageDecodeError, storage.StorageError) as error:
            log.warning("skipping pair %s: %s", source, error)
            continue
        sources.append(source)
        images.append(image)
        targets.append(target)
        masks.append(mask)
    return _examples("pair", sources, images, targets, masks)


def _examples(kind: str, sources: Any, images: Any, targets: Any, masks: Any) -> Batch:
    """Rows of one kind with prefixed sources; examples whose mask is empty have nothing to score and are dropped."""
    keep = []
    for index, mask in enumerate(masks):
        if np.any(mask):
            keep.append(index)
        else:
            log.warning("skipping %s %s: its mask is empty", kind, sources[index])
    return {
        "source": np.array([f"{kind}s/{sources[i]}" for i in keep], dtype=object),
        "kind": np.array([kind] * len(keep), dtype=object),
        "image": object_array([images[i] for i in keep]),
        "target": object_array([targets[i] for i in keep]),
        "mask": object_array([np.asarray(masks[i], dtype=bool) for i in keep]),
    }


class Segmentations:
    """Callable batch stage: what the segmenter makes of each example, computed once for every set-up.

    Adds ``target_furniture``, the pixels it calls furniture in the target: targets are empty rooms,
    so these are its own false alarms, and every set-up's residual furniture is measured net of
    them. Adds ``found_mask``: for a pair, the removal mask the de-furnishing job would paint in
    the furnished photo; for a room, whose input has nothing to find, the exact mask.
    """

    def __init__(self, config: MaskingConfig, dtype: str = "auto") -> None:
        from casalimpia.masking import FurnitureMasker

        self.masker = FurnitureMasker(config, dtype)

    def __call__(self, batch: Batch) -> Batch:
        found = list(batch["mask"])
        pairs = [i for i, kind in enumerate(batch["kind"]) if kind == "pair"]
        for i, mask in zip(pairs, self.masker.segment([batch["image"][i] for i in pairs]), strict=True):
            found[i] = mask
        return {
            **batch,
            "target_furniture": object_array(self.masker.furniture(list(batch["target"]))),
            "found_mask": object_array(found),
        }


# Painting and scoring.


def paint_classical(image: np.ndarray, mask: np.ndarray, *, method: str, radius: int) -> np.ndarray:
    """OpenCV's Telea or Navier-Stokes inpainting of mask; pixels outside mask are returned bit-identical."""
    import cv2

    flag = cv2.INPAINT_TELEA if method == "telea" else cv2.INPAINT_NS
    # OpenCV treats the three channels alike, so RGB needs no conversion to BGR.
    painted = cv2.inpaint(np.ascontiguousarray(image), mask.astype(np.uint8) * 255, radius, flag)
    return np.where(mask[:, :, None], painted, image)


class SetupPainter:
    """Callable batch stage: paints one set-up's ``output`` for each example, and times it.

    Adds ``output``, ``painted_mask`` (the example's exact mask, or with ``masks: segmenter`` the
    one the segmenter found), ``seconds`` (the batch's painting time per image), ``warmup`` (True on
    the actor's first batch, which pays for lazy initialisation and kernel selection) and
    ``peak_memory_gb`` (the actor's peak accelerator memory so far; NaN on the CPU).
    """

    def __init__(
        self,
        setup: SetupConfig,
        inpaint: InpaintConfig | None = None,
        dtype: str = "auto",
        *,
        channels_last: bool = False,
        compile_unet: bool = False,
    ) -> None:
        """``inpaint`` is the set-up's merged inpaint settings, needed for the diffusion method only;
        the speed settings are the de-furnishing job's (see RayConfig), so the timings are its."""
        self.setup = setup
        self.device = None
        self.inpainter = None
        if setup.method == "diffusion":
            from casalimpia.inpainting import Inpainter

            if inpaint is None:
                raise ValueError("a diffusion set-up needs its inpaint settings")
            self.inpainter = Inpainter(inpaint, dtype, channels_last=channels_last, compile_unet=compile_unet)
            self.device = self.inpainter.pipe.device
        self.first_batch = True

    def __call__(self, batch: Batch) -> Batch:
        images = list(batch["image"])
        masks = list(batch["found_mask" if self.setup.masks == "segmenter" else "mask"])
        start = time.perf_counter()
        outputs = self.paint(images, masks, [str(source) for source in batch["source"]])
        seconds = (time.perf_counter() - start) / max(1, len(images))
        count = len(images)
        warmup, self.first_batch = self.first_batch, False
        return {
            **batch,
            "output": object_array(outputs),
            "painted_mask": object_array(masks),
            "seconds": np.full(count, seconds),
            "warmup": np.full(count, warmup),
            "peak_memory_gb": np.full(count, self._peak_memory_gb()),
        }

    def paint(self, images: list[np.ndarray], masks: list[np.ndarray], sources: list[str]) -> list[np.ndarray]:
        """The painted photos, one per (photo, mask, source path); outside each mask they equal the photo.

        A photo whose mask is empty (the segmenter found nothing) is returned as it is, as the
        de-furnishing job writes it.
        """
        if self.inpainter is not None:
            return self.inpainter.paint(images, masks, sources)
        return [
            paint_classical(image, mask, method=self.setup.method, radius=self.setup.radius) if mask.any() else image
            for image, mask in zip(images, masks, strict=True)
        ]

    def _peak_memory_gb(self) -> float:
        if self.device is None or self.device.type == "cpu":
            return math.nan
        import torch

        return torch.accelerator.max_memory_allocated(self.device) / 2**30


def outside_changed(output: np.ndarray, image: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of the pixels outside mask where output differs from image in any channel; 0 when none are outside."""
    outside = ~mask
    if not outside.any():
        return 0.0
    return float(np.any(output != image, axis=2)[outside].mean())


def closer_to_empty(output: np.ndarray, empty: np.ndarray, furnished: np.ndarray, mask: np.ndarray) -> float:
    """1.0 when output inside mask is nearer (mean squared error) to the empty room than to the furnished, else 0."""
    inside = mask.astype(bool)
    painted = output[inside].astype(np.float64)
    to_empty = np.mean((painted - empty[inside]) ** 2)
    to_furnished = np.mean((painted - furnished[inside]) ** 2)
    return float(to_empty < to_furnished)


def mask_scores(painted: np.ndarray, furniture: np.ndarray) -> dict[str, float]:
    """The SEGMENTATION scores of a painted mask against the exact furniture mask of a pair."""
    structure = ~furniture
    return {
        "mask_recall": float((painted & furniture).sum() / max(1, furniture.sum())),
        "mask_ratio": float(painted.sum() / max(1, furniture.sum())),
        "structure_removed": float((painted & structure).sum() / max(1, structure.sum())),
    }


def cost_per_1000(seconds_per_image: float, price_per_hour: float) -> float:
    """Cost of painting 1,000 images at seconds_per_image each on hardware rented at price_per_hour."""
    return seconds_per_image * 1000 / 3600 * price_per_hour


class Scorer:
    """Callable batch stage: the scores of each painted example, as scalar columns.

    Returns ``source``, ``kind``, the SCORE_COLUMNS, the painter's ``seconds``, ``warmup`` and
    ``peak_memory_gb``, and ``preview``: the output as PNG bytes for the sources named in
    ``previews`` (the report's examples), empty for the rest. Pixels stay on the workers.
    """

    def __init__(
        self,
        config: MaskingConfig,
        dtype: str = "auto",
        previews: frozenset[str] = frozenset(),
        max_residual: float | None = None,
    ) -> None:
        """``max_residual`` is the quality gate's threshold (QaConfig), None when no gate is counted."""
        from casalimpia.masking import FurnitureMasker
        from casalimpia.metrics import LPIPS

        self.max_residual = max_residual
        self.masker = FurnitureMasker(config, dtype)
        self.lpips = LPIPS(self.masker.placement.device, batch_size=config.batch_size)
        self.previews = previews

    def __call__(self, batch: Batch) -> Batch:
        from casalimpia.masking import residual_fraction
        from casalimpia.metrics import score

        outputs, targets, masks = list(batch["output"]), list(batch["target"]), list(batch["mask"])
        lpips, lpips_mask = self.lpips(outputs, targets, masks)
        furniture = self.masker.furniture(outputs)
        scores = []
        for i, (output, target, mask) in enumerate(zip(outputs, targets, masks, strict=True)):
            image, painted = batch["image"][i], batch["painted_mask"][i]
            pair = batch["kind"][i] == "pair"
            # The gate sees what the de-furnishing job would: the output re-segmented inside the painted mask.
            gate = residual_fraction(furniture[i], painted)
            scores.append(
                {
                    **score([output], [target], [mask]),
                    "lpips": lpips[i],
                    "lpips_mask": lpips_mask[i],
                    "mask_fraction": float(mask.mean()),
                    "outside_changed": outside_changed(output, image, painted),
                    "residual_furniture": residual_fraction(furniture[i], mask, baseline=batch["target_furniture"][i]),
                    "target_furniture": residual_fraction(batch["target_furniture"][i], mask),
                    "closer_to_empty": closer_to_empty(output, target, image, mask) if pair else math.nan,
                    "flagged": math.nan if self.max_residual is None else float(gate > self.max_residual),
                    **(mask_scores(painted, mask) if pair else dict.fromkeys(SEGMENTATION, math.nan)),
                }
            )
        previews = [
            encode_image(output, "png") if source in self.previews else b""
            for source, output in zip(batch["source"], outputs, strict=True)
        ]
        return {
            "source": batch["source"],
            "kind": batch["kind"],
            **{column: np.array([row[column] for row in scores], dtype=np.float64) for column in SCORE_COLUMNS},
            "seconds": batch["seconds"],
            "warmup": batch["warmup"],
            "peak_memory_gb": batch["peak_memory_gb"],
            "preview": np.array(previews, dtype=object),
        }


# The driver.


def build_examples(plan: EvalPlan) -> Any:
    """The lazy Ray Dataset of examples: source, kind, image, target, mask and target_furniture."""
    import ray

    from casalimpia.training.data import PairBuilder

    config = plan.config
    data, resources = config.data, config.ray
    rows_per_block = config.masking.batch_size
    parts = []
    if plan.rooms:
        rooms = _items([{"source": source} for source in plan.rooms], rows_per_block)
        rooms = rooms.map_batches(
            PairBuilder,
            fn_constructor_kwargs={"config": data.pair_config(), "masks": "fixed", "seed": data.seed},
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=-(-len(plan.rooms) // rows_per_block)),
            batch_size=rows_per_block,
            num_cpus=resources.io_cpus,
        )
        parts.append(rooms.map_batches(room_examples, batch_size=rows_per_block, num_cpus=resources.io_cpus))
    if plan.pairs:
        pairs = _items([{"source": source, "mask_path": mask} for source, mask in plan.pairs.items()], rows_per_block)
        parts.append(
            pairs.map_batches(
                read_pairs,
                fn_kwargs={
                    "pairs_uri": data.pairs,
                    "max_pixels": data.decode.max_pixels,
                    "min_side": data.decode.min_side,
                },
                batch_size=rows_per_block,
                num_cpus=resources.io_cpus,
            )
        )
    examples = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return examples.map_batches(
        Segmentations,
        fn_constructor_kwargs={"config": config.masking, "dtype": resources.dtype},
        **segmenter_pool(config.masking, resources),
    )


def _items(rows: list[dict[str, str]], rows_per_block: int) -> Any:
    import ray

    blocks = max(1, min(-(-len(rows) // rows_per_block), MAX_INPUT_BLOCKS))
    return ray.data.from_items(rows, override_num_blocks=blocks)


def score_setup(examples: Any, config: EvaluateConfig, name: str, previews: frozenset[str]) -> Any:
    """The lazy Ray Dataset of one set-up's scores over the materialized examples (see Scorer's columns)."""

    setup, resources = config.setups[name], config.ray
    diffusion = setup.method == "diffusion"
    inpaint = config.setup_inpaint(name) if diffusion else None
    painted = examples.map_batches(
        SetupPainter,
        fn_constructor_kwargs={
            "setup": setup,
            "inpaint": inpaint,
            "dtype": resources.dtype,
            "channels_last": resources.channels_last,
            "compile_unet": resources.compile_unet,
        },
        compute=actor_pool(resources.inpainting_actors),
        batch_size=(inpaint or config.inpaint).batch_size,
        num_cpus=resources.inpainting_cpus,
        # The classical methods run on the CPU: they must not hold a GPU the scorers could use.
        num_gpus=resources.inpainting_gpus if diffusion else 0,
    )
    return painted.map_batches(
        Scorer,
        fn_constructor_kwargs={
            "config": config.masking,
            "dtype": resources.dtype,
            "previews": previews,
            "max_residual": config.qa.max_residual,
        },
        **segmenter_pool(config.masking, resources),
    )


def evaluate(plan: EvalPlan) -> EvalSummary:
    """Run the plan on the connected Ray cluster; writes scores, summary, report and config under output."""
    config = plan.config
    if TINY in _models(config):
        log.warning("the tiny preset is in use: random weights, the figures show the mechanics, not quality")
    elif uses_toy(*_models(config)):
        log.warning("%s", BANNER)
    storage.write_bytes(storage.join(config.output, "config.yaml"), to_yaml(config).encode())
    start = time.perf_counter()
    examples = build_examples(plan).materialize()
    count = examples.count()
    if count == 0:
        raise JobError(f"data: none of the {len(plan.rooms)} rooms and {len(plan.pairs)} pairs could be read")
    shown = frozenset(_report_sources(plan, config.report_examples))
    scores: list[dict[str, Any]] = []
    previews: dict[tuple[str, str], bytes] = {}
    for name in config.setups:
        started = time.perf_counter()
        rows = []
        for batch in score_setup(examples, config, name, shown).iter_batches(batch_size=None, batch_format="pyarrow"):
            rows += batch.to_pylist()
        for row in sorted(rows, key=lambda row: row["source"]):
            preview = row.pop("preview")
            if preview:
                previews[(name, row["source"])] = preview
            scores.append({"setup": name, **row})
        log.info("set-up %s: %d examples painted and scored in %.1fs", name, len(rows), time.perf_counter() - started)
    rows = summarize(scores, config)
    summary = EvalSummary(rows, count, time.perf_counter() - start, config.output)
    shown_examples = sorted(_take(examples, shown), key=lambda row: row["source"])
    storage.write_rows(storage.join(config.output, "scores.parquet"), scores)
    storage.write_rows(storage.join(config.output, "summary.parquet"), rows)
    storage.write_bytes(storage.join(config.output, "summary.md"), (summary.table() + "\n").encode())
    page = render_report(config, summary, shown_examples, previews)
    storage.write_bytes(storage.join(config.output, "report.html"), page.encode())
    return summary


def _take(examples: Any, sources: frozenset[str]) -> list[dict[str, Any]]:
    """The rows of the named examples, pixels included (a handful: the report's)."""
    from ray.data.expressions import col

    return examples.filter(expr=col("source").is_in(sorted(sources))).take_all() if sources else []


def _models(config: EvaluateConfig) -> list[str | None]:
    """Every model reference the evaluation uses: the segmenter, each diffusion set-up's model and LoRA."""
    inpaints = [config.setup_inpaint(name) for name, s in config.setups.items() if s.method == "diffusion"]
    return [config.masking.model, *(inpaint.model for inpaint in inpaints), *(inpaint.lora for inpaint in inpaints)]


def _report_sources(plan: EvalPlan, count: int) -> list[str]:
    """The examples shown in the report: rooms and pairs in turn, so that both kinds are seen."""
    rooms = [f"rooms/{source}" for source in plan.rooms]
    pairs = [f"pairs/{source}" for source in plan.pairs]
    mixed = [source for both in itertools.zip_longest(rooms, pairs) for source in both if source is not None]
    return mixed[:count]


def summarize(scores: list[dict[str, Any]], config: EvaluateConfig) -> list[dict[str, Any]]:
    """One row per set-up with the SUMMARY_COLUMNS, from the per-image scores.

    ``seconds_per_image`` is painting time on one actor, so with N actors the pool paints N times
    as fast and ``cost_per_1000`` (actor-hours at ``price_per_hour``) stays what one image costs.
    Each actor's first batch pays for lazy initialisation (kernel selection, allocator growth) and
    is left out of the timing unless it is all there is.
    """
    rows = []
    for name, setup in config.setups.items():
        own = [row for row in scores if row["setup"] == name]
        timed = [row for row in own if not row["warmup"]] or own
        seconds = float(np.mean([row["seconds"] for row in timed])) if timed else math.nan
        memory = [row["peak_memory_gb"] for row in own if math.isfinite(row["peak_memory_gb"])]
        rows.append(
            {
                "setup": name,
                "method": setup.method,
                "images": len(own),
                **{metric: _mean(own, metric) for metric in QUALITY},
                "outside_changed_max": max((row["outside_changed"] for row in own), default=math.nan),
                "residual_furniture": _mean(own, "residual_furniture"),
                "target_furniture": _mean(own, "target_furniture"),
                "closer_to_empty": _mean(own, "closer_to_empty"),
                "flagged": _mean(own, "flagged"),
                "caught": _mean([row for row in own if row["closer_to_empty"] == 0.0], "flagged"),
                "mask_recall": _median(own, "mask_recall"),
                "mask_ratio": _median(own, "mask_ratio"),
                "structure_removed": _mean(own, "structure_removed"),
                "seconds_per_image": seconds,
                "images_per_second": 1 / seconds if seconds > 0 else math.nan,
                "peak_memory_gb": max(memory, default=math.nan),
                "cost_per_1000": cost_per_1000(seconds, config.price_per_hour),
            }
        )
    return rows


def _mean(rows: list[dict[str, Any]], column: str) -> float:
    """The mean of a column over the rows that measured it (rooms have no closer_to_empty, for one)."""
    values = [row[column] for row in rows if math.isfinite(row[column])]
    return float(np.mean(values)) if values else math.nan


def _median(rows: list[dict[str, Any]], column: str) -> float:
    values = [row[column] for row in rows if math.isfinite(row[column])]
    return float(np.median(values)) if values else math.nan


def format_value(column: str, value: Any) -> str:
    """A summary cell as printed: NaN (nothing measured) as 'n/a'."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return _FORMATS.get(column, "{:.4f}").format(value)
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Summary rows as a markdown table with every SUMMARY_COLUMNS column."""
    lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(format_value(column, row[column]) for column in SUMMARY_COLUMNS) + " |")
    return "\n".join(lines)


# report.html: self-contained (inline SVG plots, base64 images), readable offline.


def render_report(
    config: EvaluateConfig,
    summary: EvalSummary,
    examples: list[dict[str, Any]],
    previews: dict[tuple[str, str], bytes],
) -> str:
    """The report as an HTML string: summary table, bar plots, and side-by-side crops of a few examples."""
    warning = ""
    if TINY in _models(config):
        warning = (
            '<p class="warn">Made with the <b>tiny</b> preset: small random models for tests and demos. '
            "The figures show the mechanics of the evaluation, not the quality of any set-up.</p>"
        )
    elif uses_toy(*_models(config)):
        warning = f'<p class="warn">Made with the <b>toy</b> preset: {html.escape(BANNER)}.</p>'

    head = "".join(f"<th>{html.escape(column)}</th>" for column in SUMMARY_COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_value(c, row[c]))}</td>" for c in SUMMARY_COLUMNS) + "</tr>"
        for row in summary.rows
    )
    plots = "".join(
        _bar_chart(column, better, [(row["setup"], row[column]) for row in summary.rows]) for column, better in _PLOTS
    )
    glossary = "".join(
        f"<tr><th>{html.escape(column)}</th><td>{html.escape(text)}</td></tr>"
        for column, text in SUMMARY_COLUMNS.items()
    )
    names = list(config.setups)
    example_head = "<th>example</th><th>input (hole)</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in names)
    example_rows = "".join(_example_row(example, names, previews) for example in examples)
    data = config.data
    sources = " and ".join(
        part
        for part in (
            data.rooms and f"rooms <code>{html.escape(data.rooms)}</code> ({html.escape(data.subset)} subset)",
            data.pairs and f"pairs <code>{html.escape(data.pairs)}</code>",
        )
        if part
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>casalimpia evaluation</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
td, th {{ border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; text-align: left; }}
img {{ width: 192px; display: block; image-rendering: pixelated; }}
svg {{ margin: 0 1.5em 1.5em 0; font-size: 12px; }}
.name {{ font-family: monospace; max-width: 14em; word-break: break-all; }}
.warn {{ background: #fff3cd; border: 1px solid #e0c36c; padding: 0.6em; }}
</style></head><body>
<h1>casalimpia evaluation</h1>
{warning}
<p>{summary.examples} examples from {sources}, {len(names)} set-ups, {summary.seconds:.1f}s;
cost at {config.price_per_hour:g} per actor-hour. Output <code>{html.escape(config.output)}</code>.</p>
<h2>Summary</h2>
<table><tr>{head}</tr>{body}</table>
<div>{plots}</div>
<h2>Examples ({len(examples)})</h2>
<table><tr>{example_head}<th>target</th></tr>{example_rows}</table>
<h2>Columns</h2>
<table>{glossary}</table>
</body></html>
"""


def _bar_chart(column: str, better: str, values: list[tuple[str, float]]) -> str:
    """A small horizontal bar chart as inline SVG; NaN values show as 'n/a' without a bar."""
    label_width, bar_width, bar_height, gap, top = 110, 200, 16, 6, 22
    finite = [value for _, value in values if math.isfinite(value)]
    largest = max((abs(value) for value in finite), default=0.0) or 1.0
    height = top + len(values) * (bar_height + gap)
    parts = [f'<text x="0" y="14" font-weight="bold">{html.escape(column)} ({html.escape(better)})</text>']
    for index, (name, value) in enumerate(values):
        y = top + index * (bar_height + gap)
        length = bar_width * max(value, 0.0) / largest if math.isfinite(value) else 0.0
        parts.append(
            f'<text x="{label_width - 6}" y="{y + 12}" text-anchor="end">{html.escape(name)}</text>'
            f'<rect x="{label_width}" y="{y}" width="{length:.1f}" height="{bar_height}" fill="#4a7fb5"/>'
            f'<text x="{label_width + length + 4:.1f}" y="{y + 12}">{html.escape(format_value(column, value))}</text>'
        )
    width = label_width + bar_width + 70
    return f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}">{"".join(parts)}</svg>'


def _example_row(example: dict[str, Any], names: list[str], previews: dict[tuple[str, str], bytes]) -> str:
    """One example side by side: the input with its hole tinted, each set-up's output, the target; cropped."""
    from casalimpia.inpainting import crop_around
    from casalimpia.report import overlay, thumbnail

    source, mask = example["source"], np.asarray(example["mask"], dtype=bool)
    window = crop_around(mask, context=_CROP_CONTEXT, min_side=min(mask.shape) // 2).window

    def cell(rgb: np.ndarray | None) -> str:
        return "<td>not painted</td>" if rgb is None else f'<td><img src="{thumbnail(rgb[window])}"></td>'

    outputs = []
    for name in names:
        png = previews.get((name, source))
        outputs.append(None if png is None else decode_image(png, max_pixels=mask.size, min_side=1))
    cells = [cell(overlay(example["image"], mask)), *map(cell, outputs), cell(example["target"])]
    return f"<tr><td class='name'>{html.escape(source)}<br>mask {mask.mean():.1%}</td>{''.join(cells)}</tr>"
