"""Synthetic rooms with exact ground truth: the offline stand-in for a labelled catalogue.

Real listing photos never come with the empty room next to them, so testing, evaluating and
training furniture segmentation and inpainting needs rooms we build ourselves.
:mod:`casalimpia.synthetic.render` draws one room (furnished photo, empty twin, furniture mask,
ADE20K class map, shadow map); :mod:`casalimpia.synthetic.files` writes them as the folders the
jobs read. Seeds at or above :data:`HELD_OUT_SEED` are held out: nothing shipped is trained or
tuned on them.
"""

from casalimpia.synthetic.files import (
    demo_room,
    demo_room_path,
    main,
    write_demo_rooms,
    write_room_pairs,
    write_segmentation_pairs,
)
from casalimpia.synthetic.render import HELD_OUT_SEED, SyntheticRoom, render_room

__all__ = [
    "HELD_OUT_SEED",
    "SyntheticRoom",
    "demo_room",
    "demo_room_path",
    "main",
    "render_room",
    "write_demo_rooms",
    "write_room_pairs",
    "write_segmentation_pairs",
]
