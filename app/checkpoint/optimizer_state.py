"""Optimizer state across sharding plans: what a checkpoint's optimizer state loads into.

A table's optimizer state has one of two forms, and which one depends on the plan. A sharded table
is stepped by FBGEMM inside the backward: its state is `sparse.<table fqn>.<table>.momentum1`
(and `momentum2`), a ShardedTensor. A table the planner replicates (data_parallel, which it picks
for small tables once there are 2+ ranks) is stepped by a torch optimizer of its own: its state is
`replicated_tables.<table fqn>.sum` (or exp_avg, exp_avg_sq) plus a `step`. A checkpoint written
under one plan is loaded under another (another number of ranks, the default plan), so each
state that the checkpoint holds in the other form is read from it there and converted: the values
are the same numbers, only the shape may differ (row-wise Adagrad keeps [rows] fused, [rows, 1]
replicated). A torch `step` with no counterpart is the run's step. Anything else without a
counterpart of the same size (the optimizer itself changed) keeps its fresh value, with a warning
naming the tables.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from app.optim import FUSED_PART, REPLICATED_PART

log = logging.getLogger(__name__)

PREFIX = "optimizer.state."
_FUSED, _REPLICATED = f"{FUSED_PART}.", f"{REPLICATED_PART}."
# FBGEMM's name for each torch optimizer state of the same meaning (Adagrad's sum of squared
# gradients, Adam's moments): the same for every optimizer that keeps it.
_FUSED_NAME = {"sum": "momentum1", "exp_avg": "momentum1", "exp_avg_sq": "momentum2"}
_TORCH_NAMES = {"momentum1": ("sum", "exp_avg"), "momentum2": ("exp_avg_sq",)}


@dataclass
class _Conversion:
    """One state loaded from the checkpoint's other form: read into `buffer`, copied into `target`."""

    target: Any
    buffer: torch.Tensor


@dataclass
class OptimizerLoad:
    """Where each of an optimizer's states loads from: `targets` goes to dcp.load (flat keys of the
    checkpoint), `finish()` puts the values into the optimizer's state dict."""

    state_dict: dict[str, Any]
    targets: dict[str, Any] = field(default_factory=dict)
    _direct: list[tuple[dict[str, Any], str, str]] = field(default_factory=list)
    _conversions: list[_Conversion] = field(default_factory=list)
    _steps: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    fresh_tables: list[str] = field(default_factory=list)
    fresh_dense: list[str] = field(default_factory=list)

    def finish(self, step: int) -> dict[str, Any]:
        """After dcp.load of `targets`: the optimizer state dict to load, states converted, torch
        step counters without a counterpart set to `step`."""
        for states, name, key in self._direct:
            states[name] = self.targets[key]  # DCP replaces non-tensor values rather than filling them
        for conversion in self._conversions:
            _copy_into(conversion.target, conversion.buffer)
        for states, name in self._steps:
            value = states[name]
            states[name] = value.fill_(step) if isinstance(value, torch.Tensor) else float(step)
        if self.fresh_tables:
            log.warning(
                "the checkpoint holds no optimizer state of this optimizer for table(s) %s: it starts fresh there",
                ", ".join(sorted(set(self.fresh_tables))),
            )
        if self.fresh_dense:
            log.warning(
                "the checkpoint holds no dense optimizer state like this optimizer's (%d value(s), e.g. "
                "%s): it starts fresh",
                len(self.fresh_dense),
                self.fresh_dense[0],
            )
        return self.state_dict


def plan_optimizer_load(state_dict: dict[str, Any], saved: Metadata) -> OptimizerLoad:
    """How to fill `state_dict` (an optimizer's, whose states already exist) from a checkpoint
    whose DCP metadata is `saved`."""
    entries = saved.state_dict_metadata
    load = OptimizerLoad(state_dict)
    for param_key, states in state_dict["state"].items():
        for name, value in states.items():
            key = f"{PREFIX}{param_key}.{name}"
            if _fits(entries.get(key), value):
                load.targets[key] = value
                load._direct.append((states, name, key))
                continue
            counterpart = _counterpart(param_key, name, entries, value)
            if counterpart is not None:
                tensor = entries[counterpart]
                assert isinstance(tensor, TensorStorageMetadata)  # the only kind _counterpart picks
                buffer = torch.empty(tensor.size, dtype=tensor.properties.dtype)
                load.targets[counterpart] = buffer
                load._conversions.append(_Conversion(value, buffer))
            elif name == "step":
                load._steps.append((states, name))
            elif param_key.startswith((_FUSED, _REPLICATED)):
                load.fresh_tables.append(_table(param_key))
            else:
                load.fresh_dense.append(f"{param_key}.{name}")
    return load


def _fits(entry: Any, value: Any) -> bool:
    """Whether a checkpoint entry loads into `value` as it is."""
    if entry is None:
        return False
    if not isinstance(value, torch.Tensor):
        return not isinstance(entry, TensorStorageMetadata)
    return isinstance(entry, TensorStorageMetadata) and tuple(entry.size) == tuple(value.shape)


def _table(param_key: str) -> str:
    """The table's name in `<part>.<...>.embedding_bags.<table>.weight`."""
    return param_key.rsplit(".", 2)[-2]


def _counterpart(param_key: str, name: str, entries: dict[str, Any], value: Any) -> str | None:
    """The checkpoint key that holds this table state in the other form, if it holds as many values."""
    if not isinstance(value, torch.Tensor):
        return None
    candidates: list[str] = []
    if param_key.startswith(_FUSED):
        fqn, table = param_key[len(_FUSED) :], _table(param_key)
        state = name[len(table) + 1 :] if name.startswith(f"{table}.") else name
        candidates = [f"{PREFIX}{_REPLICATED}{fqn}.{torch_name}" for torch_name in _TORCH_NAMES.get(state, ())]
    elif param_key.startswith(_REPLICATED) and name in _FUSED_NAME:
        fqn, table = param_key[len(_REPLICATED) :], _table(param_key)
        candidates = [f"{PREFIX}{_FUSED}{fqn}.{table}.{_FUSED_NAME[name]}"]
    size = _global_numel(value)
    for key in candidates:
        entry = entries.get(key)
        if isinstance(entry, TensorStorageMetadata) and entry.size.numel() == size:
            return key
    return None


def _global_numel(value: torch.Tensor) -> int:
    return value.size().numel() if isinstance(value, ShardedTensor) else value.numel()


def _copy_into(target: Any, full: torch.Tensor) -> None:
    """Copy the whole-table `full` (in the checkpoint's shape) into `target`: a plain tensor, or
    this rank's shards of a ShardedTensor."""
    with torch.no_grad():
        if isinstance(target, ShardedTensor):
            full = full.reshape(target.size())
            for shard in target.local_shards():
                region = full
                for dim, (offset, size) in enumerate(zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes)):
                    region = region.narrow(dim, offset, size)
                shard.tensor.copy_(region)
        else:
            target.copy_(full.reshape(target.shape))
