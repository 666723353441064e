"""The model wrapped by DistributedModelParallel with the plan, and the DDPs inside it; optionally
with dense gradients kept local (k-step model averaging)."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper
from torchrec.distributed.types import ShardingPlan

from app.config import ShardingConfig
from app.sharding.sharders import sharders


class _LocalGradients(DefaultDataParallelWrapper):
    """DDP over the dense part, as by default, but with gradients kept local (no all-reduce): for
    k-step model averaging, where the ranks average parameters instead (app/trainer.py). DDP
    still broadcasts rank 0's initial parameters, so every rank starts from the same ones. Tables
    the planner replicates (data_parallel) sit in DDPs of their own inside TorchRec's sharded
    collection, which the dense DDP does not reach: they keep their gradients local too, and are
    averaged with the dense part."""

    def wrap(self, dmp: DistributedModelParallel, env, device: torch.device) -> None:
        super().wrap(dmp, env, device)
        for ddp in data_parallel_modules(dmp):
            ddp.register_comm_hook(None, _keep_local)


def data_parallel_modules(dmp: DistributedModelParallel) -> list[DistributedDataParallel]:
    """The dense part's DDP and the replicated tables' DDPs (held in a plain list, `_lookups`,
    of each sharded collection, so not among the model's submodules)."""
    found = [dmp._dmp_wrapped_module] if isinstance(dmp._dmp_wrapped_module, DistributedDataParallel) else []
    for module in dmp.modules():
        found += [lookup for lookup in getattr(module, "_lookups", []) if isinstance(lookup, DistributedDataParallel)]
    return found


def _keep_local(state, bucket):  # no annotations: DDP checks them, and this module's are strings
    """A DDP communication hook that communicates nothing: the bucket's local gradients."""
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def shard_model(
    model: nn.Module,
    plan: ShardingPlan,
    config: ShardingConfig,
    device: torch.device,
    batch_size: int,
    local_dense_gradients: bool = False,
    sparse_clip_value: float | None = None,
) -> DistributedModelParallel:
    """`batch_size`: per rank (it scales fp16 gradients in communication); `sparse_clip_value`:
    optim.sparse_clip_value."""
    wrapper = _LocalGradients() if local_dense_gradients else None
    with warnings.catch_warnings():
        # torchrec's own DDP wrap passes DDP's deprecated broadcast_buffers; nothing for us to change.
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        return DistributedModelParallel(
            model,
            device=device,
            plan=plan,
            sharders=sharders(config, device, batch_size, sparse_clip_value),
            data_parallel_wrapper=wrapper,
        )
