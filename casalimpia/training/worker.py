"""What every training worker shares: its precision, its optimisation, and agreement across workers.

The inpainting loop (:mod:`casalimpia.training.loop`) and the segmenter's
(:mod:`casalimpia.training.segmenter`) resolve mixed precision, step their parameters
(:class:`Optimisation`) and reduce values over data-parallel workers the same way.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

TRAINING_STATE = "training_state.pt"
"""File in a checkpoint folder with what resuming needs: trained weights, optimizer, schedule, step."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses: the run has diverged."""


@dataclass(frozen=True)
class Precision:
    """How a worker computes: the autocast dtype (None for fp32), the frozen weights' dtype, the scaler."""

    autocast: torch.dtype | None
    weights: torch.dtype
    scaler: bool
    reason: str


def resolve_precision(name: str, device: torch.device) -> Precision:
    """Mixed precision for a worker on device; trained weights always stay in fp32.

    Frozen weights take the half dtype on an accelerator (half the memory and bandwidth) and stay
    fp32 on the CPU, where half-precision kernels are slow; autocast picks per-op dtypes either way.
    """
    on_cpu = device.type == "cpu"
    if name == "auto":
        if on_cpu:
            return Precision(None, torch.float32, False, "fp32: training on the CPU")
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            name, why = "bf16", "bf16: supported by this GPU, no loss scaling needed"
        else:
            name, why = "fp16", "fp16 with loss scaling: this accelerator has no bf16"
    else:
        why = f"{name} as configured"
    if name == "fp32":
        return Precision(None, torch.float32, False, why)
    half = torch.bfloat16 if name == "bf16" else torch.float16
    return Precision(half, torch.float32 if on_cpu else half, name == "fp16", why)


def set_cpu_threads(threads: int | None, device: torch.device) -> None:
    """Give a CPU worker's torch ``threads`` threads: Ray sets one per whole CPU a worker reserves, so a
    worker given a fraction of a CPU (to leave a small machine's cores to its data tasks) computes on one."""
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
        log.info("torch computes with %d CPU threads (ray.torch_threads)", threads)


def make_optimizer(optim: Any, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer ``optim`` (an OptimConfig) names, over parameters."""
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=optim.learning_rate, weight_decay=optim.weight_decay)
    if optim.optimizer == "adagrad":
        return torch.optim.Adagrad(parameters, lr=optim.learning_rate, weight_decay=optim.weight_decay)
    return torch.optim.SGD(parameters, lr=optim.learning_rate, momentum=optim.momentum, weight_decay=optim.weight_decay)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def finite_everywhere(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every worker: a step is skipped everywhere or nowhere."""
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if distributed():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def mean_everywhere(values: list[float], device: torch.device) -> float:
    """Mean of the values of all workers (NaN when no worker had any)."""
    totals = torch.tensor([sum(values), len(values)], dtype=torch.float64, device=device)
    if distributed():
        dist.all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] > 0 else math.nan


class Optimisation:
    """How a worker's trained parameters move: optimizer, schedule, loss scaling, accumulation, clipping, EMA.

    ``backward`` takes one micro-batch's loss and steps every ``optim.grad_accum`` micro-batches.
    A loss that is not finite on any worker drops its accumulation window on every worker alike
    (so DDP stays in step); ``optim.max_nonfinite`` of them in a row raise NonFiniteLossError.
    With ``optim.ema_decay`` a moving average of the parameters follows every step, and
    :meth:`averaged` swaps it in. Parameters are trained in fp32 whatever the precision.
    """

    def __init__(
        self,
        optim: Any,
        parameters: list[torch.nn.Parameter],
        precision: Precision,
        total_steps: int,
        device: torch.device,
        *,
        precision_name: str,
    ) -> None:
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        self.optim = optim
        self.parameters = parameters
        self.precision_name = precision_name
        self.optimizer = make_optimizer(optim, parameters)
        self.lr_scheduler = get_scheduler(
            optim.lr_scheduler,
            self.optimizer,
            num_warmup_steps=optim.warmup_steps,
            num_training_steps=max(1, total_steps),
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.scaler)
        self.ema = EMAModel(parameters, decay=optim.ema_decay, foreach=True) if optim.ema_decay > 0 else None
        self.step = 0
        self.nonfinite = 0
        self._consecutive_nonfinite = 0
        self._micro = 0

    @property
    def learning_rate(self) -> float:
        return self.lr_scheduler.get_last_lr()[0]

    def backward(self, loss: torch.Tensor, model: torch.nn.Module) -> float | None:
        """Backward of one micro-batch through model (DDP or not); returns the loss, None when it was skipped."""
        if not finite_everywhere(loss):
            self._skip_nonfinite()
            return None
        self._consecutive_nonfinite = 0
        accumulate = self.optim.grad_accum
        last = (self._micro + 1) % accumulate == 0
        # Gradients are all-reduced once per window, on its last micro-batch.
        no_sync = getattr(model, "no_sync", None)
        with no_sync() if (no_sync is not None and not last) else contextlib.nullcontext():
            self.scaler.scale(loss / accumulate).backward()
        self._micro += 1
        if last:
            self._step()
        return float(loss.detach())

    def finish_epoch(self) -> None:
        """Step on a partial accumulation window left at the end of an epoch."""
        if self._micro % self.optim.grad_accum == 0:
            return
        if distributed():
            # The window's micro-batches all ran under no_sync: average their gradients by hand.
            for parameter in self.parameters:
                if parameter.grad is not None:
                    dist.all_reduce(parameter.grad)
                    parameter.grad /= dist.get_world_size()
        self._step()

    def _step(self) -> None:
        if self.optim.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters, self.optim.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.parameters)
        self._micro = 0
        self.step += 1

    def _skip_nonfinite(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._micro = 0
        self.nonfinite += 1
        self._consecutive_nonfinite += 1
        limit = self.optim.max_nonfinite
        log.warning("non-finite loss at step %d: step skipped (%d in a row)", self.step, self._consecutive_nonfinite)
        if self._consecutive_nonfinite >= limit:
            raise NonFiniteLossError(
                f"{limit} non-finite losses in a row at step {self.step} (optim.max_nonfinite): the run diverged. "
                f"Lower optim.learning_rate (now {self.optim.learning_rate:g}), keep optim.max_grad_norm on, "
                f"or train in bf16 or fp32 (precision is {self.precision_name})."
            )

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """Within the block the parameters hold their moving average (when there is one)."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.parameters)
        self.ema.copy_to(self.parameters)
        try:
            yield
        finally:
            self.ema.restore(self.parameters)

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, schedule, scaler, moving average and counters (not the parameters themselves)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "step": self.step,
            "nonfinite": self.nonfinite,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (self.ema is None) != (state["ema"] is None):
            raise ValueError("checkpoint and optim.ema_decay disagree on whether weights are averaged")
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.step = state["step"]
        self.nonfinite = state["nonfinite"]
