"""Edit a JPEG inside a mask without re-encoding the rest: the blocks the mask touches get new DCT
coefficients, every other block keeps the input's coefficients bit for bit.

A JPEG decoder turns identical coefficients into identical pixels, so a photo decoded from the
output equals the input's decoding everywhere except in the touched MCUs (the minimum coded units:
8x8 pixels, 16x8 or 16x16 with subsampled chroma) and the pixels next to them that a decoder's
chroma upsampling blends with them. The new blocks are quantised with the input's own tables at its
own chroma subsampling, so the file keeps its quality, its markers (EXIF, ICC profile, XMP, ...)
and its baseline or progressive coding.

``jpeglib`` (libjpeg through ctypes) reads and writes the coefficients; only the forward DCT of the
touched blocks is computed here. jpeglib works on files, so each call goes through a temporary folder.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import jpeglib
import numpy as np

# The libjpeg jpeglib loads to read and write baseline files. Its coefficient writer ignores the
# progressive flag, so progressive inputs are written with mozjpeg, which honours it (and cannot
# write baseline: it makes every file progressive).
_BASELINE_LIBJPEG = "turbo210"
_PROGRESSIVE_LIBJPEG = "mozjpeg403"
_BLOCK = 8

# JFIF's RGB -> YCbCr (ITU-R BT.601, full range), which JPEG decoders invert.
_RGB_TO_YCBCR = np.array(
    [
        [0.299, 0.587, 0.114],
        [-0.168735892, -0.331264108, 0.5],
        [0.5, -0.418687589, -0.081312411],
    ],
    dtype=np.float32,
)
_YCBCR_OFFSET = np.array([0.0, 128.0, 128.0], dtype=np.float32)


def _dct_matrix() -> np.ndarray:
    """The orthonormal 8-point DCT-II matrix: JPEG's forward DCT of a block is D @ block @ D.T."""
    k = np.arange(_BLOCK)
    matrix = np.sqrt(2 / _BLOCK) * np.cos((2 * k[np.newaxis, :] + 1) * k[:, np.newaxis] * np.pi / (2 * _BLOCK))
    matrix[0] /= np.sqrt(2)
    return matrix.astype(np.float32)


_DCT = _dct_matrix()


class NotBlockEditable(ValueError):
    """A JPEG whose blocks this module cannot rewrite (CMYK, Adobe RGB transform, an unreadable stream)."""


@dataclass(frozen=True)
class _Layout:
    """Where one component's blocks lie: its sampling relative to the MCU."""

    vertical: int
    """Blocks per MCU vertically (the component's vertical sampling factor)."""
    horizontal: int
    """Blocks per MCU horizontally."""


def replace_masked_blocks(original: bytes, stored: np.ndarray, mask: np.ndarray) -> bytes:
    """The JPEG ``original`` with every MCU that ``mask`` touches re-encoded from ``stored``.

    ``stored`` is the edited photo as (H, W, 3) uint8 RGB and ``mask`` (H, W) bool, both in the
    file's stored orientation (EXIF orientation not applied) and at its size. Pixels of ``stored``
    outside the touched MCUs are not read.

    Raises:
        NotBlockEditable: the file is not a YCbCr or grayscale JPEG jpeglib can read, or its size
            differs from ``stored``'s.
    """
    with tempfile.TemporaryDirectory(prefix="casalimpia-jpeg-") as folder:
        source, target = os.path.join(folder, "in.jpg"), os.path.join(folder, "out.jpg")
        with open(source, "wb") as file:
            file.write(original)
        progressive = is_progressive(original)
        with jpeglib.version(_PROGRESSIVE_LIBJPEG if progressive else _BASELINE_LIBJPEG):
            jpeg = _read(source)
            _check_editable(jpeg, stored)
            _replace_blocks(jpeg, stored, mask)
            # libjpeg's standard Huffman tables: optimising them would shrink the file a few per cent
            # for a second pass over every coefficient.
            jpeg.write_dct(target, flags=["+PROGRESSIVE_MODE"] if progressive else [])
        with open(target, "rb") as file:
            return file.read()


def is_progressive(data: bytes) -> bool:
    """Whether the JPEG's frame header is progressive (SOF2, SOF6, SOF10, SOF14), read from its markers."""
    position = 2  # after SOI
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker in (0xC2, 0xC6, 0xCA, 0xCE)
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    raise NotBlockEditable("no frame header before the end of the file")


def _read(path: str) -> jpeglib.DCTJPEG:
    try:
        jpeg = jpeglib.read_dct(path)
        jpeg.load()
    except Exception as exc:
        raise NotBlockEditable(f"jpeglib cannot read the file: {exc}") from exc
    return jpeg


def _check_editable(jpeg: jpeglib.DCTJPEG, stored: np.ndarray) -> None:
    space = jpeg.jpeg_color_space
    if not (space == jpeglib.JCS_YCbCr and jpeg.num_components == 3) and not (
        space == jpeglib.JCS_GRAYSCALE and jpeg.num_components == 1
    ):
        raise NotBlockEditable(f"colour space {space} with {jpeg.num_components} components")
    if (jpeg.height, jpeg.width) != stored.shape[:2]:
        raise NotBlockEditable(f"file is {jpeg.width}x{jpeg.height}, the photo {stored.shape[1]}x{stored.shape[0]}")


def _replace_blocks(jpeg: jpeglib.DCTJPEG, stored: np.ndarray, mask: np.ndarray) -> None:
    """Overwrite, in place, the coefficients of every block in an MCU the mask touches."""
    factors = np.asarray(jpeg.samp_factor).reshape(-1, 2)[: jpeg.num_components]
    layouts = [_Layout(int(v), int(h)) for v, h in factors]
    mcu_height = _BLOCK * max(layout.vertical for layout in layouts)
    mcu_width = _BLOCK * max(layout.horizontal for layout in layouts)
    touched = _touched_mcus(mask, mcu_height, mcu_width)
    rows, columns = np.nonzero(touched)
    if rows.size == 0:
        return
    mcus = _gather_mcus(stored, touched.shape, rows, columns, mcu_height, mcu_width)
    components = [jpeg.Y, jpeg.Cb, jpeg.Cr][: jpeg.num_components]
    for index, (layout, coefficients) in enumerate(zip(layouts, components, strict=True)):
        # Box averaging and the colour transform are both linear: averaging RGB first and converting
        # the few averaged pixels gives the subsampled chroma for a fraction of the work.
        rgb = _downsample(mcus, mcu_height // (_BLOCK * layout.vertical), mcu_width // (_BLOCK * layout.horizontal))
        plane = rgb[..., 0] if jpeg.num_components == 1 else rgb @ _RGB_TO_YCBCR[index] + _YCBCR_OFFSET[index]
        blocks = _forward_dct(plane, layout)  # (N, vertical, horizontal, 8, 8)
        table = jpeg.qt[jpeg.quant_tbl_no[index]].astype(np.float32)
        quantised = np.clip(np.rint(blocks / table), -1024, 1023).astype(coefficients.dtype)
        for i in range(layout.vertical):
            for j in range(layout.horizontal):
                block_rows, block_columns = rows * layout.vertical + i, columns * layout.horizontal + j
                # MCUs at the right and bottom edges can hold dummy blocks outside the component's array.
                inside = (block_rows < coefficients.shape[0]) & (block_columns < coefficients.shape[1])
                coefficients[block_rows[inside], block_columns[inside]] = quantised[inside, i, j]


def _touched_mcus(mask: np.ndarray, mcu_height: int, mcu_width: int) -> np.ndarray:
    """(MCU rows, MCU columns) bool: whether the mask has a pixel in each MCU."""
    height, width = mask.shape
    padded = np.zeros((-(-height // mcu_height) * mcu_height, -(-width // mcu_width) * mcu_width), dtype=bool)
    padded[:height, :width] = mask
    # Reducing the contiguous row axis first is an order of magnitude faster than any(axis=(1, 3)).
    bands = np.logical_or.reduce(padded.reshape(-1, mcu_height, padded.shape[1]), axis=1)
    return bands.reshape(bands.shape[0], -1, mcu_width).any(axis=2)


def _gather_mcus(
    stored: np.ndarray, grid: tuple[int, int], rows: np.ndarray, columns: np.ndarray, height: int, width: int
) -> np.ndarray:
    """(N, height, width, 3) float32 pixels of the listed MCUs, the image's edge repeated past its border."""
    padding = ((0, grid[0] * height - stored.shape[0]), (0, grid[1] * width - stored.shape[1]), (0, 0))
    padded = np.pad(stored, padding, mode="edge") if any(after for _, after in padding) else stored
    tiles = padded.reshape(grid[0], height, grid[1], width, 3).swapaxes(1, 2)
    return tiles[rows, columns].astype(np.float32)


def _downsample(pixels: np.ndarray, vertical: int, horizontal: int) -> np.ndarray:
    """Average (N, H, W, C) pixels over vertical x horizontal boxes, as libjpeg's encoder does."""
    if vertical == horizontal == 1:
        return pixels
    # Adding strided slices is several times faster than sum() over the interleaved box axes.
    total = sum(pixels[:, i::vertical, j::horizontal] for i in range(vertical) for j in range(horizontal))
    return total * np.float32(1 / (vertical * horizontal))


def _forward_dct(plane: np.ndarray, layout: _Layout) -> np.ndarray:
    """(N, 8v, 8h) samples -> (N, v, h, 8, 8) DCT coefficients, level-shifted by 128 first."""
    count = plane.shape[0]
    blocks = (plane - 128.0).reshape(count, layout.vertical, _BLOCK, layout.horizontal, _BLOCK).swapaxes(2, 3)
    return np.einsum("uy,nabyx,vx->nabuv", _DCT, blocks, _DCT, optimize=True)
