"""Synthetic rooms written as files: a demo catalogue, training pairs and segmentation labels.

:func:`write_demo_rooms` saves a small catalogue of furnished photos mixing the formats, sizes,
EXIF orientations and folder layouts of a real listing export. The bundled demo set in
``casalimpia/data/demo_rooms`` was made with::

    python -m casalimpia.synthetic casalimpia/data/demo_rooms --count 8

:func:`write_room_pairs` writes rooms with their empty twins and exact masks; the bundled
training demo data (``casalimpia/data/empty_rooms`` and ``casalimpia/data/mask_library``) was
made with::

    python -m casalimpia.synthetic /tmp/rooms --pairs --count 12 --seed 100
    cp /tmp/rooms/empty/* casalimpia/data/empty_rooms/
    python -m casalimpia.synthetic /tmp/furnished --pairs --count 8 --seed 200
    python jobs/masks.py --config configs/masks_demo.yaml --input /tmp/furnished/furnished \\
        --output casalimpia/data/mask_library --set masking.masks=/tmp/furnished/masks --set ring=4

:func:`write_segmentation_pairs` writes furnished photos with their ADE20K label maps, the
layout the segmenter fine-tuning job reads.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from casalimpia.synthetic.render import HELD_OUT_SEED, SyntheticRoom, _render, render_room

__all__ = [
    "demo_room",
    "demo_room_path",
    "main",
    "write_demo_rooms",
    "write_room_pairs",
    "write_segmentation_pairs",
]

_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class _DemoFile:
    path: str
    kind: str
    size: tuple[int, int]  # (width, height) as shown upright
    exif_rotated: bool = False


# A listing export mixes folders, suffix spellings, formats, portrait shots and
# phone photos whose pixels are stored sideways with an EXIF orientation tag.
_DEMO_FILES: tuple[_DemoFile, ...] = (
    _DemoFile("living/living_room_01.jpg", "living", (384, 288)),
    _DemoFile("living/living_room_02.JPG", "living", (480, 320)),
    _DemoFile("bedrooms/master/bedroom_01.png", "bedroom", (256, 192)),
    _DemoFile("bedrooms/guest/bedroom_02.webp", "bedroom", (320, 320)),
    _DemoFile("dining/dining_room_phone.jpg", "dining", (384, 288), exif_rotated=True),
    _DemoFile("bedrooms/master/bedroom_03_portrait.jpg", "bedroom", (288, 384)),
    _DemoFile("dining/dining_room_02.webp", "dining", (480, 320)),
    _DemoFile("living_room_03.png", "living", (240, 240)),
)


def demo_room_path(index: int) -> str:
    """The relative path :func:`write_demo_rooms` writes demo photo ``index`` to."""
    spec = _DEMO_FILES[index % len(_DEMO_FILES)]
    path = PurePosixPath(spec.path)
    if index >= len(_DEMO_FILES):
        path = path.with_name(f"{path.stem}_{index // len(_DEMO_FILES)}{path.suffix}")
    return str(path)


def demo_room(index: int, seed: int = 0) -> SyntheticRoom:
    """The room behind demo photo ``index`` of :func:`write_demo_rooms`, upright, with its ground truth."""
    spec = _DEMO_FILES[index % len(_DEMO_FILES)]
    return _render(np.random.default_rng(seed + index), *spec.size, spec.kind)


def write_demo_rooms(folder: str | Path, count: int = 8, seed: int = 0) -> list[Path]:
    """Write a small, varied set of furnished demo photos and return their paths.

    Files cycle through a fixed mix of nested folders, ``.jpg``/``.JPG``,
    PNG and WebP, landscape, square and portrait sizes, and one JPEG stored
    sideways with EXIF Orientation 6 (upright once the tag is applied). Beyond
    the first eight, names get a numeric suffix. Image ``i`` uses seed ``seed + i``.
    """
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")
    root = Path(folder)
    paths: list[Path] = []
    for i in range(count):
        spec = _DEMO_FILES[i % len(_DEMO_FILES)]
        rel = Path(demo_room_path(i))
        image = Image.fromarray(demo_room(i, seed).furnished)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = {".jpg": "JPEG", ".png": "PNG", ".webp": "WEBP"}[rel.suffix.lower()]
        options: dict[str, object] = {"quality": 85} if fmt in ("JPEG", "WEBP") else {"optimize": True}
        if spec.exif_rotated:
            # Orientation 6 tells viewers to turn the stored pixels 90 degrees
            # clockwise, so store the upright render turned counter-clockwise.
            image = image.transpose(Image.Transpose.ROTATE_90)
            exif = Image.Exif()
            exif[_EXIF_ORIENTATION] = 6
            options["exif"] = exif
        image.save(path, fmt, **options)
        paths.append(path)
    return paths


def write_room_pairs(folder: str | Path, count: int, seed: int = 0, size: tuple[int, int] = (96, 72)) -> list[str]:
    """Write rooms with their ground truth: ``furnished/``, ``empty/`` and ``masks/`` under folder.

    Room ``i`` (seed ``seed + i``) is ``room_{i:03d}.png`` in ``furnished/`` and ``empty/``; its
    exact furniture mask is ``masks/room_{i:03d}.png.png``, where the mask library job
    (``masking.masks``) looks for it. Returns the room file names.
    """
    root = Path(folder)
    names = []
    for i in range(count):
        room = render_room(seed + i, *size)
        name = f"room_{i:03d}.png"
        for kind, pixels in (("furnished", room.furnished), ("empty", room.empty)):
            (root / kind).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / kind / name, optimize=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(room.mask.astype(np.uint8) * 255).save(root / "masks" / f"{name}.png", optimize=True)
        names.append(name)
    return names


def write_segmentation_pairs(
    folder: str | Path, count: int, seed: int = 0, size: tuple[int, int] = (128, 96), *, twins: bool = False
) -> list[str]:
    """Write furnished rooms with their class maps: ``images/`` and ``labels/`` under folder.

    The room of seed ``s`` is ``images/room_{s:07d}.png`` and ``labels/room_{s:07d}.png``, the
    label an 8-bit PNG of 0-indexed ADE20K ids (see :attr:`SyntheticRoom.classes`); named by seed,
    writes of other seed ranges and sizes can share one folder. With ``twins`` each room also
    gets ``room_{s:07d}_empty.png`` (its empty twin) and ``room_{s:07d}_cleared.png`` (the furnished
    photo with its furniture filled in by OpenCV's Telea inpainting, the smooth fill an imperfect
    painter leaves), both labelled with the room's structure: the segmenter also judges painted
    outputs (the quality gate), and a model that has only seen furnished rooms calls bare walls
    and smooth fills furniture. Returns the file names.
    """
    _check_seeds(seed, count)
    root = Path(folder)
    for kind in ("images", "labels"):
        (root / kind).mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        room = render_room(seed + i, *size)
        examples = {f"room_{seed + i:07d}.png": (room.furnished, room.classes)}
        if twins:
            examples[f"room_{seed + i:07d}_empty.png"] = (room.empty, room.structure)
            examples[f"room_{seed + i:07d}_cleared.png"] = (_cleared(room), room.structure)
        for name, (photo, labels) in examples.items():
            Image.fromarray(photo).save(root / "images" / name, optimize=True)
            Image.fromarray(labels).save(root / "labels" / name, optimize=True)
            names.append(name)
    return names


def _cleared(room: SyntheticRoom) -> np.ndarray:
    """The furnished photo with its furniture filled in from around it by OpenCV's Telea inpainting."""
    import cv2

    # One pixel of growth takes the furniture's anti-aliased edge with it, as the job's mask dilation does.
    mask = cv2.dilate(room.mask.astype(np.uint8) * 255, np.ones((3, 3), np.uint8))
    return cv2.inpaint(room.furnished, mask, 3, cv2.INPAINT_TELEA)


def _check_seeds(seed: int, count: int) -> None:
    """Training data must come from below the held-out seeds, or held-out figures would lie."""
    if seed < HELD_OUT_SEED < seed + count:
        raise ValueError(
            f"seeds {seed}..{seed + count - 1} straddle the held-out range (>= {HELD_OUT_SEED}): "
            "write training and held-out rooms separately"
        )


def _size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` as a (width, height) pair of positive integers."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 128x96, got {text!r}") from None
    if width < 16 or height < 16:
        raise argparse.ArgumentTypeError(f"rooms are at least 16x16 pixels, got {text!r}")
    return width, height


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m casalimpia.synthetic FOLDER [--count N] [--seed S] [--pairs|--labels] [--size WxH]``.

    Sizes apply to ``--pairs`` and ``--labels``; the demo catalogue mixes its own.
    """
    parser = argparse.ArgumentParser(
        prog="python -m casalimpia.synthetic",
        description=(
            "Write synthetic furnished room photos. Seeds from "
            f"{HELD_OUT_SEED:,} on are held out for evaluation: train below them."
        ),
    )
    parser.add_argument("folder", type=Path, help="output folder (created if missing)")
    parser.add_argument("--count", type=int, default=8, help="number of images (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image (default: 0)")
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument(
        "--pairs", action="store_true", help="write furnished/, empty/ and masks/ ground truth (96x72) instead"
    )
    layout.add_argument(
        "--labels", action="store_true", help="write images/ and labels/ (ADE20K class maps, 128x96) instead"
    )
    parser.add_argument(
        "--twins",
        action="store_true",
        help="with --labels, also write each room's empty twin and its furniture filled in, labelled as empty",
    )
    parser.add_argument(
        "--size", type=_size, help="WIDTHxHEIGHT of every room written with --pairs or --labels (default: as above)"
    )
    args = parser.parse_args(argv)
    if args.twins and not args.labels:
        parser.error("--twins goes with --labels")
    if args.size is not None and not (args.pairs or args.labels):
        parser.error("--size goes with --pairs or --labels (the demo catalogue mixes its own sizes)")
    sized = {} if args.size is None else {"size": args.size}
    if args.pairs:
        for name in write_room_pairs(args.folder, args.count, seed=args.seed, **sized):
            print(args.folder / "furnished" / name)
        return
    if args.labels:
        for name in write_segmentation_pairs(args.folder, args.count, seed=args.seed, twins=args.twins, **sized):
            print(args.folder / "images" / name)
        return
    for path in write_demo_rooms(args.folder, count=args.count, seed=args.seed):
        print(path)
