"""The bulk de-furnishing job on Ray Data.

``prepare`` does everything that can fail for a whole-job reason (bad URI, unknown model, nothing
to read) on the driver before any Ray work starts, and splits the catalogue into photos to do and
photos already done. ``execute`` streams the photos to do through

    read + decode (CPU tasks) -> FurnitureMasker pool -> crop (CPU tasks) -> Inpainter pool
    -> blend + encode + write (CPU tasks)

and collects the small manifest rows on the driver, persisting them as it goes, so an interrupted
run resumes from what was written. Every listed file ends as exactly one manifest row.

Faults: Ray Data replaces an actor that dies (out of memory, lost node) and resubmits the batch it
held, and reruns a task whose worker died; its defaults already retry without limit (Ray 2.60
deprecates setting them per stage). Redoing a batch is harmless: every photo is painted with its own
seed and every write replaces its object atomically, so a redone photo is byte for byte the same.

The mask library job (``casalimpia.training.library``) shares the rest: planning (``plan_run``),
reading and masking (``masked_photos``), the manifest (``ManifestWriter``, ``read_manifest``) and the
driver loop (``run_plan``); each job brings its own manifest schema, checks and write task.

The read and write functions run as Ray tasks in many short-lived workers, so this module imports
torch-based code (models, stages) only inside the driver functions that need it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from casalimpia import configure_logging, faults, storage
from casalimpia.config import (
    MANIFEST_EVERY,
    RANDOM_WEIGHTS,
    TOY,
    ActorPoolConfig,
    DecodeConfig,
    DefurnishConfig,
    MaskingConfig,
    RayConfig,
    to_yaml,
)
from casalimpia.images import ImageDecodeError, decode_image, encode_mask, output_format, with_suffix
from casalimpia.output_photos import encode_output
from casalimpia.progress import Interrupted, Progress, Stopped, stop_on_signals
from casalimpia.toy import BANNER, uses_toy

log = logging.getLogger(__name__)

MANIFEST_DIR = "_manifest"
MANIFEST_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("output", pa.string()),
        ("mask", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("mask_fraction", pa.float64()),
        ("seconds_mask", pa.float64()),
        ("seconds_inpaint", pa.float64()),
        ("residual", pa.float64()),
        ("outside_changed", pa.float64()),
        ("config_hash", pa.string()),
    ]
)
DONE = ("ok", "skipped", "review")
"""Statuses of photos whose output is written; a rerun skips them."""
MAX_INPUT_BLOCKS = 4096


class JobError(RuntimeError):
    """A job that cannot start; the message is one line for the user."""


class PhotoJobConfig(Protocol):
    """What the shared pieces need of a job's config: DefurnishConfig and MaskLibraryConfig have it."""

    input: str
    output: str
    overwrite: bool
    limit: int | None
    manifest_every: int
    progress_every: float
    decode: DecodeConfig
    masking: MaskingConfig
    ray: RayConfig

    def config_hash(self) -> str: ...


NewRow = Callable[..., dict[str, Any]]
"""Builds one manifest row of a job's schema: ``new_row(source, config_hash, **values)``, failed by default."""


def manifest_row(source: str, config_hash: str, **values: Any) -> dict[str, Any]:
    """A manifest row with every column, defaults for those not given."""
    row = {
        "source": source,
        "output": "",
        "mask": "",
        "status": "failed",
        "error": "",
        "width": 0,
        "height": 0,
        "mask_fraction": 0.0,
        "seconds_mask": 0.0,
        "seconds_inpaint": 0.0,
        "residual": None,
        "outside_changed": None,
        "config_hash": config_hash,
    }
    row.update(values)
    return row


def unsafe_path_reason(relative: str) -> str | None:
    """Why a listed relative path must not be written under the output, or None when it is safe."""
    parts = relative.split("/")
    if relative.startswith("/") or any(part in ("", ".", "..") for part in parts):
        return f"unsafe path {relative!r}: absolute or contains empty, '.' or '..' components"
    if any(ord(char) < 32 for char in relative):
        return f"unsafe path {relative!r}: contains control characters"
    return None


@dataclass
class Plan:
    """What one run will do, decided on the driver before any Ray work."""

    config: Any
    """The job's config (DefurnishConfig, MaskLibraryConfig), its local paths made absolute."""
    config_hash: str
    run_id: str
    todo: list[str]
    """Relative paths of the photos to process."""
    settled: list[dict[str, Any]] = field(default_factory=list)
    """Manifest rows decided without processing: skipped (done before) and refused files."""

    def lines(self) -> list[str]:
        """What the run will do: photos to process, done before, refused with their reasons counted."""
        done = sum(row["status"] in DONE for row in self.settled)
        reasons = Counter(refusal_kind(row["error"]) for row in self.settled if row["status"] not in DONE)
        lines = [
            f"{len(self.todo):,} photos to process, {done:,} done before, {sum(reasons.values()):,} refused "
            f"(config {self.config_hash}, run {self.run_id})"
        ]
        lines += [f"  refused: {count:,} {reason}" for reason, count in reasons.most_common()]
        return lines


def refusal_kind(error: str) -> str:
    """An error's kind without its particulars: 'unsafe path' for "unsafe path 'a/../b': ..."."""
    return re.split(r"[:('\"]", error, maxsplit=1)[0].strip() or error


def prepare(config: DefurnishConfig, *, dry_run: bool = False) -> Plan:
    """Check the job can run and decide what to do; raises JobError with one line otherwise.

    ``dry_run`` writes nothing: the output is only read (for photos already done), not probed.
    """
    # Ray workers do not share the driver's working directory: pin local paths now.
    lora = config.inpaint.lora
    config = dataclasses.replace(
        config,
        input=absolute_uri(config.input),
        output=absolute_uri(config.output),
        masking=pin_masking(config.masking),
        inpaint=dataclasses.replace(
            config.inpaint, model=absolute_model(config.inpaint.model), lora=lora and absolute_lora(lora)
        ),
    )
    files = list_input(config.input)
    check_masking(config.masking)
    if config.qa.max_residual is not None and config.masking.masks is not None:
        check_model(config.masking.model, "masking.model (used by qa.max_residual)")
    check_model(config.inpaint.model, "inpaint.model")
    if config.inpaint.lora is not None:
        check_lora(config.inpaint.lora)
    # The image is written last: its presence is what marks a photo done.
    return plan_run(config, files, manifest_row, file_columns=("output",), probe_output=not dry_run)


def plan_run(
    config: PhotoJobConfig,
    files: list[str],
    new_row: NewRow,
    file_columns: tuple[str, ...],
    *,
    probe_output: bool = True,
) -> Plan:
    """Check the output is writable, refuse unsafe and unsupported files, apply the limit, split off done photos.

    ``probe_output`` False skips the writability check, which writes (and deletes) a probe file.

    ``files`` are the input's relative paths. A photo counts as done when the output holds an ok or
    skipped row of it with this config's hash and every file its ``file_columns`` name (see
    ``completed_rows``); done photos become skipped rows unless ``config.overwrite`` is set.
    """
    if probe_output:
        try:
            storage.ensure_writable(config.output)
        except storage.StorageError as error:
            raise JobError(f"output: {error}") from None

    config_hash = config.config_hash()
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    settled: list[dict[str, Any]] = []
    photos: list[str] = []
    for relative in files:
        reason = unsafe_path_reason(relative)
        if reason is None and PurePosixPath(relative).suffix.lower() not in config.decode.suffixes:
            reason = f"unsupported file type (accepted: {', '.join(config.decode.suffixes)})"
        if reason is None:
            photos.append(relative)
        else:
            settled.append(new_row(relative, config_hash, error=reason))
    if config.limit is not None:
        photos = photos[: config.limit]
    done = {} if config.overwrite else completed_rows(config.output, config_hash, file_columns)
    todo = [relative for relative in photos if relative not in done]
    # A photo flagged for review stays flagged: its output is the same until someone looks at it.
    settled += [
        {**done[relative], **({} if done[relative]["status"] == "review" else {"status": "skipped", "error": ""})}
        for relative in photos
        if relative in done
    ]
    return Plan(config, config_hash, run_id, todo, settled)


def list_input(uri: str) -> list[str]:
    """The relative paths of every file under the input URI; raises JobError when there are none."""
    try:
        # Every file gets a row: hidden and underscored names are photos like any other, and keys that
        # could climb out of the output (a/../b) are listed too, for plan_run to refuse in the manifest.
        files = storage.list_files(uri, everything=True)
    except storage.StorageError as error:
        raise JobError(f"input: {error}") from None
    if not files:
        raise JobError(f"input: no files under {uri}")
    return files


def pin_masking(masking: MaskingConfig) -> MaskingConfig:
    """The masking section with a local model folder and the user's masks folder made absolute."""
    masks = masking.masks
    return dataclasses.replace(masking, model=absolute_model(masking.model), masks=masks and absolute_uri(masks))


def check_masking(masking: MaskingConfig) -> None:
    """The segmentation model, or the user's masks folder, is there; raises JobError otherwise."""
    if masking.masks is None:
        check_model(masking.model, "masking.model")
        return
    try:
        storage.list_files(masking.masks)
    except storage.StorageError as error:
        raise JobError(f"masking.masks: {error}") from None


def absolute_uri(uri: str) -> str:
    """s3:// URIs as they are; local paths and file:// URIs as absolute local paths."""
    return uri if storage.is_s3(uri) else os.path.abspath(uri.removeprefix("file://"))


def absolute_model(reference: str) -> str:
    """A model reference that names an existing local folder, made absolute; hub ids as they are."""
    return os.path.abspath(reference) if os.path.isdir(reference) else reference


def absolute_lora(reference: str) -> str:
    """A LoRA reference with its local path made absolute; the toy preset's as it is."""
    return reference if reference == TOY else absolute_uri(reference)


def check_model(reference: str, role: str) -> None:
    """The model can be loaded (hub cache, folder, s3:// prefix or tiny); raises JobError naming role."""
    from casalimpia.models import ModelUnavailableError, check_available

    try:
        check_available(reference, role)
    except ModelUnavailableError as error:
        raise JobError(str(error)) from None


def check_lora(uri: str, key: str = "inpaint.lora") -> None:
    """A LoRA folder or .safetensors file is at uri; raises JobError naming the config key otherwise."""
    if uri == TOY:
        return
    try:
        found = storage.exists(uri) if uri.endswith(".safetensors") else bool(storage.list_files(uri))
    except storage.StorageError as error:
        raise JobError(f"{key}: {error}") from None
    if not found:
        raise JobError(f"{key}: nothing at {uri}")


def read_manifest(output: str) -> list[dict[str, Any]]:
    """One row per source: the latest of the manifest parts under output, in order of first appearance.

    Parts are named by run, oldest first. A run persists every photo's row before it deletes the
    parts of earlier runs, so a driver killed in between leaves a source in two parts: the newer wins.
    """
    folder = storage.join(output, MANIFEST_DIR)
    try:
        parts = [p for p in storage.list_files(folder) if p.endswith(".parquet")]
    except storage.StorageError:
        return []
    rows = {row["source"]: row for part in sorted(parts) for row in storage.read_rows(storage.join(folder, part))}
    return list(rows.values())


def completed_rows(output: str, config_hash: str, file_columns: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Rows of photos already done with this config whose files are really there.

    ``file_columns`` name the row's columns that hold paths under output ('' when the row has no
    such file); each top-level folder they point into is listed once.
    """
    candidates = [row for row in read_manifest(output) if row["status"] in DONE and row["config_hash"] == config_hash]
    folders = {row[column].split("/", 1)[0] for row in candidates for column in file_columns if row[column]}
    written: set[str] = set()
    for folder in folders:
        try:
            written.update(f"{folder}/{path}" for path in storage.list_files(storage.join(output, folder)))
        except storage.StorageError:
            continue
    return {
        row["source"]: row
        for row in candidates
        if all(row[column] in written for column in file_columns if row[column])
    }


def read_and_decode(batch: dict[str, np.ndarray], *, input_uri: str, max_pixels: int, min_side: int) -> dict:
    """CPU task: fetch and decode each photo; failures become rows with an error, never exceptions.

    The file's bytes travel with the photo as ``file``: its output is made from them (see
    ``output_photos``), and reading them again at the end could find another photo under the name.
    """
    images, files, errors, widths, heights = [], [], [], [], []
    for source in batch["source"]:
        try:
            data = storage.read_bytes(storage.join(input_uri, source))
            image = decode_image(data, max_pixels=max_pixels, min_side=min_side)
            error = ""
        except (ImageDecodeError, storage.StorageError) as exc:
            image, data, error = np.zeros((0, 0, 3), dtype=np.uint8), b"", str(exc)
        images.append(image)
        files.append(data)
        errors.append(error)
        heights.append(image.shape[0])
        widths.append(image.shape[1])
    return {
        "source": batch["source"],
        "image": object_array(images),
        "file": np.array(files, dtype=object),
        "error": np.array(errors, dtype=object),
        "width": np.array(widths, dtype=np.int64),
        "height": np.array(heights, dtype=np.int64),
    }


def encode_and_write(
    batch: dict[str, np.ndarray],
    *,
    output_uri: str,
    fmt: str,
    quality: int,
    save_masks: bool,
    config_hash: str,
    max_residual: float | None = None,
) -> pa.Table:
    """CPU task: write each result (and its mask) and return the manifest rows, without pixels.

    The image file is made from the input's (``output_photos.encode_output``): copied when there is
    nothing to remove, JPEG blocks outside the mask kept, metadata carried. With ``max_residual``
    set, a written photo whose ``residual`` is above it (or could not be measured) gets status
    'review' and the reason in ``error``.
    """
    rows = []
    for i, source in enumerate(batch["source"]):
        error = batch["error"][i]
        residual = float(batch["residual"][i]) if "residual" in batch else None
        row = manifest_row(
            source,
            config_hash,
            width=int(batch["width"][i]),
            height=int(batch["height"][i]),
            mask_fraction=float(batch["mask_fraction"][i]),
            seconds_mask=float(batch["seconds_mask"][i]),
            seconds_inpaint=float(batch["seconds_inpaint"][i]),
            residual=None if residual is None or np.isnan(residual) else residual,
        )
        if not error:
            try:
                image_format = output_format(source, fmt)
                row["output"] = f"images/{with_suffix(source, image_format)}"
                if save_masks:
                    row["mask"] = f"masks/{source}.png"
                    storage.write_bytes(storage.join(output_uri, row["mask"]), encode_mask(batch["mask"][i]))
                photo = encode_output(
                    batch["file"][i], batch["image"][i], batch["mask"][i], image_format, quality=quality
                )
                # The image goes last: its presence is what marks the photo done for a rerun.
                storage.write_bytes(storage.join(output_uri, row["output"]), photo.data)
                row.update(status="ok", outside_changed=photo.outside_changed)
                if max_residual is not None:
                    row.update(_quality_verdict(residual, max_residual))
            except (storage.StorageError, OSError, ValueError) as exc:
                error = f"write failed: {str(exc).splitlines()[0][:200]}"
        if error:
            row.update(status="failed", error=error, output="", mask="", outside_changed=None)
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def _quality_verdict(residual: float | None, max_residual: float) -> dict[str, str]:
    """Status and reason of a written photo under the quality gate."""
    if residual is None or np.isnan(residual):
        return {"status": "review", "error": "residual furniture could not be measured"}
    if residual > max_residual:
        return {"status": "review", "error": f"residual furniture {residual:.3f} > qa.max_residual {max_residual}"}
    return {}


def object_array(items: list[np.ndarray]) -> np.ndarray:
    """A 1-D object array of arrays (numpy would stack same-shaped ones into one array)."""
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


class ManifestWriter:
    """Buffers manifest rows of one job's schema on the driver and persists them as parquet parts of one run.

    A part is written every ``rows_per_part`` rows, so a killed driver loses at most that much bookkeeping.
    """

    def __init__(self, output: str, run_id: str, schema: pa.Schema, rows_per_part: int = MANIFEST_EVERY) -> None:
        self.folder = storage.join(output, MANIFEST_DIR)
        self.run_id = run_id
        self.schema = schema
        self.rows_per_part = rows_per_part
        self.buffer: list[dict[str, Any]] = []
        self.parts = 0
        self.counts: Counter[str] = Counter()

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.buffer += rows
        self.counts.update(row["status"] for row in rows)
        if len(self.buffer) >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"{self.run_id}-{self.parts:05d}.parquet"
        storage.write_rows(storage.join(self.folder, name), self.buffer, self.schema)
        self.parts += 1
        self.buffer = []

    def finish(self) -> None:
        """Flush, then drop parts of earlier runs: this run's parts now account for every photo."""
        self.flush()
        for part in storage.list_files(self.folder):
            if not part.startswith(self.run_id):
                storage.delete(storage.join(self.folder, part))


@dataclass
class Summary:
    """What a run did."""

    counts: dict[str, int]
    processed: int
    seconds: float
    output: str
    progress: list[tuple[float, int]] = field(default_factory=list)
    """(seconds since the start, photos processed) at each arrival of rows: the run's rate over time."""

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        statuses = ("ok", "review", "failed", "skipped") if self.counts.get("review") else ("ok", "failed", "skipped")
        counts = " ".join(f"{status}={self.counts.get(status, 0)}" for status in statuses)
        return f"{counts} processed={self.processed} in {self.seconds:.1f}s ({self.images_per_second:.2f} images/s)"


def actor_pool(pool: ActorPoolConfig) -> Any:
    """Ray Data's strategy for a pool of ``pool.min`` to ``pool.max`` actors.

    Ray Data adds an actor while the pool's actors are busy and the cluster has room for one, and asks the
    cluster's autoscaler for nodes when it has none; ``max`` None leaves no limit but the cluster's. A fixed
    ``size`` would never grow onto nodes that join during the run.
    """
    import ray

    return ray.data.ActorPoolStrategy(min_size=pool.min, max_size=pool.max)


def segmenter_pool(masking: MaskingConfig, resources: RayConfig) -> dict[str, Any]:
    """``map_batches`` arguments of an actor pool that runs the segmentation model, sized by ray.masking_*.

    Masking, the quality gate and the evaluation's scorers all hold the same model, so they share one sizing.
    """
    return {
        "compute": actor_pool(resources.masking_actors),
        "batch_size": masking.batch_size,
        "num_cpus": resources.masking_cpus,
        "num_gpus": resources.masking_gpus,
    }


def masked_photos(plan: Plan, rows_per_block: int) -> Any:
    """The lazy Ray Dataset of the photos to do, decoded and masked (see FurnitureMasker's columns).

    ``rows_per_block`` is the batch size of the job's slowest stage: blocks that small keep every
    stage streaming, and the cap bounds the objects the driver creates for a catalogue of millions.
    """
    import ray

    from casalimpia.masking import FurnitureMasker

    config = plan.config
    resources = config.ray
    items = [{"source": source} for source in plan.todo]
    blocks = max(1, min(-(-len(items) // rows_per_block), MAX_INPUT_BLOCKS))
    dataset = ray.data.from_items(items, override_num_blocks=blocks)
    dataset = dataset.map_batches(
        read_and_decode,
        fn_kwargs={
            "input_uri": config.input,
            "max_pixels": config.decode.max_pixels,
            "min_side": config.decode.min_side,
        },
        batch_size=config.masking.batch_size,
        num_cpus=resources.io_cpus,
    )
    masker, masker_kwargs = faults.stage(
        "masker", FurnitureMasker, {"config": config.masking, "dtype": resources.dtype}
    )
    return dataset.map_batches(masker, fn_constructor_kwargs=masker_kwargs, **segmenter_pool(config.masking, resources))


def build_dataset(plan: Plan) -> Any:
    """The lazy Ray Dataset of manifest rows for the photos to do."""
    from casalimpia.inpainting import Inpainter, blend_painted, crop_for_painting
    from casalimpia.masking import ResidualFurniture

    config = plan.config
    resources = config.ray
    dataset = masked_photos(plan, rows_per_block=config.inpaint.batch_size)
    # Cropping and blending run as CPU tasks on either side of the painting pool, so its GPU only paints.
    dataset = dataset.map_batches(
        crop_for_painting,
        fn_kwargs={"config": config.inpaint},
        batch_size=config.inpaint.batch_size,
        num_cpus=resources.io_cpus,
    )
    inpainter, inpainter_kwargs = faults.stage(
        "inpainter",
        Inpainter,
        {
            "config": config.inpaint,
            "dtype": resources.dtype,
            "channels_last": resources.channels_last,
            "compile_unet": resources.compile_unet,
        },
    )
    dataset = dataset.map_batches(
        inpainter,
        fn_constructor_kwargs=inpainter_kwargs,
        compute=actor_pool(resources.inpainting_actors),
        batch_size=config.inpaint.batch_size,
        num_cpus=resources.inpainting_cpus,
        num_gpus=resources.inpainting_gpus,
    )
    dataset = dataset.map_batches(
        blend_painted,
        fn_kwargs={"feather": config.inpaint.feather},
        batch_size=config.inpaint.batch_size,
        num_cpus=resources.io_cpus,
    )
    if config.qa.max_residual is not None:
        # The gate re-runs the segmenter, so its pool is sized like the masking one.
        dataset = dataset.map_batches(
            ResidualFurniture,
            fn_constructor_kwargs={"config": config.masking, "dtype": resources.dtype},
            **segmenter_pool(config.masking, resources),
        )
    return dataset.map_batches(
        encode_and_write,
        fn_kwargs={
            "output_uri": config.output,
            "fmt": config.write.format,
            "quality": config.write.quality,
            "save_masks": config.write.save_masks,
            "config_hash": plan.config_hash,
            "max_residual": config.qa.max_residual,
        },
        batch_size=config.inpaint.batch_size,
        num_cpus=resources.io_cpus,
    )


def execute(plan: Plan) -> Summary:
    """Run the plan on the connected Ray cluster; returns the summary, writes manifest and report."""
    from casalimpia.report import write_report

    config = plan.config
    if random := {config.masking.model, config.inpaint.model} & set(RANDOM_WEIGHTS):
        log.warning("%s: random weights, the outputs are noise (for tests, demos, benchmarks)", "/".join(random))
    if uses_toy(config.masking.model, config.inpaint.model, config.inpaint.lora):
        log.warning("%s", BANNER)
    summary = run_plan(plan, build_dataset, MANIFEST_SCHEMA)
    write_report(config, read_manifest(config.output), summary)
    return summary


def run_plan(plan: Plan, build: Callable[[Plan], Any], schema: pa.Schema) -> Summary:
    """Save the resolved config, stream the rows of ``build(plan)`` into the manifest, and summarise.

    The settled rows go in first and every streamed row is persisted as it arrives, so an
    interrupted run resumes from what was written; the dataset is only built when there is work.
    A progress line is logged every ``config.progress_every`` seconds. SIGINT or SIGTERM persists
    every row received so far and raises ``Interrupted``.
    """
    config = plan.config
    storage.write_bytes(storage.join(config.output, "config.yaml"), to_yaml(config).encode())
    manifest = ManifestWriter(config.output, plan.run_id, schema, config.manifest_every)
    manifest.add(plan.settled)
    driver_fault = faults.armed("driver")
    stopped: Stopped | None = None
    with Progress(len(plan.todo), config.progress_every) as progress:
        try:
            with stop_on_signals():
                batches = build(plan).iter_batches(batch_size=None, batch_format="pyarrow") if plan.todo else []
                for batch in batches:
                    rows = batch.to_pylist()
                    progress.add([row["status"] for row in rows])
                    manifest.add(rows)
                    if manifest.parts and progress.processed:
                        faults.die_once(driver_fault, "the driver")
        except Stopped as stop:
            stopped = stop
    if stopped is not None:
        # flush, not finish: the parts of earlier runs still hold the rows of photos this run did not reach.
        manifest.flush()
        raise Interrupted(stopped, progress.processed)
    seconds = progress.elapsed()
    manifest.finish()
    return Summary(dict(manifest.counts), progress.processed, seconds, config.output, progress.arrivals)


def connect(address: str | None) -> None:
    """Join the Ray cluster at address (or RAY_ADDRESS, or a running local one), else start one."""
    import ray

    configure_logging()
    if not ray.is_initialized():
        ray.init(address=address, runtime_env={"worker_process_setup_hook": "casalimpia.configure_logging"})
