"""Segmenter fine-tuning: label maps to OneFormer targets, scores, crops, a learning check, and the job end to end."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from casalimpia.classes import ADE20K_CLASSES, IGNORE_LABEL, MOVABLE, STRUCTURE
from casalimpia.config import MaskingConfig, SegmenterTrainConfig, load_config
from casalimpia.masking import IMAGENET_MEAN, FurnitureMasker
from casalimpia.metrics import SegmentationScores
from casalimpia.training.runs import read_epochs
from casalimpia.training.segmenter import SegmenterTrainer, class_lookup, label_targets, prepare
from casalimpia.training.segmenter_data import (
    PAD_COLOUR,
    LabelledPhoto,
    list_examples,
    random_crop,
    read_example,
    split_examples,
)

ROOT = Path(__file__).resolve().parents[1]
WALL, FLOOR, CEILING, BED, SOFA = 0, 3, 5, 7, 23
COLOURS = {
    WALL: (200, 190, 170),
    FLOOR: (120, 80, 50),
    CEILING: (240, 240, 240),
    BED: (160, 40, 40),
    SOFA: (40, 60, 160),
}


def write_rooms(folder: Path, count: int, size: tuple[int, int] = (80, 64), seed: int = 0) -> None:
    """Rooms drawn by hand in the dataset layout: ceiling, wall and floor bands, a bed or a sofa, an unlabelled row."""
    rng = np.random.default_rng(seed)
    width, height = size
    palette = np.zeros((256, 3), dtype=np.uint8)
    for label, colour in COLOURS.items():
        palette[label] = colour
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        labels = np.full((height, width), WALL, dtype=np.uint8)
        labels[: height // 8] = CEILING
        labels[int(height * 0.6) :] = FLOOR
        left, top = int(rng.integers(0, width // 2)), int(rng.integers(height // 4, height // 2))
        right, bottom = (
            left + int(rng.integers(width // 4, width // 2)),
            top + int(rng.integers(height // 4, height // 2)),
        )
        labels[top:bottom, left:right] = SOFA if index % 2 else BED
        noise = rng.integers(-20, 20, (height, width, 3))
        image = np.clip(palette[labels].astype(int) + noise, 0, 255).astype(np.uint8)
        labels[0] = IGNORE_LABEL
        Image.fromarray(image).save(folder / "images" / f"room_{index:02d}.jpg", quality=90)
        Image.fromarray(labels).save(folder / "labels" / f"room_{index:02d}.png")


def demo_config(dataset: Path, storage: Path, *overrides: str) -> SegmenterTrainConfig:
    return load_config(
        ROOT / "configs/train_segmenter_demo.yaml",
        [f"data.dataset={dataset}", f"storage={storage}", "tracking.wandb=false", *overrides],
        SegmenterTrainConfig,
    )


def test_a_label_map_becomes_one_mask_per_class_present_and_ignored_pixels_in_none():
    labels = torch.tensor([[WALL, WALL, SOFA], [FLOOR, SOFA, IGNORE_LABEL]], dtype=torch.uint8)
    masks, classes = label_targets(labels)
    assert classes.tolist() == [WALL, FLOOR, SOFA] and classes.dtype == torch.long
    assert masks.shape == (3, 2, 3) and masks.dtype == torch.float32
    assert masks[2].tolist() == [[0, 0, 1], [0, 1, 0]]
    # Every labelled pixel is in exactly one mask, the ignored one in none.
    assert masks.sum(0).tolist() == [[1, 1, 1], [1, 1, 0]]
    empty_masks, empty_classes = label_targets(torch.full((4, 4), IGNORE_LABEL, dtype=torch.uint8))
    assert empty_masks.shape == (0, 4, 4) and empty_classes.numel() == 0


def test_segmentation_scores_pool_furniture_and_count_structure_removed():
    id2label = dict(enumerate(ADE20K_CLASSES))
    scores = SegmentationScores(class_lookup(id2label, MOVABLE), class_lookup(id2label, STRUCTURE))
    truth = np.array([[WALL, WALL, SOFA, SOFA], [FLOOR, FLOOR, SOFA, IGNORE_LABEL]], dtype=np.uint8)
    # Two of three sofa pixels found (one as a bed: still furniture), one wall pixel called a sofa,
    # and the ignored pixel's prediction does not count.
    predicted = np.array([[WALL, SOFA, SOFA, BED], [FLOOR, FLOOR, WALL, BED]], dtype=np.uint8)
    scores.add(predicted, truth)
    scores.add(np.full((1, 2), FLOOR, np.uint8), np.full((1, 2), FLOOR, np.uint8))  # a photo without furniture
    result = scores.result()
    assert result["furniture_recall"] == pytest.approx(2 / 3)
    assert result["furniture_precision"] == pytest.approx(2 / 3)
    assert result["furniture_iou"] == pytest.approx(2 / 4)
    assert result["furniture_recall_median"] == pytest.approx(2 / 3)
    assert result["structure_removed"] == pytest.approx(1 / 6)
    # IoU per class present: wall 1/3 (one hit, three in the union), floor 4/4, sofa 1/4 (exact sofa only).
    assert result["miou"] == pytest.approx((1 / 3 + 1 + 1 / 4) / 3)
    assert result["pixel_accuracy"] == pytest.approx(6 / 9)
    nothing = SegmentationScores(np.zeros(3, bool), np.zeros(3, bool)).result()
    assert all(math.isnan(value) for value in nothing.values())


def test_random_crops_keep_labels_whole_and_pad_small_photos_with_ignored_pixels():
    labels = np.full((40, 60), WALL, dtype=np.uint8)
    labels[10:30, 20:50] = SOFA
    example = LabelledPhoto("a.png", np.zeros((40, 60, 3), dtype=np.uint8), labels)
    rng = np.random.default_rng(0)
    for _ in range(5):
        image, crop = random_crop(example, resolution=64, crop=64, scale=[0.5, 2.0], flip=True, rng=rng)
        assert image.shape == (64, 64, 3) and crop.shape == (64, 64) and crop.dtype == np.uint8
        # Nearest-neighbour labels: no value between two classes; padding is ignored.
        assert set(np.unique(crop)) <= {WALL, SOFA, IGNORE_LABEL}
    # At half scale the 40 px short side becomes 32: the rest of the 64 px window is padding.
    _, crop = random_crop(example, resolution=64, crop=64, scale=[0.5, 0.5], flip=False, rng=rng)
    assert (crop[32:] == IGNORE_LABEL).all() and (crop[:32, :48] != IGNORE_LABEL).all()
    # Padding is the mean colour, zero once normalised as the masking stage normalises.
    assert tuple(round(255 * channel) for channel in IMAGENET_MEAN) == PAD_COLOUR


def test_examples_are_listed_with_their_labels_split_by_name_and_checked(tmp_path):
    write_rooms(tmp_path / "rooms", 6)
    decode = demo_config(tmp_path / "rooms", tmp_path).data.decode
    photos = list_examples(str(tmp_path / "rooms"), decode)
    assert photos == [f"room_{i:02d}.jpg" for i in range(6)]
    split = split_examples(photos, [0.5, 0.5, 0.0])
    # By name, not by listing order.
    reordered = split_examples(photos[::-1], [0.5, 0.5, 0.0])
    assert {name: sorted(paths) for name, paths in reordered.items()} == split
    assert sorted(split["train"] + split["validation"]) == photos
    example = read_example(str(tmp_path / "rooms"), photos[0], decode)
    assert example.image.shape == (64, 80, 3) and set(np.unique(example.labels)) == {0, 3, 5, 7, 255}

    (tmp_path / "rooms/labels/room_00.png").unlink()
    with pytest.raises(ValueError, match="1 of 6 photos have no label map"):
        list_examples(str(tmp_path / "rooms"), decode)
    Image.fromarray(np.full((64, 80), 200, np.uint8)).save(tmp_path / "rooms/labels/room_00.png")
    with pytest.raises(ValueError, match="no ADE20K class id"):
        read_example(str(tmp_path / "rooms"), "room_00.jpg", decode)


def test_the_loss_falls_on_one_batch_within_a_few_steps(tmp_path):
    write_rooms(tmp_path / "rooms", 4)
    # A higher rate than the demo's: memorising one batch needs no care for the next one.
    config = demo_config(tmp_path / "rooms", tmp_path, "optim.learning_rate=0.003")
    examples = [read_example(str(tmp_path / "rooms"), f"room_{i:02d}.jpg", config.data.decode) for i in range(4)]
    rng = np.random.default_rng(0)
    crops = [random_crop(e, resolution=64, crop=64, scale=[1.0, 1.0], flip=False, rng=rng) for e in examples]
    batch = {
        "image": torch.tensor(np.stack([image for image, _ in crops])),
        "labels": torch.tensor(np.stack([labels for _, labels in crops])),
    }
    torch.manual_seed(0)
    trainer = SegmenterTrainer(config, torch.device("cpu"), total_steps=20)
    losses = [trainer.train_batch(batch) for _ in range(20)]
    print(f"loss on one batch: {losses[0]:.3f} -> {losses[-1]:.3f} in 20 steps")
    assert all(loss is not None and math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.75 * losses[0]


def test_prepare_fails_fast_with_one_line(tmp_path):
    write_rooms(tmp_path / "rooms", 2)
    with pytest.raises(Exception, match=r"^data\.dataset: cannot list"):
        prepare(demo_config(tmp_path / "nothing", tmp_path))
    with pytest.raises(Exception, match=r"^masking\.model: "):
        prepare(demo_config(tmp_path / "rooms", tmp_path, "masking.model=./models/missing"))


def test_the_job_trains_and_exports_a_model_that_masking_loads(ray_local, load_job, tmp_path, capsys, monkeypatch):
    write_rooms(tmp_path / "rooms", 8)
    arguments = [
        "--config",
        "configs/train_segmenter_demo.yaml",
        "--input",
        str(tmp_path / "rooms"),
        "--output",
        str(tmp_path / "runs"),
        "--set",
        "epochs=1",
        "--set",
        "tracking.wandb=false",
    ]
    monkeypatch.chdir(ROOT)
    job = load_job("train_segmenter")
    assert job.main(arguments) == 0
    out = capsys.readouterr().out
    assert "starting run" in out and "val/furniture_iou" in out and "segmenter: " in out
    run = tmp_path / "runs/demo"
    first = read_epochs(str(run))
    assert [row["epoch"] for row in first] == [1] and first[0]["step"] >= 1
    assert {"train/loss", "val/miou", "val/furniture_recall", "val/structure_removed"} <= set(first[0])
    resolved = load_config(run / "config.yaml", [], SegmenterTrainConfig)
    assert resolved.data.dataset == str(tmp_path / "rooms") and resolved.masking.model == "tiny"
    model = run / "model"
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "config.yaml"} <= {
        p.name for p in model.iterdir()
    }
    assert not (model / "training_state.pt").exists()

    # The export loads through the masking stage exactly as a hub id does, in inference form.
    masker = FurnitureMasker(MaskingConfig(model=str(model), resolution=64))
    assert masker.model.config.is_training is False and masker.model.config.dropout == 0.0
    photo = np.asarray(Image.open(tmp_path / "rooms/images/room_01.jpg").convert("RGB"))
    (mask,) = masker.segment([photo])
    assert mask.shape == photo.shape[:2] and mask.dtype == bool

    # Started again with more epochs, the run resumes (the driver sees its checkpoint) and the
    # workers start from the checkpoint's weights, optimizer and step count.
    again = prepare(load_config(run / "config.yaml", ["epochs=2"], SegmenterTrainConfig))
    assert again.resuming
    (checkpoint,) = [p for p in run.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")]
    resumed = SegmenterTrainer(again.config, torch.device("cpu"), again.total_steps, start=str(checkpoint))
    assert resumed.optimisation.step == first[0]["step"]


def test_shipped_configs_load_and_the_real_one_starts_from_the_masking_model():
    real = load_config(
        ROOT / "configs/train_segmenter.yaml", [], SegmenterTrainConfig, {"data.dataset": "a", "storage": "b"}
    )
    defurnish = load_config(ROOT / "configs/defurnish.yaml", values={"input": "a", "output": "b"})
    assert real.masking.model == defurnish.masking.model and real.masking.resolution == defurnish.masking.resolution
    assert real.ray.use_gpu and real.ray.workers > 1 and real.precision == "auto"
    demo = load_config(ROOT / "configs/train_segmenter_demo.yaml", [], SegmenterTrainConfig)
    assert demo.masking.model == "tiny" and not demo.ray.use_gpu
