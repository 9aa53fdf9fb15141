"""The renderer: one furnished room photo with its exact ground truth.

:func:`render_room` ray-casts a box-shaped room seen by a pinhole camera standing
against the front wall (one-point perspective: back wall, side walls, floor and
ceiling), paints furniture on top as shaded 3-D boxes standing on the floor, and
returns the furnished photo, the same room empty, the exact furniture mask, a
per-pixel ADE20K class map and the furniture shadows. Shadows are drawn into the
furnished photo only, so ``empty`` equals ``furnished`` everywhere except under
the mask and under those shadows.

Seeds at or above :data:`HELD_OUT_SEED` are held out for evaluation: no model the
project ships is trained or tuned on them, so quality figures measured there are
figures on rooms the models have never seen. Training data uses seeds below it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from casalimpia.classes import ADE20K_CLASSES

__all__ = ["HELD_OUT_SEED", "SyntheticRoom", "render_room"]

Colour = tuple[float, float, float]
Point3 = tuple[float, float, float]

# Furniture is drawn at twice the output resolution and box-filtered down
# (2x2 blocks, see _block_mean), which anti-aliases its edges and makes the mask
# "any sub-pixel covered". The room is shaded once per pixel, anti-aliased
# analytically (see _paint_room).
_SS = 2
_MASK_FRACTION = (0.05, 0.35)
_LAYOUT_ATTEMPTS = 40
_KINDS = ("living", "bedroom", "dining")
_ARCHITRAVE = 0.07  # width of a door's trim, metres
HELD_OUT_SEED = 1_000_000
"""First seed reserved for held-out evaluation; nothing shipped is trained or tuned at or above it."""

# ADE20K ids (0-indexed) of what the renderer draws, looked up by name so a typo cannot pass.
_ADE20K_ID = {name: index for index, name in enumerate(ADE20K_CLASSES)}
WALL, FLOOR, CEILING, WINDOWPANE, DOOR = (_ADE20K_ID[n] for n in ("wall", "floor", "ceiling", "windowpane", "door"))

# numpy scalars are strongly typed: float64 ones would silently upcast the
# float32 image math (and double its cost), so constants are spelled float32.
_F32 = np.float32

_WALLS: tuple[Colour, ...] = (
    (0.93, 0.91, 0.87),  # warm white
    (0.87, 0.85, 0.81),  # greige
    (0.81, 0.84, 0.86),  # pale grey-blue
    (0.80, 0.84, 0.77),  # sage
    (0.92, 0.87, 0.78),  # beige
    (0.95, 0.95, 0.94),  # white
    (0.78, 0.76, 0.74),  # taupe
    (0.91, 0.83, 0.77),  # peach
)
_ACCENT_WALLS: tuple[Colour, ...] = (
    (0.36, 0.45, 0.52),
    (0.55, 0.62, 0.52),
    (0.70, 0.55, 0.45),
    (0.40, 0.42, 0.45),
)
_WOOD_FLOORS: tuple[Colour, ...] = (
    (0.70, 0.53, 0.35),  # oak
    (0.44, 0.30, 0.20),  # walnut
    (0.80, 0.70, 0.55),  # ash
    (0.62, 0.58, 0.52),  # grey wash
    (0.60, 0.38, 0.25),  # cherry
)
_TILE_FLOORS: tuple[Colour, ...] = (
    (0.85, 0.83, 0.79),  # cream
    (0.55, 0.56, 0.57),  # grey
    (0.68, 0.44, 0.32),  # terracotta
    (0.91, 0.91, 0.90),  # white
)
_FABRICS: tuple[Colour, ...] = (
    (0.55, 0.56, 0.58),  # grey
    (0.30, 0.31, 0.34),  # charcoal
    (0.20, 0.26, 0.38),  # navy
    (0.78, 0.60, 0.25),  # mustard
    (0.50, 0.58, 0.48),  # sage
    (0.78, 0.72, 0.62),  # beige
    (0.68, 0.40, 0.30),  # terracotta
    (0.20, 0.44, 0.47),  # teal
    (0.86, 0.83, 0.76),  # cream
    (0.80, 0.62, 0.58),  # blush
)
_WOODS: tuple[Colour, ...] = (
    (0.64, 0.48, 0.31),  # oak
    (0.38, 0.25, 0.17),  # walnut
    (0.90, 0.90, 0.88),  # white lacquer
    (0.16, 0.16, 0.17),  # black
    (0.78, 0.66, 0.50),  # birch
    (0.58, 0.58, 0.57),  # grey lacquer
)
_LINENS: tuple[Colour, ...] = ((0.95, 0.95, 0.94), (0.92, 0.90, 0.85), (0.84, 0.85, 0.87))
_FRAMES: tuple[Colour, ...] = ((0.96, 0.96, 0.95), (0.22, 0.22, 0.23), (0.55, 0.40, 0.27))


@dataclass(frozen=True)
class SyntheticRoom:
    """One rendered room with exact ground truth.

    Attributes:
        furnished: ``(H, W, 3)`` uint8 photo with furniture and its shadows.
        empty: ``(H, W, 3)`` uint8 photo of the same room without furniture or
            furniture shadows; equal to ``furnished`` outside mask and shadows.
        mask: ``(H, W)`` bool, True exactly on the pixels covered by furniture
            (shadows are not furniture and are not in the mask).
        classes: ``(H, W)`` uint8 ADE20K ids (0-indexed, as in the models' ``id2label``):
            each furniture pixel is its piece's class (the frontmost piece where
            pieces overlap), every other pixel the wall, floor, ceiling,
            windowpane or door its centre sees. Furniture classes are exactly
            where ``mask`` is True.
        shadow: ``(H, W)`` float32 darkening in [0, 1) that furniture shadows
            apply to the empty room (0 where nothing is shaded).
        structure: ``(H, W)`` uint8 ADE20K ids of the empty room: ``classes`` with
            each furniture pixel given the wall, floor, ceiling, windowpane or door
            behind it.
    """

    furnished: np.ndarray
    empty: np.ndarray
    mask: np.ndarray
    classes: np.ndarray
    shadow: np.ndarray
    structure: np.ndarray


@dataclass(frozen=True)
class _Camera:
    """Pinhole camera at the origin looking down +z with y up, in output pixels."""

    focal: float
    cx: float
    cy: float
    width: int
    height: int

    def project(self, point: Point3) -> tuple[float, float]:
        x, y, z = point
        return self.cx + self.focal * x / z, self.cy - self.focal * y / z


@dataclass(frozen=True)
class _Room:
    """Axis-aligned room box in camera coordinates (metres)."""

    left: float
    right: float
    floor: float  # negative: the camera sits at y = 0
    ceiling: float
    depth: float  # z of the back wall


@dataclass(frozen=True)
class _Window:
    """Window on the back wall; heights are above the floor."""

    x0: float
    x1: float
    h0: float
    h1: float
    frame: Colour
    mullion: bool
    transom: float | None
    trees: bool


@dataclass(frozen=True)
class _Door:
    """Closed door on a side wall, spanning z0..z1 along the wall."""

    on_left: bool
    z0: float
    z1: float
    height: float
    leaf: Colour
    trim: Colour


@dataclass(frozen=True)
class _Box:
    """Furniture part; heights h0..h1 are above the floor."""

    x0: float
    x1: float
    h0: float
    h1: float
    z0: float
    z1: float
    colour: Colour
    layer: int = 0
    texture: float = 0.02
    # Segments (floor-relative points) drawn darker on a face known to be
    # visible, e.g. door splits and handles of a cabinet front.
    lines: tuple[tuple[Point3, Point3], ...] = ()

    @property
    def near(self) -> float:
        return self.z0

    @property
    def centre_x(self) -> float:
        return 0.5 * (self.x0 + self.x1)


@dataclass(frozen=True)
class _Blob:
    """Round furniture part (plant foliage), drawn as a projected disc."""

    x: float
    h: float
    z: float
    radius: float
    colour: Colour
    layer: int = 1

    @property
    def near(self) -> float:
        return self.z - self.radius

    @property
    def centre_x(self) -> float:
        return self.x


@dataclass(frozen=True)
class _Piece:
    """One piece of furniture: its parts, floor footprint (x0, x1, z0, z1) and ADE20K class name."""

    parts: tuple[_Box | _Blob, ...]
    footprint: tuple[float, float, float, float]
    height: float
    kind: str

    @property
    def near(self) -> float:
        return self.footprint[2]


@dataclass
class _Painter:
    """Draws furniture faces as integer ids so colour and mask come from one label map."""

    size: tuple[int, int]  # (width, height) of the supersampled canvas
    image: Image.Image = field(init=False)
    draw: ImageDraw.ImageDraw = field(init=False)
    # Per id: base colour, shade at the top and bottom of the face, face top
    # and bottom (canvas rows), texture amplitude. Id 0 means "no furniture".
    faces: list[tuple[Colour, float, float, float, float, float]] = field(init=False)
    # Per id: the ADE20K class of the piece the face belongs to.
    face_classes: list[int] = field(init=False)
    # Class of the piece being drawn; set by _draw_piece, recorded with each face added.
    piece_class: int = field(init=False, default=WALL)

    def __post_init__(self) -> None:
        self.image = Image.new("I", self.size, 0)
        self.draw = ImageDraw.Draw(self.image)
        self.faces = [((0.0, 0.0, 0.0), 0.0, 0.0, 0.0, 1.0, 0.0)]
        self.face_classes = [WALL]

    @staticmethod
    def canvas(uv: tuple[float, float]) -> tuple[float, float]:
        # ImageDraw puts pixel centres on integers, the ray caster on half-integers.
        return uv[0] * _SS - 0.5, uv[1] * _SS - 0.5

    def _add(self, colour: Colour, top: float, bottom: float, rows: Sequence[float], texture: float) -> int:
        self.faces.append((colour, top, bottom, min(rows), max(rows), texture))
        self.face_classes.append(self.piece_class)
        return len(self.faces) - 1

    def polygon(
        self, points: Sequence[tuple[float, float]], colour: Colour, top: float, bottom: float, texture: float
    ) -> None:
        rows = [p[1] for p in points]
        self.draw.polygon(list(points), fill=self._add(colour, top, bottom, rows, texture))
        # A darker rim separates faces the way real edges catch less light.
        edge = self._add(colour, 0.8 * top, 0.8 * bottom, rows, 0.0)
        self.draw.line([*points, points[0]], fill=edge, width=1)

    def ellipse(self, centre: tuple[float, float], radius: float, colour: Colour, texture: float) -> None:
        u, v = centre
        rows = (v - radius, v + radius)
        self.draw.ellipse(
            (u - radius, v - radius, u + radius, v + radius), fill=self._add(colour, 1.1, 0.8, rows, texture)
        )

    def line(self, points: Sequence[tuple[float, float]], colour: Colour, width: int) -> None:
        rows = [p[1] for p in points]
        self.draw.line(list(points), fill=self._add(colour, 1.0, 1.0, rows, 0.0), width=width)

    def labels(self) -> np.ndarray:
        return np.asarray(self.image, dtype=np.int32)

    def furniture_classes(self, labels: np.ndarray) -> np.ndarray:
        """ADE20K class per output pixel of ``labels``, 255 where no furniture covers it.

        Faces are numbered in drawing order, far to near, so the largest id among a
        pixel's sub-samples is its frontmost piece.
        """
        front = np.maximum(
            np.maximum(labels[0::2, 0::2], labels[1::2, 0::2]), np.maximum(labels[0::2, 1::2], labels[1::2, 1::2])
        )
        table = np.array([255, *self.face_classes[1:]], dtype=np.uint8)
        return table[front]

    def colours(self, labels: np.ndarray, noise: np.ndarray) -> tuple[slice, slice, np.ndarray]:
        """Furniture colour averaged onto output pixels, over the labels' bounding box.

        ``labels`` is this painter's label map and ``noise`` the output-resolution
        texture grain. Returns the box as output row and column slices and its
        planar RGB ``(3, R, C)``, already weighted by furniture coverage.
        """
        rows, cols = _even_span(labels.any(axis=1)), _even_span(labels.any(axis=0))
        faces = np.array([(*f[0], *f[1:]) for f in self.faces], dtype=np.float32)
        table, top, bottom, row0, row1, texture = faces[:, :3].T, *faces[:, 3:].T
        # The shade runs linearly from the face's top row to its bottom row.
        slope = (bottom - top) / np.maximum(row1 - row0, 1.0)
        offset = top - slope * row0
        ids = labels[rows, cols]
        r = np.arange(rows.start, rows.stop, dtype=np.float32)[:, None]
        out_rows = slice(rows.start // _SS, rows.stop // _SS)
        out_cols = slice(cols.start // _SS, cols.stop // _SS)
        grain = np.repeat(np.repeat(noise[out_rows, out_cols], _SS, axis=0), _SS, axis=1)
        shade = (offset[ids] + slope[ids] * r) * (1.0 + texture[ids] * grain)
        return out_rows, out_cols, _block_mean(table[:, ids] * shade[None])


def render_room(seed: int, width: int = 512, height: int = 384) -> SyntheticRoom:
    """Render one furnished room, its empty twin and the exact furniture mask.

    The result is a deterministic function of ``(seed, width, height)``; the
    room kind (living room, bedroom, dining room), geometry, colours and
    furniture all vary with the seed. Layouts are redrawn until the furniture
    covers 5-35 % of the image.
    """
    rng = np.random.default_rng(seed)
    return _render(rng, width, height, str(rng.choice(_KINDS)))


def _render(rng: np.random.Generator, width: int, height: int, kind: str) -> SyntheticRoom:
    if width < 16 or height < 16:
        raise ValueError(f"image must be at least 16x16 pixels, got {width}x{height}")
    room, cam = _pick_geometry(rng, width, height)
    window = _pick_window(rng, room)
    door = _pick_door(rng, room, cam) if rng.random() < 0.5 else None
    # Texture grain at output-pixel scale, shared by room and furniture.
    noise = rng.standard_normal((height, width), dtype=np.float32)
    empty_lin = _paint_room(rng, room, cam, window, door, noise)

    light_x = 0.5 * (window.x0 + window.x1)
    pieces, painter, labels = _furnish(rng, kind, room, cam, door, light_x)
    covered = labels > 0
    shadow = _shadow_alpha(pieces, room, cam, light_x)
    # With zero coverage and zero shadow this is empty_lin * 1 (+ 0), bit-exact,
    # which is what keeps the two images identical away from the furniture.
    furnished_lin = empty_lin * ((1.0 - shadow) * (1.0 - _block_mean(covered.astype(np.float32))))[None]
    rows, cols, furniture = painter.colours(labels, noise)
    furnished_lin[:, rows, cols] += furniture

    mask = _block_any(covered)
    structure = _structure_classes(room, cam, window, door)
    classes = np.where(mask, painter.furniture_classes(labels), structure)
    finish = _photo_finish(rng, width, height)
    return SyntheticRoom(
        furnished=finish(furnished_lin),
        empty=finish(empty_lin),
        mask=mask,
        classes=classes,
        shadow=shadow,
        structure=structure,
    )


def _furnish(
    rng: np.random.Generator, kind: str, room: _Room, cam: _Camera, door: _Door | None, light_x: float
) -> tuple[list[_Piece], _Painter, np.ndarray]:
    """Draw layouts until the furniture covers an accepted share of the image.

    Returns the pieces, their painter and its label map; if no attempt lands
    inside the band, the closest miss.
    """

    def attempt() -> tuple[float, list[_Piece], _Painter, np.ndarray]:
        pieces = _layout(rng, kind, room, cam, door)
        painter = _Painter((cam.width * _SS, cam.height * _SS))
        for piece in sorted(pieces, key=lambda p: -p.near):
            _draw_piece(painter, cam, room, piece, light_x)
        labels = painter.labels()
        fraction = float(np.count_nonzero(_block_any(labels > 0))) / (cam.width * cam.height)
        miss = max(_MASK_FRACTION[0] - fraction, fraction - _MASK_FRACTION[1], 0.0)
        return miss, pieces, painter, labels

    best = attempt()
    for _ in range(_LAYOUT_ATTEMPTS - 1):
        if best[0] == 0.0:
            break
        best = min(best, attempt(), key=lambda a: a[0])
    return best[1], best[2], best[3]


def _block_mean(image: np.ndarray) -> np.ndarray:
    """Average 2x2 blocks over the last two axes (``_SS`` is 2).

    Strided slices are much faster than ``reshape().mean()``, and the fixed
    summation order keeps identical inputs bit-identical.
    """
    return 0.25 * (image[..., 0::2, 0::2] + image[..., 1::2, 0::2] + image[..., 0::2, 1::2] + image[..., 1::2, 1::2])


def _even_span(select: np.ndarray) -> slice:
    """Smallest slice with even ends covering the True entries, so it maps onto output pixels."""
    idx = np.flatnonzero(select)
    if not idx.size:
        return slice(0, 0)
    return slice(int(idx[0]) // 2 * 2, (int(idx[-1]) + 2) // 2 * 2)


def _block_any(image: np.ndarray) -> np.ndarray:
    return image[0::2, 0::2] | image[1::2, 0::2] | image[0::2, 1::2] | image[1::2, 1::2]


def _jitter(rng: np.random.Generator, colour: Colour, amount: float = 0.04) -> Colour:
    c = np.clip(np.asarray(colour) * (1.0 + rng.normal(0.0, amount, 3)), 0.0, 1.0)
    return float(c[0]), float(c[1]), float(c[2])


def _scaled(colour: Colour, factor: float) -> Colour:
    return colour[0] * factor, colour[1] * factor, colour[2] * factor


def _pick(rng: np.random.Generator, palette: Sequence[Colour], amount: float = 0.04) -> Colour:
    return _jitter(rng, palette[int(rng.integers(len(palette)))], amount)


def _pick_geometry(rng: np.random.Generator, width: int, height: int) -> tuple[_Room, _Camera]:
    room_width = rng.uniform(3.4, 5.0)
    camera_height = rng.uniform(1.2, 1.5)
    left = -room_width * rng.uniform(0.38, 0.62)
    room = _Room(
        left=left,
        right=left + room_width,
        floor=-camera_height,
        ceiling=rng.uniform(2.5, 2.9) - camera_height,
        depth=rng.uniform(3.5, 4.8),
    )
    # Focal length tied to the longer side keeps a 70-80 degree lens for
    # landscape shots and still shows the whole back wall in portrait ones.
    cam = _Camera(
        focal=max(width, height) * rng.uniform(0.6, 0.72),
        cx=width * rng.uniform(0.46, 0.54),
        cy=height * rng.uniform(0.46, 0.54),
        width=width,
        height=height,
    )
    return room, cam


def _pick_window(rng: np.random.Generator, room: _Room) -> _Window:
    room_width = room.right - room.left
    ceiling = room.ceiling - room.floor
    french = rng.random() < 0.3
    w = min(rng.uniform(1.2, 1.7) if french else rng.uniform(0.9, 1.8), room_width - 1.0)
    x0 = rng.uniform(room.left + 0.4, room.right - 0.4 - w)
    h1 = min(rng.uniform(2.05, 2.3), ceiling - 0.2)
    h0 = 0.05 if french else rng.uniform(0.8, 1.0)
    return _Window(
        x0=x0,
        x1=x0 + w,
        h0=h0,
        h1=h1,
        frame=_pick(rng, _FRAMES, 0.02),
        mullion=w > 1.1 or rng.random() < 0.3,
        transom=h0 + 0.72 * (h1 - h0) if rng.random() < 0.4 else None,
        trees=rng.random() < 0.6,
    )


def _visible_side_z(room: _Room, cam: _Camera, on_left: bool) -> float:
    """Nearest z at which a side wall is inside the frame."""
    if on_left:
        return -room.left * cam.focal / cam.cx
    return room.right * cam.focal / (cam.width - cam.cx)


def _pick_door(rng: np.random.Generator, room: _Room, cam: _Camera) -> _Door:
    on_left = bool(rng.random() < 0.5)
    z_min = max(_visible_side_z(room, cam, on_left) + 0.2, 1.0)
    w = rng.uniform(0.8, 0.95)
    z0 = rng.uniform(z_min, max(z_min, room.depth - 0.3 - w))
    return _Door(
        on_left=on_left,
        z0=z0,
        z1=z0 + w,
        height=rng.uniform(2.0, 2.1),
        leaf=_pick(rng, (*_FRAMES, (0.85, 0.85, 0.83), (0.50, 0.36, 0.24)), 0.03),
        trim=_pick(rng, _FRAMES[:1], 0.01),
    )


def _span(select: np.ndarray) -> slice:
    """Slice covering the True entries of a 1-D mask that are known to be contiguous."""
    idx = np.flatnonzero(select)
    return slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, 0)


def _planar(colour: Colour) -> np.ndarray:
    return np.asarray(colour, dtype=np.float32)[:, None, None]


def _nearest(*distances: np.ndarray) -> np.ndarray:
    return functools.reduce(np.minimum, distances)


def _band(offset: np.ndarray, width: float, footprint: np.ndarray | float) -> np.ndarray:
    """Fraction of a pixel's footprint covered by a band ``width`` wide centred at offset 0.

    Box-filtering thin features analytically keeps them from flickering in and
    out where they are thinner than a pixel.
    """
    d = np.abs(offset)
    lo = np.maximum(d - 0.5 * footprint, -0.5 * width)
    hi = np.minimum(d + 0.5 * footprint, 0.5 * width)
    return np.clip(hi - lo, 0.0, None) / footprint


def _line_coverage(coord: np.ndarray, period: float, width: float, footprint: np.ndarray) -> np.ndarray:
    """Pixel coverage of lines ``width`` wide at every multiple of ``period``."""
    return _band(coord - period * np.round(coord / period), width, footprint)


def _coverage(signed: np.ndarray, footprint: np.ndarray | float) -> np.ndarray:
    """Approximate pixel coverage of the side of an edge where ``signed`` (a distance) is positive."""
    return np.clip(signed / footprint + 0.5, 0.0, 1.0)


def _ambient_occlusion(distance: np.ndarray, strength: float) -> np.ndarray:
    """Darkening near one room edge; multiply the terms of the edges a surface meets.

    Corners and wall/floor junctions receive less bounced light. A product of
    per-edge terms (rather than one term of the nearest edge) keeps them
    separable, so most of them stay cheap row or column vectors.
    """
    return 1.0 - strength * np.exp(distance * -5.0)


def _paint_room(
    rng: np.random.Generator, room: _Room, cam: _Camera, window: _Window, door: _Door | None, noise: np.ndarray
) -> np.ndarray:
    """Ray-cast the bare room; returns planar RGB ``(3, H, W)`` at output resolution.

    Seen from inside a box, a ray's first hit is the nearest of the back wall,
    the side wall its column points at and the floor or ceiling its row points
    at. So each surface owns a band of rows or columns (the back wall a
    rectangle), and on it x, z or height depend on the row or the column alone:
    every surface is a cheap broadcast over one slice of the image. Shading is
    smooth, so it runs once per pixel; only which surface owns a pixel is
    resolved on a 2x2 sub-pixel grid, which anti-aliases the long junctions.
    """
    height, width = noise.shape

    def slopes(count: int, centre: float, offset: float) -> np.ndarray:
        return (np.arange(count, dtype=np.float32) + offset - centre) / cam.focal

    sx, sy = slopes(width, cam.cx, 0.5), -slopes(height, cam.cy, 0.5)
    sub_x = [slopes(width, cam.cx, o) for o in (0.25, 0.75)]
    sub_y = [-slopes(height, cam.cy, o) for o in (0.25, 0.75)]
    with np.errstate(divide="ignore"):
        # Distance along z to the side wall each column sees, and to the floor
        # or ceiling each row sees (inf where the ray is parallel to it).
        side = [np.where(s < 0, room.left / s, room.right / s) for s in sub_x]
        vertical = [np.where(s < 0, room.floor / s, room.ceiling / s) for s in sub_y]

    def fraction(
        row_ok: list[np.ndarray], col_ok: list[np.ndarray], rows: slice, cols: slice, walls: bool
    ) -> np.ndarray:
        """Share of each pixel's 2x2 sub-samples owned by a side wall (walls) or floor/ceiling."""
        total = np.zeros((rows.stop - rows.start, cols.stop - cols.start), dtype=np.float32)
        for a in range(2):
            for b in range(2):
                wall_first = side[b][None, cols] < vertical[a][rows, None]
                total += row_ok[a][rows, None] & col_ok[b][None, cols] & (wall_first if walls else ~wall_first)
        return total * _F32(0.25)

    wall = _pick(rng, _WALLS, 0.02)
    back = _pick(rng, _ACCENT_WALLS, 0.03) if rng.random() < 0.2 else wall
    trim = _jitter(rng, (0.95, 0.95, 0.93), 0.01)
    skirting = rng.uniform(0.07, 0.13)
    ceiling_colour = _jitter(rng, (0.95, 0.95, 0.94), 0.01)
    side_light = rng.uniform(0.82, 0.95, 2).tolist()
    window_x = 0.5 * (window.x0 + window.x1)
    room_w = room.right - room.left
    ceiling_h = room.ceiling - room.floor
    # The wall closer to the window gets more of its light.
    side_light[0 if window_x < room.left + 0.5 * room_w else 1] += 0.05

    out = np.zeros((3, height, width), dtype=np.float32)

    def wall_colour(
        h: np.ndarray, fp: np.ndarray | float, base: Colour, light: np.ndarray, grain: np.ndarray
    ) -> np.ndarray:
        board = _coverage(skirting - h, fp)
        albedo = _planar(base) + (_planar(trim) - _planar(base)) * board[None]
        # A thin shadow line where the skirting board stands proud of the wall.
        seam = 1.0 - 0.15 * _band(h - skirting - 0.006, 0.012, fp)
        vertical_light = 1.0 - 0.05 * ((h / ceiling_h - 0.55) * 2.0) ** 2
        return albedo * (light * vertical_light * seam * (1.0 + 0.003 * grain))[None]

    # Back wall, with the window. Its ownership is separable: rows x columns.
    back_rows = [v >= room.depth for v in vertical]
    back_cols = [s >= room.depth for s in side]
    rows, cols = _span(back_rows[0] | back_rows[1]), _span(back_cols[0] | back_cols[1])
    x = (sx[cols] * room.depth)[None, :]
    h = (sy[rows] * room.depth - room.floor)[:, None]
    along_x = _ambient_occlusion(x - room.left, 0.22) * _ambient_occlusion(room.right - x, 0.22)
    light = (0.9 * along_x) * (_ambient_occlusion(h, 0.22) * _ambient_occlusion(ceiling_h - h, 0.22))
    rgb = wall_colour(h, room.depth / cam.focal, back, light, noise[rows, cols])
    _paint_window(rgb, x, h, noise[rows, cols], window, trim, rng)
    share_rows = 0.5 * (back_rows[0][rows].astype(np.float32) + back_rows[1][rows])
    share_cols = 0.5 * (back_cols[0][cols].astype(np.float32) + back_cols[1][cols])
    out[:, rows, cols] += rgb * (share_rows[:, None] * share_cols[None, :])[None]

    # Side walls, brighter towards the window at the back, maybe with a door.
    all_rows = [np.ones(height, dtype=bool)] * 2
    for on_left in (True, False):
        owned = [((s < 0) if on_left else (s > 0)) & (d < room.depth) for s, d in zip(sub_x, side, strict=True)]
        cols = _span(owned[0] | owned[1])
        z = ((room.left if on_left else room.right) / sx[cols])[None, :]
        h = sy[:, None] * z - room.floor
        along_z = side_light[0 if on_left else 1] * (0.86 + 0.14 * z / room.depth)
        along_z *= _ambient_occlusion(room.depth - z, 0.25)
        light = along_z * _ambient_occlusion(h, 0.25) * _ambient_occlusion(ceiling_h - h, 0.25)
        rgb = wall_colour(h, z / cam.focal, wall, light, noise[:, cols])
        if door is not None and door.on_left == on_left:
            _paint_door(rgb, z, h, z / cam.focal, door, light)
        out[:, :, cols] += rgb * fraction(all_rows, owned, slice(0, height), cols, walls=True)[None]

    all_cols = [np.ones(width, dtype=bool)] * 2

    # Floor: planks or tiles, with a pool of daylight in front of the window.
    owned = [(s < 0) & (d < room.depth) for s, d in zip(sub_y, vertical, strict=True)]
    rows = _span(owned[0] | owned[1])
    z = (room.floor / sy[rows])[:, None]
    x = sx[None, :] * z
    across = z / cam.focal  # world size of a pixel across the line of sight
    along = z * across / -room.floor  # floor pixels stretch along z with distance
    texture = _wood_floor if rng.random() < 0.65 else _tile_floor
    rgb = texture(rng, x - room.left, z, across, along)
    glow_width = 0.6 * (window.x1 - window.x0) + 0.3
    glow = np.exp(-(((x - window_x) / glow_width) ** 2) - ((room.depth - 0.9 - z) / 1.3) ** 2)
    light = 0.84 + 0.08 * z / room.depth + (0.35 if window.h0 < 0.5 else 0.2) * glow
    light *= _ambient_occlusion(x - room.left, 0.3) * _ambient_occlusion(room.right - x, 0.3)
    light *= _ambient_occlusion(room.depth - z, 0.3)
    out[:, rows, :] += rgb * (light * fraction(owned, all_cols, rows, slice(0, width), walls=False))[None]

    # Ceiling, darker towards the camera, sometimes with a light fitting.
    owned = [(s > 0) & (d < room.depth) for s, d in zip(sub_y, vertical, strict=True)]
    rows = _span(owned[0] | owned[1])
    z = (room.ceiling / sy[rows])[:, None]
    x = sx[None, :] * z
    light = (0.8 + 0.14 * z / room.depth) * _ambient_occlusion(room.depth - z, 0.2)
    light = light * _ambient_occlusion(x - room.left, 0.2) * _ambient_occlusion(room.right - x, 0.2)
    rgb = _planar(ceiling_colour) * light[None]
    if rng.random() < 0.6:
        lamp_x, lamp_z = room.left + room_w * rng.uniform(0.4, 0.6), room.depth * rng.uniform(0.55, 0.7)
        r = np.hypot(x - lamp_x, z - lamp_z)
        fp = z * z / (cam.focal * room.ceiling)  # ceiling pixels stretch along z like the floor's
        rim = 1.0 - 0.2 * _band(r - 0.175, 0.03, fp)
        disc = _coverage(0.16 - r, fp)[None]
        rgb = rgb * rim[None] * (1.0 - disc) + _F32(0.97) * disc
    out[:, rows, :] += rgb * fraction(owned, all_cols, rows, slice(0, width), walls=False)[None]
    return out


def _structure_classes(room: _Room, cam: _Camera, window: _Window, door: _Door | None) -> np.ndarray:
    """ADE20K class of the room surface each pixel centre sees (what _paint_room shades there)."""
    sx = (np.arange(cam.width, dtype=np.float32) + 0.5 - cam.cx) / cam.focal
    sy = -(np.arange(cam.height, dtype=np.float32) + 0.5 - cam.cy) / cam.focal
    with np.errstate(divide="ignore"):
        side = np.where(sx < 0, room.left / sx, room.right / sx)[None, :]
        vertical = np.where(sy < 0, room.floor / sy, room.ceiling / sy)[:, None]
    floor_or_ceiling = np.where(sy < 0, FLOOR, CEILING)[:, None]
    classes = np.where(side < vertical, WALL, floor_or_ceiling)
    back = (side >= room.depth) & (vertical >= room.depth)
    classes = np.where(back, WALL, classes).astype(np.uint8)

    x = sx[None, :] * room.depth
    h = sy[:, None] * room.depth - room.floor
    in_window = (x >= window.x0) & (x <= window.x1) & (h >= window.h0) & (h <= window.h1)
    classes[back & in_window] = WINDOWPANE
    if door is not None:
        wall_x = room.left if door.on_left else room.right
        on_wall = ~back & (side < vertical) & ((sx < 0) if door.on_left else (sx > 0))[None, :]
        with np.errstate(divide="ignore"):
            z = (wall_x / sx)[None, :]
        h = sy[:, None] * z - room.floor
        in_door = (z > door.z0 - _ARCHITRAVE) & (z < door.z1 + _ARCHITRAVE) & (h < door.height + _ARCHITRAVE)
        classes[on_wall & in_door] = DOOR
    return classes


def _paint_window(
    rgb: np.ndarray,
    x: np.ndarray,
    h: np.ndarray,
    grain: np.ndarray,
    window: _Window,
    trim: Colour,
    rng: np.random.Generator,
) -> None:
    """Paint the window into the back wall's planar RGB; x is a row vector, h a column."""
    cols = _span((x[0] > window.x0 - 0.06) & (x[0] < window.x1 + 0.06))
    rows = _span((h[:, 0] > window.h0 - 0.05) & (h[:, 0] < window.h1))
    sub, wx, wh, grain = rgb[:, rows, cols], x[:, cols], h[rows, :], grain[rows, cols]
    bar = 0.06
    if window.h0 > 0.3:
        sill = (wh > window.h0 - 0.05) & (wh < window.h0) & np.ones_like(wx, dtype=bool)
        for channel in range(3):
            np.copyto(sub[channel], _F32(min(trim[channel] * 1.02, 1.0)), where=sill)
    inside = (wx >= window.x0) & (wx <= window.x1) & (wh >= window.h0) & (wh <= window.h1)
    t = np.clip((wh - window.h0) / (window.h1 - window.h0), 0.0, 1.0)
    # Interior exposure blows the sky out to near white, with a hint of blue up high.
    zenith, horizon = _planar((0.80, 0.90, 1.0)), _planar((0.99, 1.0, 1.0))
    glass = np.broadcast_to(horizon + (zenith - horizon) * (t**1.5)[None], (3, *inside.shape))
    if window.trees:
        phase = rng.uniform(0, 2 * np.pi, 3).tolist()
        treeline = 0.28 + 0.06 * np.sin(wx * 5.0 + phase[0]) + 0.04 * np.sin(wx * 13.0 + phase[1])
        leaves = _planar((0.52, 0.64, 0.45)) * (1.0 + 0.08 * np.sin(wx * 31.0 + phase[2]) + 0.05 * grain)[None]
        glass = np.where((t < treeline)[None], leaves, glass)
    edge = _nearest(wx - window.x0, window.x1 - wx, wh - window.h0, window.h1 - wh)
    frame = edge < bar
    if window.mullion:
        frame |= np.abs(wx - 0.5 * (window.x0 + window.x1)) < 0.35 * bar
    if window.transom is not None:
        frame |= np.abs(wh - window.transom) < 0.025
    # The frame's inner edge reads as a reveal: slightly shaded.
    frame_shade = np.where((edge > 0.6 * bar) & (edge < bar), _F32(0.85), _F32(1.0))
    glass = np.where(frame[None], _planar(window.frame) * frame_shade[None], glass)
    for channel in range(3):
        np.copyto(sub[channel], glass[channel], where=inside)


def _paint_door(rgb: np.ndarray, z: np.ndarray, h: np.ndarray, fp: np.ndarray, door: _Door, light: np.ndarray) -> None:
    """Paint a closed panelled door into a side wall's planar RGB; z and fp are row vectors."""
    cols = _span((z[0] > door.z0 - _ARCHITRAVE) & (z[0] < door.z1 + _ARCHITRAVE))
    sub, dz, dh, fp = rgb[:, :, cols], z[:, cols], h[:, cols], fp[:, cols]
    lit = np.broadcast_to(light, h.shape)[:, cols]
    # The door's vertical edges fall on pixel columns; only the tops are slanted
    # in the image and need soft coverage.
    trim = _coverage(door.height + _ARCHITRAVE - dh, fp)
    sub *= 1.0 - trim[None]
    sub += _planar(door.trim) * (1.02 * lit * trim)[None]
    leaf = ((dz > door.z0) & (dz < door.z1)) * _coverage(door.height - dh, fp)
    # Two recessed panels, outlined darker like moulded door panels.
    shade = lit.copy()
    inset_z0, inset_z1 = door.z0 + 0.12, door.z1 - 0.12
    for p0, p1 in ((0.15, 0.95), (1.15, door.height - 0.15)):
        panel = (dz > inset_z0) & (dz < inset_z1) & (dh > p0) & (dh < p1)
        inner = (dz > inset_z0 + 0.02) & (dz < inset_z1 - 0.02) & (dh > p0 + 0.02) & (dh < p1 - 0.02)
        shade[panel & ~inner] *= 0.8
    colour = _planar(door.leaf) * shade[None]
    handle = (np.abs(dz - (door.z0 + 0.08)) < 0.025) & (np.abs(dh - 1.0) < 0.05)
    colour = np.where(handle[None], _F32(0.25), colour)
    sub *= 1.0 - leaf[None]
    sub += colour * leaf[None]


def _wood_floor(
    rng: np.random.Generator, x: np.ndarray, z: np.ndarray, across: np.ndarray, along: np.ndarray
) -> np.ndarray:
    base = _planar(_pick(rng, _WOOD_FLOORS, 0.05))
    plank_w, plank_l = rng.uniform(0.12, 0.22), rng.uniform(1.0, 2.0)
    offsets = rng.random(64).astype(np.float32)
    tones = rng.normal(0.0, 1.0, 257).astype(np.float32)
    phases = rng.uniform(0.0, 2 * np.pi, 64).astype(np.float32)
    col = np.floor(x / plank_w).astype(np.int64)
    length = z / plank_l + offsets[col % 64]
    row = np.floor(length).astype(np.int64)
    tone = 1.0 + 0.08 * tones[(col * 31 + row * 17) % 257]
    # Grain runs along the plank; fade it out where it is finer than a sample.
    grain_freq = 28.0
    fade = np.clip(1.0 - 2.0 * across * grain_freq, 0.0, 1.0)
    grain = 1.0 + 0.05 * fade * np.sin(2 * np.pi * grain_freq * x + 2.5 * np.sin(1.3 * z + phases[col % 64]))
    seam = np.maximum(
        _line_coverage(x, plank_w, 0.004, across),
        _line_coverage(length, 1.0, 0.004 / plank_l, along / plank_l),
    )
    return base * (tone * grain * (1.0 - 0.5 * seam))[None]


def _tile_floor(
    rng: np.random.Generator, x: np.ndarray, z: np.ndarray, across: np.ndarray, along: np.ndarray
) -> np.ndarray:
    base = _planar(_pick(rng, _TILE_FLOORS, 0.03))
    size = rng.uniform(0.3, 0.6)
    grout = base * rng.uniform(0.65, 0.8)
    tones = rng.normal(0.0, 1.0, 257).astype(np.float32)
    ix, iz = np.floor(x / size).astype(np.int64), np.floor(z / size).astype(np.int64)
    tile = base * (1.0 + 0.04 * tones[(ix * 31 + iz * 17) % 257])[None]
    line = np.maximum(_line_coverage(x, size, 0.006, across), _line_coverage(z, size, 0.006, along))[None]
    return tile * (1.0 - line) + grout * line


def _layout(rng: np.random.Generator, kind: str, room: _Room, cam: _Camera, door: _Door | None) -> list[_Piece]:
    """Place up to four pieces for a room kind, skipping any that would collide."""
    taken: list[tuple[float, float, float, float]] = []
    if door is not None:
        # Keep the door's swing clear, as any furnished room would.
        x = (room.left, room.left + 1.0) if door.on_left else (room.right - 1.0, room.right)
        taken.append((x[0], x[1], door.z0 - 0.1, door.z1 + 0.1))
    pieces: list[_Piece] = []
    limit = int(rng.integers(1, 5))
    # Nearest floor depth inside the frame; pieces may be cut by the bottom
    # edge a little, as in real photos, but not stand behind the camera.
    near_floor = cam.focal * -room.floor / (cam.height - cam.cy)

    def place(piece: _Piece | None) -> _Piece | None:
        if piece is None or len(pieces) >= limit:
            return None
        x0, x1, z0, z1 = piece.footprint
        inside = x0 >= room.left and x1 <= room.right and z1 <= room.depth and z0 >= max(0.5 * near_floor, 1.2)
        clear = all(x1 + 0.05 < a or x0 - 0.05 > b or z1 + 0.05 < c or z0 - 0.05 > d for a, b, c, d in taken)
        if inside and clear:
            taken.append(piece.footprint)
            pieces.append(piece)
            return piece
        return None

    width = room.right - room.left
    back = room.depth - 0.03
    side = bool(rng.random() < 0.5)

    # Back-wall pieces keep out of the door's swing so the main piece survives.
    lo = room.left + (1.05 if door is not None and door.on_left else 0.2)
    hi = room.right - (1.05 if door is not None and not door.on_left else 0.2)

    def against_back(w: float) -> float:
        return rng.uniform(lo, max(lo, hi - w))

    if kind == "living":
        sofa_w = min(rng.uniform(1.7, 2.4), width - 0.6)
        sofa = place(_sofa(rng, against_back(sofa_w), sofa_w, back) if rng.random() < 0.9 else None)
        if sofa is not None and rng.random() < 0.75:
            tw, td = rng.uniform(0.8, 1.2), rng.uniform(0.5, 0.65)
            tz1 = sofa.footprint[2] - rng.uniform(0.35, 0.5)
            tx0 = 0.5 * (sofa.footprint[0] + sofa.footprint[1]) - tw / 2 + rng.uniform(-0.15, 0.15)
            place(_table(rng, tx0, tw, tz1 - td, tz1, rng.uniform(0.38, 0.46)))
        z1 = rng.uniform(room.depth - 2.0, room.depth - 1.0)
        arm_x = room.left + 0.15 if side else room.right - 1.05
        place(_sofa(rng, arm_x, rng.uniform(0.8, 0.95), z1, armchair=True) if rng.random() < 0.5 else None)
        place(_plant(rng, room.right - 0.45 if side else room.left + 0.45, back - 0.35) if rng.random() < 0.5 else None)
        place(_side_cabinet(rng, room, not side, tall=False) if rng.random() < 0.4 else None)
    elif kind == "bedroom":
        single = rng.random() < 0.2
        bed_w = rng.uniform(0.9, 1.0) if single else min(rng.uniform(1.4, 1.8), width - 1.2)
        bed_x = against_back(bed_w)
        bed = place(_bed(rng, bed_x, bed_w, back))
        if bed is not None and rng.random() < 0.8:
            for x0 in (bed.footprint[0] - 0.5, bed.footprint[1] + 0.05):
                place(_cabinet(rng, x0, 0.45, back - 0.4, back, 0.5, doors=0, drawers=2))
        place(_side_cabinet(rng, room, side, tall=True) if rng.random() < 0.5 else None)
        place(_plant(rng, room.left + 0.4 if side else room.right - 0.4, back - 0.3) if rng.random() < 0.3 else None)
    else:
        tw, td = min(rng.uniform(1.3, 1.8), width - 1.6), rng.uniform(0.8, 0.95)
        tz1 = room.depth - rng.uniform(1.0, 1.6)
        tx0 = room.left + 0.5 * (width - tw) + rng.uniform(-0.3, 0.3)
        table = place(_table(rng, tx0, tw, tz1 - td, tz1, 0.75))
        if table is not None:
            x0, x1, z0, z1 = table.footprint
            chair = _pick(rng, _WOODS + _FABRICS, 0.04)
            if rng.random() < 0.5:
                for cx, facing in ((x0 - 0.5, 1), (x1 + 0.05, -1)):
                    place(_chair(rng, cx, 0.5 * (z0 + z1) - 0.22, chair, facing_x=facing))
            else:
                for cx in (x0 + 0.15, x1 - 0.6):
                    place(_chair(rng, cx, z1 + 0.05, chair, facing_x=0))
        sw = rng.uniform(1.2, 1.8)
        place(_cabinet(rng, against_back(sw), sw, back - 0.45, back, rng.uniform(0.75, 0.9), doors=3, drawers=0))
        place(_plant(rng, room.left + 0.4 if side else room.right - 0.4, back - 0.3) if rng.random() < 0.5 else None)
    return pieces


def _piece(parts: Sequence[_Box | _Blob], kind: str) -> _Piece:
    boxes = [p for p in parts if isinstance(p, _Box)]
    return _Piece(
        kind=kind,
        parts=tuple(parts),
        footprint=(
            min(b.x0 for b in boxes),
            max(b.x1 for b in boxes),
            min(b.z0 for b in boxes),
            max(b.z1 for b in boxes),
        ),
        height=max(b.h1 for b in boxes),
    )


def _legs(x0: float, x1: float, z0: float, z1: float, height: float, size: float, colour: Colour) -> list[_Box]:
    return [
        _Box(x, x + size, 0.0, height, z, z + size, colour, layer=0, texture=0.0)
        for x in (x0, x1 - size)
        for z in (z0, z1 - size)
    ]


def _sofa(rng: np.random.Generator, x0: float, w: float, z1: float, *, armchair: bool = False) -> _Piece:
    fabric = _pick(rng, _FABRICS)
    depth = rng.uniform(0.82, 0.95)
    z0 = z1 - depth
    leg, seat, top = rng.uniform(0.06, 0.14), rng.uniform(0.4, 0.46), rng.uniform(0.78, 0.9)
    arm_w, arm_h = rng.uniform(0.12, 0.22), rng.uniform(0.55, 0.65)
    x1 = x0 + w
    parts: list[_Box | _Blob] = _legs(x0 + 0.05, x1 - 0.05, z0 + 0.05, z1 - 0.05, leg, 0.04, _pick(rng, _WOODS[:4]))
    base_top = seat - 0.12
    parts += [
        _Box(x0, x0 + arm_w, leg, arm_h, z0, z1, fabric, layer=1, texture=0.025),
        _Box(x1 - arm_w, x1, leg, arm_h, z0, z1, fabric, layer=1, texture=0.025),
        _Box(x0 + arm_w, x1 - arm_w, leg, base_top, z0, z1, fabric, layer=1, texture=0.025),
        _Box(x0 + arm_w, x1 - arm_w, base_top, top, z1 - 0.2, z1, fabric, layer=2, texture=0.025),
    ]
    inner = x1 - x0 - 2 * arm_w
    count = 1 if armchair or inner < 1.1 else (2 if inner < 1.7 else 3)
    cushion = inner / count
    for i in range(count):
        cx0 = x0 + arm_w + i * cushion
        parts.append(_Box(cx0, cx0 + cushion, base_top, seat, z0, z1 - 0.34, fabric, layer=3, texture=0.03))
        parts.append(_Box(cx0, cx0 + cushion, base_top, top - 0.05, z1 - 0.34, z1 - 0.2, fabric, layer=3, texture=0.03))
    return _piece(parts, "armchair" if armchair else "sofa")


def _table(rng: np.random.Generator, x0: float, w: float, z0: float, z1: float, height: float) -> _Piece:
    wood = _pick(rng, _WOODS)
    legs = _pick(rng, _WOODS) if rng.random() < 0.3 else wood
    top = rng.uniform(0.03, 0.05)
    parts: list[_Box | _Blob] = _legs(x0 + 0.04, x0 + w - 0.04, z0 + 0.04, z1 - 0.04, height - top, 0.05, legs)
    parts.append(_Box(x0, x0 + w, height - top, height, z0, z1, wood, layer=1, texture=0.015))
    return _piece(parts, "coffee table" if height < 0.6 else "table")


def _chair(rng: np.random.Generator, x0: float, z0: float, colour: Colour, *, facing_x: int) -> _Piece:
    size, seat = 0.45, 0.46
    x1, z1 = x0 + size, z0 + size
    parts: list[_Box | _Blob] = _legs(x0 + 0.02, x1 - 0.02, z0 + 0.02, z1 - 0.02, seat - 0.04, 0.035, colour)
    parts.append(_Box(x0, x1, seat - 0.04, seat, z0, z1, colour, layer=1, texture=0.02))
    # The back stands on the side away from the table.
    if facing_x > 0:
        back = _Box(x0, x0 + 0.04, seat, 0.9, z0, z1, colour, layer=2)
    elif facing_x < 0:
        back = _Box(x1 - 0.04, x1, seat, 0.9, z0, z1, colour, layer=2)
    else:
        back = _Box(x0, x1, seat, 0.9, z1 - 0.04, z1, colour, layer=2)
    parts.append(back)
    return _piece(parts, "chair")


def _bed(rng: np.random.Generator, x0: float, w: float, z1: float) -> _Piece:
    length = rng.uniform(2.0, 2.15)
    x1, z0 = x0 + w, z1 - length
    frame = _pick(rng, _WOODS + _FABRICS[:3])
    linen = _pick(rng, _LINENS, 0.01)
    duvet = _pick(rng, _LINENS + _FABRICS, 0.03)
    board_h = rng.uniform(0.95, 1.25)
    parts: list[_Box | _Blob] = [
        _Box(x0 - 0.03, x1 + 0.03, 0.0, board_h, z1 - 0.08, z1, frame, layer=0, texture=0.03),
        _Box(x0, x1, 0.0, 0.32, z0, z1 - 0.08, frame, layer=0, texture=0.03),
        _Box(x0 + 0.02, x1 - 0.02, 0.32, 0.52, z0 + 0.02, z1 - 0.08, linen, layer=1, texture=0.01),
        _Box(x0 - 0.02, x1 + 0.02, 0.27, 0.56, z0 - 0.02, z1 - 0.62, duvet, layer=2, texture=0.03),
    ]
    if rng.random() < 0.6:
        throw = _pick(rng, _FABRICS)
        parts.append(_Box(x0 - 0.03, x1 + 0.03, 0.25, 0.58, z0 + 0.12, z0 + 0.5, throw, layer=3, texture=0.03))
    count = 1 if w < 1.2 else 2
    pillow = (w - 0.1) / count
    for i in range(count):
        px0 = x0 + 0.05 + i * pillow
        parts.append(_Box(px0 + 0.02, px0 + pillow - 0.02, 0.52, 0.68, z1 - 0.55, z1 - 0.12, linen, layer=3))
    return _piece(parts, "bed")


def _cabinet(
    rng: np.random.Generator, x0: float, w: float, z0: float, z1: float, height: float, *, doors: int, drawers: int
) -> _Piece:
    """Low cabinet against the back wall, doors or drawers on its front face."""
    colour = _pick(rng, _WOODS)
    leg = rng.uniform(0.0, 0.12)
    x1 = x0 + w
    lines: list[tuple[Point3, Point3]] = []
    for i in range(1, doors):
        xs = x0 + w * i / doors
        lines.append(((xs, leg + 0.02, z0), (xs, height - 0.02, z0)))
    for i in range(1, drawers):
        hs = leg + (height - leg) * i / drawers
        lines.append(((x0 + 0.02, hs, z0), (x1 - 0.02, hs, z0)))
    for i in range(max(drawers, 1)):
        hs = leg + (height - leg) * (i + 0.5) / max(drawers, 1)
        lines.append(((0.5 * (x0 + x1) - 0.06, hs, z0), (0.5 * (x0 + x1) + 0.06, hs, z0)))
    body = _Box(x0, x1, leg, height, z0, z1, colour, layer=1, texture=0.015, lines=tuple(lines))
    parts: list[_Box | _Blob] = [body]
    if leg > 0.03:
        parts += _legs(x0 + 0.03, x1 - 0.03, z0 + 0.03, z1 - 0.03, leg, 0.035, _jitter(rng, _scaled(colour, 0.5)))
    return _piece(parts, "chest of drawers" if drawers else "cabinet")


def _side_cabinet(rng: np.random.Generator, room: _Room, on_left: bool, *, tall: bool) -> _Piece:
    """Wardrobe (tall) or sideboard against a side wall, doors on its room-facing side."""
    if tall:
        depth, length, height = 0.6, rng.uniform(1.0, 1.8), rng.uniform(1.95, 2.2)
        z1 = room.depth - rng.uniform(0.05, 0.8)
    else:
        depth, length, height = 0.45, rng.uniform(1.0, 1.6), rng.uniform(0.5, 0.85)
        z1 = room.depth - rng.uniform(0.3, 1.2)
    x0 = room.left if on_left else room.right - depth
    front_x = x0 + depth if on_left else x0
    z0 = z1 - length
    doors = max(2, round(length / 0.5))
    lines = [
        ((front_x, 0.05, z0 + length * i / doors), (front_x, height - 0.03, z0 + length * i / doors))
        for i in range(1, doors)
    ]
    for i in range(doors):
        zc = z0 + length * (i + 0.5) / doors
        lines.append(((front_x, 0.5 * height - 0.08, zc), (front_x, 0.5 * height + 0.08, zc)))
    colour = _pick(rng, _WOODS)
    box = _Box(x0, x0 + depth, 0.0, height, z0, z1, colour, texture=0.015, lines=tuple(lines))
    return _piece([box], "wardrobe" if tall else "cabinet")


def _plant(rng: np.random.Generator, x: float, z: float) -> _Piece:
    pot, pot_h = rng.uniform(0.28, 0.4), rng.uniform(0.3, 0.45)
    crown = rng.uniform(0.9, 1.5)
    clay = _pick(rng, ((0.70, 0.42, 0.30), (0.90, 0.90, 0.88), (0.25, 0.25, 0.26)))
    leaf = _pick(rng, ((0.22, 0.40, 0.20), (0.30, 0.45, 0.25), (0.18, 0.33, 0.24)))
    parts: list[_Box | _Blob] = [_Box(x - pot / 2, x + pot / 2, 0.0, pot_h, z - pot / 2, z + pot / 2, clay)]
    # Foliage starts on the pot rim and fans out towards the top.
    for _ in range(int(rng.integers(10, 16))):
        up = rng.random()
        radius = rng.uniform(0.09, 0.17)
        parts.append(
            _Blob(
                x + rng.normal(0.0, 0.06 + 0.16 * up),
                pot_h + 0.06 + up * max(crown - pot_h - 0.06 - radius, 0.0),
                z + rng.normal(0.0, 0.06),
                radius,
                _jitter(rng, leaf, 0.12),
            )
        )
    return _piece(parts, "plant")


def _draw_piece(painter: _Painter, cam: _Camera, room: _Room, piece: _Piece, light_x: float) -> None:
    painter.piece_class = _ADE20K_ID[piece.kind]
    # Within one piece: lower layers first, then far to near, then outside in,
    # which is a correct painter's order for the adjacent boxes we build.
    for part in sorted(piece.parts, key=lambda p: (p.layer, -p.near, -abs(p.centre_x))):
        if isinstance(part, _Blob):
            u, v = painter.canvas(cam.project((part.x, room.floor + part.h, part.z)))
            painter.ellipse((u, v), part.radius * cam.focal * _SS / part.z, part.colour, 0.06)
        else:
            _draw_box(painter, cam, room.floor, part, light_x)


def _draw_box(painter: _Painter, cam: _Camera, floor: float, box: _Box, light_x: float) -> None:
    y0, y1 = floor + box.h0, floor + box.h1

    def quad(*corners: Point3) -> list[tuple[float, float]]:
        return [painter.canvas(cam.project(c)) for c in corners]

    x0, x1, z0, z1 = box.x0, box.x1, box.z0, box.z1
    # Daylight comes from the window behind the furniture: tops are brightest,
    # fronts face away from it, and the side turned towards it is lit better.
    lit_left = light_x < box.centre_x
    if x0 > 0:
        shade = 0.85 if lit_left else 0.66
        painter.polygon(
            quad((x0, y0, z0), (x0, y0, z1), (x0, y1, z1), (x0, y1, z0)), box.colour, shade, shade * 0.88, box.texture
        )
    if x1 < 0:
        shade = 0.66 if lit_left else 0.85
        painter.polygon(
            quad((x1, y0, z0), (x1, y0, z1), (x1, y1, z1), (x1, y1, z0)), box.colour, shade, shade * 0.88, box.texture
        )
    if y1 < 0:
        painter.polygon(
            quad((x0, y1, z0), (x1, y1, z0), (x1, y1, z1), (x0, y1, z1)), box.colour, 1.04, 0.98, box.texture
        )
    painter.polygon(quad((x0, y0, z0), (x1, y0, z0), (x1, y1, z0), (x0, y1, z0)), box.colour, 0.82, 0.7, box.texture)
    for a, b in box.lines:
        painter.line(quad((a[0], floor + a[1], a[2]), (b[0], floor + b[1], b[2])), _scaled(box.colour, 0.45), width=2)


def _shadow_alpha(pieces: Sequence[_Piece], room: _Room, cam: _Camera, light_x: float) -> np.ndarray:
    """Soft furniture shadows on floor and walls as darkening in [0, 1), output resolution.

    Each shadow is blurred in its own crop padded by three blur radii, so
    pixels beyond stay exactly zero and the empty room shows through unchanged.
    """
    alpha = np.zeros((cam.height, cam.width), dtype=np.float32)
    f = room.floor

    def add(points: Sequence[Point3], blur: float, strength: float) -> None:
        uv = [cam.project(p) for p in points]
        radius = max(blur * cam.focal / min(p[2] for p in points), 0.6)
        pad = int(3 * radius) + 2
        left, top = int(min(u for u, _ in uv)) - pad, int(min(v for _, v in uv)) - pad
        right, bottom = int(max(u for u, _ in uv)) + pad + 1, int(max(v for _, v in uv)) + pad + 1
        u0, v0, u1, v1 = max(left, 0), max(top, 0), min(right, cam.width), min(bottom, cam.height)
        if u1 <= u0 or v1 <= v0:
            return
        layer = Image.new("L", (right - left, bottom - top), 0)
        ImageDraw.Draw(layer).polygon([(u - left - 0.5, v - top - 0.5) for u, v in uv], fill=255)
        soft = np.asarray(layer.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
        region = alpha[v0:v1, u0:u1]
        region += soft[v0 - top : v1 - top, u0 - left : u1 - left] * (strength / 255.0) * (1.0 - region)

    def on_floor(x: float, z: float) -> Point3:
        return min(max(x, room.left), room.right), f, min(z, room.depth)

    for piece in pieces:
        x0, x1, z0, z1 = piece.footprint
        # Light from the back-wall window throws shadows towards the camera,
        # skewed sideways by where the piece stands relative to the window.
        reach = 0.12 + 0.25 * piece.height
        lateral = ((x0 + x1) / 2 - light_x) / max(room.depth - (z0 + z1) / 2, 0.5)
        skew = reach * min(max(lateral, -1.0), 1.0)
        e = 0.04
        cast = [(x0 - e, z1 + e), (x1 + e, z1 + e), (x1 + e + skew, z0 - reach), (x0 - e + skew, z0 - reach)]
        add([on_floor(x, z) for x, z in cast], 0.1, 0.3)
        # Contact shadow: darker and tight, where the piece meets the floor.
        contact = [(x0 - 0.02, z1 + 0.02), (x1 + 0.02, z1 + 0.02), (x1 + 0.02, z0 - 0.02), (x0 - 0.02, z0 - 0.02)]
        add([on_floor(x, z) for x, z in contact], 0.03, 0.45)
        # Pieces against a wall also shade the wall behind them a little.
        top = f + piece.height + 0.04
        if z1 > room.depth - 0.06:
            add([(x, y, room.depth) for x, y in ((x0 - e, f), (x1 + e, f), (x1 + e, top), (x0 - e, top))], 0.06, 0.22)
        for wall_x, touches in ((room.left, x0 < room.left + 0.06), (room.right, x1 > room.right - 0.06)):
            if touches:
                add([(wall_x, y, z) for z, y in ((z0 - e, f), (z1 + e, f), (z1 + e, top), (z0 - e, top))], 0.06, 0.22)
    return alpha


def _photo_finish(rng: np.random.Generator, width: int, height: int) -> Callable[[np.ndarray], np.ndarray]:
    """Camera response applied per pixel to both images, so it cannot break their equality."""
    exposure = rng.uniform(0.95, 1.08)
    white_balance = (1.0 + rng.normal(0.0, 0.015, 3)).astype(np.float32)
    vignette = rng.uniform(0.12, 0.3)
    across = ((np.arange(width, dtype=np.float32) + 0.5) / width * 2.0 - 1.0) ** 2
    down = ((np.arange(height, dtype=np.float32) + 0.5) / height * 2.0 - 1.0) ** 2
    falloff = exposure * (1.0 - 0.5 * vignette * (across[None, :] + down[:, None]))
    gain = falloff[None] * white_balance[:, None, None]
    grain = rng.standard_normal((height, width), dtype=np.float32) * _F32(0.002)

    def finish(planar: np.ndarray) -> np.ndarray:
        rgb = np.round(np.clip(planar * gain + grain, 0.0, 1.0) * 255.0).astype(np.uint8)
        return np.ascontiguousarray(rgb.transpose(1, 2, 0))

    return finish
