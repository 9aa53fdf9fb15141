"""The file written for a painted photo: the input file, changed only where the furniture was.

Listing platforms republish these photos, so everything but the furniture stays as it came:

- nothing to remove, and the output in the input's format: the input's bytes, copied;
- a JPEG written as JPEG: only the blocks the mask touches are re-encoded, with the input's own
  quantisation tables and chroma subsampling; every other block's DCT coefficients, and every
  marker (EXIF, ICC profile, XMP), are the input's (``casalimpia.jpeg_blocks``);
- anything else is encoded whole from the decoded pixels, with the input's ICC profile, EXIF
  (orientation set to upright, as the pixels are), XMP and DPI wherever the format holds them;
  PNG and lossless WebP inputs written as themselves are lossless, lossy WebP, HEIF and AVIF ones
  (and JPEGs libjpeg cannot edit by blocks, CMYK) at a quality matched to the input's size.

Each result says which of these it was and measures ``outside_changed``, the fraction of pixels
outside the mask whose decoded value differs from the input's, by decoding what it wrote.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from casalimpia.images import (
    ImageDecodeError,
    Metadata,
    decode_image,
    encode_image,
    inspect_photo,
    to_stored_orientation,
)
from casalimpia.jpeg_blocks import NotBlockEditable, replace_masked_blocks

QUALITY_LADDER = (50, 60, 70, 80, 90)
"""Qualities tried, with write.quality above them, to match a lossy input that does not record its own."""
COPIED = "copied"
BLOCKS = "blocks"
ENCODED = "encoded"


@dataclass(frozen=True)
class OutputPhoto:
    """A painted photo's file, ready to write."""

    data: bytes
    method: str
    """How it was made: COPIED (the input's bytes), BLOCKS (JPEG blocks re-encoded), ENCODED (whole)."""
    outside_changed: float
    """Fraction of the pixels outside the mask whose decoded value differs from the input's."""


def encode_output(original: bytes, painted: np.ndarray, mask: np.ndarray, fmt: str, *, quality: int) -> OutputPhoto:
    """The file for ``painted``, the upright decoding of ``original`` painted inside ``mask``, in ``fmt``.

    ``quality`` is the highest quality of a lossy format encoded whole: a lossy input written in its
    own format gets the quality that matches it (``matched_encoding``), another format ``quality``.
    Block-exact JPEGs keep the input's tables.

    Raises:
        ImageDecodeError: ``original`` is not a photo (it decoded once, so only if it changed since).
        ValueError: ``fmt`` is not a format ``encode_image`` writes.
    """
    photo = inspect_photo(original)
    if not mask.any() and photo.format == fmt:
        return OutputPhoto(original, COPIED, 0.0)
    data, method = None, ENCODED
    if photo.format == fmt == "jpeg":
        try:
            data = replace_masked_blocks(
                original,
                to_stored_orientation(painted, photo.orientation),
                to_stored_orientation(mask, photo.orientation),
            )
            method = BLOCKS
        except NotBlockEditable:
            data = None  # CMYK and the like: encoded whole below
    if data is None and photo.format == fmt and not photo.lossless:
        data = matched_encoding(painted, fmt, len(original), photo.metadata, highest=quality)
    if data is None:
        lossless = photo.lossless and photo.format == fmt
        data = encode_image(painted, fmt, quality=quality, lossless=lossless, metadata=photo.metadata)
    return OutputPhoto(data, method, changed_outside(data, painted, mask))


def matched_encoding(painted: np.ndarray, fmt: str, size: int, metadata: Metadata, *, highest: int) -> bytes:
    """``painted`` encoded at the lowest quality of ``QUALITY_LADDER`` (up to ``highest``) whose file is at
    least ``size`` bytes, the input's: at least the input's bits per pixel, so no coarser than it was.

    WebP, HEIF and AVIF files do not record the quality they were encoded at; their size does show it.
    A binary search over the ladder costs two or three encodes; when even ``highest`` gives a smaller
    file (the input was near-lossless), that encoding is returned.
    """
    ladder = sorted({level for level in QUALITY_LADDER if level < highest} | {highest})
    low, high = 0, len(ladder) - 1
    chosen = None
    while low <= high:
        middle = (low + high) // 2
        data = encode_image(painted, fmt, quality=ladder[middle], metadata=metadata)
        if len(data) >= size:
            chosen, high = data, middle - 1
        else:
            low = middle + 1
    return chosen if chosen is not None else encode_image(painted, fmt, quality=highest, metadata=metadata)


def changed_outside(data: bytes, painted: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of the pixels outside ``mask`` where the decoded ``data`` differs from ``painted``."""
    outside = ~mask
    count = np.count_nonzero(outside)
    if count == 0:
        return 0.0
    decoded = decode_image(data, max_pixels=painted.shape[0] * painted.shape[1], min_side=1)
    if decoded.shape != painted.shape:
        raise ImageDecodeError(f"wrote {decoded.shape[1]}x{decoded.shape[0]}, expected the photo's size")
    # OR-ing the channels is several times faster than any(axis=2) on a 12 MP photo.
    unequal = decoded != painted
    differs = unequal[..., 0] | unequal[..., 1] | unequal[..., 2]
    return np.count_nonzero(differs & outside) / count
