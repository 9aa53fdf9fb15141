"""The shipped toy models on held-out synthetic rooms: they find the furniture and paint over it.

Every room here comes from seeds at or above HELD_OUT_SEED, which no toy model was trained on.
The thresholds sit below what the shipped models reach (BENCHMARKS.md, "Quality") and above what
the random ``tiny`` models reach, which find no furniture at all.
"""

from dataclasses import replace

import numpy as np
import pytest

from casalimpia.config import InpaintConfig, MaskingConfig
from casalimpia.evaluation import closer_to_empty, mask_scores
from casalimpia.inpainting import Inpainter
from casalimpia.masking import FurnitureMasker, residual_fraction
from casalimpia.metrics import score
from casalimpia.synthetic import HELD_OUT_SEED, render_room
from casalimpia.toy import TOY_DIR

ROOMS = [render_room(HELD_OUT_SEED + i, 96, 72) for i in range(36)]
SOURCES = [f"held_out/{i}.png" for i in range(len(ROOMS))]
# As configs/toy/evaluate.yaml masks and paints (configs/demo.yaml, with the blend ramp scaled to 96x72 rooms).
MASKING = MaskingConfig(model="toy", resolution=64, dilation=0.06, batch_size=4)
PAINTING = InpaintConfig(model="toy", lora="toy", resolution=64, steps=10, guidance_scale=1.0, feather=1, batch_size=4)
# The evaluation's quality gate (configs/toy/evaluate.yaml): more than this much of the mask still furniture.
MAX_RESIDUAL = 0.25


@pytest.fixture(scope="module")
def masker():
    return FurnitureMasker(MASKING)


@pytest.fixture(scope="module")
def found(masker):
    """The removal masks the toy segmenter finds in the held-out rooms."""
    return masker.segment([room.furnished for room in ROOMS])


@pytest.fixture(scope="module")
def painted():
    """The base painter's and the LoRA's outputs on the exact furniture masks, by set-up name."""
    furnished, masks = [room.furnished for room in ROOMS], [room.mask for room in ROOMS]
    return {
        "base": Inpainter(replace(PAINTING, lora=None)).paint(furnished, masks, SOURCES),
        "lora": Inpainter(PAINTING).paint(furnished, masks, SOURCES),
    }


def residuals(masker: FurnitureMasker, photos: list[np.ndarray]) -> np.ndarray:
    """The fraction of each room's furniture mask the segmenter still calls furniture in the photo."""
    furniture = masker.furniture(photos)
    return np.array([residual_fraction(found, room.mask) for found, room in zip(furniture, ROOMS, strict=True)])


def test_the_toy_models_are_shipped_within_10_mb():
    files = [path for path in TOY_DIR.rglob("*") if path.is_file()]
    assert {path.relative_to(TOY_DIR).parts[0] for path in files} == {"segmenter", "painter", "lora"}
    assert sum(path.stat().st_size for path in files) <= 10 * 2**20


def test_toy_segmenter_finds_held_out_furniture_and_keeps_the_structure(found):
    scores = [mask_scores(mask, room.mask) for mask, room in zip(found, ROOMS, strict=True)]
    assert np.median([s["mask_recall"] for s in scores]) >= 0.8
    assert np.median([s["mask_ratio"] for s in scores]) <= 3.0
    # What the dilation adds around the furniture is most of this.
    assert np.mean([s["structure_removed"] for s in scores]) <= 0.1


def test_the_demo_configuration_paints_closer_to_the_empty_room_than_to_the_furniture(found):
    outputs = Inpainter(PAINTING).paint([room.furnished for room in ROOMS], found, SOURCES)
    closer = [
        closer_to_empty(output, room.empty, room.furnished, room.mask)
        for output, room in zip(outputs, ROOMS, strict=True)
    ]
    # The done-when target of the toy world; BENCHMARKS.md, "Quality", has the 200-room figure.
    assert np.mean(closer) >= 0.8, closer


def test_the_lora_paints_the_empty_room_better_and_leaves_less_furniture_than_the_base(painted, masker):
    empty_rooms = [room.empty for room in ROOMS]
    masks = [room.mask for room in ROOMS]
    psnr = {name: score(outputs, empty_rooms, masks)["psnr_mask"] for name, outputs in painted.items()}
    assert psnr["lora"] > psnr["base"] + 0.5, psnr
    residual = {name: residuals(masker, outputs).mean() for name, outputs in painted.items()}
    assert residual["lora"] < 0.8 * residual["base"], residual


def test_the_quality_gate_flags_furniture_left_behind_and_passes_empty_rooms(painted, masker):
    def flagged(photos: list[np.ndarray]) -> float:
        return float((residuals(masker, photos) > MAX_RESIDUAL).mean())

    # Furniture left where it was is nearly always caught; the empty rooms (a perfect painter) rarely are.
    assert flagged([room.furnished for room in ROOMS]) >= 0.95
    assert flagged([room.empty for room in ROOMS]) <= 0.2
    # The base painter paints furniture-like blurs back into the holes more often than the LoRA does.
    assert flagged(painted["base"]) > flagged(painted["lora"])


def test_install_copies_the_exports_and_stores_the_painters_unet_in_half_precision(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from casalimpia.toy import install

    exports = {name: tmp_path / "runs" / name for name in ("segmenter", "painter", "lora")}
    for folder in exports.values():
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text("name: run\n")
    (exports["painter"] / "unet").mkdir()
    save_file({"weight": torch.ones(3)}, exports["painter"] / "unet" / "diffusion_pytorch_model.safetensors")
    save_file({"weight": torch.ones(3)}, exports["segmenter"] / "model.safetensors")
    target = tmp_path / "toy"
    (target / "lora").mkdir(parents=True)
    (target / "lora" / "stale.safetensors").write_text("from the previous toy models")

    install(exports["segmenter"], exports["painter"], exports["lora"], target)
    assert load_file(target / "painter/unet/diffusion_pytorch_model.safetensors")["weight"].dtype == torch.float16
    assert load_file(target / "segmenter/model.safetensors")["weight"].dtype == torch.float32
    assert not (target / "lora/stale.safetensors").exists()
    assert all((target / name / "config.yaml").exists() for name in exports)
