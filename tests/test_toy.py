"""The shipped toy models on held-out synthetic rooms: they find the furniture and paint over it.

Every room here comes from seeds at or above HELD_OUT_SEED, which no toy model was trained on.
The thresholds sit below what the shipped models reach (BENCHMARKS.md, "Quality") and above what
the random ``tiny`` models reach, which find no furniture at all.
"""

import numpy as np
import pytest

from casalimpia.config import InpaintConfig, MaskingConfig
from casalimpia.evaluation import closer_to_empty, mask_scores
from casalimpia.inpainting import Inpainter
from casalimpia.masking import FurnitureMasker
from casalimpia.synthetic import HELD_OUT_SEED, render_room
from casalimpia.toy import TOY_DIR

ROOMS = [render_room(HELD_OUT_SEED + i, 96, 72) for i in range(12)]
# As configs/demo.yaml masks and paints.
MASKING = MaskingConfig(model="toy", resolution=64, dilation=0.045, batch_size=4)
PAINTING = InpaintConfig(model="toy", lora="toy", resolution=64, steps=10, guidance_scale=1.0, batch_size=4)
# The demo configuration reached 74% on 200 held-out rooms (configs/toy/evaluate.yaml); the target is 80%.
CLOSER_THRESHOLD = 0.7


@pytest.fixture(scope="module")
def found():
    """The removal masks the toy segmenter finds in the held-out rooms."""
    return FurnitureMasker(MASKING).segment([room.furnished for room in ROOMS])


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
    outputs = Inpainter(PAINTING).paint(
        [room.furnished for room in ROOMS], found, [f"held_out/{i}.png" for i in range(len(ROOMS))]
    )
    closer = [
        closer_to_empty(output, room.empty, room.furnished, room.mask)
        for output, room in zip(outputs, ROOMS, strict=True)
    ]
    assert np.mean(closer) >= CLOSER_THRESHOLD, closer


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
