"""Measure throughput: the inpainting stage alone, the whole de-furnishing job, and a naive baseline.

python jobs/bench.py --config configs/bench.yaml             # full-size models with random weights, on a GPU
python jobs/bench.py --config configs/bench_demo.yaml        # tiny models on the CPU, offline

Writes a JSON record under the config's output folder and appends a row to BENCHMARKS.md.
Run it on the machine whose GPU is measured: the stage alone and the baseline run in this process.
"""

import argparse
import sys
from pathlib import Path

# `python jobs/bench.py` puts jobs/ first on sys.path; the library sits one level up
# (and is not pip-installed on a cluster that only received the working directory).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from casalimpia import configure_logging
from casalimpia.bench import run
from casalimpia.config import BenchConfig, ConfigError, add_config_arguments, config_from_args
from casalimpia.pipeline import JobError, connect


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="two batches and no scaling sweep: checks it runs")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        config = config_from_args(args, BenchConfig, quick=True if args.quick else None)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    connect(config.ray.address)
    try:
        record = run(config)
    except JobError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    job, stage, baseline = record["job"], record["stage"], record["baseline"]
    print(f"device: {record['device']['name']} ({record['device']['dtype']})")
    steady = _format(job["steady_images_per_second"])
    print(
        f"job: {job['images_per_second']:.2f} images/s over {job['photos']} photos, {steady} once started "
        f"({job['painted']} photos painted, mean mask {job['mean_mask_fraction']:.1%})"
    )
    print(f"stage alone: {stage['images_per_second']:.2f} images/s; job efficiency {_format(job['efficiency'])}")
    for variant in stage["variants"]:
        payback = variant["payback_images"]
        print(
            f"stage with {variant['name']}: {variant['images_per_second']:.2f} images/s "
            f"({variant['speedup']:.2f}x), warm-up {variant['warmup_seconds']:.1f}s vs {stage['warmup_seconds']:.1f}s, "
            + ("never pays back" if payback is None else f"pays back after {payback:,.0f} images")
        )
    host = record["host"]
    print(
        f"host work off the painting actors: crop {host['crop_ms_per_image']:.1f} ms, "
        f"blend {host['blend_ms_per_image']:.1f} ms per image"
    )
    write = record["write"]
    for kind in ("baseline", "progressive"):
        print(
            f"writing a {write['megapixels']:.0f} MP {kind} JPEG: {write[kind]['blocks_ms']:.0f} ms with only the "
            f"masked blocks re-encoded, {write[kind]['encode_ms']:.0f} ms re-encoded whole "
            f"({write[kind]['blocks_over_encode']:.1f}x); outside_changed check {write[kind]['check_ms']:.0f} ms"
        )
    print(f"masking alone: {record['masking']['images_per_second']:.2f} images/s")
    print(
        f"naive baseline: {baseline['images_per_second']:.3f} images/s; job speed-up {_format(baseline['job_speedup'])}"
    )
    if gpu := record["gpu"]:
        cost = _format(gpu["cost_per_1000"])
        print(f"gpu: UNet MFU {_format(gpu['unet_mfu'])}, peak {gpu['peak_memory_gb']:.1f} GB, $/1,000 images {cost}")
    for row in record["scaling"]:
        print(
            f"scaling: {row['photos']} photos: plan {row['plan_seconds']:.2f}s, run {row['run_seconds']:.1f}s "
            f"({row['seconds_per_image']:.3f} s/image, {_format(row['steady_seconds_per_image'])} once started), "
            f"rerun {row['rerun_seconds']:.1f}s"
        )
    print(f"record: {record['path']}")
    return 0


def _format(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
