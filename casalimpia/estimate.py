"""What a de-furnishing run will cost, from painting rates the benchmark measured.

``jobs/bench.py`` appends one entry per run to ``RATES`` (shipped in the package): the device, the
date, the painting settings that set the cost of a photo (model, resolution, steps, whether
guidance doubles the UNet's batch), the job's steady rate on that machine and the devices it paid
for. ``estimate_lines`` turns the entries that match a config into device-hours and money for the
photos a run has to do, one line per device measured; with none it says which measurement is
missing rather than guessing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from casalimpia.config import InpaintConfig
from casalimpia.progress import format_duration

RATES = Path(__file__).parent / "data" / "painting_rates.yaml"


@dataclass(frozen=True)
class PaintingRate:
    """One benchmark run's steady rate, and what it was measured with."""

    date: str
    device: str
    """The device as the benchmark named it, e.g. 'NVIDIA H100 80GB HBM3' or 'x86_64 CPU, 2 cores'."""
    model: str
    resolution: int
    steps: int
    guided: bool
    """Classifier-free guidance on (guidance_scale > 1): the UNet paints each photo twice per step."""
    images_per_second: float
    """The whole job's steady rate on the machine."""
    devices: int
    """GPUs the measured run paid for; 1 for a CPU machine."""
    price_per_hour: float | None
    """Price of one device-hour the benchmark was given; None on a CPU machine."""

    def matches(self, inpaint: InpaintConfig) -> bool:
        return (self.model, self.resolution, self.steps, self.guided) == painting_key(inpaint)


def painting_key(inpaint: InpaintConfig) -> tuple[str, int, int, bool]:
    """The settings that set what painting a photo costs (a fused LoRA costs what the base does)."""
    return inpaint.model, inpaint.resolution, inpaint.steps, inpaint.guidance_scale > 1


def read_rates(path: str | Path = RATES) -> list[PaintingRate]:
    """The measured rates in a rates file; none when it does not exist."""
    file = Path(path)
    entries = yaml.safe_load(file.read_text()) if file.exists() else None
    return [PaintingRate(**entry) for entry in entries or []]


def append_rate(path: str | Path, rate: PaintingRate) -> None:
    """Add one measured rate to a rates file, creating it if needed."""
    entries = [asdict(entry) for entry in [*read_rates(path), rate]]
    Path(path).write_text(yaml.safe_dump(entries, sort_keys=False))


def estimate_lines(inpaint: InpaintConfig, photos: int, rates: list[PaintingRate]) -> list[str]:
    """Device-hours and cost of painting ``photos`` with ``inpaint``, per device a matching rate was measured on."""
    model, resolution, steps, guided = painting_key(inpaint)
    matching = [rate for rate in rates if rate.matches(inpaint)]
    if not matching:
        return [
            f"estimate: no measured rate for {model} at {resolution} px, {steps} steps, guidance "
            f"{'on' if guided else 'off'}: run jobs/bench.py with these settings on the device you will use "
            "(BENCHMARKS.md)"
        ]
    lines = []
    for rate in matching:
        seconds = photos / rate.images_per_second
        device_hours = seconds * rate.devices / 3600
        price = rate.price_per_hour
        cost = "" if price is None else f", ${device_hours * price:,.2f} at ${price:g} per device-hour"
        lines.append(
            f"estimate on {rate.device} ({rate.images_per_second:.2f} images/s once started on {rate.devices} "
            f"device{'s' if rate.devices > 1 else ''}, measured {rate.date}): {photos:,} photos take "
            f"{format_duration(seconds)} there plus start-up, {device_hours:,.2f} device-hours{cost}"
        )
    return lines
