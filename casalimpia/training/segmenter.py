"""Segmenter fine-tuning: OneFormer trained with its own loss on photos with label maps, on Ray Train.

This is how a catalogue teaches the masking model its own photos (for example from masks corrected
during review): every weight of the model named by ``masking.model`` is trained, data-parallel, on
random crops of the examples described in ``casalimpia.training.segmenter_data``, and the best epoch
is exported as a folder that ``masking.model`` loads as it loads a hub id.

OneFormer learns semantic segmentation as mask classification: for each photo the targets are one
binary mask per class present in its label map and that class's id (:func:`label_targets`), which
its Hungarian matcher assigns to the object queries. Its training form also encodes one text per
query ("a photo with a sofa", padded with "a semantic photo") for a query-text contrastive loss, and
is told the task with the same tokens the masking stage uses.

Everything under one run folder, ``<storage>/<name>/``::

    checkpoint_*/          Ray Train checkpoints: the model folder, training_state.pt, config.yaml; best N kept
    model/                 the best checkpoint's model folder (config.json, model.safetensors, tokenizer
                           files) and config.yaml: ready for ``masking.model``
    metrics.jsonl          one line of metrics per epoch
    config.yaml            the resolved config of the latest start

Starting a run with the same name and storage resumes it from its latest checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from casalimpia import storage
from casalimpia.classes import IGNORE_LABEL, STRUCTURE, normalize_label
from casalimpia.config import RANDOM_WEIGHTS, SegmenterTrainConfig, build, to_dict, to_yaml
from casalimpia.masking import IMAGENET_MEAN, IMAGENET_STD, FurnitureMasker, task_tokens
from casalimpia.metrics import SegmentationScores
from casalimpia.models import TEXT_MAPPER_PREFIX, Placement, load_segmenter, segmenter_form
from casalimpia.pipeline import JobError, absolute_model, absolute_uri, check_model
from casalimpia.training.runs import RunPlan, RunSummary, fit_and_export, has_checkpoints, torch_trainer
from casalimpia.training.segmenter_data import LabelledPhoto, list_examples, split_examples
from casalimpia.training.worker import (
    TRAINING_STATE,
    Optimisation,
    mean_everywhere,
    resolve_precision,
    set_cpu_threads,
)

log = logging.getLogger(__name__)

MODEL_DIR = "model"
COLUMNS = (
    "epoch",
    "step",
    "train/loss",
    "val/miou",
    "val/furniture_recall",
    "val/furniture_iou",
    "val/structure_removed",
)
"""Metrics shown per epoch in the log and the summary table."""
SEMANTIC_TEXT = "a semantic photo"
"""Text of the queries beyond the classes present, as OneFormer's processor writes it."""


def label_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OneFormer's semantic targets of one (H, W) label map: (K, H, W) float masks and (K,) class ids.

    One binary mask per class present, in ascending id order; ignored pixels (IGNORE_LABEL) are in
    no mask, as OneFormer's own processor makes them.
    """
    classes = torch.unique(labels)
    classes = classes[classes != IGNORE_LABEL]
    masks = labels[None] == classes[:, None, None]
    return masks.float(), classes.long()


def class_lookup(id2label: dict[Any, str], names: Sequence[str]) -> np.ndarray:
    """Bool lookup by class id of the named classes, through the model's own labels."""
    label2id = {normalize_label(label): int(i) for i, label in id2label.items()}
    lookup = np.zeros(len(id2label), dtype=bool)
    lookup[[label2id[name] for name in names if name in label2id]] = True
    return lookup


class SegmenterTrainer:
    """OneFormer in its training form on one worker, and its optimisation state; works without Ray.

    ``wrap`` turns the model into what the forward pass calls (``ray.train.torch.prepare_model``
    for DDP). Weights stay fp32, since all of them are trained; autocast runs the forward in bf16 or
    fp16 on an accelerator. ``start`` is a model reference: ``masking.model``, or the folder of the
    checkpoint a run resumes from (its ``training_state.pt`` is then loaded too).
    """

    def __init__(
        self,
        config: SegmenterTrainConfig,
        device: torch.device,
        total_steps: int,
        *,
        start: str | None = None,
        wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    ) -> None:

        self.config = config
        self.device = device
        self.precision = resolve_precision(config.precision, device)
        log.info("training the segmenter on %s, %s", device, self.precision.reason)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model, self.tokenizer = load_segmenter(
                start or config.masking.model, Placement(device, torch.float32, self.precision.reason), training=True
            )
        self.network = wrap(self.model) if wrap is not None else self.model
        model_config = self.model.config
        self.task_inputs = task_tokens(self.tokenizer, model_config.task_seq_len).to(device)
        self.class_texts = self._class_texts()
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimisation = Optimisation(
            config.optim, self.parameters, self.precision, total_steps, device, precision_name=config.precision
        )
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        self.epoch = 0
        self._inference: Any = None
        if start is not None and Path(start, TRAINING_STATE).exists():
            self.load_state_dict(torch.load(Path(start, TRAINING_STATE), map_location=device, weights_only=False))
        log.info(
            "OneFormer from %s: %d trained parameters",
            start or config.masking.model,
            sum(map(torch.numel, self.parameters)),
        )

    def _class_texts(self) -> torch.Tensor:
        """Token ids of each class's text (row = class id) and, in the last row, of SEMANTIC_TEXT.

        Padding is zeroed, as OneFormer's processor does: its text encoder finds the end of a text
        at the largest token id.
        """
        config = self.model.config
        names = [config.id2label[i] for i in range(config.num_labels)]
        texts = [f"a photo with a {name}" for name in names] + [SEMANTIC_TEXT]
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=config.text_encoder_context_length,
            return_tensors="pt",
        )
        return (tokens["input_ids"] * tokens["attention_mask"]).to(self.device)

    def _text_inputs(self, class_labels: list[torch.Tensor]) -> torch.Tensor:
        """(B, queries, length) texts: the classes of each photo first, SEMANTIC_TEXT after them."""
        config = self.model.config
        count = config.num_queries - config.text_encoder_n_ctx
        rows = torch.full((len(class_labels), count), config.num_labels, dtype=torch.long, device=self.device)
        for row, classes in zip(rows, class_labels, strict=True):
            shown = classes[:count]
            row[: len(shown)] = shown
        return self.class_texts[rows]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision.autocast)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """OneFormer's loss on a batch of crops (``image``: uint8 NHWC, ``labels``: uint8 NHW)."""
        pixels = batch["image"].to(self.device).permute(0, 3, 1, 2).float() / 255
        pixels = (pixels - self.mean) / self.std
        targets = [label_targets(labels) for labels in batch["labels"].to(self.device)]
        mask_labels = [masks for masks, _ in targets]
        class_labels = [classes for _, classes in targets]
        with self._autocast():
            output = self.network(
                pixel_values=pixels,
                task_inputs=self.task_inputs.expand(len(pixels), -1),
                text_inputs=self._text_inputs(class_labels),
                mask_labels=mask_labels,
                class_labels=class_labels,
            )
        return output.loss.float().sum()

    def train_batch(self, batch: dict[str, torch.Tensor]) -> float | None:
        """One micro-batch through :meth:`Optimisation.backward`: the loss, or None when it was skipped."""
        return self.optimisation.backward(self.loss(batch), self.network)

    def inference_model(self) -> Any:
        """The trained weights in OneFormer's inference form, what masking loads; built once, refreshed per call."""
        if self._inference is None:
            self._inference = segmenter_form(self.model, training=False).to(self.device).eval()
        else:
            state = {k: v for k, v in self.model.state_dict().items() if not k.startswith(TEXT_MAPPER_PREFIX)}
            self._inference.load_state_dict(state)
        return self._inference

    def validate(self, examples: list[LabelledPhoto]) -> dict[str, float]:
        """Segment the examples as the masking stage would and score them; keys are prefixed ``val/``."""
        if not examples:
            return {}
        with self.optimisation.averaged():
            model = self.inference_model()
        masker = FurnitureMasker(self.config.masking, segmenter=(model, self.tokenizer))
        id2label = masker.model.config.id2label
        scores = SegmentationScores(masker.removal_ids, class_lookup(id2label, STRUCTURE))
        size = self.config.masking.batch_size
        for start in range(0, len(examples), size):
            chunk = examples[start : start + size]
            with self._autocast():
                predicted = masker.label_maps([example.image for example in chunk])
            for example, labels in zip(chunk, predicted, strict=True):
                height, width = example.labels.shape
                full = Image.fromarray(labels.astype(np.uint8)).resize((width, height), Image.Resampling.NEAREST)
                scores.add(np.asarray(full), example.labels)
        return {f"val/{name}": value for name, value in scores.result().items()}

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs besides the model folder: text mapper, optimizer, schedule, scaler, counters."""
        return {
            "text_mapper": {k: v for k, v in self.model.state_dict().items() if k.startswith(TEXT_MAPPER_PREFIX)},
            "epoch": self.epoch,
            **self.optimisation.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["text_mapper"], strict=False)
        self.optimisation.load_state_dict(state)
        self.epoch = state["epoch"]

    def save_checkpoint(self, folder: str | Path) -> None:
        """A checkpoint folder: the model as masking loads it, the resumable state, the training config."""
        folder = Path(folder)
        with self.optimisation.averaged():
            self.inference_model().save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        torch.save(self.state_dict(), folder / TRAINING_STATE)
        (folder / "config.yaml").write_text(to_yaml(self.config))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: train for the configured epochs, validating and checkpointing after each on rank 0.

    ``loop_config`` holds the resolved config as plain data (``config``), the optimizer steps of the
    whole run (``total_steps``) and the validation photos (``validation``).
    """
    import ray.train
    import ray.train.torch

    from casalimpia.training.segmenter_data import validation_examples
    from casalimpia.training.tracking import open_tracker

    config: SegmenterTrainConfig = build(SegmenterTrainConfig, loop_config["config"])
    context = ray.train.get_context()
    is_main = context.get_world_rank() == 0
    device = ray.train.torch.get_device()
    set_cpu_threads(config.ray.torch_threads, device)
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as folder:
        trainer = SegmenterTrainer(config, device, loop_config["total_steps"], start=folder, wrap=_data_parallel)
    optimisation = trainer.optimisation
    if checkpoint is not None:
        log.info("resumed from %s: epoch %d, step %d", checkpoint.path, trainer.epoch, optimisation.step)
    tracker = open_tracker(config, enabled=is_main)
    examples = validation_examples(config.data.dataset, loop_config["validation"], config.data) if is_main else []
    try:
        for epoch in range(trainer.epoch, config.epochs):
            started = time.perf_counter()
            losses: list[float] = []
            for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=config.batch_size):
                loss = trainer.train_batch(batch)
                if loss is None:
                    continue
                losses.append(loss)
                if optimisation.step % config.tracking.log_every == 0:
                    tracker.log({"train/loss": loss, "train/lr": optimisation.learning_rate}, optimisation.step)
            optimisation.finish_epoch()
            trainer.epoch = epoch + 1
            metrics: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": optimisation.step,
                "train/loss": mean_everywhere(losses, device),
                "train/lr": optimisation.learning_rate,
                "train/nonfinite_steps": optimisation.nonfinite,
                "train/seconds": time.perf_counter() - started,
            }
            if is_main:
                metrics.update(trainer.validate(examples))
                tracker.log(metrics, optimisation.step)
            with tempfile.TemporaryDirectory() as folder:
                saved = None
                if is_main and ((epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs):
                    trainer.save_checkpoint(folder)
                    saved = ray.train.Checkpoint.from_directory(folder)
                ray.train.report(metrics, checkpoint=saved)
    finally:
        tracker.finish()


def _data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """The model wrapped for DDP by Ray Train."""
    import ray.train.torch

    # The Swin backbone's last layer norm feeds no output OneFormer uses: DDP must expect unused weights.
    return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})


@dataclass
class SegmenterPlan(RunPlan):
    """What a segmenter training run will do, decided on the driver before any Ray work."""

    config: SegmenterTrainConfig
    train: list[str]
    """Photos trained on (paths under images/)."""
    validation: list[str]
    """Photos validated on after each epoch (at most data.validation_images of them are read)."""


def prepare(config: SegmenterTrainConfig) -> SegmenterPlan:
    """Check the run can start and plan it; raises JobError with one line otherwise."""
    config = _absolute(config)
    check_model(config.masking.model, "masking.model")
    try:
        photos = list_examples(config.data.dataset, config.data.decode)
    except (ValueError, storage.StorageError) as error:
        raise JobError(f"data.dataset: {error}") from None
    splits = split_examples(photos, config.data.split, config.data.limit)
    for split in ("train", "validation"):
        if not splits[split]:
            counts = ", ".join(f"{name} {len(paths)}" for name, paths in splits.items())
            raise JobError(f"data.split: no {split} examples among {len(photos)} ({counts}); add examples")
    try:
        storage.ensure_writable(config.storage)
    except storage.StorageError as error:
        raise JobError(f"storage: {error}") from None
    # Ray Data splits the rows equally between workers, dropping the remainder.
    rows_per_worker = len(splits["train"]) // config.ray.workers
    if rows_per_worker == 0:
        raise JobError(f"ray.workers: {config.ray.workers} workers but only {len(splits['train'])} training examples")
    steps_per_epoch = math.ceil(math.ceil(rows_per_worker / config.batch_size) / config.optim.grad_accum)
    resuming = has_checkpoints(storage.join(config.storage, config.name))
    return SegmenterPlan(
        config=config,
        steps_per_epoch=steps_per_epoch,
        resuming=resuming,
        train=splits["train"],
        validation=splits["validation"],
    )


def _absolute(config: SegmenterTrainConfig) -> SegmenterTrainConfig:
    """Local paths made absolute: Ray workers do not share the driver's working directory."""
    return dataclasses.replace(
        config,
        storage=absolute_uri(config.storage),
        data=dataclasses.replace(config.data, dataset=absolute_uri(config.data.dataset)),
        masking=dataclasses.replace(config.masking, model=absolute_model(config.masking.model)),
        tracking=dataclasses.replace(config.tracking, dir=str(Path(config.tracking.dir).resolve())),
    )


def fit(plan: SegmenterPlan) -> RunSummary:
    """Train on the connected Ray cluster; returns the summary after exporting the best epoch's model."""
    from casalimpia.training.segmenter_data import train_dataset

    config, resources = plan.config, plan.config.ray
    if config.masking.model in RANDOM_WEIGHTS:
        log.warning(
            "masking.model %r has random weights: the trained model is for tests and demos only", config.masking.model
        )
    storage.write_bytes(storage.join(plan.run_uri, "config.yaml"), to_yaml(config).encode())
    dataset = train_dataset(
        config.data.dataset, plan.train, config.data, resolution=config.masking.resolution, num_cpus=resources.data_cpus
    )
    # Each epoch re-executes the dataset; a progress bar per epoch and operator would drown the log.
    dataset.context.enable_progress_bars = False
    trainer = torch_trainer(
        train_loop_per_worker,
        {"config": to_dict(config), "total_steps": plan.total_steps, "validation": plan.validation},
        config,
        datasets={"train": dataset},
        shown=COLUMNS[2:],
    )

    def export(checkpoint: Path, output_uri: str) -> None:
        for path in sorted(checkpoint.iterdir()):
            if path.is_file() and path.name != TRAINING_STATE:
                storage.write_bytes(storage.join(output_uri, path.name), path.read_bytes())

    return fit_and_export(trainer, plan, export, output=MODEL_DIR, output_key="masking.model", columns=COLUMNS)
