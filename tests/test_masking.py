"""Class policy, mask refinement and the masking stage with the tiny OneFormer (no Ray)."""

import numpy as np
import pytest
from scipy import ndimage

from casalimpia import faults
from casalimpia.classes import (
    ADE20K_CLASSES,
    BUILTIN,
    CLASS_SEPARATOR,
    MOVABLE,
    STRUCTURE,
    join_class_names,
    removal_classes,
    split_class_names,
)
from casalimpia.config import MaskingConfig
from casalimpia.images import encode_mask
from casalimpia.masking import FurnitureMasker, distance_to_outside, mask_candidates, refine_mask
from casalimpia.synthetic import render_room


def test_design_ids_match_the_label_table():
    # The 0-indexed ids DESIGN.md states, checked against the table the policy uses.
    for index, name in {
        0: "wall",
        3: "floor",
        7: "bed",
        23: "sofa",
        36: "lamp",
        89: "television receiver",
        146: "radiator",
        148: "clock",
    }.items():
        assert ADE20K_CLASSES[index] == name
    assert len(ADE20K_CLASSES) == 150
    assert set(MOVABLE + BUILTIN + STRUCTURE) <= set(ADE20K_CLASSES)
    assert not set(MOVABLE) & set(STRUCTURE) and not set(BUILTIN) & set(STRUCTURE)


def test_policy_presets_remove_and_keep():
    assert "curtain" not in removal_classes("movable", [], [])
    assert "curtain" in removal_classes("movable+builtin", [], [])
    chosen = removal_classes("movable", ["Curtain "], ["lamp"])
    assert "curtain" in chosen and "lamp" not in chosen and "sofa" in chosen
    assert not set(removal_classes("movable+builtin", [], [])) & set(STRUCTURE)


def test_class_names_round_trip_through_one_string():
    assert not [name for name in ADE20K_CLASSES if CLASS_SEPARATOR in name]
    for names in ([], ["sofa"], ["chest of drawers", "television receiver"]):
        assert split_class_names(join_class_names(names)) == names


def test_refine_drops_specks_fills_holes_and_grows():
    mask = np.zeros((100, 100), dtype=bool)
    mask[20:60, 20:60] = True
    mask[35:45, 35:45] = False  # a hole
    mask[90, 90] = True  # a speck
    refined = refine_mask(mask, dilation_px=0, min_component_px=5, fill_holes=True)
    assert refined[40, 40] and not refined[90, 90]
    grown = refine_mask(mask, dilation_px=3, min_component_px=5, fill_holes=True)
    assert grown[17, 40] and not grown[15, 40] and grown.sum() > refined.sum()


@pytest.mark.parametrize("seed", range(3))
def test_distance_to_outside_is_the_exact_euclidean_distance(seed):
    mask = render_room(seed, 160, 120).mask
    mask[:30, :40] = True  # touching two borders, which do not count as outside
    expected = ndimage.distance_transform_edt(mask)
    assert np.allclose(distance_to_outside(mask), expected, atol=1e-4)
    assert distance_to_outside(np.ones((8, 8), dtype=bool)).min() > 1e6, "no outside: farther than any photo"


def test_mask_candidates():
    assert mask_candidates("living/a.jpg") == ["living/a.jpg.png", "living/a.png", "living/a.jpg"]
    assert mask_candidates("b.png") == ["b.png.png", "b.png"]


def _batch(images, errors=None):
    count = len(images)
    image_column = np.empty(count, dtype=object)
    image_column[:] = images
    return {
        "source": np.array([f"room-{i}.png" for i in range(count)], dtype=object),
        "image": image_column,
        "error": np.array(errors or [""] * count, dtype=object),
    }


def test_masker_tiny_masks_every_photo_at_its_own_size():
    masker = FurnitureMasker(MaskingConfig(model="tiny", resolution=64, preset="movable+builtin"))
    images = [np.full((90, 120, 3), 128, np.uint8), np.zeros((200, 80, 3), np.uint8), np.zeros((0, 0, 3), np.uint8)]
    out = masker(_batch(images, ["", "", "decode failed"]))
    assert out["mask"][0].shape == (90, 120) and out["mask"][0].dtype == bool
    assert out["mask"][1].shape == (200, 80)
    assert out["error"][2] == "decode failed" and out["mask"][2].size == 0
    assert np.isclose(out["mask_fraction"][0], out["mask"][0].mean())
    assert out["seconds_mask"][2] == 0.0
    assert out["classes"][2] == ""
    # Deterministic: the tiny preset is seeded.
    again = FurnitureMasker(MaskingConfig(model="tiny", resolution=64, preset="movable+builtin"))(_batch(images[:2]))
    assert np.array_equal(again["mask"][1], out["mask"][1])


def test_masker_reads_user_masks(tmp_path):
    expected = np.zeros((40, 60), dtype=bool)
    expected[10:20, 5:30] = True
    (tmp_path / "room-0.png").write_bytes(encode_mask(expected))
    masker = FurnitureMasker(MaskingConfig(masks=str(tmp_path)))
    out = masker(_batch([np.zeros((40, 60, 3), np.uint8), np.zeros((40, 60, 3), np.uint8)]))
    assert np.array_equal(out["mask"][0], expected)
    assert out["mask_fraction"][0] == pytest.approx(expected.mean())
    assert out["error"][1].startswith("no mask for room-1.png")
    assert list(out["classes"]) == ["", ""]


def test_masker_names_the_removal_classes_in_each_label_map():
    masker = FurnitureMasker(MaskingConfig(model="tiny", resolution=64, preset="movable+builtin"))
    # The random tiny model labels each of these photos with a single class: the grey one with a
    # removal class, the synthetic room with one that is kept.
    images = [np.full((90, 120, 3), 128, np.uint8), render_room(0, 256, 192).furnished]
    out = masker(_batch(images))
    removable = set(removal_classes("movable+builtin", [], []))
    for i, labels in enumerate(masker.label_maps(images)):
        present = sorted({ADE20K_CLASSES[label] for label in np.unique(labels)} & removable)
        assert split_class_names(out["classes"][i]) == present
        assert out["mask"][i].any() == bool(present)
    assert out["classes"][0] and not out["classes"][1]


def test_a_batch_out_of_memory_is_segmented_in_halves_and_only_a_photo_that_fails_alone_fails(monkeypatch):
    config = MaskingConfig(model="tiny", resolution=64, preset="movable+builtin")
    images = [render_room(seed, 128, 96).furnished for seed in range(3)]
    expected = FurnitureMasker(config)(_batch(images))
    # The model runs out of memory on more than one photo at once, and on room-1.png even alone.
    monkeypatch.setenv(faults.FAULTS_ENV, "masker_oom=1:room-1.png")
    stage, kwargs = faults.stage("masker", FurnitureMasker, {"config": config})
    out = stage(**kwargs)(_batch(images))
    assert out["error"][1] == f"segmentation failed: injected fault: out of memory on 1 photo(s) ({faults.FAULTS_ENV})"
    assert out["mask"][1].size == 0 and out["mask_fraction"][1] == 0 and out["seconds_mask"][1] == 0
    for i in (0, 2):
        assert out["error"][i] == "" and np.array_equal(out["mask"][i], expected["mask"][i])
        assert out["classes"][i] == expected["classes"][i]
