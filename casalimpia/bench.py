"""Throughput benchmark: how fast the inpainting stage paints, how close the whole job comes to it,
and how far both are from the naive way of calling diffusers.

One run measures, on whatever device is present:

    job       read, decode, mask, crop, inpaint, blend, write on Ray Data over ``photos`` synthetic JPEGs
    stage     the Inpainter alone, in this process, on the crops of the same photos and the job's masks;
              optionally again with each of ``variants``' speed settings switched on
    host      the CPU work the job keeps off the painting actors, per image: cropping and blending back
    write     writing one painted 12 MP JPEG as the job does (only the masked blocks re-encoded) against
              a whole re-encode, for a baseline 4:2:0 and a progressive 4:4:4 input
    masking   the FurnitureMasker alone on the same photos, to size the two pools against each other
    baseline  diffusers' pipeline called once per photo in fp32: no Ray, no batching, no crop
    gpu       on a GPU: the UNet's model FLOP utilisation, peak memory, cost per 1,000 images
    scaling   optionally, the whole job over catalogues of several sizes: plan, run and resume costs

The job runs first so that the stage alone paints exactly the masks the job painted: a segmenter
with random weights may find no furniture in a photo, and an empty mask is copied, not painted.
Rates after warm-up are what a catalogue of millions sees: the stage and the baseline leave their
first call out, and the job's ``steady`` rate leaves out its start-up (actors, model loading).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import io
import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from casalimpia import storage
from casalimpia.config import BenchConfig, DefurnishConfig, to_yaml
from casalimpia.estimate import PaintingRate, append_rate, painting_key
from casalimpia.images import decode_image, decode_mask, encode_image, encode_mask
from casalimpia.inpainting import blend_painted, crop_for_painting, to_paint
from casalimpia.jpeg_blocks import replace_masked_blocks
from casalimpia.output_photos import changed_outside
from casalimpia.pipeline import execute, object_array, prepare, read_manifest
from casalimpia.synthetic import render_room

log = logging.getLogger(__name__)

# Dense bf16/fp16 tensor-core peaks (FLOP/s) by GPU name, for model FLOP utilisation.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}
RECORD_FIELDS = (
    "time",
    "device",
    "versions",
    "settings",
    "job",
    "stage",
    "host",
    "write",
    "masking",
    "baseline",
    "gpu",
    "scaling",
)
SCALING_PHOTO_SIZE = (128, 96)
MIN_STEADY_ARRIVALS = 4


def run(config: BenchConfig) -> dict[str, Any]:
    """Run every measurement the config asks for on the connected Ray cluster; returns the record."""
    from casalimpia.models import resolve_placement

    config = effective(config)
    placement = resolve_placement(config.ray.dtype)
    log.info("benchmarking on %s", placement.reason)
    root = os.path.abspath(config.output)
    os.makedirs(root, exist_ok=True)
    Path(root, "config.yaml").write_text(to_yaml(config))
    width, height = config.photo_size
    rooms = os.path.join(root, f"rooms-{width}x{height}")
    names = write_photos(rooms, config.photos, (width, height), seed=0)
    job = measure_job(config, rooms, os.path.join(rooms, "job"))
    if job["painted"] < job["photos"]:
        log.warning(
            "only %d of %d photos have furniture to paint: the rates overstate painting speed "
            "(set segment: false to paint the synthetic rooms' furniture)",
            job["painted"],
            job["photos"],
        )
    batches = load_batches(rooms, os.path.join(rooms, "job"), names, config.inpaint.batch_size)
    host, cropped = measure_host(config, batches)
    stage, gpu = measure_stage(config, cropped, placement)
    stage["variants"] = [measure_variant(config, cropped, name, stage, placement) for name in config.variants]
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": describe_device(placement),
        "versions": versions(),
        "settings": settings(config),
        "job": job,
        "stage": stage,
        "host": host,
        "write": measure_write(config),
        "masking": measure_masking(config, batches, placement),
        "baseline": measure_baseline(config, batches, placement),
        "gpu": gpu,
        "scaling": [measure_scale(config, size, os.path.join(root, f"scaling-{size}")) for size in config.scaling],
    }
    record["job"]["efficiency"] = ratio(job["steady_images_per_second"], stage["images_per_second"])
    record["baseline"]["job_speedup"] = ratio(job["steady_images_per_second"], record["baseline"]["images_per_second"])
    if gpu is not None:
        gpu["cost_per_1000"] = cost_per_1000(config, job["steady_images_per_second"])
    if config.rates and job["steady_images_per_second"]:
        append_rate(config.rates, painting_rate(config, record))
    path = os.path.join(root, f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json")
    Path(path).write_text(json.dumps(record, indent=2) + "\n")
    record["path"] = path
    if config.record:
        append_row(config.record, record)
    return record


def effective(config: BenchConfig) -> BenchConfig:
    """The config as run: quick mode keeps two batches, one baseline photo and no scaling sweep."""
    if not config.quick:
        return config
    return dataclasses.replace(config, photos=2 * config.inpaint.batch_size, baseline_photos=1, scaling=[])


def write_photos(root: str, count: int, size: tuple[int, int], seed: int) -> list[str]:
    """Synthetic furnished rooms as root/photos/*.jpg and their furniture masks as root/masks/*.jpg.png.

    Files already there are kept, so repeated runs time the same photos (a folder holds one size);
    returns the photo names, which sort in the order they were made.
    """
    names = [f"room_{i:05d}.jpg" for i in range(count)]
    for i, name in enumerate(names):
        photo, mask = Path(root, "photos", name), Path(root, "masks", f"{name}.png")
        if not (photo.exists() and mask.exists()):
            room = render_room(seed + i, *size)
            photo.parent.mkdir(parents=True, exist_ok=True)
            mask.parent.mkdir(parents=True, exist_ok=True)
            photo.write_bytes(encode_image(room.furnished, "jpeg", quality=90))
            mask.write_bytes(encode_mask(room.mask))
    return names


def job_config(config: BenchConfig, root: str, output_uri: str, photos: int) -> DefurnishConfig:
    """The de-furnishing job over the first ``photos`` of root/photos with the benchmark's settings.

    It overwrites, so every run paints every photo; without ``segment`` it reads root/masks. The
    limit leaves out photos an earlier, larger run left in the folder.
    """
    sections = {name: getattr(config, name) for name in ("decode", "masking", "inpaint", "write", "ray")}
    if not config.segment:
        sections["masking"] = dataclasses.replace(config.masking, masks=f"{root}/masks")
    return DefurnishConfig(
        input=f"{root}/photos", output=output_uri, overwrite=True, limit=photos, report_samples=0, **sections
    )


def measure_job(config: BenchConfig, root: str, output_uri: str) -> dict[str, Any]:
    """The whole job over root/photos: its overall rate, and its rate once started."""
    summary = execute(prepare(job_config(config, root, output_uri, config.photos)))
    rows = read_manifest(output_uri)
    fractions = [row["mask_fraction"] for row in rows if row["status"] == "ok"]
    return {
        "photos": summary.processed,
        "ok": summary.counts.get("ok", 0),
        "painted": sum(fraction > 0 for fraction in fractions),
        "mean_mask_fraction": float(np.mean(fractions)) if fractions else 0.0,
        "seconds": summary.seconds,
        "images_per_second": summary.images_per_second,
        "steady_images_per_second": steady_rate(summary.progress),
    }


def steady_rate(progress: list[tuple[float, int]]) -> float | None:
    """Photos per second after the first quarter of them arrived, which a catalogue of millions runs at.

    Leaving out the first quarter leaves out the start-up (actors, model loading) and the burst of
    rows that were already done when the first arrived. None when fewer than MIN_STEADY_ARRIVALS
    arrivals follow that mark: rows come a batch at a time, often several at once, and a rate over
    two or three arrivals measures those bursts, not the job.
    """
    if not progress:
        return None
    total = progress[-1][1]
    index = next(i for i, (_, done) in enumerate(progress) if done >= total / 4)
    if len(progress) - 1 - index < MIN_STEADY_ARRIVALS:
        return None
    (start, started_with), (end, _) = progress[index], progress[-1]
    return (total - started_with) / (end - start) if end > start else None


def load_batches(root: str, job_uri: str, names: list[str], batch_size: int) -> list[dict[str, np.ndarray]]:
    """The photos under root/photos decoded, with the masks the job wrote, in the batches the Inpainter takes."""
    batches = []
    for start in range(0, len(names), batch_size):
        sources = names[start : start + batch_size]
        images = [
            decode_image(storage.read_bytes(storage.join(root, "photos", name)), max_pixels=10**9, min_side=1)
            for name in sources
        ]
        masks = [
            decode_mask(storage.read_bytes(storage.join(job_uri, "masks", f"{name}.png")), size=image.shape[1::-1])
            for name, image in zip(sources, images, strict=True)
        ]
        batches.append(
            {
                "source": np.array(sources, dtype=object),
                "image": object_array(images),
                "error": np.array([""] * len(sources), dtype=object),
                "width": np.array([image.shape[1] for image in images]),
                "height": np.array([image.shape[0] for image in images]),
                "mask": object_array(masks),
                "mask_fraction": np.array([float(mask.mean()) for mask in masks]),
            }
        )
    return batches


def timed_rate(stage: Any, batches: list[dict[str, np.ndarray]]) -> tuple[float, float, float]:
    """Images per second of stage over the batches after the first, the seconds timed, and the first's seconds.

    The first batch is a warm-up (lazy initialisation, kernel selection, compilation); with a single
    batch, that batch is run again for the timing.
    """
    start = time.perf_counter()
    stage(batches[0])
    warmup = time.perf_counter() - start
    timed = batches[1:] or batches
    start = time.perf_counter()
    for batch in timed:
        stage(batch)
    seconds = time.perf_counter() - start
    return sum(len(batch["source"]) for batch in timed) / seconds, seconds, warmup


def measure_stage(
    config: BenchConfig, batches: list[dict[str, np.ndarray]], placement: Any
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The Inpainter alone on the cropped batches, with the config's speed settings; on a GPU also its
    FLOP utilisation and peak memory."""
    cuda = placement.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    inpainter = make_inpainter(config)
    rate, seconds, warmup = timed_rate(inpainter, batches)
    flops = unet_flops_per_image(inpainter.pipe, config)
    stage = {
        "images_per_second": rate,
        "seconds": seconds,
        "warmup_seconds": warmup,
        "unet_tflop_per_image": flops / 1e12,
    }
    gpu = None
    if cuda:
        peak = next((value for name, value in PEAK_FLOPS.items() if name in torch.cuda.get_device_name()), None)
        half = placement.dtype in (torch.bfloat16, torch.float16)
        gpu = {
            "unet_mfu": rate * flops / peak if peak and half else None,
            "peak_flops": peak,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
            "cost_per_1000": None,
        }
    del inpainter
    release_memory(cuda)
    return stage, gpu


def make_inpainter(config: BenchConfig) -> Any:
    """The Inpainter as the job's painting actors make it."""
    from casalimpia.inpainting import Inpainter

    resources = config.ray
    return Inpainter(
        config.inpaint,
        resources.dtype,
        channels_last=resources.channels_last,
        compile_unet=resources.compile_unet,
    )


def measure_variant(
    config: BenchConfig, batches: list[dict[str, np.ndarray]], name: str, stage: dict[str, Any], placement: Any
) -> dict[str, Any]:
    """The stage alone again with the speed settings ``name`` names switched on, against the plain stage.

    ``payback_images`` is how many images the faster rate takes to win back the longer warm-up (a
    compile, say): above a job's photos per actor the setting does not pay; None when it is not faster.
    """
    speed = dict.fromkeys(name.split("+"), True)
    switched = dataclasses.replace(config, variants=[], ray=dataclasses.replace(config.ray, **speed))
    inpainter = make_inpainter(switched)
    rate, seconds, warmup = timed_rate(inpainter, batches)
    del inpainter
    release_memory(placement.device.type == "cuda")
    saving = 1 / stage["images_per_second"] - 1 / rate
    extra = warmup - stage["warmup_seconds"]
    return {
        "name": name,
        "images_per_second": rate,
        "seconds": seconds,
        "warmup_seconds": warmup,
        "speedup": rate / stage["images_per_second"],
        "payback_images": max(0.0, extra / saving) if saving > 0 else None,
    }


def measure_host(
    config: BenchConfig, batches: list[dict[str, np.ndarray]]
) -> tuple[dict[str, Any], list[dict[str, np.ndarray]]]:
    """Milliseconds per painted image of the CPU work on either side of the painting actors, in one
    thread, and the cropped batches the painting stage takes.

    Blending is timed on the unpainted crops, which cost what painted ones do.
    """
    painted = max(1, sum(len(to_paint(batch)) for batch in batches))
    start = time.perf_counter()
    cropped = [crop_for_painting(batch, config=config.inpaint) for batch in batches]
    crop_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for batch in cropped:
        blend_painted({**batch, "painted": batch["model_image"]}, feather=config.inpaint.feather)
    blend_seconds = time.perf_counter() - start
    host = {"crop_ms_per_image": 1000 * crop_seconds / painted, "blend_ms_per_image": 1000 * blend_seconds / painted}
    return host, cropped


def measure_write(config: BenchConfig) -> dict[str, Any]:
    """Milliseconds to write one painted photo of ``write_photo_size`` as a JPEG, best of three (quick: one).

    ``blocks_ms`` is what the job's write task does with a JPEG (``replace_masked_blocks``: read the
    input's coefficients, re-encode the blocks the mask touches, write), ``encode_ms`` a whole
    re-encode of the painted pixels at ``write.quality``, what the job did before; ``check_ms`` is
    the decode that measures ``outside_changed``. The photo is a synthetic room scaled up, its
    furniture the mask.
    """
    width, height = config.write_photo_size
    room = render_room(0, max(64, width // 4), max(64, height // 4))
    photo = np.asarray(Image.fromarray(room.furnished).resize((width, height), Image.Resampling.BICUBIC))
    mask = np.asarray(Image.fromarray(room.mask).resize((width, height), Image.Resampling.NEAREST))
    painted = photo.copy()
    painted[mask] = photo[mask] // 2
    repeats = 1 if config.quick else 3
    record: dict[str, Any] = {"megapixels": width * height / 1e6, "mask_fraction": float(mask.mean())}
    inputs = {"baseline": {"subsampling": 2}, "progressive": {"subsampling": 0, "progressive": True}}
    for name, options in inputs.items():
        buffer = io.BytesIO()
        Image.fromarray(photo).save(buffer, "JPEG", quality=90, **options)
        original = buffer.getvalue()
        blocks = _best_of(repeats, lambda original=original: replace_masked_blocks(original, painted, mask))
        encode = _best_of(repeats, lambda: encode_image(painted, "jpeg", quality=config.write.quality))
        written = replace_masked_blocks(original, painted, mask)
        check = _best_of(repeats, lambda written=written: changed_outside(written, painted, mask))
        record[name] = {
            "blocks_ms": 1000 * blocks,
            "encode_ms": 1000 * encode,
            "check_ms": 1000 * check,
            "blocks_over_encode": blocks / encode,
        }
    return record


def _best_of(repeats: int, work: Any) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``work``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def unet_flops_per_image(pipe: Any, config: BenchConfig) -> float:
    """FLOPs the UNet spends on one image: one counted forward at the painting size, times its evaluations.

    Classifier-free guidance doubles the evaluations; strength below 1 skips the first steps.
    """
    from torch.utils.flop_counter import FlopCounterMode

    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)  # count the eager module, not a compiled wrapper
    side = config.inpaint.resolution // pipe.vae_scale_factor
    parameter = next(unet.parameters())
    sample = torch.zeros(1, unet.config.in_channels, side, side, device=parameter.device, dtype=parameter.dtype)
    context = torch.zeros(1, 77, unet.config.cross_attention_dim, device=parameter.device, dtype=parameter.dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(sample, torch.tensor([999], device=parameter.device), encoder_hidden_states=context)
    evaluations = math.ceil(config.inpaint.steps * config.inpaint.strength)
    guidance = 2 if config.inpaint.guidance_scale > 1 else 1
    return float(counter.get_total_flops()) * evaluations * guidance


def measure_masking(config: BenchConfig, batches: list[dict[str, np.ndarray]], placement: Any) -> dict[str, Any]:
    """The FurnitureMasker alone on the decoded photos."""
    from casalimpia.masking import FurnitureMasker

    masker = FurnitureMasker(config.masking, config.ray.dtype)
    unmasked = [
        {key: value for key, value in batch.items() if key not in ("mask", "mask_fraction")} for batch in batches
    ]
    rate, seconds, _ = timed_rate(masker, unmasked)
    del masker
    release_memory(placement.device.type == "cuda")
    return {"images_per_second": rate, "seconds": seconds}


def measure_baseline(config: BenchConfig, batches: list[dict[str, np.ndarray]], placement: Any) -> dict[str, Any]:
    """diffusers' pipeline in fp32, one whole photo at a time, as a first script would call it."""
    from casalimpia.models import Placement, load_inpainting_pipeline

    fp32 = Placement(placement.device, torch.float32, f"{placement.device} (fp32: the naive baseline)")
    pipe = load_inpainting_pipeline(config.inpaint.model, fp32)
    photos = [(batch["image"][i], batch["mask"][i]) for batch in batches for i in range(len(batch["source"]))]
    photos = photos[: config.baseline_photos + 1]
    paint_whole_photo(pipe, config.inpaint, *photos[0])
    timed = photos[1:] or photos
    start = time.perf_counter()
    for image, mask in timed:
        paint_whole_photo(pipe, config.inpaint, image, mask)
    seconds = time.perf_counter() - start
    del pipe
    release_memory(placement.device.type == "cuda")
    return {"images_per_second": len(timed) / seconds, "seconds": seconds, "photos": len(timed)}


def paint_whole_photo(pipe: Any, inpaint: Any, image: np.ndarray, mask: np.ndarray) -> None:
    from PIL import Image

    pipe(
        prompt=inpaint.prompt,
        negative_prompt=inpaint.negative_prompt,
        image=Image.fromarray(image),
        mask_image=Image.fromarray(mask.astype(np.uint8) * 255),
        height=inpaint.resolution,
        width=inpaint.resolution,
        num_inference_steps=inpaint.steps,
        guidance_scale=inpaint.guidance_scale,
        strength=inpaint.strength,
    )


def measure_scale(config: BenchConfig, size: int, root: str) -> dict[str, Any]:
    """The whole job over ``size`` small photos: planning (listing, resume check), the run, and a rerun."""
    names = write_photos(root, size, SCALING_PHOTO_SIZE, seed=1_000)
    job = job_config(config, root, os.path.join(root, "out"), size)
    start = time.perf_counter()
    plan = prepare(job)
    plan_seconds = time.perf_counter() - start
    summary = execute(plan)
    start = time.perf_counter()
    rerun = execute(prepare(dataclasses.replace(job, overwrite=False)))
    rerun_seconds = time.perf_counter() - start
    return {
        "photos": size,
        "plan_seconds": plan_seconds,
        "run_seconds": summary.seconds,
        "seconds_per_image": summary.seconds / size,
        "steady_seconds_per_image": ratio(1.0, steady_rate(summary.progress)),
        "rerun_seconds": rerun_seconds,
        "rerun_skipped": rerun.counts.get("skipped", 0) == len(names),
    }


def release_memory(cuda: bool) -> None:
    """Give the accelerator memory of a finished measurement back before the next one loads its models."""
    import gc

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def painting_rate(config: BenchConfig, record: dict[str, Any]) -> PaintingRate:
    """The job's steady rate as the entry --dry-run estimates from, with what it was measured with."""
    on_gpu = record["gpu"] is not None
    return PaintingRate(
        date=record["time"][:10],
        device=record["device"]["name"],
        model=config.inpaint.model,
        resolution=config.inpaint.resolution,
        steps=config.inpaint.steps,
        guided=painting_key(config.inpaint)[3],
        images_per_second=round(record["job"]["steady_images_per_second"], 4),
        devices=paid_gpus(config) if on_gpu else 1,
        price_per_hour=config.price_per_hour if on_gpu else None,
    )


def paid_gpus(config: BenchConfig) -> int:
    """Whole GPUs the job's pools hold (fixed pools: min = max)."""
    resources = config.ray
    gpus = (
        resources.masking_actors.min * resources.masking_gpus
        + resources.inpainting_actors.min * resources.inpainting_gpus
    )
    return max(1, math.ceil(gpus))


def cost_per_1000(config: BenchConfig, images_per_second: float | None) -> float | None:
    """Price of 1,000 images at the job's steady rate, paying for every GPU its pools hold (fixed: min = max)."""
    if not images_per_second:
        return None
    return paid_gpus(config) * config.price_per_hour * 1000 / (images_per_second * 3600)


def describe_device(placement: Any) -> dict[str, Any]:
    if placement.device.type == "cuda":
        properties = torch.cuda.get_device_properties(placement.device)
        name, memory = properties.name, properties.total_memory / 2**30
    else:
        name, memory = f"{platform.machine()} CPU, {os.cpu_count()} cores", None
    return {"name": name, "type": placement.device.type, "dtype": str(placement.dtype), "memory_gb": memory}


def versions() -> dict[str, str]:
    packages = ("casalimpia", "torch", "diffusers", "transformers", "ray")
    return {"python": platform.python_version(), **{name: importlib.metadata.version(name) for name in packages}}


def settings(config: BenchConfig) -> dict[str, Any]:
    inpaint, resources = config.inpaint, config.ray
    return {
        "inpaint_model": inpaint.model,
        "masking_model": config.masking.model if config.segment else "synthetic masks",
        "photos": config.photos,
        "photo_size": list(config.photo_size),
        "resolution": inpaint.resolution,
        "steps": inpaint.steps,
        "guidance_scale": inpaint.guidance_scale,
        "batch_size": inpaint.batch_size,
        "masking_batch_size": config.masking.batch_size,
        "dtype": resources.dtype,
        "channels_last": resources.channels_last,
        "compile_unet": resources.compile_unet,
        # Fixed pools (BenchConfig checks): min is the pool's size.
        "masking_actors": resources.masking_actors.min,
        "inpainting_actors": resources.inpainting_actors.min,
        "masking_gpus": resources.masking_gpus,
        "inpainting_gpus": resources.inpainting_gpus,
        "quick": config.quick,
    }


ROW_HEADER = (
    "| date | device | models | settings | job img/s (steady) | stage img/s | efficiency | masking img/s "
    "| baseline img/s | job / baseline | UNet MFU | peak GB | $ / 1,000 | versions |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
)


def append_row(path: str, record: dict[str, Any]) -> None:
    """Append the record's row to the table that ends the markdown file, starting the table if needed."""
    file = Path(path)
    text = file.read_text() if file.exists() else "# Benchmarks\n\n## Runs\n\n"
    if not text.endswith("\n"):
        text += "\n"
    if ROW_HEADER.splitlines()[0] not in text:
        text += ROW_HEADER
    file.write_text(text + table_row(record) + "\n")


def table_row(record: dict[str, Any]) -> str:
    settings_, job, gpu = record["settings"], record["job"], record["gpu"] or {}
    cells = [
        record["time"][:10],
        f"{record['device']['name']} ({record['device']['dtype'].removeprefix('torch.')})",
        f"{settings_['inpaint_model']} + {settings_['masking_model']}",
        f"{settings_['resolution']} px, {settings_['steps']} steps, cfg {settings_['guidance_scale']}, "
        f"batch {settings_['batch_size']}, {settings_['photos']} photos, actors: masking "
        f"{settings_['masking_actors']}, painting {settings_['inpainting_actors']}"
        + (" (quick)" if settings_["quick"] else ""),
        f"{job['images_per_second']:.2f} ({_number(job['steady_images_per_second'], '{:.2f}')})",
        f"{record['stage']['images_per_second']:.2f}",
        _number(job["efficiency"], "{:.2f}"),
        f"{record['masking']['images_per_second']:.2f}",
        f"{record['baseline']['images_per_second']:.3f}",
        _number(record["baseline"]["job_speedup"], "{:.1f}x"),
        _number(gpu.get("unet_mfu"), "{:.1%}"),
        _number(gpu.get("peak_memory_gb"), "{:.1f}"),
        _number(gpu.get("cost_per_1000"), "${:.3f}"),
        ", ".join(f"{name} {version}" for name, version in record["versions"].items()),
    ]
    return "| " + " | ".join(cells) + " |"


def _number(value: float | None, form: str) -> str:
    return "" if value is None else form.format(value)
