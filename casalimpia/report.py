"""``report.html``: a self-contained contact sheet of a de-furnishing run, readable offline.

Thumbnails are embedded as base64 JPEG, so the file can be mailed or opened straight from object
storage. It shows the run's counts, a sample of photos (input, mask overlay, output) and the
failed photos with their reasons.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from casalimpia import storage
from casalimpia.config import RANDOM_WEIGHTS
from casalimpia.images import ImageDecodeError, decode_image, decode_mask
from casalimpia.toy import BANNER, uses_toy

if TYPE_CHECKING:
    from casalimpia.config import DefurnishConfig
    from casalimpia.pipeline import Summary

THUMBNAIL = 320
MAX_FAILED_LISTED = 200
MASK_TINT = np.array([255, 40, 90], dtype=np.float32)


def thumbnail(rgb: np.ndarray) -> str:
    """A small JPEG of rgb as a data: URI, so the page needs no other file."""
    image = Image.fromarray(rgb)
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def overlay(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """rgb with the mask's pixels tinted, to show what was removed."""
    tinted = rgb.astype(np.float32)
    tinted[mask] = 0.45 * tinted[mask] + 0.55 * MASK_TINT
    return tinted.astype(np.uint8)


def _sample_cells(config: DefurnishConfig, row: dict[str, Any]) -> list[str]:
    """Thumbnails for one photo; a file that cannot be read back shows as a note, not an error."""
    limit = config.decode.max_pixels
    try:
        source = decode_image(
            storage.read_bytes(storage.join(config.input, row["source"])), max_pixels=limit, min_side=1
        )
        output = decode_image(
            storage.read_bytes(storage.join(config.output, row["output"])), max_pixels=limit, min_side=1
        )
        tinted = source
        if row["mask"]:
            mask = decode_mask(
                storage.read_bytes(storage.join(config.output, row["mask"])), size=(source.shape[1], source.shape[0])
            )
            tinted = overlay(source, mask)
    except (storage.StorageError, ImageDecodeError) as error:
        return [f'<td colspan="3">cannot show: {html.escape(str(error))}</td>']
    return [f'<td><img src="{thumbnail(image)}"></td>' for image in (source, tinted, output)]


def render_report(config: DefurnishConfig, rows: list[dict[str, Any]], summary: Summary) -> str:
    """The report as an HTML string."""
    ok = [row for row in rows if row["status"] in ("ok", "skipped") and row["output"]]
    # Photos with the most furniture first: they show what the run did.
    sample = sorted(ok, key=lambda row: -row["mask_fraction"])[: config.report_samples]
    # The most furniture left first: those need a human soonest.
    review = sorted(
        (row for row in rows if row["status"] == "review"), key=lambda row: -(row.get("residual") or math.inf)
    )
    failed = [row for row in rows if row["status"] == "failed"]
    warning = ""
    if random := {config.masking.model, config.inpaint.model} & set(RANDOM_WEIGHTS):
        warning = (
            f'<p class="warn">Made with <b>{html.escape("/".join(sorted(random)))}</b>: models with random '
            "weights, for tests, demos and benchmarks. Masks and outputs are noise, not de-furnished rooms.</p>"
        )
    elif uses_toy(config.masking.model, config.inpaint.model, config.inpaint.lora):
        warning = f'<p class="warn">Made with the <b>toy</b> preset: {html.escape(BANNER)}.</p>'

    counts = "".join(
        f"<tr><th>{status}</th><td>{sum(row['status'] == status for row in rows)}</td></tr>"
        for status in ("ok", "review", "failed", "skipped")
    )
    sample_rows = "".join(
        f"<tr><td class='name'>{html.escape(row['source'])}<br>mask {row['mask_fraction']:.1%}</td>"
        + "".join(_sample_cells(config, row))
        + "</tr>"
        for row in sample
    )
    review_rows = "".join(
        f"<tr><td class='name'>{html.escape(row['source'])}<br>{html.escape(row['error'])}</td>"
        + "".join(_sample_cells(config, row))
        + "</tr>"
        for row in review[: config.report_samples]
    )
    review_section = (
        f"<h2>For review ({len(review)}, {min(len(review), config.report_samples)} shown)</h2>"
        f"<table><tr><th>photo</th><th>input</th><th>mask</th><th>output</th></tr>{review_rows}</table>"
        if review
        else ""
    )
    failed_rows = "".join(
        f"<tr><td class='name'>{html.escape(row['source'])}</td><td>{html.escape(row['error'])}</td></tr>"
        for row in failed[:MAX_FAILED_LISTED]
    )
    more = (
        f"<p>and {len(failed) - MAX_FAILED_LISTED} more in the manifest.</p>" if len(failed) > MAX_FAILED_LISTED else ""
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>casalimpia report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
td, th {{ border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; text-align: left; }}
img {{ max-width: {THUMBNAIL}px; display: block; }}
.name {{ font-family: monospace; max-width: 16em; word-break: break-all; }}
.warn {{ background: #fff3cd; border: 1px solid #e0c36c; padding: 0.6em; }}
</style></head><body>
<h1>casalimpia de-furnishing report</h1>
{warning}
<p>input <code>{html.escape(config.input)}</code> &rarr; output <code>{html.escape(config.output)}</code>,
config hash <code>{html.escape(config.config_hash())}</code></p>
<table>{counts}<tr><th>this run</th><td>{html.escape(summary.line())}</td></tr></table>
<h2>Sample ({len(sample)} of {len(ok)} done photos)</h2>
<table><tr><th>photo</th><th>input</th><th>mask</th><th>output</th></tr>{sample_rows}</table>
{review_section}
<h2>Failed ({len(failed)})</h2>
<table><tr><th>photo</th><th>reason</th></tr>{failed_rows}</table>{more}
</body></html>
"""


def write_report(config: DefurnishConfig, rows: list[dict[str, Any]], summary: Summary) -> str:
    """Write OUTPUT/report.html and return its URI."""
    uri = storage.join(config.output, "report.html")
    storage.write_bytes(uri, render_report(config, rows, summary).encode())
    return uri
