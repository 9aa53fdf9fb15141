"""The mask library: furniture masks and margin rings cut from furnished photos, for training pairs.

``jobs/masks.py`` runs the de-furnishing job's masking stage over furnished-room photos and keeps,
per photo, what the synthetic pairs are made of:

    OUTPUT/masks/<relative path>.png   the furniture mask (mode L, 0/255, photo size)
    OUTPUT/rings/<relative path>.png   the margin ring: the photo's real pixels in a band just outside
                                       the mask, as an RGBA cut-out, transparent elsewhere (only for
                                       photos whose ring has pixels; the index's ring is '' otherwise)
    OUTPUT/_manifest/*.parquet         the index, one row per input file (LIBRARY_SCHEMA)
    OUTPUT/config.yaml                 the resolved config

A ring pasted around a hole cut in an empty room borders it with what borders real furniture
masks (contact shadows, reflections, edges the dilation did not reach), so the model learns to
paint next to them.

Planning, resume, reading, masking and the manifest are the de-furnishing job's
(``casalimpia.pipeline``); this module brings the index schema, the checks and the write task. The
write task runs in many short-lived workers, so torch-based code is only imported on the driver.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image
from scipy import ndimage

from casalimpia import storage
from casalimpia.classes import split_class_names
from casalimpia.config import TINY, MaskLibraryConfig
from casalimpia.images import encode_mask
from casalimpia.pipeline import (
    Plan,
    Summary,
    absolute_uri,
    check_masking,
    list_input,
    masked_photos,
    pin_masking,
    plan_run,
    run_plan,
)

log = logging.getLogger(__name__)

LIBRARY_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("mask", pa.string()),
        ("ring", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("mask_fraction", pa.float64()),
        ("classes", pa.list_(pa.string())),
        ("seconds_mask", pa.float64()),
        ("config_hash", pa.string()),
    ]
)


def library_row(source: str, config_hash: str, **values: Any) -> dict[str, Any]:
    """An index row with every column, defaults for those not given."""
    row = {
        "source": source,
        "mask": "",
        "ring": "",
        "status": "failed",
        "error": "",
        "width": 0,
        "height": 0,
        "mask_fraction": 0.0,
        "classes": [],
        "seconds_mask": 0.0,
        "config_hash": config_hash,
    }
    row.update(values)
    return row


def margin_ring(image: np.ndarray, mask: np.ndarray, width: int) -> np.ndarray:
    """The band of photo pixels at Euclidean distance (0, width] px outside the mask, as (H, W, 4) RGBA uint8.

    Ring pixels carry the photo's RGB and alpha 255; every other pixel is all zero (transparent and
    black, which PNG compresses to almost nothing).
    """
    ring = np.zeros((*mask.shape, 4), dtype=np.uint8)
    if width <= 0 or not mask.any():
        return ring
    # Distance of every pixel to the nearest mask pixel; mask pixels themselves are at 0.
    distance = ndimage.distance_transform_edt(~mask)
    band = (distance > 0) & (distance <= width)
    ring[band, :3] = image[band]
    ring[band, 3] = 255
    return ring


def encode_ring(ring: np.ndarray) -> bytes:
    """Encode an (H, W, 4) uint8 RGBA ring as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(ring, "RGBA").save(buffer, "PNG")
    return buffer.getvalue()


def prepare(config: MaskLibraryConfig) -> Plan:
    """Check the job can run and decide what to do; raises JobError with one line otherwise."""
    # Ray workers do not share the driver's working directory: pin local paths now.
    config = dataclasses.replace(
        config,
        input=absolute_uri(config.input),
        output=absolute_uri(config.output),
        masking=pin_masking(config.masking),
    )
    files = list_input(config.input)
    check_masking(config.masking)
    return plan_run(config, files, library_row, file_columns=("mask", "ring"))


def write_masks_and_rings(batch: dict[str, np.ndarray], *, output_uri: str, ring: int, config_hash: str) -> pa.Table:
    """CPU task: write each photo's mask and margin ring and return its index rows, without pixels."""
    rows = []
    for i, source in enumerate(batch["source"]):
        error = batch["error"][i]
        row = library_row(
            source,
            config_hash,
            width=int(batch["width"][i]),
            height=int(batch["height"][i]),
            mask_fraction=float(batch["mask_fraction"][i]),
            classes=split_class_names(str(batch["classes"][i])),
            seconds_mask=float(batch["seconds_mask"][i]),
        )
        if not error:
            try:
                mask = np.asarray(batch["mask"][i], dtype=bool)
                cut_out = margin_ring(batch["image"][i], mask, ring)
                # No ring pixels (ring 0, an empty mask, a mask covering the photo): no file to paste.
                if cut_out[..., 3].any():
                    row["ring"] = f"rings/{source}.png"
                    storage.write_bytes(storage.join(output_uri, row["ring"]), encode_ring(cut_out))
                row["mask"] = f"masks/{source}.png"
                storage.write_bytes(storage.join(output_uri, row["mask"]), encode_mask(mask))
                row["status"] = "ok"
            except (storage.StorageError, OSError, ValueError) as exc:
                error = f"write failed: {str(exc).splitlines()[0][:200]}"
        if error:
            row.update(status="failed", error=error, mask="", ring="", classes=[])
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=LIBRARY_SCHEMA)


def build_dataset(plan: Plan) -> Any:
    """The lazy Ray Dataset of index rows for the photos to do."""
    config = plan.config
    return masked_photos(plan, rows_per_block=config.masking.batch_size).map_batches(
        write_masks_and_rings,
        fn_kwargs={"output_uri": config.output, "ring": config.ring, "config_hash": plan.config_hash},
        batch_size=config.masking.batch_size,
        num_cpus=config.ray.io_cpus,
    )


def execute(plan: Plan) -> Summary:
    """Run the plan on the connected Ray cluster; writes masks, rings, the index and config.yaml."""
    masking = plan.config.masking
    if masking.masks is None and masking.model == TINY:
        log.warning("the tiny preset is in use: random weights, the masks are noise (for tests and demos)")
    return run_plan(plan, build_dataset, LIBRARY_SCHEMA)
