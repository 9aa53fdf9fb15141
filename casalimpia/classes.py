"""ADE20K's 150 semantic classes and the removal presets built from them.

Ids are 0-indexed, as in the transformers OneFormer/Mask2Former ADE20K configs. The masking stage
maps names to ids through the loaded model's own ``id2label`` and refuses a model whose labels
lack a class the policy names, so a differently indexed checkpoint cannot remove the wrong class.
"""

from __future__ import annotations

ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step",
    "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)  # fmt: skip

STRUCTURE: tuple[str, ...] = (
    "wall", "floor", "ceiling", "windowpane", "door", "column", "stairs", "screen door",
    "stairway", "bannister", "step",
)  # fmt: skip
"""The room itself: never removed, whatever the policy says."""

MOVABLE: tuple[str, ...] = (
    "bed", "cabinet", "table", "plant", "chair", "painting", "sofa", "shelf", "mirror", "rug",
    "armchair", "seat", "desk", "wardrobe", "lamp", "cushion", "box", "chest of drawers",
    "pillow", "bookcase", "coffee table", "book", "bench", "computer", "television receiver",
    "ottoman", "buffet", "poster", "stool", "basket", "bag", "blanket", "sculpture", "vase", "fan",
    "monitor", "clock",
)  # fmt: skip
"""What leaves with the owner: the default removal set."""

BUILTIN: tuple[str, ...] = (
    "curtain", "bathtub", "counter", "sink", "fireplace", "refrigerator", "blind", "toilet",
    "countertop", "stove", "kitchen island", "light", "chandelier", "oven", "microwave",
    "dishwasher", "sconce", "shower", "radiator",
)  # fmt: skip
"""Fixtures that usually stay with the property: removed only when asked."""

PRESETS: dict[str, tuple[str, ...]] = {"movable": MOVABLE, "movable+builtin": MOVABLE + BUILTIN}


def normalize_label(label: str) -> str:
    """Canonical form of a class name: some label files carry trailing spaces or capitals."""
    return label.strip().lower()


def check_class_names(names: list[str]) -> list[str]:
    """The names that are not ADE20K classes."""
    known = set(ADE20K_CLASSES)
    return [name for name in names if normalize_label(name) not in known]


def removal_classes(preset: str, remove: list[str], keep: list[str]) -> list[str]:
    """Class names to remove: the preset plus `remove`, minus `keep` and the room's structure."""
    chosen = dict.fromkeys(PRESETS[preset] + tuple(normalize_label(n) for n in remove))
    excluded = {normalize_label(n) for n in keep} | set(STRUCTURE)
    return [name for name in chosen if name not in excluded]


IGNORE_LABEL = 255
"""Label-map value of pixels nobody labelled: no training loss or score sees them."""


CLASS_SEPARATOR = ","
"""Joins class names into one string column: it survives Ray Data's arrow blocks whatever the
number of names, where a column of lists can turn into a fixed-shape tensor or a list<null>."""


def join_class_names(names: list[str]) -> str:
    """Class names as one string ('' for none); no ADE20K name contains the separator."""
    return CLASS_SEPARATOR.join(names)


def split_class_names(joined: str) -> list[str]:
    """The class names of a string made by join_class_names."""
    return joined.split(CLASS_SEPARATOR) if joined else []
