"""Training pairs: hash splits, the mask library, zoom-and-crop geometry, rings, PairBuilder and Ray Data."""

from __future__ import annotations

import io
import logging
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy import ndimage

from casalimpia import storage
from casalimpia.config import DEFAULT_SPLIT, TrainDataConfig
from casalimpia.images import encode_image, encode_mask
from casalimpia.synthetic import render_room
from casalimpia.training.data import (
    SPLITS,
    PairBuilder,
    fit_to,
    load_library,
    make_pair,
    overfit_rooms,
    random_shapes,
    split_of,
    split_rooms,
    train_dataset,
    validation_pairs,
)

RING_COLOUR = (250, 10, 10)


def rect_mask(shape: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows, cols] = True
    return mask


def ring_around(mask: np.ndarray, band: int, colour: tuple[int, int, int] = RING_COLOUR) -> np.ndarray:
    """An RGBA ring as the mask job writes it: colour on a square band around the mask's bounding box."""
    rows, cols = np.nonzero(mask)
    grown = rect_mask(
        mask.shape,
        slice(max(0, rows.min() - band), rows.max() + 1 + band),
        slice(max(0, cols.min() - band), cols.max() + 1 + band),
    )
    ring = np.zeros((*mask.shape, 4), dtype=np.uint8)
    ring[grown & ~mask] = (*colour, 255)
    return ring


def circle_mask(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    ys, xs = np.mgrid[: shape[0], : shape[1]]
    return (ys + 0.5 - centre[0]) ** 2 + (xs + 0.5 - centre[1]) ** 2 <= radius**2


def extent(mask: np.ndarray) -> tuple[int, int]:
    rows, cols = np.nonzero(mask)
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def png_rgba(rgba: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgba).save(buffer, "PNG")
    return buffer.getvalue()


def write_library(uri: str, entries: list[dict]) -> None:
    """A mask library as jobs/masks.py writes it: masks/, rings/ and _manifest/part.parquet.

    Each entry has source, mask, and optionally ring (None: no ring written), status and mask_fraction.
    """
    rows = []
    for entry in entries:
        mask, ring = entry["mask"], entry.get("ring")
        mask_path, ring_path = f"masks/{entry['source']}.png", f"rings/{entry['source']}.png"
        storage.write_bytes(storage.join(uri, mask_path), encode_mask(mask))
        if ring is not None:
            storage.write_bytes(storage.join(uri, ring_path), png_rgba(ring))
        rows.append(
            {
                "source": entry["source"],
                "status": entry.get("status", "ok"),
                "mask": mask_path,
                "ring": ring_path if ring is not None else "",
                "width": mask.shape[1],
                "height": mask.shape[0],
                "mask_fraction": entry.get("mask_fraction", float(mask.mean())),
                "classes": ["sofa"],
            }
        )
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    storage.write_bytes(storage.join(uri, "_manifest/part.parquet"), buffer.getvalue())


# (shape, rows, cols) of the rectangles of the standard library: landscape, portrait and square photos.
LIBRARY_RECTANGLES = [
    ((100, 200), slice(30, 90), slice(40, 120)),
    ((150, 100), slice(60, 140), slice(20, 70)),
    ((90, 90), slice(20, 70), slice(10, 60)),
]


LIBRARY_HOLE = rect_mask((100, 100), slice(40, 80), slice(20, 80))


def standard_library(uri: str) -> None:
    """Three usable masks of different sizes and aspects, all with rings."""
    masks = [rect_mask(*rectangle) for rectangle in LIBRARY_RECTANGLES]
    entries = [
        {"source": f"furnished/{i}.jpg", "mask": mask, "ring": ring_around(mask, 6)} for i, mask in enumerate(masks)
    ]
    write_library(uri, entries)


def write_rooms(uri: str, count: int) -> list[str]:
    """Synthetic empty rooms in landscape and portrait, as PNG; returns their relative paths."""
    sources = []
    for seed in range(count):
        width, height = (160, 120) if seed % 2 == 0 else (96, 128)
        relative = f"listing{seed % 3}/room{seed}.png"
        storage.write_bytes(storage.join(uri, relative), encode_image(render_room(seed, width, height).empty, "png"))
        sources.append(relative)
    return sources


def make_config(rooms: str, library: str, **overrides) -> TrainDataConfig:
    settings = {"resolution": 64, "validation_rooms": 16, **overrides}
    return TrainDataConfig(rooms=rooms, library=library, **settings)


@pytest.fixture
def local_data(tmp_path):
    """(config, room sources) over synthetic rooms and a hand-written library on local disk."""
    rooms, library = str(tmp_path / "rooms"), str(tmp_path / "library")
    sources = write_rooms(rooms, 4)
    standard_library(library)
    return make_config(rooms, library), sources


# Splits


def test_split_is_deterministic_disjoint_covering_and_proportional():
    names = [f"listing{i // 7}/photo{i}.jpg" for i in range(3000)]
    assigned = {name: split_of(name, DEFAULT_SPLIT) for name in names}
    shuffled = names[:]
    random.Random(0).shuffle(shuffled)
    assert {name: split_of(name, DEFAULT_SPLIT) for name in shuffled} == assigned
    assert set(assigned.values()) == set(SPLITS)
    for name, fraction in zip(SPLITS, DEFAULT_SPLIT, strict=True):
        share = sum(split == name for split in assigned.values()) / len(names)
        assert abs(share - fraction) < 0.03, (name, share, fraction)
    assert {split_of(name, [0.9, 0.1, 0.0]) for name in names} == {"train", "validation"}
    with pytest.raises(ValueError):
        split_of("a.jpg", [0.5, 0.5])


def test_split_rooms_keeps_photos_honours_limit_and_adding_files_moves_nothing(tmp_path):
    rooms = tmp_path / "rooms"
    for index in range(200):
        storage.write_bytes(str(rooms / f"l{index % 5}" / f"p{index}.JPG"), b"")
    storage.write_bytes(str(rooms / "notes.txt"), b"")
    config = make_config(str(rooms), "", shape_warmup_pct=1.0)
    before = split_rooms(str(rooms), config)
    assert sum(map(len, before.values())) == 200
    assert all(paths == sorted(paths) for paths in before.values())
    assert len(set().union(*before.values())) == 200  # disjoint

    for index in range(200, 400):
        storage.write_bytes(str(rooms / f"l{index % 5}" / f"p{index}.jpg"), b"")
    after = split_rooms(str(rooms), config)
    for name in SPLITS:
        assert set(before[name]) <= set(after[name])

    limited = split_rooms(str(rooms), make_config(str(rooms), "", shape_warmup_pct=1.0, limit=3))
    assert limited["train"] == after["train"][:3]
    assert limited["validation"] == after["validation"]


def test_split_rooms_without_training_rooms_fails_in_one_line(tmp_path):
    storage.write_bytes(str(tmp_path / "rooms" / "readme.txt"), b"")
    with pytest.raises(ValueError, match="no training rooms") as error:
        split_rooms(str(tmp_path / "rooms"), make_config(str(tmp_path / "rooms"), "", shape_warmup_pct=1.0))
    assert "\n" not in str(error.value)


def test_overfit_rooms_uses_the_first_training_room_for_both():
    assert overfit_rooms({"train": ["a.jpg", "b.jpg"], "validation": ["c.jpg"], "test": []}) == (["a.jpg"], ["a.jpg"])


# Library


def test_load_library_keeps_done_masks_in_the_fraction_range(tmp_path):
    library = str(tmp_path / "library")
    mask = rect_mask((50, 50), slice(10, 30), slice(10, 30))
    write_library(
        library,
        [
            {"source": "z.jpg", "mask": mask, "ring": ring_around(mask, 3)},
            {"source": "a.jpg", "mask": mask, "status": "skipped"},
            {"source": "failed.jpg", "mask": mask, "status": "failed"},
            {"source": "tiny.jpg", "mask": mask, "mask_fraction": 0.001},
            {"source": "huge.jpg", "mask": mask, "mask_fraction": 0.95},
        ],
    )
    entries = load_library(make_config("rooms", library))
    assert [entry.source for entry in entries] == ["a.jpg", "z.jpg"]
    assert entries[0].ring_uri is None
    assert entries[1].ring_uri == storage.join(library, "rings/z.jpg.png")
    assert entries[1].mask_uri == storage.join(library, "masks/z.jpg.png")

    with pytest.raises(ValueError, match="no usable masks") as error:
        load_library(make_config("rooms", library, min_mask_fraction=0.5, max_mask_fraction=0.6))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="no mask library"):
        load_library(make_config("rooms", str(tmp_path / "nowhere")))
    assert load_library(make_config("rooms", "", shape_warmup_pct=1.0)) == []


# Geometry


def test_fit_to_zooms_and_crops_keeping_aspect():
    circle = circle_mask((100, 200), (50, 100), 20)
    for size in [(300, 200), (100, 400), (64, 64)]:
        fitted = fit_to(circle, size)
        assert fitted.shape == size and fitted.dtype == bool
        height, width = extent(fitted)
        assert abs(height - width) <= 1, (size, height, width)
        assert np.array_equal(fitted, fitted[:, ::-1])  # centred: a symmetric layer stays symmetric
    assert fit_to(np.ones((100, 200), dtype=bool), (300, 200)).all()  # covers: no letterbox band

    ramp = np.tile(np.arange(200) >= 100, (100, 1))  # right half set
    assert not fit_to(ramp, (100, 100), offset=(0.5, 0.0)).any()  # window at the left edge
    assert fit_to(ramp, (100, 100), offset=(0.5, 1.0)).all()  # window at the right edge
    with pytest.raises(ValueError):
        fit_to(ramp, (10, 10), offset=(0.5, 1.5))


def test_fit_to_resamples_rings_without_fringes():
    mask = circle_mask((90, 120), (45, 60), 25)
    ring = ring_around(mask, 8)
    for size in [(300, 200), (37, 61)]:
        fitted = fit_to(ring, size, offset=(0.2, 0.7))
        assert fitted.shape == (*size, 4) and fitted.dtype == np.uint8
        alpha = fitted[:, :, 3]
        assert set(np.unique(alpha)) <= {0, 255}
        assert (fitted[alpha == 0, :3] == 0).all()
        # Colours are averaged with ring pixels only: no dark blend with the zeros around the ring.
        assert np.abs(fitted[alpha > 0, :3].astype(int) - RING_COLOUR).max() <= 3
        assert not (alpha.astype(bool) & fit_to(mask, size, offset=(0.2, 0.7))).any()
    assert (fit_to(np.full((40, 80, 4), 255, np.uint8), (90, 30))[:, :, 3] == 255).all()


def test_make_pair_puts_the_mask_where_the_library_says():
    library = rect_mask((100, 200), slice(20, 80), slice(60, 140))
    # Same aspect: the room is the library scaled by 3; the square crop keeps room columns 150:450.
    room = np.full((300, 600, 3), 128, np.uint8)
    pair = make_pair("r", room, library, None, resolution=150, rng=None, flip=False)
    assert np.array_equal(pair.mask, rect_mask((150, 150), slice(30, 120), slice(15, 135)))
    # Other aspect: the fit keeps library columns 50:150 and the crop scales by 1/4.
    room = np.full((400, 400, 3), 128, np.uint8)
    pair = make_pair("r", room, library, None, resolution=100, rng=None, flip=False)
    assert np.array_equal(pair.mask, rect_mask((100, 100), slice(20, 80), slice(10, 90)))
    assert np.array_equal(pair.image, pair.target)  # no ring, nothing pasted
    assert pair.image.shape == (100, 100, 3) and pair.image.dtype == np.uint8


def test_make_pair_keeps_aspect_whatever_the_shapes():
    # Polka dots: whatever window the random offsets pick, every dot inside it must stay round.
    ys, xs = np.mgrid[:150, :100]
    dots = (ys % 30 - 15) ** 2 + (xs % 30 - 15) ** 2 <= 8**2
    room = render_room(3, 480, 240).empty
    for rng in [None, *(np.random.default_rng(seed) for seed in range(4))]:
        pair = make_pair("r", room, dots, None, resolution=128, rng=rng, flip=True)
        labels, count = ndimage.label(pair.mask)
        inner = [
            extent(labels == label)
            for label in range(1, count + 1)
            if not (labels == label)[[0, -1], :].any() and not (labels == label)[:, [0, -1]].any()
        ]
        assert inner
        assert all(abs(height - width) <= 1 for height, width in inner), inner


def test_make_pair_redraws_placements_that_leave_no_hole():
    # A portrait photo with furniture only in its top tenth, zoomed over a landscape room: most
    # random windows show none of it, and a pair without a hole teaches nothing.
    library = rect_mask((600, 400), slice(0, 60), slice(100, 300))
    room = np.full((480, 640, 3), 128, np.uint8)
    assert not make_pair("r", room, library, None, resolution=64, rng=None, flip=False).mask.any()
    holes = [
        make_pair("r", room, library, None, resolution=64, rng=np.random.default_rng(seed), flip=False).mask.mean()
        for seed in range(20)
    ]
    assert sum(hole >= 0.01 for hole in holes) >= 12


def test_make_pair_pastes_the_ring_only_on_its_band_outside_the_mask():
    library = rect_mask((100, 200), slice(20, 80), slice(60, 140))
    ring = ring_around(library, 10)  # library rows 10:90, cols 50:150, minus the mask
    room = np.full((300, 600, 3), 128, np.uint8)
    pair = make_pair("r", room, library, ring, resolution=150, rng=None, flip=False)
    band = rect_mask((150, 150), slice(15, 135), slice(0, 150)) & ~pair.mask
    changed = (pair.image != pair.target).any(axis=2)
    assert np.array_equal(changed, band)  # image == target outside the ring
    assert np.abs(pair.image[band].astype(int) - RING_COLOUR).max() <= 3
    assert (pair.target == 128).all()

    # A ring overlapping the mask (it never should) still leaves the hole alone.
    full_ring = np.full((100, 200, 4), 255, np.uint8)
    pair = make_pair("r", room, library, full_ring, resolution=150, rng=np.random.default_rng(0), flip=True)
    changed = (pair.image != pair.target).any(axis=2)
    assert np.array_equal(changed, ~pair.mask)


def test_make_pair_flips_image_target_and_mask_together():
    library = rect_mask((100, 200), slice(20, 80), slice(20, 90))
    ring = ring_around(library, 6)
    room = render_room(5, 200, 150).empty
    flipped = 0
    for seed in range(12):
        plain = make_pair("r", room, library, ring, resolution=64, rng=np.random.default_rng(seed), flip=False)
        maybe = make_pair("r", room, library, ring, resolution=64, rng=np.random.default_rng(seed), flip=True)
        was_flipped = not np.array_equal(maybe.target, plain.target)
        flipped += was_flipped
        for got, expected in [(maybe.image, plain.image), (maybe.target, plain.target), (maybe.mask, plain.mask)]:
            assert np.array_equal(got, expected[:, ::-1] if was_flipped else expected)
    assert 0 < flipped < 12


def test_random_shapes_cover_5_to_50_percent_and_are_reproducible():
    coverages = []
    for seed in range(300):
        size = (96, 128) if seed % 2 else (64, 48)
        mask = random_shapes(size, np.random.default_rng(seed))
        assert mask.shape == size and mask.dtype == bool
        coverages.append(mask.mean())
    assert min(coverages) >= 0.05 and max(coverages) <= 0.5
    assert np.std(coverages) > 0.05  # varied, not one size
    first = random_shapes((96, 128), np.random.default_rng(7))
    assert np.array_equal(first, random_shapes((96, 128), np.random.default_rng(7)))
    assert not np.array_equal(first, random_shapes((96, 128), np.random.default_rng(8)))


# PairBuilder and validation


def test_pair_builder_fixed_mode_is_reproducible_and_matches_validation(local_data):
    config, sources = local_data
    batch = {"source": np.array(sources)}
    first = PairBuilder(config, masks="fixed", seed=3)(batch)
    again = PairBuilder(config, masks="fixed", seed=3)(batch)
    assert list(first["source"]) == sources
    for column in ("image", "target", "mask"):
        assert np.array_equal(first[column], again[column])
    assert first["image"].shape == (4, 64, 64, 3) and first["image"].dtype == np.uint8
    assert first["mask"].shape == (4, 64, 64) and first["mask"].dtype == np.uint8
    assert set(np.unique(first["mask"])) == {0, 1}
    assert np.array_equal(first["image"], first["target"])  # no ring
    fixed = dict(zip(first["source"], first["mask"].astype(bool), strict=True))
    for pair in validation_pairs(config, sources, 3):
        assert np.array_equal(pair.mask, fixed[pair.source])
    with pytest.raises(ValueError, match="seed"):
        PairBuilder(config, masks="fixed")
    with pytest.raises(ValueError, match="masks"):
        PairBuilder(config, masks="random")


def test_pair_builder_library_mode_varies_without_seed_and_pastes_rings(local_data):
    config, sources = local_data
    batch = {"source": np.array(sources)}
    builder = PairBuilder(config, masks="library")
    first, second = builder(batch), builder(batch)
    assert not np.array_equal(first["mask"], second["mask"])
    assert (first["image"] != first["target"]).any()  # ring_probability 1: rings pasted
    assert not (first["image"] != first["target"]).any(axis=3)[first["mask"] == 1].any()
    seeded = PairBuilder(config, masks="library", seed=5)
    assert np.array_equal(seeded(batch)["image"], seeded(batch)["image"])

    no_rings = PairBuilder(make_config(config.rooms, config.library, ring_probability=0.0), masks="library")(batch)
    assert np.array_equal(no_rings["image"], no_rings["target"])


def test_pair_builder_shapes_mode_needs_no_library(local_data):
    config, sources = local_data
    config = make_config(config.rooms, "", shape_warmup_pct=1.0)
    result = PairBuilder(config, masks="shapes", seed=0)({"source": np.array(sources)})
    coverage = result["mask"].mean(axis=(1, 2))
    assert (coverage > 0).all() and (coverage < 0.8).all()
    assert np.array_equal(result["image"], result["target"])
    with pytest.raises(ValueError, match="library"):
        PairBuilder(config, masks="library")
    validation = validation_pairs(config, sources, 0)
    assert len(validation) == len(sources) and all(pair.mask.any() for pair in validation)


def test_pair_builder_skips_rooms_that_cannot_be_read(local_data, caplog):
    config, sources = local_data
    storage.write_bytes(storage.join(config.rooms, "broken.jpg"), b"<html>not a photo</html>")
    logger = logging.getLogger("casalimpia.training.data")
    logger.addHandler(caplog.handler)
    try:
        builder = PairBuilder(config, masks="library")
        result = builder({"source": np.array(["broken.jpg", sources[0], "missing.png"])})
        empty = builder({"source": np.array(["broken.jpg"])})
    finally:
        logger.removeHandler(caplog.handler)
    assert list(result["source"]) == [sources[0]]
    assert result["image"].shape == (1, 64, 64, 3)
    assert "broken.jpg" in caplog.text and "missing.png" in caplog.text
    assert empty["source"].shape == (0,)
    assert empty["image"].shape == (0, 64, 64, 3) and empty["image"].dtype == np.uint8
    assert empty["target"].shape == (0, 64, 64, 3) and empty["target"].dtype == np.uint8
    assert empty["mask"].shape == (0, 64, 64) and empty["mask"].dtype == np.uint8


def test_validation_pairs_are_identical_on_every_call_and_have_no_ring(local_data):
    config, sources = local_data
    config = make_config(config.rooms, config.library, validation_rooms=3)
    storage.write_bytes(storage.join(config.rooms, "aaa-broken.png"), b"")
    first = validation_pairs(config, [*sources, "aaa-broken.png"], seed=11)
    second = validation_pairs(config, [*sources, "aaa-broken.png"], seed=11)
    assert [pair.source for pair in first] == sorted(sources)[:2]  # the broken one counted, then skipped
    for one, two in zip(first, second, strict=True):
        assert np.array_equal(one.image, two.image) and np.array_equal(one.mask, two.mask)
        assert np.array_equal(one.image, one.target)
        assert one.mask.any()


def test_validation_masks_always_leave_a_hole(tmp_path):
    rooms, library = str(tmp_path / "rooms"), str(tmp_path / "library")
    sources = write_rooms(rooms, 4)
    # Furniture only in the top tenth of a portrait photo: a centred crop of a landscape room misses it.
    missing = rect_mask((600, 400), slice(0, 60), slice(100, 300))
    write_library(library, [{"source": "top.jpg", "mask": missing}, {"source": "sofa.jpg", "mask": LIBRARY_HOLE}])
    for seed in range(3):
        for pair in validation_pairs(make_config(rooms, library), sources, seed):
            assert pair.mask.mean() >= 0.01


# Ray Data


def collect(dataset) -> dict[str, np.ndarray]:
    batches = list(dataset.iter_batches(batch_size=2, batch_format="numpy"))
    for batch in batches:
        rows = len(batch["source"])
        assert 1 <= rows <= 2
        assert batch["image"].shape == (rows, 64, 64, 3) and batch["image"].dtype == np.uint8
        assert batch["target"].shape == (rows, 64, 64, 3) and batch["target"].dtype == np.uint8
        assert batch["mask"].shape == (rows, 64, 64) and batch["mask"].dtype == np.uint8
    return {column: np.concatenate([batch[column] for batch in batches]) for column in batches[0]}


def test_train_dataset_streams_pairs_through_ray(ray_local, local_data, tmp_path):
    config, sources = local_data
    dataset = train_dataset(config, sources, masks="library", seed=None, num_cpus=0.5, epoch_repeats=2)
    for _epoch in range(2):
        pairs = collect(dataset)
        assert sorted(pairs["source"]) == sorted(sources * 2)
        assert set(np.unique(pairs["mask"])) == {0, 1}

    # Lazy: a library that does not exist only fails once the pairs are built.
    missing = make_config(config.rooms, str(tmp_path / "no-library"))
    train_dataset(missing, sources, masks="library", seed=0, num_cpus=0.5)


def test_train_dataset_reads_rooms_and_library_from_s3(ray_local, s3_bucket):
    rooms, library = f"s3://{s3_bucket}/rooms", f"s3://{s3_bucket}/library"
    sources = write_rooms(rooms, 3)
    standard_library(library)
    config = make_config(rooms, library)
    pairs = collect(train_dataset(config, sources, masks="library", seed=1, num_cpus=0.5))
    assert sorted(pairs["source"]) == sorted(sources)
    assert (pairs["image"] != pairs["target"]).any()  # rings read from S3 and pasted
