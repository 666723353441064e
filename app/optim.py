"""Optimizers: the sparse one fused into the embedding backward, the dense one, and the LR schedule.

The sparse optimizer is attached to the unsharded tables *before* sharding
(`apply_sparse_optimizer`): DistributedModelParallel reads it from the parameters and fuses it into
the FBGEMM kernels of every sharded table, so embedding rows are updated during backward and their
gradients never exist as dense tensors. Tables the planner makes data_parallel are replicated
plain parameters whose gradients DDP all-reduces; the in-backward hook does not reach them, so
`build_optimizer` gives them their own group with the sparse optimizer's kind and settings (fp16
ones with their state and arithmetic in fp32, as FBGEMM keeps it: app/fp32_state.py).

`optim.weight_decay` is the dense layers' L2 penalty, added to their gradients as torch's SGD,
Adagrad and Adam do. Tables get none: FBGEMM's CPU kernels ignore weight decay in every mode
(EXACT_SGD and EXACT_ADAGRAD have none on GPU either), while a replicated table's torch optimizer
would apply it to every row at every step, so the same setting would mean three things.

The LR schedule is a function of the step, and a resumed run puts it at its step with
`set_schedule_step` (LambdaLR.load_state_dict alone leaves every group at the previous LR, and
the fused kernels take their LR from the groups).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torch.optim.lr_scheduler import LambdaLR
from torchrec import optim as trec_optim
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from app.clipping import clip_dense_gradients
from app.config import ConfigError, OptimConfig
from app.fp32_state import fp32_state_factory
from app.models import TABLES_PATH, embedding_tables, sequence_tables
from app.precision import TableGradients, unscale_and_check, update_scale

_OPTIMIZER_CLASSES = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": RowWiseAdagrad,
    "adam": torch.optim.Adam,
}
# What the sharder reads to pick the FBGEMM optimizer. Its kwargs go to FBGEMM as they are, so Adam
# is torchrec's placeholder class, which accepts FBGEMM's beta1/beta2 instead of torch's betas.
_FUSED_CLASSES = {**_OPTIMIZER_CLASSES, "adam": trec_optim.Adam}
_FUSED_ON_CPU = ("sgd", "adagrad", "rowwise_adagrad")
# The parts of the CombinedOptimizer: tables FBGEMM steps inside the backward (their state exists
# from the start), the dense layers, and tables the plan replicates (stepped like dense layers).
FUSED_PART, DENSE_PART, REPLICATED_PART = "sparse", "dense", "replicated_tables"


def _optimizer_kwargs(name: str, lr: float, config: OptimConfig, weight_decay: float) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
    if name in ("adagrad", "rowwise_adagrad", "adam"):
        kwargs["eps"] = config.eps
    if name == "adam":
        kwargs["betas"] = tuple(config.betas)
    return kwargs


def apply_sparse_optimizer(model: nn.Module, config: OptimConfig, device: torch.device) -> None:
    """Attach the sparse optimizer to the unsharded model's tables; call before sharding."""
    if device.type != "cuda" and config.sparse not in _FUSED_ON_CPU:
        raise ConfigError(
            f"optim.sparse={config.sparse} needs CUDA: FBGEMM's CPU kernels fuse only "
            f"{', '.join(_FUSED_ON_CPU)} into the embedding backward."
        )
    kwargs = _optimizer_kwargs(config.sparse, config.effective_sparse_lr, config, weight_decay=0.0)  # tables: none
    if "betas" in kwargs:
        kwargs["beta1"], kwargs["beta2"] = kwargs.pop("betas")
    _apply_optimizer_in_backward(_FUSED_CLASSES[config.sparse], embedding_tables(model).parameters(), kwargs)
    histories = sequence_tables(model)
    if histories is not None:  # the histories' tables (features.sequence): fused alike
        _apply_optimizer_in_backward(_FUSED_CLASSES[config.sparse], histories.parameters(), kwargs)


def build_optimizer(model: nn.Module, config: OptimConfig) -> CombinedOptimizer:
    """One KeyedOptimizer over everything: the fused table optimizers of the sharded model, the
    dense layers, and replicated (data_parallel) tables. Its state_dict is what checkpoints save."""
    plain = dict(in_backward_optimizer_filter(model.named_parameters()))
    # Wrappers the sharding adds sit around or inside the tables' module, never within its path.
    replicated_tables = {n: p for n, p in plain.items() if f"{TABLES_PATH}." in n}
    dense = {n: p for n, p in plain.items() if f"{TABLES_PATH}." not in n}

    def wrap(name: str, lr: float, params: dict[str, nn.Parameter], weight_decay: float) -> KeyedOptimizer:
        optimizer_class = _OPTIMIZER_CLASSES[name]
        kwargs = _optimizer_kwargs(name, lr, config, weight_decay)
        # fp16 (replicated) tables: state and arithmetic in fp32, as FBGEMM's for sharded ones.
        return KeyedOptimizerWrapper(params, fp32_state_factory(optimizer_class, **kwargs))

    parts = [
        (FUSED_PART, model.fused_optimizer),
        (DENSE_PART, wrap(config.dense, config.lr, dense, config.weight_decay)),
    ]
    if replicated_tables:
        parts.append(
            (REPLICATED_PART, wrap(config.sparse, config.effective_sparse_lr, replicated_tables, weight_decay=0.0))
        )
    return CombinedOptimizer(parts)


def lr_multiplier(config: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier by step: linear warmup, hold, then linear or cosine decay. Decay
    starts at decay_start_step or at the end of warmup, whichever is later: from inside warmup it
    would make the LR jump down where warmup ends."""
    decay_start = max(config.decay_start_step, config.warmup_steps)
    decay_steps = config.decay_steps or max(1, total_steps - decay_start)

    def multiplier(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.decay == "none" or step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / decay_steps)
        shape = 1.0 - progress if config.decay == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * shape

    return multiplier


def build_lr_scheduler(optimizer: KeyedOptimizer, config: OptimConfig, total_steps: int) -> LambdaLR:
    """Scales every group's learning rate (fused tables included: their optimizer pushes the
    group's lr into the kernel on each step())."""
    return LambdaLR(optimizer, lr_multiplier(config, total_steps))


def set_schedule_step(scheduler: LambdaLR, step: int) -> None:
    """Put the schedule at `step`, every group's LR at its value there: what an uninterrupted run
    has before that step. (The fused kernels read the groups' LR at zero_grad and step.)"""
    scheduler.last_epoch = step
    lrs = [base * scale(step) for base, scale in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports


def learning_rates(optimizer: CombinedOptimizer) -> dict[str, float]:
    """The current LR of the dense layers and of the tables, by their config names (the tables'
    from the fused optimizer, or the replicated tables' where the plan shards none)."""
    first = {name: part.param_groups[0]["lr"] for name, part in optimizer.optimizers if part.param_groups}
    return {"lr": first[DENSE_PART], "sparse_lr": first.get(FUSED_PART, first.get(REPLICATED_PART))}


def set_fused_optimizer_step(optimizer: CombinedOptimizer, step: int) -> None:
    """Give FBGEMM's fused table optimizers their step count, which their state_dict leaves out:
    Adam's bias correction uses it, and would restart from 1 on every resume."""
    for _, part in optimizer.optimizers:
        if isinstance(part, CombinedOptimizer):
            set_fused_optimizer_step(part, step)
        elif hasattr(part, "set_optimizer_step"):
            part.set_optimizer_step(step)


def optimizer_and_schedule(
    model: nn.Module, config: OptimConfig, total_steps: int
) -> tuple[CombinedOptimizer, LambdaLR]:
    optimizer = build_optimizer(model, config)
    return optimizer, build_lr_scheduler(optimizer, config, total_steps)


class OptimizerStep:
    """What one training step does after its forward: backward, clip the dense gradients to
    optim.clip_grad_norm, and step every optimizer. The sharded tables' own gradients are applied
    by FBGEMM inside the backward. Under fp16's loss scale (`scaler`, with the model's cut
    `table_gradients`), the backward is judged before it reaches the tables, over every rank:
    a step with a non-finite gradient anywhere changes nothing (see app/precision.py).
    `local_gradients`: each rank steps on its own dense gradients (k-step averaging), so the norm
    clipped is taken over the ranks (app/clipping.py)."""

    def __init__(
        self,
        optimizer: CombinedOptimizer,
        clip_grad_norm: float | None = None,
        scaler: torch.amp.GradScaler | None = None,
        table_gradients: TableGradients | None = None,
        local_gradients: bool = False,
    ) -> None:
        self.optimizer = optimizer
        self.clip_grad_norm = clip_grad_norm
        self.scaler = scaler
        if scaler is not None and (table_gradients is None or table_gradients.scaler is not scaler):
            raise ValueError("a loss scale needs the model's TableGradients of the same scaler")
        self.table_gradients = table_gradients
        self.local_gradients = local_gradients
        self.last_grad_norm: torch.Tensor | None = None  # before clipping, for the logs
        self.skipped_steps = 0  # overflowing fp16 steps in this process's run
        self._found: torch.Tensor | None = None  # this step's verdict under a loss scale (1.0: overflow)
        self._skip = False

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is None or self.table_gradients is None:  # both or neither (see __init__)
            loss.backward()
            return
        self.scaler.scale(loss).backward()  # the dense part, up to the cut before the tables
        self._found = unscale_and_check(
            self.scaler, [*_gradients(dense_parameters(self.optimizer)), *self.table_gradients.gradients()]
        )
        self._skip = bool(self._found.item())
        self.table_gradients.release(apply=not self._skip)  # the tables' half of the backward, or none

    def step(self) -> None:
        if self._skip:
            self.skipped_steps += 1
        else:
            if self.clip_grad_norm is not None:
                self.last_grad_norm = clip_dense_gradients(
                    dense_parameters(self.optimizer), self.clip_grad_norm, self.local_gradients
                )
            self.optimizer.step()
        if self._found is not None and self.scaler is not None:
            update_scale(self.scaler, self._found)
        self._found, self._skip = None, False

    def logged(self) -> dict[str, float]:
        """What the training log records of the optimizers: both learning rates, and under fp16 the
        loss scale and the steps skipped so far for overflowing."""
        values = learning_rates(self.optimizer)
        if self.scaler is not None:
            values.update(loss_scale=self.scaler.get_scale(), skipped_steps=self.skipped_steps)
        return values


def _gradients(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [param.grad for param in params if param.grad is not None]


def dense_parameters(optimizer: CombinedOptimizer) -> list[torch.Tensor]:
    """The parameters stepped after the backward (dense layers, replicated tables), not by FBGEMM."""
    return [param for name, part in optimizer.optimizers if name != FUSED_PART for param in part.params.values()]
