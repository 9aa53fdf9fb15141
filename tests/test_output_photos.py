"""The files written for painted photos, on real files of every format: block-exact JPEGs, metadata
carried, byte copies, and ``outside_changed`` as measured."""

from __future__ import annotations

import functools
import io
import re

import numpy as np
import pytest
from PIL import Image, ImageCms, JpegImagePlugin, PngImagePlugin

from casalimpia.images import decode_image, encode_image, inspect_photo, to_stored_orientation
from casalimpia.jpeg_blocks import is_progressive, replace_masked_blocks
from casalimpia.output_photos import BLOCKS, COPIED, ENCODED, encode_output
from casalimpia.synthetic import render_room

# Sides that are not multiples of 16: the right and bottom MCUs are partly outside the photo.
WIDTH, HEIGHT = 250, 183
MAKE, MODEL, DATE = "Casa Phones", "Pocket 12", "2026:05:04 10:11:12"
XMP = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" xmlns:dc="http://purl.org/dc/elements/1.1/"'
    ' tiff:Orientation="{orientation}" dc:rights="(c) Agency"/></rdf:RDF></x:xmpmeta>'
)


@functools.cache
def icc_profile() -> bytes:
    """A real ICC profile that no encoder adds by itself (LAB), made once: its header holds the time."""
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB"))
    return profile.tobytes()


def camera_exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0112] = MAKE, MODEL, orientation
    exif.get_ifd(0x8769)[0x9003] = DATE  # DateTimeOriginal, in the Exif sub-IFD
    return exif.tobytes()


def phone_photo(fmt: str = "JPEG", orientation: int = 6, **options) -> bytes:
    """A synthetic room stored as a phone would store it: sideways with an EXIF orientation, an ICC
    profile, camera tags and XMP."""
    upright = render_room(7, WIDTH, HEIGHT).furnished
    # The file stores the photo so that applying the orientation shows it upright.
    stored = to_stored_orientation(upright, orientation)
    xmp = XMP.format(orientation=orientation)
    if fmt == "PNG":  # PNG keeps XMP in an iTXt chunk
        options["pnginfo"] = PngImagePlugin.PngInfo()
        options["pnginfo"].add_itxt("XML:com.adobe.xmp", xmp)
    else:
        options["xmp"] = xmp.encode()
    buffer = io.BytesIO()
    metadata = {"icc_profile": icc_profile(), "exif": camera_exif(orientation), "dpi": (300, 300)}
    Image.fromarray(stored).save(buffer, fmt, **metadata, **options)
    return buffer.getvalue()


def paint(data: bytes, mask: np.ndarray) -> np.ndarray:
    """The photo decoded upright with its masked pixels painted a flat colour."""
    painted = decode_image(data, max_pixels=10**8, min_side=8).copy()
    painted[mask] = (180, 40, 200)
    return painted


def sofa_mask(shape: tuple[int, ...]) -> np.ndarray:
    mask = np.zeros(shape[:2], dtype=bool)
    mask[60:110, 30:95] = True
    return mask


def stored_pixels(data: bytes) -> np.ndarray:
    """Pixels as the file stores them, orientation not applied."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def near_touched_mcus(stored_mask: np.ndarray, mcu: tuple[int, int]) -> np.ndarray:
    """Pixels in an MCU the mask touches or in the ring of MCUs around them."""
    height, width = stored_mask.shape
    rows, columns = -(-height // mcu[0]), -(-width // mcu[1])
    padded = np.zeros((rows * mcu[0], columns * mcu[1]), dtype=bool)
    padded[:height, :width] = stored_mask
    touched = padded.reshape(rows, mcu[0], columns, mcu[1]).any(axis=(1, 3))
    grown = touched.copy()
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            grown |= np.roll(np.roll(np.pad(touched, 1), dr, axis=0), dc, axis=1)[1:-1, 1:-1]
    return np.repeat(np.repeat(grown, mcu[0], axis=0), mcu[1], axis=1)[:height, :width]


JPEG_KINDS = {
    "baseline 4:2:0": ({"subsampling": 2, "quality": 88}, (16, 16)),
    "baseline 4:2:2": ({"subsampling": 1, "quality": 92}, (8, 16)),
    "progressive 4:4:4": ({"subsampling": 0, "quality": 90, "progressive": True}, (8, 8)),
}


@pytest.mark.parametrize("kind", list(JPEG_KINDS))
@pytest.mark.parametrize("orientation", [1, 6])
def test_jpeg_keeps_every_block_the_mask_does_not_touch(kind: str, orientation: int) -> None:
    options, mcu = JPEG_KINDS[kind]
    original = phone_photo("JPEG", orientation, **options)
    mask = sofa_mask(decode_image(original, max_pixels=10**8, min_side=8).shape)
    painted = paint(original, mask)

    result = encode_output(original, painted, mask, "jpeg", quality=95)

    assert result.method == BLOCKS
    # Away from the touched MCUs the decoded pixels are the input's, bit for bit (stored orientation:
    # the file keeps its orientation tag and stores the photo as the camera did).
    far = ~near_touched_mcus(to_stored_orientation(mask, orientation), mcu)
    before, after = stored_pixels(original), stored_pixels(result.data)
    assert far.mean() > 0.5
    np.testing.assert_array_equal(after[far], before[far])
    # Inside the mask it shows the painting, the right way up.
    decoded = decode_image(result.data, max_pixels=10**8, min_side=8)
    assert np.abs(decoded[mask].astype(int) - painted[mask]).mean() < 6
    # Changed pixels outside the mask exist only next to it, in the re-encoded blocks, and are counted.
    changed = (decoded != painted).any(axis=2) & ~mask
    assert 0 < result.outside_changed == pytest.approx(changed[~mask].mean())
    assert result.outside_changed < 0.1
    with Image.open(io.BytesIO(original)) as source, Image.open(io.BytesIO(result.data)) as written:
        assert written.quantization == source.quantization
        assert JpegImagePlugin.get_sampling(written) == JpegImagePlugin.get_sampling(source)
        assert is_progressive(result.data) == is_progressive(original) == bool(options.get("progressive"))
        assert written.info["icc_profile"] == icc_profile()
        assert written.info["xmp"] == source.info["xmp"]
        assert written.info["dpi"] == source.info["dpi"] == (300, 300)
        exif = written.getexif()
        assert (exif[0x010F], exif[0x0110], exif[0x0112]) == (MAKE, MODEL, orientation)
        assert exif.get_ifd(0x8769)[0x9003] == DATE


def test_grayscale_jpeg_keeps_its_blocks() -> None:
    gray = Image.fromarray(render_room(3, WIDTH, HEIGHT).furnished).convert("L")
    buffer = io.BytesIO()
    gray.save(buffer, "JPEG", quality=85)
    original = buffer.getvalue()
    mask = sofa_mask((HEIGHT, WIDTH))
    result = encode_output(original, paint(original, mask), mask, "jpeg", quality=95)
    assert result.method == BLOCKS
    far = ~near_touched_mcus(mask, (8, 8))
    np.testing.assert_array_equal(stored_pixels(result.data)[far], stored_pixels(original)[far])
    with Image.open(io.BytesIO(result.data)) as written:
        assert written.mode == "L"


def test_cmyk_jpeg_is_encoded_whole_and_measured() -> None:
    buffer = io.BytesIO()
    Image.fromarray(render_room(3, WIDTH, HEIGHT).furnished).convert("CMYK").save(buffer, "JPEG", quality=90)
    original = buffer.getvalue()
    mask = sofa_mask((HEIGHT, WIDTH))
    result = encode_output(original, paint(original, mask), mask, "jpeg", quality=95)
    assert result.method == ENCODED
    assert 0 < result.outside_changed <= 1


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp", "heif", "avif"])
def test_nothing_to_remove_is_a_byte_copy(fmt: str) -> None:
    original = phone_photo(fmt.upper(), quality=80) if fmt != "png" else phone_photo("PNG")
    nothing = np.zeros((HEIGHT, WIDTH), dtype=bool)
    result = encode_output(original, paint(original, nothing), nothing, fmt, quality=95)
    assert (result.data, result.method, result.outside_changed) == (original, COPIED, 0.0)


def test_nothing_to_remove_in_another_format_is_encoded() -> None:
    original = phone_photo("JPEG")
    nothing = np.zeros((HEIGHT, WIDTH), dtype=bool)
    result = encode_output(original, paint(original, nothing), nothing, "png", quality=95)
    assert result.method == ENCODED and result.data.startswith(b"\x89PNG") and result.outside_changed == 0.0


@pytest.mark.parametrize(
    ("source", "options", "exact"),
    [
        ("PNG", {}, True),
        ("WEBP", {"lossless": True}, True),
        ("WEBP", {"quality": 80}, False),
        ("HEIF", {"quality": 85}, False),
        ("AVIF", {"quality": 85}, False),
    ],
)
def test_other_formats_are_encoded_whole_with_their_metadata(source: str, options: dict, exact: bool) -> None:
    original = phone_photo(source, 6, **options)
    painted_shape = decode_image(original, max_pixels=10**8, min_side=8).shape
    assert painted_shape[:2] == (HEIGHT, WIDTH), "decoded upright"
    mask = sofa_mask(painted_shape)
    painted = paint(original, mask)
    fmt = inspect_photo(original).format

    result = encode_output(original, painted, mask, fmt, quality=95)

    assert result.method == ENCODED
    decoded = decode_image(result.data, max_pixels=10**8, min_side=8)
    if exact:
        assert result.outside_changed == 0.0
        np.testing.assert_array_equal(decoded, painted)
    else:
        assert 0 < result.outside_changed <= 1
        assert np.abs(decoded.astype(int) - painted).mean() < 4
    with Image.open(io.BytesIO(result.data)) as written:
        assert written.format == source
        assert written.info["icc_profile"] == icc_profile()
        exif = written.getexif()
        # The pixels are written upright, so the orientation says so.
        assert (exif[0x010F], exif[0x0110], exif.get(0x0112, 1)) == (MAKE, MODEL, 1)
        xmp = written.info.get("xmp") or written.info.get("XML:com.adobe.xmp")
        xmp = xmp.encode() if isinstance(xmp, str) else xmp
        # XMP's copy of the orientation says upright too, or is gone (pillow-heif drops it as it rotates).
        assert b"(c) Agency" in xmp and not re.search(rb'tiff:Orientation="[2-8]"', xmp)


@pytest.mark.parametrize("source", ["WEBP", "HEIF", "AVIF"])
def test_a_lossy_input_is_written_at_the_quality_that_matches_its_size(source: str) -> None:
    original = phone_photo(source, 1, quality=55)
    mask = sofa_mask((HEIGHT, WIDTH))
    painted = paint(original, mask)
    fmt = inspect_photo(original).format
    result = encode_output(original, painted, mask, fmt, quality=95)
    at_95 = encode_image(painted, fmt, quality=95, metadata=inspect_photo(original).metadata)
    # As fine as the input (no smaller), not inflated to write.quality.
    assert len(original) <= len(result.data) < len(at_95)


def test_jpeg_written_as_png_keeps_metadata_and_is_exact() -> None:
    original = phone_photo("JPEG", 6, quality=90)
    mask = sofa_mask((HEIGHT, WIDTH))
    painted = paint(original, mask)
    result = encode_output(original, painted, mask, "png", quality=95)
    assert result.method == ENCODED and result.outside_changed == 0.0
    with Image.open(io.BytesIO(result.data)) as written:
        assert written.info["icc_profile"] == icc_profile() and written.getexif()[0x0110] == MODEL
        assert written.info["dpi"] == pytest.approx((300, 300), abs=0.01)  # PNG stores dots per metre


def test_replace_masked_blocks_refuses_a_photo_of_another_size() -> None:
    from casalimpia.jpeg_blocks import NotBlockEditable

    original = phone_photo("JPEG", 1)
    with pytest.raises(NotBlockEditable, match="file is 250x183"):
        replace_masked_blocks(original, np.zeros((10, 10, 3), np.uint8), np.ones((10, 10), bool))


def test_job_writes_phone_photos_back_as_they_came_but_for_the_furniture(ray_local, s3_bucket) -> None:
    """The bulk job over S3 on a phone's uploads: hidden and underscored folders, HEIC, AVIF, a JPEG
    with nothing to remove, and a file that is not a photo; user masks say what to remove."""
    from casalimpia import storage
    from casalimpia.config import load_config
    from casalimpia.images import encode_mask
    from casalimpia.pipeline import execute, prepare, read_manifest

    input_uri, masks_uri, output_uri = (f"s3://{s3_bucket}/{name}" for name in ("uploads", "masks", "out"))
    sofa, nothing = sofa_mask((HEIGHT, WIDTH)), np.zeros((HEIGHT, WIDTH), dtype=bool)
    photos = {
        "listing/IMG_0001.jpg": (phone_photo("JPEG", 6, subsampling=2, quality=88), sofa),
        "listing/progressive.jpg": (phone_photo("JPEG", 1, subsampling=0, quality=90, progressive=True), sofa),
        "_drafts/room.jpg": (phone_photo("JPEG", 8, subsampling=1, quality=92), sofa),
        ".archive/room.png": (phone_photo("PNG", 3), sofa),
        "listing/IMG_0002.HEIC": (phone_photo("HEIF", 6, quality=85), sofa),
        "listing/room.avif": (phone_photo("AVIF", 1, quality=85), sofa),
        "listing/empty.jpg": (phone_photo("JPEG", 6, quality=88), nothing),
    }
    for source, (data, mask) in photos.items():
        storage.write_bytes(storage.join(input_uri, source), data)
        storage.write_bytes(storage.join(masks_uri, source + ".png"), encode_mask(mask))
    storage.write_bytes(storage.join(input_uri, "listing/_SUCCESS"), b"")
    overrides = [
        "masking.model=tiny",
        f"masking.masks={masks_uri}",
        "inpaint.model=tiny",
        "inpaint.lora=null",
        "inpaint.resolution=64",
        "inpaint.steps=2",
        "inpaint.batch_size=4",
        "ray.inpainting_actors=1",
        "ray.masking_cpus=0.25",
        "ray.inpainting_cpus=0.25",
        "ray.io_cpus=0.25",
    ]
    config = load_config("configs/demo.yaml", overrides, values={"input": input_uri, "output": output_uri})
    summary = execute(prepare(config))

    assert summary.counts == {"ok": len(photos), "failed": 1}
    rows = {row["source"]: row for row in read_manifest(output_uri)}
    assert set(rows) == {*photos, "listing/_SUCCESS"}
    assert "unsupported file type" in rows["listing/_SUCCESS"]["error"]
    written = {source: storage.read_bytes(storage.join(output_uri, rows[source]["output"])) for source in photos}
    assert rows["listing/IMG_0002.HEIC"]["output"] == "images/listing/IMG_0002.HEIC"
    assert written["listing/empty.jpg"] == photos["listing/empty.jpg"][0]
    assert rows["listing/empty.jpg"]["outside_changed"] == 0.0
    for source, (original, mask) in photos.items():
        with Image.open(io.BytesIO(original)) as before, Image.open(io.BytesIO(written[source])) as after:
            assert after.format == before.format, source
            assert after.info["icc_profile"] == icc_profile(), source
            assert (after.getexif()[0x010F], after.getexif()[0x0110]) == (MAKE, MODEL), source
        outside_changed = rows[source]["outside_changed"]
        if source.endswith(".jpg") and mask.any():
            # Block-exact: the stored pixels away from the touched MCUs (16 px covers every sampling) are the input's.
            orientation = inspect_photo(original).orientation
            far = ~near_touched_mcus(to_stored_orientation(mask, orientation), (16, 16))
            np.testing.assert_array_equal(stored_pixels(written[source])[far], stored_pixels(original)[far])
            assert 0 < outside_changed < 0.1, source
        elif source.endswith(".png"):
            assert outside_changed == 0.0
        else:
            assert 0 <= outside_changed <= 1, source
