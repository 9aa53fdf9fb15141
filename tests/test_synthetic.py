"""Tests for the synthetic room renderer and the files written from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps
from scipy import ndimage

from casalimpia.classes import ADE20K_CLASSES, MOVABLE, STRUCTURE
from casalimpia.synthetic import (
    HELD_OUT_SEED,
    SyntheticRoom,
    files,
    main,
    render,
    render_room,
    write_demo_rooms,
    write_segmentation_pairs,
)

SEEDS = range(20)
EXIF_ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def rooms() -> dict[int, SyntheticRoom]:
    return {seed: render_room(seed) for seed in SEEDS}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    folder = tmp_path_factory.mktemp("demo")
    return folder, write_demo_rooms(folder, count=8, seed=0)


def test_shapes_and_dtypes(rooms: dict[int, SyntheticRoom]) -> None:
    room = rooms[0]
    assert room.furnished.shape == room.empty.shape == (384, 512, 3)
    assert room.furnished.dtype == room.empty.dtype == np.uint8
    assert room.mask.shape == (384, 512)
    assert room.mask.dtype == np.bool_


@pytest.mark.parametrize(("width", "height"), [(288, 384), (320, 320), (97, 61)])
def test_custom_sizes(width: int, height: int) -> None:
    room = render_room(3, width, height)
    assert room.furnished.shape == room.empty.shape == (height, width, 3)
    assert room.mask.shape == (height, width)


def test_too_small_image_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least 16x16"):
        render_room(0, 8, 8)


def test_same_seed_same_room(rooms: dict[int, SyntheticRoom]) -> None:
    again = render_room(5)
    assert np.array_equal(again.furnished, rooms[5].furnished)
    assert np.array_equal(again.empty, rooms[5].empty)
    assert np.array_equal(again.mask, rooms[5].mask)


def test_different_seeds_differ(rooms: dict[int, SyntheticRoom]) -> None:
    images = [rooms[seed].empty for seed in range(6)]
    masks = [rooms[seed].mask for seed in range(6)]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert not np.array_equal(images[i], images[j])
            assert not np.array_equal(masks[i], masks[j])


def test_mask_fraction_within_bounds(rooms: dict[int, SyntheticRoom]) -> None:
    fractions = np.array([room.mask.mean() for room in rooms.values()])
    assert fractions.min() >= 0.05
    assert fractions.max() <= 0.35
    # Not all pinned to one end of the band: the layouts really vary.
    assert fractions.max() - fractions.min() > 0.1


@pytest.mark.parametrize("seed", SEEDS)
def test_furniture_changes_masked_pixels(rooms: dict[int, SyntheticRoom], seed: int) -> None:
    room = rooms[seed]
    changed = (room.furnished != room.empty).any(axis=-1)
    assert changed[room.mask].mean() > 0.98


@pytest.mark.parametrize("seed", SEEDS)
def test_only_shadows_differ_outside_mask(rooms: dict[int, SyntheticRoom], seed: int) -> None:
    room = rooms[seed]
    outside = ~room.mask
    # Shadows only darken the empty room, never brighten it or shift its hue.
    assert np.all(room.furnished[outside] <= room.empty[outside])
    # Far from any furniture, the two images are bit-identical.
    distance = ndimage.distance_transform_edt(outside)
    far = distance > 0.3 * max(room.mask.shape)
    assert far.mean() > 0.1
    assert np.array_equal(room.furnished[far], room.empty[far])


def test_shadows_are_drawn_but_not_masked(rooms: dict[int, SyntheticRoom]) -> None:
    for room in rooms.values():
        shadow = (room.furnished != room.empty).any(axis=-1) & ~room.mask
        assert shadow.sum() > 0.002 * room.mask.size


@pytest.mark.parametrize("seed", SEEDS)
def test_class_map_names_furniture_exactly_under_the_mask(rooms: dict[int, SyntheticRoom], seed: int) -> None:
    room = rooms[seed]
    assert room.classes.shape == room.mask.shape
    assert room.classes.dtype == np.uint8
    names = np.array(ADE20K_CLASSES)[room.classes]
    assert np.array_equal(np.isin(names, MOVABLE), room.mask)
    assert set(np.unique(names[~room.mask])) <= set(STRUCTURE)
    # Every room is seen with its walls, floor, ceiling and window.
    assert {"wall", "floor", "ceiling", "windowpane"} <= set(np.unique(names))


def test_structure_map_is_the_class_map_with_the_furniture_taken_out(rooms: dict[int, SyntheticRoom]) -> None:
    for room in rooms.values():
        assert room.structure.dtype == np.uint8
        assert np.array_equal(room.structure[~room.mask], room.classes[~room.mask])
        assert set(np.unique(np.array(ADE20K_CLASSES)[room.structure])) <= set(STRUCTURE)


def test_class_map_follows_the_painted_structure(rooms: dict[int, SyntheticRoom]) -> None:
    names = {seed: np.array(ADE20K_CLASSES)[room.classes] for seed, room in rooms.items()}
    with_door = [seed for seed in SEEDS if (names[seed] == "door").any()]
    assert 3 <= len(with_door) < len(SEEDS)  # half the rooms get a door
    for label in names.values():
        # The window sits in the back wall: wall on both sides of it on every row it spans.
        for row in np.flatnonzero((label == "windowpane").any(axis=1)):
            columns = np.flatnonzero(label[row] == "windowpane")
            beside = label[row, [columns[0] - 1, min(columns[-1] + 1, label.shape[1] - 1)]]
            assert set(beside) <= {"wall", *MOVABLE}
        rows = np.arange(label.shape[0])[:, None].repeat(label.shape[1], axis=1)
        assert rows[label == "floor"].mean() > rows[label == "ceiling"].mean()


def test_shadow_map_is_the_darkening_outside_the_mask(rooms: dict[int, SyntheticRoom]) -> None:
    for room in rooms.values():
        assert room.shadow.shape == room.mask.shape
        assert room.shadow.dtype == np.float32
        assert room.shadow.min() >= 0.0 and room.shadow.max() < 1.0
        outside = ~room.mask
        changed = (room.furnished != room.empty).any(axis=-1) & outside
        # Wherever the photos differ outside the furniture, a shadow is drawn there.
        assert np.all(room.shadow[changed] > 0.0)
        peak = room.shadow[outside].max()
        deep = outside & (room.shadow > 0.5 * peak)
        ratio = room.furnished[deep].astype(np.float32).mean() / room.empty[deep].astype(np.float32).mean()
        assert ratio < 1.0 - 0.4 * peak


def test_segmentation_pairs_are_photos_with_their_class_maps(tmp_path: Path) -> None:
    names = write_segmentation_pairs(tmp_path, count=3, seed=4, size=(64, 48))
    assert names == ["room_0000004.png", "room_0000005.png", "room_0000006.png"]
    for i, name in enumerate(names):
        room = render_room(4 + i, 64, 48)
        assert np.array_equal(np.asarray(Image.open(tmp_path / "images" / name)), room.furnished)
        label = Image.open(tmp_path / "labels" / name)
        assert label.mode == "L"
        assert np.array_equal(np.asarray(label), room.classes)


def test_twins_are_the_empty_room_and_the_cleared_room_labelled_as_empty(tmp_path: Path) -> None:
    names = write_segmentation_pairs(tmp_path, count=1, seed=4, size=(64, 48), twins=True)
    assert names == ["room_0000004.png", "room_0000004_empty.png", "room_0000004_cleared.png"]
    room = render_room(4, 64, 48)
    photo = {name: np.asarray(Image.open(tmp_path / "images" / name)) for name in names}
    assert np.array_equal(photo["room_0000004_empty.png"], room.empty)
    cleared = photo["room_0000004_cleared.png"].astype(np.int16)
    # Filled in from around the furniture: far from the furniture's colours, near the empty room's.
    inside = room.mask
    assert np.abs(cleared[inside] - room.empty[inside]).mean() < np.abs(cleared[inside] - room.furnished[inside]).mean()
    # Away from the furniture (and its one pixel of anti-aliased edge) it is the furnished photo, shadows and all.
    grown = np.asarray(Image.fromarray(inside.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(3))) > 0
    assert np.array_equal(cleared[~grown], room.furnished[~grown])
    for name in names[1:]:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "labels" / name)), room.structure)


def test_training_files_never_reach_into_the_held_out_seeds(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="held-out"):
        write_segmentation_pairs(tmp_path, count=2, seed=HELD_OUT_SEED - 1)
    assert write_segmentation_pairs(tmp_path, count=1, seed=HELD_OUT_SEED, size=(32, 24))


def test_demo_writes_expected_mix(demo: tuple[Path, list[Path]]) -> None:
    folder, paths = demo
    assert len(paths) == len(set(paths)) == 8
    assert all(path.is_file() and path.is_relative_to(folder) for path in paths)
    assert {path.suffix for path in paths} >= {".jpg", ".JPG", ".png", ".webp"}
    formats = {Image.open(path).format for path in paths}
    assert formats == {"JPEG", "PNG", "WEBP"}
    depths = {len(path.relative_to(folder).parts) for path in paths}
    assert {1, 2, 3} <= depths  # top level, one folder deep and nested
    shapes = {ImageOps.exif_transpose(Image.open(path)).size for path in paths}
    assert any(w > h for w, h in shapes) and any(w < h for w, h in shapes) and any(w == h for w, h in shapes)
    assert sum(path.stat().st_size for path in paths) < 300_000


def test_demo_has_one_sideways_jpeg_with_exif_orientation(demo: tuple[Path, list[Path]]) -> None:
    _, paths = demo
    rotated = [path for path in paths if Image.open(path).getexif().get(EXIF_ORIENTATION) == 6]
    assert len(rotated) == 1
    path = rotated[0]
    index = paths.index(path)
    spec = files._DEMO_FILES[index]
    stored = Image.open(path)
    assert stored.format == "JPEG"
    assert stored.size == spec.size[::-1]
    upright = ImageOps.exif_transpose(stored)
    assert upright.size == spec.size
    # Compare with the upright render itself, so a 180-degree mistake shows.
    expected = render._render(np.random.default_rng(index), *spec.size, spec.kind).furnished
    error = np.abs(np.asarray(upright.convert("RGB"), dtype=np.int16) - expected).mean()
    flipped = np.abs(np.asarray(upright.convert("RGB"), dtype=np.int16) - expected[::-1, ::-1]).mean()
    assert error < 4.0 < flipped


def test_demo_lossless_file_matches_render(demo: tuple[Path, list[Path]]) -> None:
    _, paths = demo
    index = next(i for i, path in enumerate(paths) if path.suffix == ".png")
    spec = files._DEMO_FILES[index]
    expected = render._render(np.random.default_rng(index), *spec.size, spec.kind).furnished
    assert np.array_equal(np.asarray(Image.open(paths[index]).convert("RGB")), expected)


def test_demo_names_stay_unique_beyond_one_cycle(tmp_path: Path) -> None:
    paths = write_demo_rooms(tmp_path, count=9, seed=3)
    assert len(set(paths)) == 9
    assert all(path.is_file() for path in paths)


def test_cli_writes_and_prints_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(tmp_path / "out"), "--count", "3", "--seed", "7"])
    printed = capsys.readouterr().out.split()
    assert len(printed) == 3
    assert all(Path(line).is_file() for line in printed)


def test_cli_writes_label_maps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(tmp_path), "--labels", "--count", "2"])
    main([str(tmp_path), "--labels", "--count", "1", "--seed", "2", "--size", "64x96"])
    printed = capsys.readouterr().out.split()
    assert [Path(line).name for line in printed] == ["room_0000000.png", "room_0000001.png", "room_0000002.png"]
    assert all((tmp_path / "labels" / Path(line).name).is_file() for line in printed)
    assert Image.open(tmp_path / "images/room_0000002.png").size == (64, 96)
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--count", "1", "--size", "64x96"])  # the demo catalogue has its own sizes
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--pairs", "--twins"])
