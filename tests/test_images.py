"""Tests for casalimpia.images: every input is built in code, no binary fixtures."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from casalimpia.images import (
    IMAGE_SUFFIXES,
    ImageDecodeError,
    _rgb_and_alpha,
    decode_image,
    decode_mask,
    encode_image,
    encode_mask,
    output_format,
    with_suffix,
)

MAX_PIXELS = 100_000_000
MIN_SIDE = 64
RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def _save(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _decode(data: bytes) -> np.ndarray:
    return decode_image(data, max_pixels=MAX_PIXELS, min_side=MIN_SIDE)


def _decode_error(data: bytes, **limits: int) -> str:
    kwargs = {"max_pixels": MAX_PIXELS, "min_side": MIN_SIDE, **limits}
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, **kwargs)
    return _one_line(info.value)


def _one_line(error: Exception) -> str:
    message = str(error)
    assert message
    assert "\n" not in message
    assert len(message) <= 200
    return message


def _noise(height: int = 64, width: int = 96, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)


def _halves(height: int = 64, width: int = 96) -> np.ndarray:
    """Left half red, right half blue: orientation mistakes are visible."""
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[:, : width // 2] = RED
    rgb[:, width // 2 :] = BLUE
    return rgb


def _split(mode: str, left: object, right: object, size: int = 64) -> Image.Image:
    image = Image.new(mode, (size, size), left)
    image.paste(right, (size // 2, 0, size, size))
    return image


def _png_claiming_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR claims another size: a decompression bomb's header."""
    data = bytearray(_save(Image.new("L", (1, 1)), "PNG"))
    # IHDR is the first chunk: 8-byte signature, length, type, then width and
    # height; its CRC covers type and the 13 data bytes.
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _assert_photo(rgb: np.ndarray, shape: tuple[int, int]) -> None:
    assert rgb.shape == (*shape, 3)
    assert rgb.dtype == np.uint8
    assert rgb.flags.c_contiguous
    assert rgb.flags.writeable


# --- decode_image: bad inputs --------------------------------------------------


def test_error_is_a_value_error_with_a_bounded_single_line() -> None:
    error = ImageDecodeError("first line\nsecond line\t" + "x" * 500)
    assert isinstance(error, ValueError)
    assert _one_line(error).startswith("first line second line x")
    assert str(error).endswith("...")


def test_empty_file() -> None:
    assert _decode_error(b"") == "empty file (0 bytes)"


@pytest.mark.parametrize(
    "data",
    [
        b"hello",
        b"<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n" * 20,
        b"\x00" * 4096,
        _save(Image.new("RGB", (64, 64)), "GIF"),  # an image, but not one we accept
    ],
    ids=["text", "html", "zeros", "gif"],
)
def test_not_an_image(data: bytes) -> None:
    message = _decode_error(data)
    assert message.startswith("not an image: ")
    assert f"{len(data)} bytes starting {data[:16]!r}" in message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_file(fmt: str) -> None:
    data = _save(Image.fromarray(_noise()), fmt)
    message = _decode_error(data[: len(data) // 2])
    assert message.startswith("truncated or corrupt image: ")


def test_corrupt_bytes_in_the_middle_of_a_png() -> None:
    data = bytearray(_save(Image.fromarray(_noise()), "PNG"))
    middle = len(data) // 2
    data[middle : middle + 32] = b"\xa5" * 32
    assert _decode_error(bytes(data)).startswith("truncated or corrupt image: ")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_corrupt_bytes_anywhere_never_escape_as_other_errors(fmt: str) -> None:
    clean = _save(Image.fromarray(_noise()), fmt)
    rng = np.random.default_rng(1)
    for offset in np.linspace(0, len(clean) - 8, 25, dtype=int):
        data = bytearray(clean)
        data[offset : offset + 8] = rng.integers(0, 256, 8, np.uint8).tobytes()
        try:
            rgb = _decode(bytes(data))
        except ImageDecodeError as error:
            _one_line(error)
        else:
            # JPEG and WebP decoders conceal some damage; the shape must hold.
            _assert_photo(rgb, (64, 96))


def test_bomb_over_the_limit_is_refused_from_the_header_alone() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's bomb warning must not escape
        message = _decode_error(_png_claiming_size(12_000, 12_000))
    assert message == "image too large: 12000x12000 (144.0 MP) exceeds the 100.0 MP limit"


def test_bomb_past_pillows_hard_limit() -> None:
    message = _decode_error(_png_claiming_size(30_000, 30_000))
    assert message.startswith("image too large: ")
    assert "900000000" in message


def test_large_header_within_the_limit_is_decoded_without_warnings() -> None:
    # Over Pillow's warning threshold but within ours: decoding proceeds (and
    # finds the pixel data missing) without emitting DecompressionBombWarning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        message = _decode_error(_png_claiming_size(10_000, 9_000), max_pixels=10**8)
    assert message.startswith("truncated or corrupt image: ")


def test_pixel_limit_is_inclusive() -> None:
    data = _save(Image.new("RGB", (80, 64)), "PNG")
    assert decode_image(data, max_pixels=80 * 64, min_side=1).shape == (64, 80, 3)
    message = _decode_error(data, max_pixels=80 * 64 - 1, min_side=1)
    assert message.startswith("image too large: 80x64 ")


def test_too_small() -> None:
    data = _save(Image.new("RGB", (20, 30)), "PNG")
    assert _decode_error(data) == "image too small: 20x30 (minimum side 64 px)"
    assert decode_image(data, max_pixels=MAX_PIXELS, min_side=20).shape == (30, 20, 3)


# --- decode_image: orientation, modes, frames ----------------------------------


def _with_orientation(rgb: np.ndarray, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(Image.fromarray(rgb), fmt, exif=exif.tobytes())


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_6_is_rotated_upright(fmt: str) -> None:
    # Orientation 6 means "rotate 90 degrees clockwise to display": the
    # stored left (red) half ends up on top, the right (blue) half below.
    rgb = _decode(_with_orientation(_halves(64, 96), fmt, 6))
    _assert_photo(rgb, (96, 64))
    top = rgb[:40].reshape(-1, 3).mean(axis=0)
    bottom = rgb[56:].reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(top, RED, atol=8)
    np.testing.assert_allclose(bottom, BLUE, atol=8)


@pytest.mark.parametrize(
    ("orientation", "upright"),
    [
        (1, lambda a: a),
        (2, np.fliplr),
        (3, lambda a: np.rot90(a, 2)),
        (4, np.flipud),
        (6, lambda a: np.rot90(a, -1)),
        (8, lambda a: np.rot90(a, 1)),
    ],
)
def test_exif_orientations_are_exact_on_png(orientation: int, upright) -> None:
    stored = _noise(64, 80)
    rgb = _decode(_with_orientation(stored, "PNG", orientation))
    np.testing.assert_array_equal(rgb, upright(stored))


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize(
    "exif",
    [
        b"Exif\x00\x00not a tiff header at all",
        # Big-endian TIFF claiming one orientation entry, cut off mid-entry.
        b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00",
    ],
)
def test_corrupt_exif_leaves_the_photo_as_stored(exif: bytes) -> None:
    stored = _halves()
    rgb = _decode(_save(Image.fromarray(stored), "PNG", exif=exif))
    np.testing.assert_array_equal(rgb, stored)


def _p_image(transparent: bool) -> Image.Image:
    image = _split("P", 0, 1)
    image.putpalette([*RED, *BLUE])
    if transparent:
        image.info["transparency"] = 0
    return image


@pytest.mark.parametrize(
    ("image", "fmt", "left", "right"),
    [
        (_split("RGB", RED, BLUE), "PNG", RED, BLUE),
        (_split("L", 0, 200), "PNG", (0, 0, 0), (200, 200, 200)),
        (_split("1", 0, 1), "PNG", (0, 0, 0), WHITE),
        (_split("LA", (100, 0), (100, 255)), "PNG", WHITE, (100, 100, 100)),
        (_p_image(transparent=False), "PNG", RED, BLUE),
        (_p_image(transparent=True), "PNG", WHITE, BLUE),
        (_split("RGBA", (*RED, 0), (*BLUE, 255)), "PNG", WHITE, BLUE),
        # Half-transparent black over white: 255 * (255 - 128) / 255 = 127.
        (_split("RGBA", (0, 0, 0, 128), (0, 255, 0, 255)), "PNG", (127,) * 3, (0, 255, 0)),
        (_split("RGBA", (*RED, 0), (*BLUE, 255)), "WEBP", WHITE, BLUE),
        (_split("I;16", 32768, 65535), "PNG", (128,) * 3, WHITE),
        (_split("I;16", 0, 257), "PNG", (0, 0, 0), (1, 1, 1)),
    ],
    ids=[
        "rgb",
        "l",
        "bilevel",
        "la",
        "palette",
        "palette-transparent",
        "rgba",
        "rgba-half",
        "webp-rgba",
        "i16-high",
        "i16-low",
    ],
)
def test_modes_become_rgb_over_white(image: Image.Image, fmt: str, left: tuple, right: tuple) -> None:
    params = {"lossless": True} if fmt == "WEBP" else {}
    if "transparency" in image.info:
        params["transparency"] = image.info["transparency"]
    rgb = _decode(_save(image, fmt, **params))
    _assert_photo(rgb, (64, 64))
    assert tuple(rgb[0, 0]) == left
    assert tuple(rgb[-1, -1]) == right


def test_rgb_png_with_trns_colour_key_becomes_white() -> None:
    data = _save(_split("RGB", RED, BLUE), "PNG", transparency=RED)
    rgb = _decode(data)
    assert tuple(rgb[0, 0]) == WHITE
    assert tuple(rgb[-1, -1]) == BLUE


@pytest.mark.parametrize(
    ("image", "left", "right"),
    [
        (_split("L", 90, 200), (90,) * 3, (200,) * 3),
        # Pillow undoes Adobe's inverted CMYK; C+M+Y+K = 0 is white.
        (_split("CMYK", (0, 255, 255, 0), (0, 0, 0, 0)), RED, WHITE),
    ],
    ids=["l", "cmyk"],
)
def test_jpeg_modes(image: Image.Image, left: tuple, right: tuple) -> None:
    rgb = _decode(_save(image, "JPEG", quality=95))
    _assert_photo(rgb, (64, 64))
    np.testing.assert_allclose(rgb[:, :24].reshape(-1, 3).mean(0), left, atol=4)
    np.testing.assert_allclose(rgb[:, 40:].reshape(-1, 3).mean(0), right, atol=4)


def test_32_bit_integer_mode_is_scaled_as_16_bit() -> None:
    samples = np.array([[-5, 0, 128, 129, 32768, 65535, 70000]], np.int32)
    image = Image.fromarray(samples)
    assert image.mode == "I"
    rgb, alpha = _rgb_and_alpha(image)
    assert alpha is None
    assert rgb[0, :, 0].tolist() == [0, 0, 0, 1, 128, 255, 255]
    assert (rgb == rgb[:, :, :1]).all()


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("PNG", {}), ("WEBP", {"lossless": True}), ("MPO", {})],
    ids=["apng", "animated-webp", "mpo"],
)
def test_multi_frame_files_give_the_first_frame(fmt: str, params: dict) -> None:
    frames = [Image.new("RGB", (64, 64), colour) for colour in (RED, BLUE, WHITE)]
    data = _save(frames[0], fmt, save_all=True, append_images=frames[1:], **params)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    rgb = _decode(data)
    _assert_photo(rgb, (64, 64))
    np.testing.assert_allclose(rgb.reshape(-1, 3).mean(0), RED, atol=3)


# --- encode_image ---------------------------------------------------------------


def test_png_round_trip_is_bit_identical() -> None:
    rgb = _noise(65, 97)
    np.testing.assert_array_equal(_decode(encode_image(rgb, "png")), rgb)


def test_webp_at_quality_100_is_lossless() -> None:
    rgb = _noise()
    np.testing.assert_array_equal(_decode(encode_image(rgb, "webp", quality=100)), rgb)


@pytest.mark.parametrize("fmt", ["jpeg", "jpg", "JPEG", "webp"])
def test_lossy_round_trip_is_close(fmt: str) -> None:
    # A smooth gradient, like a wall: lossy codecs should barely touch it.
    ramp = np.linspace(0, 255, 128)
    rgb = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 128.0), axis=-1)
    rgb = rgb.astype(np.uint8)
    decoded = _decode(encode_image(rgb, fmt, quality=90))
    assert np.abs(decoded.astype(int) - rgb).mean() < 3


def test_lossy_quality_is_honoured() -> None:
    rgb = _noise()
    for fmt in ("jpeg", "webp"):
        assert len(encode_image(rgb, fmt, quality=20)) < len(encode_image(rgb, fmt, quality=90))


def test_encode_signature_and_non_contiguous_input() -> None:
    rgb = _noise(64, 192)[:, ::2]
    assert not rgb.flags.c_contiguous
    assert encode_image(rgb, "png").startswith(b"\x89PNG")
    assert encode_image(rgb, "jpeg").startswith(b"\xff\xd8")
    assert encode_image(rgb, "webp")[8:12] == b"WEBP"
    np.testing.assert_array_equal(_decode(encode_image(rgb, "png")), rgb)


@pytest.mark.parametrize(
    ("rgb", "fmt", "quality"),
    [
        (np.zeros((8, 8), np.uint8), "png", 95),
        (np.zeros((8, 8, 4), np.uint8), "png", 95),
        (np.zeros((8, 8, 3), np.float32), "png", 95),
        (np.zeros((8, 8, 3), np.uint8), "gif", 95),
        (np.zeros((8, 8, 3), np.uint8), "jpeg", 101),
    ],
)
def test_encode_rejects_bad_arguments(rgb: np.ndarray, fmt: str, quality: int) -> None:
    with pytest.raises(ValueError):
        encode_image(rgb, fmt, quality=quality)


# --- paths ----------------------------------------------------------------------


def test_image_suffixes() -> None:
    assert IMAGE_SUFFIXES == (".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".avif")


@pytest.mark.parametrize(
    ("path", "requested", "expected"),
    [
        ("a/photo.jpg", "same", "jpeg"),
        ("a/photo.JPEG", "same", "jpeg"),
        ("a/photo.Png", "same", "png"),
        ("a/photo.webp", "same", "webp"),
        ("a/IMG_0001.HEIC", "same", "heif"),
        ("a/photo.heif", "same", "heif"),
        ("a/photo.avif", "same", "avif"),
        ("a/photo.tiff", "same", "png"),
        ("a/photo", "same", "png"),
        ("a.jpg/photo", "same", "png"),
        ("a/photo.jpg", "png", "png"),
        ("a/photo.png", "jpeg", "jpeg"),
        ("a/photo.png", "jpg", "jpeg"),
        ("a/photo.png", "webp", "webp"),
    ],
)
def test_output_format(path: str, requested: str, expected: str) -> None:
    assert output_format(path, requested) == expected


def test_output_format_rejects_unknown_request() -> None:
    with pytest.raises(ValueError, match="'bmp'"):
        output_format("a.jpg", "bmp")


@pytest.mark.parametrize(
    ("path", "fmt", "expected"),
    [
        ("photo.JPG", "jpeg", "photo.JPG"),
        ("photo.jpeg", "jpg", "photo.jpeg"),
        ("rooms/photo.png", "png", "rooms/photo.png"),
        ("rooms/photo.png", "jpeg", "rooms/photo.jpg"),
        ("rooms/photo.jpg", "webp", "rooms/photo.webp"),
        ("rooms/photo.WEBP", "png", "rooms/photo.png"),
        ("rooms/IMG_0001.HEIC", "heic", "rooms/IMG_0001.HEIC"),
        ("rooms/photo.jpg", "avif", "rooms/photo.avif"),
        ("rooms/photo.tiff", "png", "rooms/photo.png"),
        ("rooms/photo", "png", "rooms/photo.png"),
        ("rooms.v2/photo", "jpeg", "rooms.v2/photo.jpg"),
        ("rooms/.hidden", "png", "rooms/.hidden.png"),
        ("./rooms//photo.jpg", "png", "./rooms//photo.png"),
    ],
)
def test_with_suffix(path: str, fmt: str, expected: str) -> None:
    assert with_suffix(path, fmt) == expected


# --- masks ----------------------------------------------------------------------


def test_mask_round_trip_is_an_8_bit_png() -> None:
    mask = _noise(48, 80)[:, :, 0] > 127
    data = encode_mask(mask)
    with Image.open(io.BytesIO(data)) as image:
        assert (image.format, image.mode) == ("PNG", "L")
        assert set(np.unique(np.array(image))) == {0, 255}
    decoded = decode_mask(data, size=(80, 48))
    assert decoded.dtype == bool
    np.testing.assert_array_equal(decoded, mask)


def test_encode_mask_rejects_non_2d() -> None:
    with pytest.raises(ValueError):
        encode_mask(np.zeros((4, 4, 3), bool))


def _mask_of(image: Image.Image, **params: object) -> np.ndarray:
    return decode_mask(_save(image, "PNG", **params), size=image.size)


@pytest.mark.parametrize(
    ("image", "left", "right"),
    [
        (_split("L", 127, 128), False, True),
        (_split("1", 0, 1), False, True),
        (_split("RGB", (127, 127, 127), (0, 0, 128)), False, True),
        (_split("RGB", (0, 0, 0), RED), False, True),
        (_p_image(transparent=False), True, True),
        # Uniform colour, varying alpha: the strokes are drawn as opacity.
        (_split("RGBA", (0, 0, 0, 0), (0, 0, 0, 255)), False, True),
        (_split("LA", (255, 255), (255, 0)), True, False),
        # Colour varies: alpha is ignored and luminance decides (red is dark).
        (_split("RGBA", (255, 255, 255, 0), (0, 0, 0, 255)), True, False),
        (_split("RGBA", (*RED, 255), (200, 200, 200, 0)), False, True),
        # Nothing varies: an all-opaque black mask is empty, not "remove all".
        (_split("RGBA", (0, 0, 0, 255), (0, 0, 0, 255)), False, False),
    ],
    ids=[
        "l-threshold",
        "bilevel",
        "rgb-any-channel",
        "rgb-red",
        "palette",
        "rgba-alpha",
        "la-alpha",
        "rgba-luminance",
        "rgba-red-luminance",
        "rgba-uniform",
    ],
)
def test_mask_modes(image: Image.Image, left: bool, right: bool) -> None:
    mask = _mask_of(image)
    assert mask.shape == (64, 64)
    assert mask.dtype == bool
    assert mask[0, 0] == left
    assert mask[-1, -1] == right


def test_mask_is_resized_with_nearest() -> None:
    mask = np.zeros((2, 4), bool)
    mask[:, 1] = True
    decoded = decode_mask(encode_mask(mask), size=(8, 6))
    assert decoded.shape == (6, 8)
    expected = np.zeros((6, 8), bool)
    expected[:, 2:4] = True
    np.testing.assert_array_equal(decoded, expected)


def test_mask_honours_exif_orientation() -> None:
    stored = np.zeros((64, 96), np.uint8)
    stored[:, :48] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    mask = decode_mask(_save(Image.fromarray(stored), "PNG", exif=exif.tobytes()), size=(64, 96))
    assert mask[:48].all()
    assert not mask[48:].any()


@pytest.mark.parametrize(
    ("data", "prefix"),
    [
        (b"", "empty file (0 bytes)"),
        (b"<html>nope</html>", "not an image: "),
        (encode_mask(np.ones((64, 64), bool))[:40], "not an image: "),
        (_save(Image.fromarray(_noise()), "PNG")[:-2000], "truncated or corrupt image: "),
        (_png_claiming_size(20_000, 20_000), "image too large: "),
    ],
    ids=["empty", "html", "header-only", "truncated", "bomb"],
)
def test_decode_mask_errors(data: bytes, prefix: str) -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_mask(data, size=(64, 64))
    assert _one_line(info.value).startswith(prefix)
