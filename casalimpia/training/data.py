"""Synthetic training pairs for the LoRA: empty rooms with furniture silhouettes laid over them.

Nobody photographs a listing twice, furnished and empty, so pairs are built the other way round.
Take a photo of an empty room (the target), lay over it the silhouette of furniture segmented from
a *different*, furnished photo (a mask of the library written by ``jobs/masks.py``) and train the
model to restore the empty room under that mask. Library masks have the shapes, sizes and places
of real furniture, which random shapes do not; :func:`random_shapes` is only a warm-up.

Zoom-and-crop, never letterbox or stretch. A library mask comes from a photo of another size and
aspect. It is scaled uniformly until it covers the room, then cropped (:func:`fit_to`): stretching
would distort the silhouettes, and letterboxing would leave furniture-free bands and shift the rest
away from where furniture stands (on the floor, against the walls). The square training crop is
taken the same way: the short side scaled to the resolution, then a square window.

The margin ring. Segmentation misses things at the edges of furniture: contact shadows,
reflections on a polished floor, the tip of a chair leg. When a real photo is de-furnished these
remnants sit just outside the hole, and a model that has only seen clean borders continues them
into the room (a shadow grows back a sofa). For every mask the library keeps a ring of the
furnished photo's real pixels just outside the mask. Pasted around the hole in the empty room, it
shows the model such cues while its target stays the empty room, so it learns to ignore them. The
ring lands only outside the hole, and no other pixel of the room changes, so the pair stays honest.

Each layer is resampled once, straight from its own pixels to the training crop: the library's
mask and ring go through the fit to the room and the square crop as one mapping, which spares a
room-sized copy of every mask and a second blur of the ring.

Rooms are split into train, validation and test by a hash of their relative path, so the split
does not depend on listing order and adding photos never moves a room from one split to another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import logging
import math
import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from casalimpia import storage
from casalimpia.config import TrainDataConfig
from casalimpia.images import ImageDecodeError, decode_image
from casalimpia.pipeline import DONE, absolute_uri, read_manifest

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
MASK_MODES = ("library", "shapes", "fixed")

# A window of a layer, as PIL's resize takes it: (left, top, right, bottom) in the layer's pixels.
Box = tuple[float, float, float, float]
_CENTRE = (0.5, 0.5)
# 53 bits is what a float64 holds exactly, so the hash maps to [0, 1) without ever rounding up to 1.
_HASH_BITS = 53
_SHAPES_COVERAGE = (0.05, 0.5)
_SHAPES_PER_MASK = (1, 4)
# Side of each random shape's bounding box, as a fraction of the image's side.
_SHAPE_SIDE = (0.15, 0.6)
# A blob is an ellipse whose outline is pushed in and out by smooth noise drawn on a coarse grid.
_BLOB_GRID = 5
_BLOB_ROUGHNESS = 0.6
_BLOB_LEVEL = 0.3
# A random placement that leaves less of the crop than this in the hole is drawn again, at most
# _PLACEMENT_TRIES times: a portrait library photo zoomed over a landscape room shows a third of its
# height, which may hold no furniture at all.
_MIN_HOLE_FRACTION = 0.01
_PLACEMENT_TRIES = 8
# Pairs per call of a PairBuilder: one output block of about 7 MB at 512 px, small enough to keep
# many blocks in flight and large enough that per-task overhead is noise next to decoding photos.
_PAIRS_PER_TASK = 4
# More input blocks than this only add scheduling overhead: blocks are shuffled, not rows.
_MAX_INPUT_BLOCKS = 1024


@dataclass(frozen=True)
class LibraryMask:
    """One usable mask of the library, by URI: masks are read only when a pair needs them."""

    source: str
    mask_uri: str
    ring_uri: str | None
    mask_fraction: float


@dataclass(frozen=True, eq=False)
class Pair:
    """One training example at the training resolution R."""

    source: str
    """Relative path of the room."""
    image: np.ndarray
    """(R, R, 3) uint8: the empty room with the margin ring pasted on, before the hole is cut."""
    target: np.ndarray
    """(R, R, 3) uint8: the empty room."""
    mask: np.ndarray
    """(R, R) bool: the hole to paint."""


def split_of(relative: str, fractions: Sequence[float]) -> str:
    """The split of a room: a sha256 of its relative path, mapped to [0, 1), against cumulative fractions."""
    if len(fractions) != len(SPLITS) or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"expected {len(SPLITS)} non-negative fractions {SPLITS} summing to 1, got {list(fractions)}")
    digest = hashlib.sha256(relative.encode()).digest()
    position = (int.from_bytes(digest[:8], "big") >> (64 - _HASH_BITS)) / 2**_HASH_BITS
    for name, edge in zip(SPLITS, itertools.accumulate(fractions), strict=True):
        if position < edge:
            return name
    # Fractions that sum to 1 only up to rounding leave a sliver below 1; an empty split must not get it.
    return next(name for name, fraction in zip(SPLITS[::-1], fractions[::-1], strict=True) if fraction > 0)


def split_rooms(rooms_uri: str, config: TrainDataConfig) -> dict[str, list[str]]:
    """The photos under rooms_uri by split, as sorted relative paths; 'train' is cut to config.limit."""
    photos = [p for p in storage.list_files(rooms_uri) if posixpath.splitext(p)[1].lower() in config.decode.suffixes]
    split: dict[str, list[str]] = {name: [] for name in SPLITS}
    for relative in photos:
        split[split_of(relative, config.split)].append(relative)
    split["train"] = split["train"][: config.limit]
    if not split["train"]:
        counts = ", ".join(f"{name} {len(paths)}" for name, paths in split.items())
        raise ValueError(f"no training rooms under {rooms_uri}: {len(photos)} photos found ({counts})")
    return split


def load_library(config: TrainDataConfig) -> list[LibraryMask]:
    """The usable masks of config.library, sorted by source; [] when no library is configured.

    Usable: done (ok, or skipped as done by an earlier run) and covering between min_mask_fraction
    and max_mask_fraction of their photo. Where a photo has rows from several runs, the latest wins.
    """
    if not config.library:
        # Config validation allows this only when every epoch uses random shapes.
        return []
    latest = {row["source"]: row for row in read_manifest(config.library)}
    if not latest:
        raise ValueError(f"no mask library at {config.library}: no _manifest/*.parquet (write it with jobs/masks.py)")
    low, high = config.min_mask_fraction, config.max_mask_fraction
    done = [row for row in latest.values() if row["status"] in DONE and row["mask"]]
    usable = sorted((row for row in done if low <= row["mask_fraction"] <= high), key=lambda row: row["source"])
    if not usable:
        raise ValueError(
            f"no usable masks in the library {config.library}: {len(latest)} photos, {len(done)} done,"
            f" none with mask_fraction in [{low}, {high}]"
        )
    return [
        LibraryMask(
            source=row["source"],
            mask_uri=storage.join(config.library, row["mask"]),
            ring_uri=storage.join(config.library, row["ring"]) if row.get("ring") else None,
            mask_fraction=float(row["mask_fraction"]),
        )
        for row in usable
    ]


def fit_to(layer: np.ndarray, size: tuple[int, int], *, offset: tuple[float, float] = _CENTRE) -> np.ndarray:
    """Zoom-and-crop layer to size (height, width): scaled uniformly to cover it, then cropped.

    layer is an (H, W) bool mask (resampled nearest-neighbour, stays bool), an (H, W, 4) uint8 ring
    (colour resampled smoothly, alpha nearest-neighbour so a binary alpha stays binary, colour 0
    where alpha is 0) or an (H, W, 3) uint8 image (resampled smoothly). offset (vertical,
    horizontal) in [0, 1] places the crop window along the axis that overflows: 0 keeps the
    top/left edge, 1 the bottom/right, 0.5 centres it.
    """
    if not all(0 <= value <= 1 for value in offset):
        raise ValueError(f"offset must be in [0, 1] on both axes, got {offset}")
    return _resample(layer, size, _cover_box(layer.shape, size, offset))


def random_shapes(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A warm-up mask of size (height, width): the union of 1-4 rectangles, ellipses and blobs.

    The union covers between 5 % and 50 % of the image.
    """
    height, width = size
    shapes: tuple[Callable[[tuple[int, int], np.random.Generator], np.ndarray], ...] = (_rectangle, _ellipse, _blob)
    low, high = _SHAPES_COVERAGE
    # Rejection sampling: most draws land in range, so this ends after a few tries.
    while True:
        mask = np.zeros(size, dtype=bool)
        for _ in range(int(rng.integers(_SHAPES_PER_MASK[0], _SHAPES_PER_MASK[1] + 1))):
            shape = shapes[int(rng.integers(len(shapes)))]
            box_height = max(1, round(height * rng.uniform(*_SHAPE_SIDE)))
            box_width = max(1, round(width * rng.uniform(*_SHAPE_SIDE)))
            top = int(rng.integers(height - box_height + 1))
            left = int(rng.integers(width - box_width + 1))
            mask[top : top + box_height, left : left + box_width] |= shape((box_height, box_width), rng)
        if low <= mask.mean() <= high:
            return mask


def make_pair(
    source: str,
    room: np.ndarray,
    mask: np.ndarray,
    ring: np.ndarray | None,
    *,
    resolution: int,
    rng: np.random.Generator | None,
    flip: bool,
) -> Pair:
    """A training pair from an empty room and a library mask (and its ring) from another photo.

    room is (H, W, 3) uint8 at its own size; mask (h, w) bool and ring (h, w, 4) uint8 are at their
    photo's size. The mask and ring are fitted to the room (:func:`fit_to`, random offset), the
    ring's pixels are pasted where its alpha is set and the mask is not, and the square crop is
    taken: short side scaled to resolution, random window. Random windows that leave less than 1 %
    of the crop in the hole are drawn again, a few times at most: a pair without a hole teaches
    nothing. With flip, all three are flipped left-right with probability 0.5. rng None centres
    both windows and never flips.
    """
    if ring is not None and ring.shape[:2] != mask.shape:
        raise ValueError(f"ring {ring.shape[:2]} and mask {mask.shape} differ in size")
    size = (resolution, resolution)
    for _ in range(1 if rng is None else _PLACEMENT_TRIES):
        fit_offset, crop_offset = (_CENTRE, _CENTRE) if rng is None else (_random_offset(rng), _random_offset(rng))
        room_window = _cover_box(room.shape, size, crop_offset)
        crop_in_library = _window_in_library(room_window, room.shape, mask.shape, fit_offset)
        hole = _resample(mask, size, crop_in_library)
        if hole.mean() >= _MIN_HOLE_FRACTION:
            break
    target = _resample(room, size, room_window)
    image = target.copy()
    if ring is not None:
        margin = _resample(ring, size, crop_in_library)
        pasted = (margin[:, :, 3] > 0) & ~hole
        image[pasted] = margin[:, :, :3][pasted]
    if flip and rng is not None and rng.random() < 0.5:
        image, target, hole = (np.ascontiguousarray(layer[:, ::-1]) for layer in (image, target, hole))
    return Pair(source=source, image=image, target=target, mask=hole)


class PairBuilder:
    """Ray Data map_batches callable: relative room paths in, training pairs out.

    masks chooses the hole of each pair: 'library' (a random usable library mask, its ring pasted
    with probability config.ring_probability), 'shapes' (:func:`random_shapes`, no ring) or 'fixed'
    (a library mask, or shapes without a library, chosen from (seed, source), no ring, centred, no
    flip: the pair :func:`validation_pairs` makes, so an overfitting run trains on what it
    validates on). seed None draws fresh entropy on every call, so augmentation differs per epoch;
    an int seeds each row from (seed, source).

    Rooms or library files that cannot be read are skipped with a warning: one bad file must not
    stop a training run.
    """

    def __init__(self, config: TrainDataConfig, *, masks: str = "library", seed: int | None = None) -> None:
        if masks not in MASK_MODES:
            raise ValueError(f"masks must be one of {list(MASK_MODES)}, got {masks!r}")
        if masks == "fixed" and seed is None:
            raise ValueError("masks='fixed' needs a seed: its pairs are derived from (seed, source)")
        self._config = config
        self._masks = masks
        self._seed = seed
        self._library = [] if masks == "shapes" else load_library(config)
        if masks == "library" and not self._library:
            raise ValueError("masks='library' needs a mask library (data.library)")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shared = np.random.default_rng() if self._seed is None else None
        pairs = []
        for source in map(str, batch["source"]):
            rng = shared if shared is not None else _row_rng(self._seed, source)
            try:
                pairs.append(self._pair(source, rng))
            except (ImageDecodeError, storage.StorageError) as exc:
                log.warning("skipping room %s: %s", source, exc)
        return _stack(pairs, self._config.resolution)

    def _pair(self, source: str, rng: np.random.Generator) -> Pair:
        config = self._config
        room = _read_room(config, source)
        if self._masks == "fixed":
            return _fixed_pair(source, room, self._library, config.resolution, rng)
        if self._masks == "shapes":
            mask, ring = random_shapes(_shapes_size(room.shape, config.resolution), rng), None
        else:
            entry = self._library[int(rng.integers(len(self._library)))]
            with_ring = entry.ring_uri is not None and rng.random() < config.ring_probability
            mask, ring = _read_library_mask(entry, with_ring=with_ring)
        return make_pair(source, room, mask, ring, resolution=config.resolution, rng=rng, flip=config.flip)


def train_dataset(
    config: TrainDataConfig,
    rooms: list[str],
    *,
    masks: str,
    seed: int | None,
    num_cpus: float,
    epoch_repeats: int = 1,
) -> ray.data.Dataset:
    """A lazy Ray Dataset of training pairs over rooms, reshuffled on every pass (every epoch).

    Rows are the rooms' relative paths, each repeated epoch_repeats times, permuted once here and
    cut into small blocks whose order is randomised again on every execution (randomize_block_order
    reseeded per execution: a permutation of block references, no data moves). A PairBuilder actor
    pool turns them into pairs (columns source, image, target, mask; see :class:`PairBuilder` for
    masks and seed), loading the library list once per actor. Building runs nothing.
    """
    # Ray is imported here so that the pair functions stay importable, and quick to import, without it.
    import ray.data

    if not rooms:
        raise ValueError("no rooms to train on")
    if epoch_repeats < 1:
        raise ValueError(f"epoch_repeats must be at least 1, got {epoch_repeats}")
    # Actors run in other working directories: local paths must be absolute before they leave.
    config = dataclasses.replace(
        config, rooms=absolute_uri(config.rooms), library=config.library and absolute_uri(config.library)
    )
    rows = [{"source": source} for source in rooms for _ in range(epoch_repeats)]
    # Sorted paths put one listing's photos side by side; mixed once here, they do not share every block.
    rows = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]
    tasks = math.ceil(len(rows) / _PAIRS_PER_TASK)
    dataset = ray.data.from_items(rows, override_num_blocks=min(len(rows), _MAX_INPUT_BLOCKS))
    dataset = dataset.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return dataset.map_batches(
        PairBuilder,
        fn_constructor_kwargs={"config": config, "masks": masks, "seed": seed},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=tasks),
        batch_size=_PAIRS_PER_TASK,
        batch_format="numpy",
        num_cpus=num_cpus,
    )


def validation_pairs(config: TrainDataConfig, rooms: list[str], seed: int) -> list[Pair]:
    """Pairs of the first config.validation_rooms rooms (sorted), the same on every call.

    Each room gets a library mask (random shapes without a library) chosen from (seed, source)
    among those that leave a hole in its crop, no ring (validation measures restoration under the mask
    alone), centred crops and no flip. Rooms that cannot be read are skipped with a warning.
    """
    library = load_library(config)
    pairs = []
    for source in sorted(rooms)[: config.validation_rooms]:
        try:
            room = _read_room(config, source)
            pairs.append(_fixed_pair(source, room, library, config.resolution, _row_rng(seed, source)))
        except (ImageDecodeError, storage.StorageError) as exc:
            log.warning("skipping validation room %s: %s", source, exc)
    return pairs


def overfit_rooms(split: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """(train, validation) rooms of an overfitting run: the first training room for both."""
    if not split["train"]:
        raise ValueError("no training room to overfit on")
    first = split["train"][:1]
    return first, list(first)


def _fixed_pair(
    source: str, room: np.ndarray, library: list[LibraryMask], resolution: int, rng: np.random.Generator
) -> Pair:
    # Centred windows cannot be moved, so a mask that leaves no hole in this room's crop is swapped.
    for _ in range(_PLACEMENT_TRIES):
        if library:
            mask, _ = _read_library_mask(library[int(rng.integers(len(library)))], with_ring=False)
        else:
            mask = random_shapes(_shapes_size(room.shape, resolution), rng)
        pair = make_pair(source, room, mask, None, resolution=resolution, rng=None, flip=False)
        if pair.mask.mean() >= _MIN_HOLE_FRACTION:
            break
    return pair


def _random_offset(rng: np.random.Generator) -> tuple[float, float]:
    return rng.random(), rng.random()


def _row_rng(seed: int | None, source: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(f"{seed}:{source}".encode()).digest(), "big"))


def _read_room(config: TrainDataConfig, source: str) -> np.ndarray:
    data = storage.read_bytes(storage.join(config.rooms, source))
    return decode_image(data, max_pixels=config.decode.max_pixels, min_side=config.decode.min_side)


def _read_library_mask(entry: LibraryMask, *, with_ring: bool) -> tuple[np.ndarray, np.ndarray | None]:
    mask = _read_png(entry.mask_uri, "L") > 127
    if not with_ring or entry.ring_uri is None:
        return mask, None
    ring = _read_png(entry.ring_uri, "RGBA")
    if ring.shape[:2] != mask.shape:
        raise ImageDecodeError(f"ring {entry.ring_uri} is {ring.shape[:2]}, its mask {mask.shape}")
    return mask, ring


def _read_png(uri: str, mode: str) -> np.ndarray:
    data = storage.read_bytes(uri)
    try:
        with Image.open(io.BytesIO(data), formats=("PNG",)) as image:
            return np.array(image.convert(mode))
    except Exception as exc:
        # Pillow raises OSError, SyntaxError, ValueError, ... on a damaged file; all mean the same here.
        raise ImageDecodeError(f"unreadable library file {uri}: {exc}") from exc


def _stack(pairs: list[Pair], resolution: int) -> dict[str, np.ndarray]:
    # Filled row by row rather than stacked, so that a batch whose rooms all failed still has the
    # columns' shapes and dtypes.
    count, side = len(pairs), resolution
    batch = {
        "source": np.array([pair.source for pair in pairs], dtype=str),
        "image": np.empty((count, side, side, 3), dtype=np.uint8),
        "target": np.empty((count, side, side, 3), dtype=np.uint8),
        "mask": np.empty((count, side, side), dtype=np.uint8),
    }
    for row, pair in enumerate(pairs):
        batch["image"][row] = pair.image
        batch["target"][row] = pair.target
        batch["mask"][row] = pair.mask
    return batch


def _shapes_size(room_shape: tuple[int, ...], resolution: int) -> tuple[int, int]:
    # Drawn at the room's aspect with the crop's short side: cheap, and undistorted once fitted.
    scale = resolution / min(room_shape[:2])
    return max(1, round(room_shape[0] * scale)), max(1, round(room_shape[1] * scale))


def _cover_box(shape: tuple[int, ...], size: tuple[int, int], offset: tuple[float, float]) -> Box:
    """The window of a layer of this shape that, scaled uniformly, exactly fills size (height, width)."""
    height, width = shape[:2]
    scale = max(size[0] / height, size[1] / width)
    window_height, window_width = size[0] / scale, size[1] / scale
    top = (height - window_height) * offset[0]
    left = (width - window_width) * offset[1]
    return left, top, left + window_width, top + window_height


def _window_in_library(
    room_window: Box, room_shape: tuple[int, ...], library_shape: tuple[int, ...], fit_offset: tuple[float, float]
) -> Box:
    """A window of the room, in the pixels of a library layer fitted to the room with fit_offset."""
    left, top, right, _ = _cover_box(library_shape, room_shape[:2], fit_offset)
    # Room pixels per library pixel: the fit scales both axes alike.
    scale = room_shape[1] / (right - left)
    return (
        left + room_window[0] / scale,
        top + room_window[1] / scale,
        left + room_window[2] / scale,
        top + room_window[3] / scale,
    )


def _resample(layer: np.ndarray, size: tuple[int, int], box: Box) -> np.ndarray:
    """The window box of layer, resampled to size (height, width)."""
    height, width = size
    if layer.dtype == bool and layer.ndim == 2:
        return _nearest(layer, size, box)
    if layer.dtype == np.uint8 and layer.ndim == 3 and layer.shape[2] == 3:
        resized = Image.fromarray(np.ascontiguousarray(layer)).resize(
            (width, height), Image.Resampling.BICUBIC, box=box
        )
        return np.asarray(resized)
    if layer.dtype == np.uint8 and layer.ndim == 3 and layer.shape[2] == 4:
        alpha = _nearest(layer[:, :, 3], size, box)
        # Pillow resizes RGBA with premultiplied alpha, so ring colours are averaged with ring pixels
        # only, never with the zeros around the ring (no dark fringe); bilinear weights are
        # non-negative, so the averages stay within the ring's colours.
        resized = Image.fromarray(np.ascontiguousarray(layer)).resize(
            (width, height), Image.Resampling.BILINEAR, box=box
        )
        rgb = np.where(alpha[:, :, np.newaxis] > 0, np.asarray(resized)[:, :, :3], 0).astype(np.uint8)
        return np.dstack([rgb, alpha])
    raise ValueError(
        f"expected an (H, W) bool mask or an (H, W, 3) or (H, W, 4) uint8 image, got {layer.dtype} {layer.shape}"
    )


def _nearest(layer: np.ndarray, size: tuple[int, int], box: Box) -> np.ndarray:
    rows = _sample_indices(box[1], box[3], size[0], layer.shape[0])
    cols = _sample_indices(box[0], box[2], size[1], layer.shape[1])
    return layer[rows[:, np.newaxis], cols]


def _sample_indices(start: float, stop: float, count: int, limit: int) -> np.ndarray:
    """Indices of the source pixels under the centres of count output pixels spanning [start, stop)."""
    centres = start + (np.arange(count) + 0.5) * ((stop - start) / count)
    return np.clip(np.floor(centres).astype(np.intp), 0, limit - 1)


def _rectangle(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    return np.ones(size, dtype=bool)


def _ellipse(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    return _ellipse_field(size) >= 0


def _blob(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    coarse = rng.standard_normal((_BLOB_GRID, _BLOB_GRID)).astype(np.float32)
    noise = np.asarray(Image.fromarray(coarse).resize(size[::-1], Image.Resampling.BICUBIC))
    return _ellipse_field(size) + _BLOB_ROUGHNESS * noise > _BLOB_LEVEL


def _ellipse_field(size: tuple[int, int]) -> np.ndarray:
    """1 at the centre of the box, 0 on its inscribed ellipse, negative outside it."""
    ys = (np.arange(size[0]) + 0.5) / size[0] * 2 - 1
    xs = (np.arange(size[1]) + 0.5) / size[1] * 2 - 1
    return 1 - ys[:, np.newaxis] ** 2 - xs[np.newaxis, :] ** 2
