"""The de-furnishing job end to end on the real local Ray instance with the tiny preset."""

import io
import os
import struct
import zlib
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from casalimpia import storage
from casalimpia.config import load_config
from casalimpia.images import decode_image
from casalimpia.pipeline import JobError, execute, prepare, read_manifest
from casalimpia.synthetic import render_room, write_demo_rooms, write_room_pairs

TINY = [
    "masking.model=tiny",
    "masking.resolution=64",
    "masking.batch_size=2",
    "inpaint.model=tiny",
    "inpaint.lora=null",
    "qa.max_residual=null",
    "inpaint.resolution=64",
    "inpaint.steps=2",
    "inpaint.batch_size=2",
    "ray.masking_cpus=0.25",
    "ray.inpainting_cpus=0.25",
    "ray.io_cpus=0.25",
    "ray.inpainting_actors=2",
]
BAD_FILES = {
    "broken/empty.jpg": "empty file",
    "broken/truncated.png": "truncated",
    "broken/text.jpg": "not an image",
    "broken/notes.txt": "unsupported file type",
    "broken/tiny.png": "too small",
}


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb_png(side: int) -> bytes:
    """A real decompression bomb: a side x side grayscale PNG of zeros, a few hundred KB on disk."""
    row = b"\x00" * (side + 1)  # filter byte + pixels
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def make_catalogue(uri: str, staging: Path) -> dict[str, tuple[int, int]]:
    """Good photos in nested folders plus one file of each bad kind; returns good (width, height)."""
    good: dict[str, tuple[int, int]] = {}
    for path in write_demo_rooms(staging, count=8, seed=1):
        relative = path.relative_to(staging).as_posix()
        data = path.read_bytes()
        storage.write_bytes(storage.join(uri, relative), data)
        image = decode_image(data, max_pixels=10**8, min_side=8)
        good[relative] = (image.shape[1], image.shape[0])
    truncated = _png(render_room(9, 160, 120).furnished)
    bad = {
        "broken/empty.jpg": b"",
        "broken/truncated.png": truncated[: len(truncated) // 2],
        "broken/text.jpg": b"<html>not a photo</html>",
        "broken/notes.txt": b"hello",
        "broken/tiny.png": _png(np.zeros((20, 30, 3), np.uint8)),
    }
    for relative, data in bad.items():
        storage.write_bytes(storage.join(uri, relative), data)
    return good


def run_job(input_uri: str, output_uri: str, *extra: str):
    config = load_config("configs/demo.yaml", [*TINY, *extra], values={"input": input_uri, "output": output_uri})
    plan = prepare(config)
    return plan, execute(plan)


def check_run(
    input_uri: str, output_uri: str, good: dict[str, tuple[int, int]], bad: dict[str, str] = BAD_FILES
) -> list[dict]:
    rows = read_manifest(output_uri)
    sources = [row["source"] for row in rows]
    assert sorted(sources) == sorted([*good, *bad]), "every input has exactly one manifest row"
    by_source = {row["source"]: row for row in rows}
    for relative, (width, height) in good.items():
        row = by_source[relative]
        assert row["status"] in ("ok", "skipped"), row
        assert (row["width"], row["height"]) == (width, height)
        output = decode_image(storage.read_bytes(storage.join(output_uri, row["output"])), max_pixels=10**8, min_side=8)
        assert output.shape[:2] == (height, width)
        assert storage.exists(storage.join(output_uri, row["mask"]))
    for relative, reason in bad.items():
        row = by_source[relative]
        assert row["status"] == "failed" and reason in row["error"], row
        assert "\n" not in row["error"]
    assert len({row["config_hash"] for row in rows}) == 1
    for name in ("config.yaml", "report.html"):
        assert storage.exists(storage.join(output_uri, name))
    return rows


def test_local_folder_then_rerun_skips_done_photos(ray_local, tmp_path):
    input_uri, output_uri = str(tmp_path / "in"), str(tmp_path / "out")
    good = make_catalogue(input_uri, tmp_path / "staging")
    plan, summary = run_job(input_uri, output_uri)
    assert len(plan.todo) == len(good) + len(BAD_FILES) - 1  # notes.txt is refused by suffix
    rows = check_run(input_uri, output_uri, good)
    assert summary.counts == {"ok": len(good), "failed": len(BAD_FILES)}
    assert all(row["status"] == "ok" for row in rows if row["source"] in good)
    report = (tmp_path / "out" / "report.html").read_text()
    assert "tiny" in report and "data:image/jpeg;base64," in report and "broken/empty.jpg" in report

    outputs_before = {
        p: (tmp_path / "out" / "images" / p).stat().st_mtime_ns
        for p in storage.list_files(str(tmp_path / "out" / "images"))
    }
    plan, summary = run_job(input_uri, output_uri)
    assert summary.counts == {"skipped": len(good), "failed": len(BAD_FILES)}
    rows = check_run(input_uri, output_uri, good)
    assert all(row["status"] == "skipped" for row in rows if row["source"] in good)
    assert {p: (tmp_path / "out" / "images" / p).stat().st_mtime_ns for p in outputs_before} == outputs_before
    assert len(list((tmp_path / "out" / "_manifest").glob("*.parquet"))) == 1

    # A changed config hash, or overwrite, plans every photo again (decided on the driver).
    def planned(*extra):
        config = load_config("configs/demo.yaml", [*TINY, *extra], values={"input": input_uri, "output": output_uri})
        return len(prepare(config).todo)

    assert planned() == len(BAD_FILES) - 1
    assert planned("inpaint.seed=7") == planned("overwrite=true") == len(good) + len(BAD_FILES) - 1


def test_s3_catalogue_with_hostile_keys_writes_nothing_outside_the_output(ray_local, s3_bucket, tmp_path, capfd):
    input_uri, output_uri = f"s3://{s3_bucket}/raw", f"s3://{s3_bucket}/empty/"
    good = make_catalogue(input_uri, tmp_path)
    # Keys that name their way out of the prefix, and odd but harmless names that stay photos.
    photo = _png(render_room(4, 96, 72).furnished)
    hostile = {
        "../escape.png": "unsafe path",
        "a/../../../escape.png": "unsafe path",
        "/absolute.png": "unsafe path",
        "./dot.png": "unsafe path",
        "ctl\x01.png": "unsafe path",
        "bomb.png": "image too large",
    }
    odd = ["sp ace/ü né.png", "\u202eevil.png", "%2e%2e/encoded.png", "back\\..\\slash.png", " .png"]
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for key in [*hostile, *odd]:
        client.put_object(Bucket=s3_bucket, Key=f"raw/{key}", Body=_bomb_png(12_000) if key == "bomb.png" else photo)
    good |= {key: (96, 72) for key in odd}
    bad = BAD_FILES | hostile

    _, summary = run_job(input_uri, output_uri)
    assert summary.counts == {"ok": len(good), "failed": len(bad)}
    check_run(input_uri, output_uri, good, bad)
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert all(key.startswith(("raw/", "empty/")) for key in keys), "nothing lands outside the output"
    written = [key for key in keys if key.startswith("empty/") and not key.endswith("/")]  # not the prefix marker
    assert not any("/../" in key or "//" in key or "/./" in key for key in written)
    # The credentials the job ran with appear nowhere in what it wrote or printed.
    secrets = [os.environ["AWS_SECRET_ACCESS_KEY"].encode(), os.environ["AWS_ACCESS_KEY_ID"].encode()]
    printed = capfd.readouterr()
    texts = [storage.read_bytes(f"s3://{s3_bucket}/{key}") for key in written] + [
        printed.out.encode(),
        printed.err.encode(),
    ]
    assert not any(secret in text for secret in secrets for text in texts)
    manifest = storage.list_files(storage.join(output_uri, "_manifest"))
    table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(output_uri, "_manifest", manifest[0]))))
    assert table.column_names == [
        "source",
        "output",
        "mask",
        "status",
        "error",
        "width",
        "height",
        "mask_fraction",
        "seconds_mask",
        "seconds_inpaint",
        "residual",
        "outside_changed",
        "config_hash",
    ]
    _, summary = run_job(input_uri, output_uri)
    assert summary.counts == {"skipped": len(good), "failed": len(bad)}


def test_quality_gate_flags_photos_with_furniture_left(ray_local, tmp_path):
    """A barely repainted hole (strength 0.05) keeps its furniture; the gate re-segments it and flags it.

    The outputs are PNG like their inputs, which keeps the unmasked pixels exact.

    The tiny segmenter's fixed random weights label all of synthetic room 1 as furniture and none
    of room 0, so with the rooms' exact masks room 1's output still has furniture in its hole.
    """
    write_room_pairs(tmp_path / "rooms", count=2, seed=0)
    gate = [f"masking.masks={tmp_path / 'rooms' / 'masks'}", "qa.max_residual=0.5"]
    barely = ["inpaint.strength=0.05", "inpaint.steps=20", "ray.inpainting_actors=1"]
    input_uri, output_uri = str(tmp_path / "rooms" / "furnished"), str(tmp_path / "out")
    _, summary = run_job(input_uri, output_uri, *gate, *barely)
    assert summary.counts == {"ok": 1, "review": 1} and "ok=1 review=1" in summary.line()
    rows = {row["source"]: row for row in read_manifest(output_uri)}
    clean, flagged = rows["room_000.png"], rows["room_001.png"]
    assert clean["status"] == "ok" and clean["residual"] == 0.0 and clean["error"] == ""
    assert flagged["status"] == "review" and flagged["residual"] > 0.5
    assert "residual furniture" in flagged["error"] and "qa.max_residual 0.5" in flagged["error"]
    for row in (clean, flagged):
        # Written (flagged or not), and PNG keeps every pixel outside the mask exactly.
        output = np.asarray(Image.open(tmp_path / "out" / row["output"]))
        mask = np.asarray(Image.open(tmp_path / "out" / row["mask"])) > 0
        photo = np.asarray(Image.open(tmp_path / "rooms" / "furnished" / row["source"]))
        assert mask.any() and np.array_equal(output[~mask], photo[~mask])
    assert "For review (1" in (tmp_path / "out" / "report.html").read_text()

    # A rerun redoes nothing and keeps the flag: the output has not changed since it was flagged.
    _, summary = run_job(input_uri, output_uri, *gate, *barely)
    assert summary.counts == {"skipped": 1, "review": 1}
    assert {row["source"]: row["status"] for row in read_manifest(output_uri)} == {
        "room_000.png": "skipped",
        "room_001.png": "review",
    }


def test_bad_job_fails_before_ray_work(tmp_path):
    config = load_config("configs/demo.yaml", TINY, values={"input": str(tmp_path / "missing"), "output": "o"})
    with pytest.raises(JobError, match=r"input: .*missing"):
        prepare(config)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(_png(np.zeros((80, 80, 3), np.uint8)))
    config = load_config(
        "configs/demo.yaml",
        [*TINY, "inpaint.model=/no/such/model"],
        values={"input": str(tmp_path / "in"), "output": str(tmp_path / "out")},
    )
    with pytest.raises(JobError, match=r"inpaint\.model: no such folder"):
        prepare(config)
