"""Cropping, compositing and the inpainting stages with the tiny SD pipeline (no Ray)."""

import numpy as np
import pytest
from scipy import ndimage

from casalimpia import faults
from casalimpia.config import InpaintConfig
from casalimpia.images import decode_image, encode_image
from casalimpia.inpainting import (
    Inpainter,
    blend_painted,
    composite,
    crop_around,
    crop_for_painting,
    photo_seed,
)
from casalimpia.synthetic import render_room

CONFIG = InpaintConfig(model="tiny", resolution=64, steps=2)


def test_crop_is_square_around_the_mask_and_inside_the_photo():
    mask = np.zeros((400, 600), dtype=bool)
    mask[100:150, 500:580] = True
    crop = crop_around(mask, context=0.5, min_side=64)
    assert crop.height == crop.width == 160
    assert crop.left + crop.width <= 600 and crop.top >= 0
    assert crop.top <= 100 and crop.top + crop.height >= 150 and crop.left <= 500


def test_crop_never_exceeds_the_photo():
    mask = np.ones((100, 300), dtype=bool)
    crop = crop_around(mask, context=0.5, min_side=512)
    assert (crop.top, crop.left, crop.height, crop.width) == (0, 0, 100, 300)


@pytest.mark.parametrize("feather", [0, 4])
def test_composite_keeps_every_pixel_outside_the_mask(feather):
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    painted = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    mask = np.zeros((64, 80), dtype=bool)
    mask[10:40, 20:70] = True
    result = composite(original, painted, mask, feather)
    assert np.array_equal(result[~mask], original[~mask])
    assert np.array_equal(result[25, 45], painted[25, 45])  # deep inside: fully painted


@pytest.mark.parametrize("seed", range(4))
def test_composite_feathers_exactly_by_the_euclidean_distance_to_the_mask_edge(seed):
    # Masks touching the photo's border and each other, against the plain whole-photo definition.
    rng = np.random.default_rng(seed)
    original = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    painted = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    mask = render_room(seed, 128, 96).mask
    mask[: 10 * seed, :20] = True
    weight = np.clip(ndimage.distance_transform_edt(mask) / 4, 0, 1)[mask][:, None]
    expected = original.copy()
    expected[mask] = np.rint(weight * painted[mask] + (1 - weight) * original[mask]).astype(np.uint8)
    assert np.abs(composite(original, painted, mask, 4).astype(int) - expected).max() <= 1


def test_photo_seed_is_stable_and_distinct():
    assert photo_seed("a/b.jpg", 0) == photo_seed("a/b.jpg", 0)
    assert photo_seed("a/b.jpg", 0) != photo_seed("a/c.jpg", 0) != photo_seed("a/b.jpg", 1)


def _batch(rooms, fractions=None, sources=None):
    count = len(rooms)
    images, masks = np.empty(count, dtype=object), np.empty(count, dtype=object)
    images[:] = [room.furnished for room in rooms]
    masks[:] = [room.mask for room in rooms]
    return {
        "source": np.array(sources or [f"r{i}.png" for i in range(count)], dtype=object),
        "image": images,
        "mask": masks,
        "mask_fraction": np.array(fractions or [m.mean() for m in masks]),
        "error": np.array([""] * count, dtype=object),
    }


@pytest.fixture(scope="module")
def inpainter():
    return Inpainter(CONFIG)


def _paint(inpainter, batch):
    """The batch through the job's three painting stages: crop (CPU), paint (actor), blend (CPU)."""
    return blend_painted(inpainter(crop_for_painting(batch, config=CONFIG)), feather=CONFIG.feather)


def test_inpainter_changes_only_masked_pixels_and_png_keeps_them_exact(inpainter):
    rooms = [render_room(seed, 160, 120) for seed in (1, 2)] + [render_room(3, 96, 128)]
    out = _paint(inpainter, _batch(rooms))
    for room, result in zip(rooms, out["image"], strict=True):
        assert result.shape == room.furnished.shape
        assert np.array_equal(result[~room.mask], room.furnished[~room.mask])
        assert not np.array_equal(result[room.mask], room.furnished[room.mask])
        # Through a PNG file and back, the unmasked pixels are still bit-identical.
        decoded = decode_image(encode_image(result, "png"), max_pixels=10**8, min_side=8)
        assert np.array_equal(decoded[~room.mask], room.furnished[~room.mask])
    assert (out["seconds_inpaint"] > 0).all()
    assert set(out) == set(_batch(rooms)) | {"seconds_inpaint"}


def test_the_stages_paint_what_painting_in_process_paints(inpainter):
    rooms = [render_room(seed, 160, 120) for seed in (7, 8)]
    cropped = crop_for_painting(_batch(rooms, sources=["a.png", "b.png"]), config=CONFIG)
    assert cropped["model_image"].shape == (2, 64, 64, 3) and cropped["model_mask"].max() == 255
    painted = inpainter(cropped)
    # The actor ships only the painted crops on, not the model inputs.
    assert painted["painted"].shape == (2, 64, 64, 3) and "model_image" not in painted
    staged = blend_painted(painted, feather=CONFIG.feather)["image"]
    in_process = inpainter.paint([room.furnished for room in rooms], [room.mask for room in rooms], ["a.png", "b.png"])
    for one, other in zip(staged, in_process, strict=True):
        assert np.array_equal(one, other)
    # In process, a photo with nothing masked comes back as it is and the others are painted as before.
    nothing = np.zeros_like(rooms[0].mask)
    mixed = inpainter.paint([rooms[0].furnished, rooms[1].furnished], [nothing, rooms[1].mask], ["a.png", "b.png"])
    assert mixed[0] is rooms[0].furnished and np.array_equal(mixed[1], in_process[1])


def test_inpainter_is_reproducible_per_photo_whatever_the_batch(inpainter):
    rooms = [render_room(seed, 128, 96) for seed in (4, 5)]
    together = _paint(inpainter, _batch(rooms, sources=["a.png", "b.png"]))["image"]
    alone = _paint(inpainter, _batch(rooms[1:], sources=["b.png"]))["image"][0]
    renamed = _paint(inpainter, _batch(rooms[1:], sources=["c.png"]))["image"][0]
    # The seed follows the path, not the batch position; batched kernels may round differently.
    assert np.abs(alone.astype(int) - together[1].astype(int)).max() <= 2
    assert np.abs(renamed.astype(int) - together[1].astype(int)).max() > 2


def test_empty_masks_and_failed_rows_pass_through(inpainter):
    room = render_room(6, 128, 96)
    batch = _batch([room, room], fractions=[0.0, 0.3])
    batch["error"] = np.array(["", "bad file"], dtype=object)
    out = _paint(inpainter, batch)
    assert np.array_equal(out["image"][0], room.furnished)
    assert out["error"][1] == "bad file" and out["seconds_inpaint"].sum() == 0


@pytest.mark.parametrize(
    "settings", [{"channels_last": True}, {"compile_unet": True}], ids=["channels_last", "compile"]
)
def test_speed_settings_paint_what_the_plain_model_paints(inpainter, settings):
    rooms = [render_room(seed, 128, 96) for seed in (9, 10)]
    photos, masks, sources = [room.furnished for room in rooms], [room.mask for room in rooms], ["a.png", "b.png"]
    fast = Inpainter(CONFIG, **settings)
    if settings.get("compile_unet"):
        assert hasattr(fast.pipe.unet, "_orig_mod")  # compiled, not silently skipped
    for plain, sped_up in zip(inpainter.paint(photos, masks, sources), fast.paint(photos, masks, sources), strict=True):
        assert np.abs(plain.astype(int) - sped_up).max() <= 2


def test_a_batch_out_of_memory_is_painted_in_halves_and_only_a_photo_that_fails_alone_fails(inpainter, monkeypatch):
    rooms = [render_room(seed, 128, 96) for seed in range(10, 14)]
    sources = ["a.png", "b.png", "c.png", "d.png"]
    expected = _paint(inpainter, _batch(rooms, sources=sources))
    # The model runs out of memory on more than one photo at once, so every photo painted was painted
    # alone, and on c.png even alone.
    monkeypatch.setenv(faults.FAULTS_ENV, "inpainter_oom=1:c.png")
    stage, kwargs = faults.stage("inpainter", Inpainter, {"config": CONFIG})
    out = _paint(stage(**kwargs), _batch(rooms, sources=sources))
    assert list(out["error"][[0, 1, 3]]) == ["", "", ""]
    assert out["error"][2] == f"inpainting failed: injected fault: out of memory on 1 photo(s) ({faults.FAULTS_ENV})"
    for i in (0, 1, 3):
        # The seed follows the photo, not the batch; batched kernels may round differently.
        assert np.abs(out["image"][i].astype(int) - expected["image"][i].astype(int)).max() <= 2
    assert np.array_equal(out["image"][2], rooms[2].furnished), "the failed photo is left as it was"
