"""Gradient clipping where torch's and FBGEMM's own do not do what the options promise alone.

`optim.clip_grad_norm` (`clip_dense_gradients`): the dense part's gradients are scaled to a total
L2 norm. With synchronous data parallelism DDP has averaged them before the step, so every rank
holds the same gradients and torch's norm is the global one. Under k-step averaging
(trainer.dense_average_every > 0) each rank steps on its own gradients, and each rank's own norm
would clip each rank by a different factor: the norm is then the root mean square of the ranks'
norms, sqrt(mean_r |g_r|^2) (one scalar all-reduce a step), equal to the synchronous norm when
the ranks' gradients agree, and every rank scales by the same factor.

`optim.sparse_clip_value` (`clip_replicated_table_gradients`): FBGEMM's fused optimizers clamp
the gradient of each sample's pooled embedding (of each position's, for sequence tables),
element-wise, before summing it into the rows (`gradient_clipping`, on CPU and CUDA alike): a
row met k times in a step can move by up to k times the bound. A row's summed gradient never
exists outside the fused kernel, so that is what the option means. Tables the plan replicates
(data_parallel) have no fused optimizer: the same clamp is applied to the gradient of their
lookup's output. Their samples' gradients are those of the rank's own mean loss, while the
sharded tables' are divided by the world size on their way back (torchrec's gradient division),
so the replicas' bound is value x world size: after DDP's average (or k-step averaging's) each
sample contributes at most `value`, as on a sharded table.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from fbgemm_gpu.split_table_batched_embeddings_ops_training import DenseTableBatchedEmbeddingBagsCodegen
from torch import nn

from app.sharding import data_parallel_modules


def clip_dense_gradients(parameters: Iterable[torch.Tensor], max_norm: float, local_gradients: bool) -> torch.Tensor:
    """Scale the gradients of `parameters` to total L2 norm `max_norm` (when above it); returns the
    norm before clipping. `local_gradients`: each rank holds its own (k-step averaging), so the norm
    is the root mean square over the ranks (collective: every rank calls it each step)."""
    parameters = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    if local_gradients and dist.is_initialized() and dist.get_world_size() > 1:
        squared = norm.pow(2)
        dist.all_reduce(squared)
        norm = (squared / dist.get_world_size()).sqrt()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


def replicated_tables(model: nn.Module) -> list[DenseTableBatchedEmbeddingBagsCodegen]:
    """The kernels of the tables a sharded model replicates (data_parallel)."""
    found = {}
    for ddp in data_parallel_modules(model):
        found.update({id(m): m for m in ddp.modules() if isinstance(m, DenseTableBatchedEmbeddingBagsCodegen)})
    return list(found.values())


def clip_replicated_table_gradients(model: nn.Module, value: float, world_size: int) -> int:
    """Clamp the gradient of every replicated table's lookup output to [-bound, bound], bound =
    value x world_size (see the module's docstring); returns how many table kernels it reaches."""
    bound = float(value) * world_size

    def clamp_output_gradient(module, args, output):
        if output.requires_grad:
            output.register_hook(lambda grad: grad.clamp(-bound, bound))

    tables = replicated_tables(model)
    for table in tables:
        table.register_forward_hook(clamp_output_gradient)
    return len(tables)
