"""Examples for segmenter fine-tuning: photos with per-pixel class labels, and the random crops trained on.

A dataset is one folder (local, ``file://`` or ``s3://``)::

    images/<name>.<jpg|jpeg|png|webp>   the photo (EXIF orientation applied, as the masking job reads it)
    labels/<name>.png                   its label map: one uint8 per pixel, the same width and height

A label is an ADE20K class id, 0-indexed as in the model's ``id2label`` (0 wall, 3 floor, 23 sofa,
...), and 255 marks pixels nobody labelled, which no loss or score sees. Names may contain folders
(``images/flat-12/living.jpg`` goes with ``labels/flat-12/living.png``). Examples are split into
train, validation and test by a hash of the name (``split_of``), so adding examples never moves one
from one split to another; the test split is never read.

Training crops follow the recipe OneFormer was trained with on ADE20K: the photo's short side is
scaled to the masking resolution times a random zoom, a random square window is cut (padded with the
mean colour and ignored labels where the photo is smaller), and it is flipped left-right at random.
Photos are resized bilinearly, labels by nearest neighbour, so no pixel gets a class between two.
"""

from __future__ import annotations

import io
import logging
import math
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from casalimpia import storage
from casalimpia.classes import ADE20K_CLASSES, IGNORE_LABEL
from casalimpia.config import DecodeConfig, SegmenterDataConfig
from casalimpia.images import ImageDecodeError, decode_image
from casalimpia.training.data import SPLITS, split_of

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
LABELS_DIR = "labels"
# Crops per task: enough blocks to keep several tasks in flight on a few CPUs, few enough that
# starting tasks does not cost more than cutting the crops (4 per task took half a 2-core CPU).
_CROPS_PER_TASK = 16
PAD_COLOUR = (124, 116, 104)
"""Colour of the padding around small crops: masking's IMAGENET_MEAN, zero after normalisation, as masking pads.
Spelled out so that the crop-making tasks need not import torch."""


@dataclass(frozen=True, eq=False)
class LabelledPhoto:
    """One example: a photo and its label map, at the photo's own size."""

    name: str
    """Relative path of the photo under images/."""
    image: np.ndarray
    """(H, W, 3) uint8 RGB."""
    labels: np.ndarray
    """(H, W) uint8 class ids, IGNORE_LABEL where unlabelled."""


def label_path(image: str) -> str:
    """The label map's path under labels/ for a photo's path under images/."""
    return posixpath.splitext(image)[0] + ".png"


def list_examples(dataset: str, decode: DecodeConfig) -> list[str]:
    """The photos under dataset's images/ that have a label map, as sorted relative paths.

    Raises ValueError naming the problem: no photos, photos without a label map, or two photos
    with one name (``a.jpg`` and ``a.png`` would share ``labels/a.png``); StorageError when
    images/ or labels/ cannot be listed.
    """
    photos = [
        path
        for path in storage.list_files(storage.join(dataset, IMAGES_DIR))
        if posixpath.splitext(path)[1].lower() in decode.suffixes
    ]
    if not photos:
        raise ValueError(f"no photos ({', '.join(decode.suffixes)}) under {storage.join(dataset, IMAGES_DIR)}")
    labels_uri = storage.join(dataset, LABELS_DIR)
    labels = set(storage.list_files(labels_uri))
    unlabelled = [path for path in photos if label_path(path) not in labels]
    if unlabelled:
        raise ValueError(
            f"{len(unlabelled)} of {len(photos)} photos have no label map under {labels_uri}: {unlabelled[:3]}"
        )
    by_label: dict[str, list[str]] = {}
    for path in photos:
        by_label.setdefault(label_path(path), []).append(path)
    shared = [paths for paths in by_label.values() if len(paths) > 1]
    if shared:
        raise ValueError(f"photos sharing a label map (rename one): {shared[0]}")
    return sorted(photos)


def split_examples(photos: Sequence[str], fractions: Sequence[float], limit: int | None = None) -> dict[str, list[str]]:
    """The photos by split (train, validation, test), by a hash of their name without suffix; train cut to limit."""
    split: dict[str, list[str]] = {name: [] for name in SPLITS}
    for path in photos:
        split[split_of(posixpath.splitext(path)[0], fractions)].append(path)
    split["train"] = split["train"][:limit]
    return split


def read_example(dataset: str, photo: str, decode: DecodeConfig) -> LabelledPhoto:
    """A photo and its label map; raises ImageDecodeError or StorageError when either cannot be used."""
    image = decode_image(
        storage.read_bytes(storage.join(dataset, IMAGES_DIR, photo)),
        max_pixels=decode.max_pixels,
        min_side=decode.min_side,
    )
    uri = storage.join(dataset, LABELS_DIR, label_path(photo))
    try:
        with Image.open(io.BytesIO(storage.read_bytes(uri)), formats=("PNG",)) as png:
            mode = png.mode
            labels = np.array(png)
    except Exception as error:
        # Pillow raises OSError, SyntaxError, ValueError, ... on a damaged file; all mean the same here.
        raise ImageDecodeError(f"unreadable label map {uri}: {error}") from error
    # 'P' holds palette indices, which is how many annotation tools store class ids.
    if mode not in ("L", "P"):
        raise ImageDecodeError(f"label map {uri} is {mode}; expected one 8-bit channel of class ids")
    if labels.shape != image.shape[:2]:
        raise ImageDecodeError(f"label map {uri} is {labels.shape[::-1]}, its photo {image.shape[1::-1]} (w, h)")
    unknown = np.setdiff1d(np.unique(labels), [*range(len(ADE20K_CLASSES)), IGNORE_LABEL])
    if unknown.size:
        raise ImageDecodeError(f"label map {uri} holds values that are no ADE20K class id: {unknown[:5].tolist()}")
    return LabelledPhoto(photo, image, labels)


def random_crop(
    example: LabelledPhoto,
    *,
    resolution: int,
    crop: int,
    scale: Sequence[float],
    flip: bool,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """A (crop, crop, 3) uint8 window of the photo and its (crop, crop) labels, zoomed, placed and flipped at random."""
    height, width = example.labels.shape
    zoom = resolution * rng.uniform(scale[0], scale[1]) / min(height, width)
    size = (max(1, round(width * zoom)), max(1, round(height * zoom)))
    image = np.asarray(Image.fromarray(example.image).resize(size, Image.Resampling.BILINEAR))
    labels = np.asarray(Image.fromarray(example.labels).resize(size, Image.Resampling.NEAREST))
    out_image = np.empty((crop, crop, 3), dtype=np.uint8)
    out_image[:] = PAD_COLOUR
    out_labels = np.full((crop, crop), IGNORE_LABEL, dtype=np.uint8)
    top = int(rng.integers(0, max(0, size[1] - crop) + 1))
    left = int(rng.integers(0, max(0, size[0] - crop) + 1))
    window = (slice(top, top + crop), slice(left, left + crop))
    kept_h, kept_w = labels[window].shape
    out_image[:kept_h, :kept_w] = image[window]
    out_labels[:kept_h, :kept_w] = labels[window]
    if flip and rng.random() < 0.5:
        out_image, out_labels = out_image[:, ::-1], out_labels[:, ::-1]
    return np.ascontiguousarray(out_image), np.ascontiguousarray(out_labels)


def make_crops(
    batch: dict[str, np.ndarray], *, dataset: str, config: SegmenterDataConfig, resolution: int
) -> dict[str, np.ndarray]:
    """Ray Data batch function: photo paths in, one random training crop each out (``image``, ``labels``).

    Fresh entropy on every call, so every epoch sees other crops. An example that cannot be read
    is skipped with a warning: one bad file must not stop a training run.
    """
    rng = np.random.default_rng()
    images, labels = [], []
    for photo in map(str, batch["photo"]):
        try:
            example = read_example(dataset, photo, config.decode)
        except (ImageDecodeError, storage.StorageError) as error:
            log.warning("skipping example %s: %s", photo, error)
            continue
        image, label = random_crop(
            example, resolution=resolution, crop=config.crop, scale=config.scale, flip=config.flip, rng=rng
        )
        images.append(image)
        labels.append(label)
    side = config.crop
    return {
        "image": np.stack(images) if images else np.empty((0, side, side, 3), dtype=np.uint8),
        "labels": np.stack(labels) if labels else np.empty((0, side, side), dtype=np.uint8),
    }


def train_dataset(
    dataset: str, photos: list[str], config: SegmenterDataConfig, *, resolution: int, num_cpus: float
) -> ray.data.Dataset:
    """A lazy Ray Dataset of training crops over photos, in another order and with other crops every epoch."""
    import ray.data

    if not photos:
        raise ValueError("no photos to train on")
    rows = [{"photo": photo} for photo in photos]
    dataset_rows = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / _CROPS_PER_TASK))
    dataset_rows = dataset_rows.randomize_block_order(seed=ray.data.RandomSeedConfig(reseed_after_execution=True))
    return dataset_rows.map_batches(
        make_crops,
        fn_kwargs={"dataset": dataset, "config": config, "resolution": resolution},
        batch_size=_CROPS_PER_TASK,
        batch_format="numpy",
        num_cpus=num_cpus,
    )


def validation_examples(dataset: str, photos: list[str], config: SegmenterDataConfig) -> list[LabelledPhoto]:
    """The first config.validation_images photos (sorted) with their labels; unreadable ones are skipped."""
    examples = []
    for photo in sorted(photos)[: config.validation_images]:
        try:
            examples.append(read_example(dataset, photo, config.decode))
        except (ImageDecodeError, storage.StorageError) as error:
            log.warning("skipping validation example %s: %s", photo, error)
    return examples
