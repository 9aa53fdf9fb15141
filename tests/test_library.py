"""The mask library: margin rings, the write task, and jobs/masks.py end to end on a real local Ray."""

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from casalimpia import storage
from casalimpia.classes import removal_classes
from casalimpia.config import MaskLibraryConfig, load_config
from casalimpia.images import decode_image, encode_mask
from casalimpia.pipeline import JobError, ManifestWriter, read_manifest
from casalimpia.synthetic import render_room
from casalimpia.training.library import LIBRARY_SCHEMA, execute, margin_ring, prepare, write_masks_and_rings

ROOT = Path(__file__).resolve().parents[1]
DEMO_ROOMS = ROOT / "casalimpia" / "data" / "demo_rooms"
DEMO_RING = 8  # configs/masks_demo.yaml


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _object_array(items: list) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def _distance_to_mask(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel to the nearest mask pixel, by brute force."""
    ys, xs = np.nonzero(mask)
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    return np.sqrt((yy[..., None] - ys) ** 2 + (xx[..., None] - xs) ** 2).min(-1)


def test_margin_ring_is_the_band_just_outside_the_mask():
    rng = np.random.default_rng(0)
    image = rng.integers(1, 256, (30, 40, 3), dtype=np.uint8)
    mask = np.zeros((30, 40), dtype=bool)
    mask[8:16, 10:22] = True
    mask[25, 33] = True
    ring = margin_ring(image, mask, 3)
    band = (_distance_to_mask(mask) > 0) & (_distance_to_mask(mask) <= 3)
    assert ring.shape == (30, 40, 4) and ring.dtype == np.uint8
    assert np.array_equal(ring[..., 3] == 255, band) and set(np.unique(ring[..., 3])) == {0, 255}
    assert np.array_equal(ring[band][:, :3], image[band])
    assert not ring[~band].any() and not ring[mask].any()
    # Euclidean, not taxicab or chessboard: (2, 2) away from the corner is in, (3, 1) is out.
    assert ring[17, 23, 3] == 255 and ring[18, 22, 3] == 0
    assert not margin_ring(image, mask, 0).any()
    assert not margin_ring(image, np.zeros_like(mask), 3).any()


def test_write_task_writes_masks_and_rings_and_index_rows(tmp_path):
    room = render_room(3, 160, 120)
    sources = ["living/room.jpg", "empty.png", "full.png", "broken.jpg"]
    masks = [room.mask, np.zeros_like(room.mask), np.ones_like(room.mask), np.zeros((0, 0), dtype=bool)]
    batch = {
        "source": _object_array(sources),
        "image": _object_array([room.furnished] * 3 + [np.zeros((0, 0, 3), np.uint8)]),
        "error": _object_array(["", "", "", "not an image"]),
        "width": np.array([160, 160, 160, 0]),
        "height": np.array([120, 120, 120, 0]),
        "mask": _object_array(masks),
        "mask_fraction": np.array([float(m.mean()) if m.size else 0.0 for m in masks]),
        "classes": _object_array(["bed,sofa", "", "curtain", ""]),
        "seconds_mask": np.array([0.5, 0.5, 0.5, 0.0]),
    }
    output = str(tmp_path / "library")
    table = write_masks_and_rings(batch, output_uri=output, ring=4, config_hash="abc")
    assert table.schema == LIBRARY_SCHEMA
    rows = {row["source"]: row for row in table.to_pylist()}
    assert rows["living/room.jpg"]["ring"] == "rings/living/room.jpg.png"
    ring = np.asarray(Image.open(tmp_path / "library" / "rings/living/room.jpg.png"))
    assert np.array_equal(ring, margin_ring(room.furnished, room.mask, 4))
    # No ring pixels around an empty mask or one covering the photo: no ring file.
    assert rows["empty.png"]["ring"] == rows["full.png"]["ring"] == ""
    assert [rows[source]["status"] for source in sources] == ["ok", "ok", "ok", "failed"]
    broken = rows["broken.jpg"]
    assert (broken["error"], broken["mask"], broken["ring"], broken["classes"]) == ("not an image", "", "", [])
    assert storage.list_files(output) == [
        "masks/empty.png.png",
        "masks/full.png.png",
        "masks/living/room.jpg.png",
        "rings/living/room.jpg.png",
    ]

    writer = ManifestWriter(output, "run", LIBRARY_SCHEMA)
    writer.add(table.to_pylist())
    writer.finish()
    assert [row["classes"] for row in read_manifest(output)] == [["bed", "sofa"], [], ["curtain"], []]

    without_rings = write_masks_and_rings(batch, output_uri=str(tmp_path / "no-rings"), ring=0, config_hash="abc")
    assert set(without_rings.column("ring").to_pylist()) == {""}
    assert not (tmp_path / "no-rings" / "rings").exists()


def read_mask(output: str, row: dict) -> np.ndarray:
    with Image.open(io.BytesIO(storage.read_bytes(storage.join(output, row["mask"])))) as image:
        assert image.mode == "L" and image.size == (row["width"], row["height"])
        gray = np.asarray(image)
    assert set(np.unique(gray)) <= {0, 255}
    return gray == 255


def check_library(output: str, photos: dict[str, np.ndarray], ring_width: int) -> list[dict]:
    """Each photo has one ok/skipped index row whose mask and ring files match the photo."""
    rows = read_manifest(output)
    by_source = {row["source"]: row for row in rows}
    assert len(by_source) == len(rows), "one index row per input file"
    for source, photo in photos.items():
        row = by_source[source]
        assert row["status"] in ("ok", "skipped"), row
        assert (row["height"], row["width"]) == photo.shape[:2]
        assert isinstance(row["classes"], list) and row["classes"] == sorted(row["classes"])
        mask = read_mask(output, row)
        assert mask.mean() == pytest.approx(row["mask_fraction"])
        expected = margin_ring(photo, mask, ring_width)
        if not expected[..., 3].any():
            assert row["ring"] == "", row
            continue
        with Image.open(io.BytesIO(storage.read_bytes(storage.join(output, row["ring"])))) as image:
            assert image.mode == "RGBA" and image.size == (row["width"], row["height"])
            ring = np.asarray(image)
        assert not ring[mask].any(), "the ring never covers the mask"
        assert np.array_equal(ring, expected)
    assert len({row["config_hash"] for row in rows}) == 1
    config = yaml.safe_load(storage.read_bytes(storage.join(output, "config.yaml")))
    assert config["ring"] == ring_width
    return rows


def run_masks_job(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "jobs/masks.py", "--config", "configs/masks_demo.yaml", *arguments]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_masks_job_end_to_end_then_rerun_skips_done_photos(ray_local, load_job, tmp_path, capsys, monkeypatch):
    photos_dir, output = tmp_path / "furnished", tmp_path / "library"
    shutil.copytree(DEMO_ROOMS, photos_dir)
    photos = {
        path.relative_to(photos_dir).as_posix(): decode_image(path.read_bytes(), max_pixels=10**8, min_side=8)
        for path in photos_dir.rglob("*.*")
    }
    jpeg = (photos_dir / "living" / "living_room_01.jpg").read_bytes()
    (photos_dir / "broken").mkdir()
    (photos_dir / "broken" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (photos_dir / "broken" / "notes.txt").write_text("not a photo")
    # The random tiny segmenter (in place of the demo's toy one, which finds furniture everywhere)
    # labels each demo room with one class, which movable+builtin removes for some rooms and keeps
    # for others: index rows with and without classes.
    arguments = ("--input", str(photos_dir), "--output", str(output), "--set", "masking.preset=movable+builtin")
    arguments += ("--set", "masking.model=tiny", "--set", "masking.dilation=0.015")

    result = run_masks_job(*arguments)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"done: ok={len(photos)} failed=2 skipped=0" in result.stdout
    rows = check_library(str(output), photos, DEMO_RING)
    by_source = {row["source"]: row for row in rows}
    assert sorted(by_source) == sorted([*photos, "broken/truncated.jpg", "broken/notes.txt"])
    for source, reason in {"broken/truncated.jpg": "truncated", "broken/notes.txt": "unsupported file type"}.items():
        row = by_source[source]
        assert row["status"] == "failed" and reason in row["error"] and "\n" not in row["error"], row
        assert (row["mask"], row["ring"], row["classes"]) == ("", "", [])
    removable = set(removal_classes("movable+builtin", [], []))
    classes = [by_source[source]["classes"] for source in photos]
    assert any(classes) and not all(classes) and set().union(*classes) <= removable

    masks_before = {p: (output / "masks" / p).stat().st_mtime_ns for p in storage.list_files(str(output / "masks"))}
    # The rerun in this process, on the session's Ray instance: the command line is the same.
    monkeypatch.chdir(ROOT)
    assert load_job("masks").main(["--config", "configs/masks_demo.yaml", *arguments]) == 0
    assert f"done: ok=0 failed=2 skipped={len(photos)}" in capsys.readouterr().out
    rows = check_library(str(output), photos, DEMO_RING)
    assert {row["source"]: row["status"] for row in rows if row["source"] in photos} == dict.fromkeys(photos, "skipped")
    assert {p: (output / "masks" / p).stat().st_mtime_ns for p in masks_before} == masks_before
    assert len(list((output / "_manifest").glob("*.parquet"))) == 1

    # --overwrite, or a changed hashed setting, plans every photo again (decided on the driver).
    def planned(*overrides: str) -> int:
        values = {"input": str(photos_dir), "output": str(output)}
        overrides = ["masking.preset=movable+builtin", "masking.model=tiny", "masking.dilation=0.015", *overrides]
        config = load_config("configs/masks_demo.yaml", overrides, cls=MaskLibraryConfig, values=values)
        return len(prepare(config).todo)

    assert planned() == 1  # the truncated photo is retried
    assert planned("overwrite=true") == planned("ring=4") == len(photos) + 1


def test_user_masks_on_s3_give_rings(ray_local, s3_bucket):
    photos_uri, masks_uri, output = (f"s3://{s3_bucket}/{name}" for name in ("furnished", "masks", "library/"))
    rooms = {f"flat-{seed}/room.png": render_room(seed, 160, 120) for seed in range(3)}
    for source, room in rooms.items():
        storage.write_bytes(storage.join(photos_uri, source), _png(room.furnished))
        storage.write_bytes(storage.join(masks_uri, f"{source}.png"), encode_mask(room.mask))
    values = {"input": photos_uri, "output": output, "masking.masks": masks_uri}
    summary = execute(prepare(load_config("configs/masks_demo.yaml", values=values, cls=MaskLibraryConfig)))
    assert summary.counts == {"ok": len(rooms)}
    rows = check_library(output, {source: room.furnished for source, room in rooms.items()}, DEMO_RING)
    assert all(row["ring"] and row["classes"] == [] for row in rows)
    assert all(np.array_equal(read_mask(output, row), rooms[row["source"]].mask) for row in rows)


def test_bad_job_fails_before_ray_work(tmp_path):
    def plan(**values):
        base = {"input": str(tmp_path / "in"), "output": str(tmp_path / "out")}
        return prepare(load_config("configs/masks_demo.yaml", values={**base, **values}, cls=MaskLibraryConfig))

    with pytest.raises(JobError, match=r"input: .*in"):
        plan()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(_png(np.zeros((80, 80, 3), np.uint8)))
    with pytest.raises(JobError, match=r"masking\.model: no such folder"):
        plan(**{"masking.model": "/no/such/model"})
    (tmp_path / "file").write_text("")
    with pytest.raises(JobError, match=r"output: "):
        plan(output=str(tmp_path / "file" / "out"))

    result = run_masks_job("--input", str(tmp_path / "missing"), "--set", "ray.address=127.0.0.1:1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: input: cannot list")
    assert "Ray" not in result.stderr
