"""Decode untrusted photo and mask bytes into numpy arrays, read what else a photo file holds, and
encode results.

Catalogue inputs are scraped or uploaded, so anything can arrive: empty files,
HTML error pages saved as ``.jpg``, truncated transfers, decompression bombs,
CMYK scans, 16-bit PNGs, animations. Every input that cannot become a photo
raises :class:`ImageDecodeError` with a one-line reason, which the pipeline
records in the manifest instead of letting the job crash.
"""

from __future__ import annotations

import contextlib
import io
import posixpath
import re
import warnings
from dataclasses import dataclass

import numpy as np
import pillow_heif
from PIL import ExifTags, Image, ImageOps, PngImagePlugin, UnidentifiedImageError

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".avif")

# Pillow reads AVIF itself (11.2 and later); pillow-heif adds HEIC/HEIF, as the "HEIF" format.
pillow_heif.register_heif_opener()

# Pillow sniffs dozens of formats, some with large attack surfaces or external
# decoders (EPS shells out to Ghostscript); untrusted bytes only reach the ones
# the catalogue uses. Camera MPO files are reached through the JPEG opener.
_PIL_FORMATS = ("JPEG", "PNG", "WEBP", "AVIF", "HEIF")
_SUFFIX_FORMATS = {
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".png": "png",
    ".webp": "webp",
    ".heic": "heif",
    ".heif": "heif",
    ".avif": "avif",
}
_FORMAT_SUFFIXES = {"jpeg": ".jpg", "png": ".png", "webp": ".webp", "heif": ".heic", "avif": ".avif"}
_FORMAT_ALIASES = {"jpg": "jpeg", "heic": "heif"}
_PIL_FORMAT_NAMES = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp", "AVIF": "avif", "HEIF": "heif"}
_ORIENTATION = ExifTags.Base.Orientation
# The XMP copy of the orientation, which some viewers honour over EXIF's.
_XMP_ORIENTATION = re.compile(rb'(tiff:Orientation(?:="|>))[0-9]')
# Pillow's convert() clips these to 255 instead of rescaling. Older Pillow
# releases open 16-bit grayscale PNGs as "I"; the samples are 0..65535 either way.
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Masks come without a caller-chosen limit; this is generous for any photo's
# mask while stopping a hostile one from allocating gigabytes.
_MASK_MAX_PIXELS = 100_000_000
_MAX_MESSAGE_CHARS = 200


class ImageDecodeError(ValueError):
    """An input that cannot become an RGB photo; str() is a one-line reason for the manifest."""

    def __init__(self, reason: str) -> None:
        # Manifest rows hold one line, and Pillow messages can be long or multi-line.
        reason = " ".join(reason.split())
        if len(reason) > _MAX_MESSAGE_CHARS:
            reason = reason[: _MAX_MESSAGE_CHARS - 3] + "..."
        super().__init__(reason)


def decode_image(data: bytes, *, max_pixels: int, min_side: int) -> np.ndarray:
    """Decode bytes into an (H, W, 3) uint8 RGB array, upright (EXIF orientation applied).

    Transparent pixels are composited over white; 16-bit samples are rescaled,
    not clipped; of multi-frame files (APNG, animated WebP, MPO) only the first
    frame is used. The pixel limit is checked against the header before any
    pixel is decoded. Pillow's own hard limit (``2 * Image.MAX_IMAGE_PIXELS``)
    still applies above ``max_pixels``.

    Raises:
        ImageDecodeError: the bytes are empty, not a JPEG/PNG/WebP/HEIF/AVIF,
            truncated or corrupt, or the image is larger than ``max_pixels``
            or has a side shorter than ``min_side``.
    """
    with _open(data, max_pixels=max_pixels) as image:
        width, height = image.size
        if min(width, height) < min_side:
            raise ImageDecodeError(f"image too small: {width}x{height} (minimum side {min_side} px)")
        rgb, alpha = _load_upright(image)
    if alpha is not None:
        rgb = _over_white(rgb, alpha)
    return rgb


@dataclass(frozen=True)
class Metadata:
    """A photo's colour profile and descriptive metadata, carried into the files written from it."""

    icc_profile: bytes | None = None
    exif: bytes | None = None
    """Every EXIF tag, the orientation set to 1: the pixels written from a decoded photo are upright."""
    xmp: bytes | None = None
    """The XMP packet, its orientation set to 1 like EXIF's."""
    dpi: tuple[float, float] | None = None


@dataclass(frozen=True)
class PhotoFile:
    """What a photo file holds besides its pixels, as writing a result from it needs it."""

    format: str
    """'jpeg', 'png', 'webp', 'heif' or 'avif': what the bytes are, whatever the file is called."""
    orientation: int
    """The EXIF orientation (1-8) that ``decode_image`` applied; 1 when it applied none."""
    lossless: bool
    """PNG or lossless WebP: a result written the same way is exact outside its mask."""
    metadata: Metadata


def inspect_photo(data: bytes) -> PhotoFile:
    """Read a photo file's format, orientation and metadata from its header, without decoding pixels.

    Raises:
        ImageDecodeError: the bytes are not a photo ``decode_image`` reads.
    """
    with _open(data, max_pixels=Image.MAX_IMAGE_PIXELS * 2) as image:
        orientation = 1
        # decode_image ignores a broken EXIF block, and so does this.
        with contextlib.suppress(Exception):
            orientation = int(image.getexif().get(_ORIENTATION, 1))
        raw_exif = image.info.get("exif")
        fmt = _PIL_FORMAT_NAMES[image.format]
        xmp = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp")
        if isinstance(xmp, str):
            xmp = xmp.encode()
        metadata = Metadata(
            icc_profile=image.info.get("icc_profile") or None,
            exif=_upright_exif(raw_exif) if raw_exif else None,
            xmp=_XMP_ORIENTATION.sub(rb"\g<1>1", xmp) if xmp else None,
            dpi=image.info.get("dpi"),
        )
    lossless = fmt == "png" or (fmt == "webp" and _is_lossless_webp(data))
    return PhotoFile(fmt, orientation if 1 <= orientation <= 8 else 1, lossless, metadata)


def encode_image(
    rgb: np.ndarray, fmt: str, *, quality: int = 95, lossless: bool = False, metadata: Metadata | None = None
) -> bytes:
    """Encode an (H, W, 3) uint8 RGB array as 'png', 'jpeg' (or 'jpg'), 'webp', 'heif' (or 'heic') or 'avif'.

    PNG is lossless. ``quality`` (0-100) applies to the others; WebP with
    ``lossless`` or at quality 100 is encoded lossless. ``metadata`` goes
    wherever the format holds it: the ICC profile, EXIF and XMP into all
    (XMP as an iTXt chunk in PNG), DPI into JPEG and PNG.

    Raises:
        ValueError: unknown format, quality out of range, or an array that is
            not (H, W, 3) uint8.
    """
    fmt = _canonical_format(fmt)
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {rgb.dtype} {rgb.shape}")
    if not 0 <= quality <= 100:
        raise ValueError(f"quality must be in 0..100, got {quality}")
    image = Image.fromarray(rgb)
    options = _metadata_options(fmt, metadata or Metadata())
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, "PNG", **options)
    elif fmt == "webp" and (lossless or quality == 100):
        # Lossless WebP reads "quality" as compression effort, not fidelity,
        # and 100 is by far the slowest setting: keep Pillow's default effort.
        image.save(buffer, "WEBP", lossless=True, **options)
    else:
        image.save(buffer, fmt.upper(), quality=quality, **options)
    return buffer.getvalue()


def to_stored_orientation(upright: np.ndarray, orientation: int) -> np.ndarray:
    """Undo ``decode_image``'s EXIF transposition: the array as the file stores it."""
    undo = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, k=1),
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: np.rot90(a, k=-1),
    }
    return np.ascontiguousarray(undo[orientation](upright)) if orientation in undo else upright


def _metadata_options(fmt: str, metadata: Metadata) -> dict:
    """Pillow's save() options that write ``metadata`` into ``fmt``."""
    options: dict = {}
    if metadata.icc_profile:
        options["icc_profile"] = metadata.icc_profile
    if metadata.exif:
        options["exif"] = metadata.exif
    if metadata.dpi and fmt in ("jpeg", "png"):
        options["dpi"] = metadata.dpi
    if metadata.xmp and fmt == "png":
        text = PngImagePlugin.PngInfo()
        text.add_itxt("XML:com.adobe.xmp", metadata.xmp.decode("utf-8", "replace"))
        options["pnginfo"] = text
    elif metadata.xmp:
        options["xmp"] = metadata.xmp
    return options


def _upright_exif(raw: bytes) -> bytes:
    """The EXIF block byte for byte, but for its orientation tag's value set to 1 (upright).

    Patching the one value keeps every other tag, maker notes and offsets included, exactly as
    the camera wrote them, which re-serialising the parsed tags would not.
    """
    header = 6 if raw.startswith(b"Exif\x00\x00") else 0
    order = {b"II": "little", b"MM": "big"}.get(raw[header : header + 2])
    if order is None or len(raw) < header + 8:
        return raw
    first_ifd = header + int.from_bytes(raw[header + 4 : header + 8], order)
    count = int.from_bytes(raw[first_ifd : first_ifd + 2], order)
    for entry in range(first_ifd + 2, min(first_ifd + 2 + 12 * count, len(raw) - 11), 12):
        if int.from_bytes(raw[entry : entry + 2], order) == _ORIENTATION:
            # A SHORT fits in the entry itself: its value is the first two bytes of the value field.
            return raw[: entry + 8] + (1).to_bytes(2, order) + raw[entry + 10 :]
    return raw


def _is_lossless_webp(data: bytes) -> bool:
    """Whether a WebP file's image is coded lossless (a VP8L chunk), from its RIFF chunks."""
    position = 12  # after "RIFF", the size and "WEBP"
    while position + 8 <= len(data):
        chunk, size = data[position : position + 4], int.from_bytes(data[position + 4 : position + 8], "little")
        if chunk in (b"VP8L", b"VP8 "):
            return chunk == b"VP8L"
        position += 8 + size + (size & 1)
    return False


def output_format(path: str, requested: str) -> str:
    """Resolve the output format: 'same' follows the input's suffix, else ``requested``.

    'same' maps .jpg/.jpeg to 'jpeg', .png to 'png', .webp to 'webp',
    .heic/.heif to 'heif' and .avif to 'avif' (case-insensitive); any other
    suffix falls back to lossless 'png'.

    Raises:
        ValueError: ``requested`` is not 'same' or a format ``encode_image`` writes.
    """
    if requested == "same":
        suffix = posixpath.splitext(path)[1].lower()
        return _SUFFIX_FORMATS.get(suffix, "png")
    return _canonical_format(requested)


def with_suffix(path: str, fmt: str) -> str:
    """Return the POSIX-style ``path`` with its suffix replaced to match ``fmt``.

    A suffix that already denotes ``fmt`` is kept as written, so photo.JPG
    stays photo.JPG for 'jpeg'; otherwise .jpg, .png, .webp, .heic or .avif
    replaces it.
    The rest of the path is returned untouched.
    """
    fmt = _canonical_format(fmt)
    stem, suffix = posixpath.splitext(path)
    if _SUFFIX_FORMATS.get(suffix.lower()) == fmt:
        return path
    return stem + _FORMAT_SUFFIXES[fmt]


def encode_mask(mask: np.ndarray) -> bytes:
    """Encode an (H, W) boolean mask as an 8-bit grayscale PNG, 255 = remove."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {mask.shape}")
    gray = np.where(mask, np.uint8(255), np.uint8(0))
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, "PNG")
    return buffer.getvalue()


def decode_mask(data: bytes, *, size: tuple[int, int]) -> np.ndarray:
    """Decode a user-supplied mask into an (H, W) bool array, True = remove.

    ``size`` is (width, height); a mask of another size is resized with
    nearest-neighbour sampling. Without alpha, a pixel is set when any colour
    channel is above 127. With alpha (RGBA, LA, palette or tRNS transparency),
    the alpha channel is the mask when the colour is the same everywhere and
    alpha varies (strokes drawn as opacity); otherwise luminance above 127.

    Raises:
        ImageDecodeError: the bytes are empty, not a JPEG/PNG/WebP/HEIF/AVIF,
            truncated or corrupt, or absurdly large.
    """
    with _open(data, max_pixels=_MASK_MAX_PIXELS) as image:
        rgb, alpha = _load_upright(image)
    if alpha is None:
        mask = (rgb > 127).any(axis=2)
    elif _is_uniform(rgb) and not _is_uniform(alpha):
        mask = alpha > 127
    else:
        mask = rgb @ np.array([0.299, 0.587, 0.114]) > 127
    if (mask.shape[1], mask.shape[0]) != tuple(size):
        resized = Image.fromarray(mask).resize(size, Image.Resampling.NEAREST)
        mask = np.array(resized)
    return mask


def _open(data: bytes, *, max_pixels: int) -> Image.Image:
    """Identify ``data`` and enforce ``max_pixels`` from the header alone."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        # Our limit supersedes Pillow's warning threshold, and the warning
        # would otherwise fire on every large input. catch_warnings is not
        # thread-safe, but a race can at worst leak or drop this one filter.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            f"not an image: not a readable JPEG, PNG, WebP, HEIF or AVIF file"
            f" ({len(data)} bytes starting {data[:16]!r})"
        ) from exc
    except Image.DecompressionBombError as exc:
        # Pillow's hard limit fires inside open(), before the size reaches us.
        raise ImageDecodeError(f"image too large: {exc}") from exc
    except Exception as exc:
        # Decoders raise OSError, SyntaxError, struct.error, EOFError, ... on
        # bad input; all of them mean the same thing for the manifest.
        raise ImageDecodeError(f"truncated or corrupt image: {_describe(exc)}") from exc
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageDecodeError(
            f"image too large: {width}x{height} ({width * height / 1e6:.1f} MP)"
            f" exceeds the {max_pixels / 1e6:.1f} MP limit"
        )
    return image


def _load_upright(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode all pixels, apply EXIF orientation, and split off any alpha."""
    try:
        # open() only read the header; decoding everything here is what
        # surfaces truncation, without enabling LOAD_TRUNCATED_IMAGES.
        image.load()
        # Viewers cannot read a broken EXIF block either, so the pixels as
        # stored are what people see: no reason to drop an intact photo.
        with contextlib.suppress(Exception):
            ImageOps.exif_transpose(image, in_place=True)
        return _rgb_and_alpha(image)
    except Exception as exc:
        raise ImageDecodeError(f"truncated or corrupt image: {_describe(exc)}") from exc


def _rgb_and_alpha(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Return (H, W, 3) uint8 colour and, when the image has transparency, (H, W) alpha."""
    if image.mode in _SIXTEEN_BIT_MODES:
        samples = np.clip(np.asarray(image, dtype=np.int32), 0, 65535)
        # Round to nearest: 65535 -> 255, 32768 -> 128.
        gray = ((samples + 128) // 257).astype(np.uint8)
        return np.repeat(gray[:, :, np.newaxis], 3, axis=2), None
    if image.has_transparency_data:
        rgba = np.array(image.convert("RGBA"))
        return rgba[:, :, :3], rgba[:, :, 3]
    return np.array(image.convert("RGB")), None


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite colour over a white background, rounding to nearest."""
    # uint16 is enough: c*a + 255*(255-a) <= 255*255, plus the rounding term.
    a = alpha[:, :, np.newaxis].astype(np.uint16)
    composite = (rgb * a + 255 * (255 - a) + 127) // 255
    return composite.astype(np.uint8)


def _is_uniform(values: np.ndarray) -> bool:
    """Whether every pixel of an (H, W) or (H, W, C) array equals the first."""
    first = values.reshape(-1, *values.shape[2:])[0]
    return bool((values == first).all())


def _canonical_format(fmt: str) -> str:
    canonical = _FORMAT_ALIASES.get(fmt.lower(), fmt.lower())
    if canonical not in _FORMAT_SUFFIXES:
        raise ValueError(f"unsupported format {fmt!r}: expected one of {', '.join(_FORMAT_SUFFIXES)}")
    return canonical


def _describe(exc: BaseException) -> str:
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
