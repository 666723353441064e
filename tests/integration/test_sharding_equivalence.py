"""Every sharding type, on 2 real gloo ranks, computes what the unsharded model computes.

Each rank feeds its own batch through the sharded model (our build_model -> apply_sparse_optimizer
-> plan_sharding -> shard_model -> build_optimizer). The reference is the same model unsharded on
one process. Checked: each rank's logits and loss; the dense gradients (DDP averages them over
ranks, so the reference loss is the mean of the ranks' losses; TorchRec divides the table
gradients by the world size to match); and every parameter, tables gathered in full, after one
SGD step. Last, that shutdown() leaves none of the process groups' threads behind.
"""

from __future__ import annotations

import gc
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from app.config import FeaturesConfig, ModelConfig, OptimConfig, ShardingConfig, SparseFeature
from app.distributed import shutdown
from app.features import FeatureSchema
from app.models import build_model
from app.optim import apply_sparse_optimizer, build_optimizer
from app.sharding import plan_sharding, shard_model

SHARDING_TYPES = ["data_parallel", "table_wise", "column_wise", "table_column_wise", "row_wise", "table_row_wise"]
SCHEMA = FeatureSchema.from_config(
    FeaturesConfig(
        dense=["d0", "d1", "d2", "d3"],
        sparse=[SparseFeature("a", 60), SparseFeature("b", 120, hotness=3), SparseFeature("c", 200)],
        embedding_dim=8,
    )
)
OPTIM = OptimConfig(dense="sgd", sparse="sgd", lr=0.1)
BATCH = 6
WORLD = 2


def model_config(arch: str) -> ModelConfig:
    return ModelConfig(
        arch=arch, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1], dcn_num_layers=2, dcn_low_rank_dim=4
    )


def make_batch(seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.cat(
        [
            torch.ones(BATCH, dtype=torch.long),
            torch.randint(0, 4, (BATCH,), generator=g),
            torch.ones(BATCH, dtype=torch.long),
        ]
    )
    values = torch.cat(
        [
            torch.randint(0, n, (int(count),), generator=g)
            for n, count in zip((60, 120, 200), lengths.view(3, BATCH).sum(1))
        ]
    )
    return Batch(
        dense_features=torch.rand(BATCH, 4, generator=g),
        sparse_features=KeyedJaggedTensor.from_lengths_sync(keys=["a", "b", "c"], values=values, lengths=lengths),
        labels=torch.randint(0, 2, (BATCH,), generator=g).float(),
    )


def reference_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(model_config(arch), SCHEMA, torch.device("cpu"))
    tables = EmbeddingBagCollection(tables=SCHEMA.embedding_bag_configs(), device=torch.device("cpu"))
    for weight in tables.parameters():
        torch.nn.init.uniform_(weight, -0.5, 0.5)
    model.model.sparse_arch.embedding_bag_collection = tables
    return model


def full_tensor(value):
    """The whole tensor on rank 0 (None elsewhere); collective for sharded values."""
    if isinstance(value, ShardedTensor):
        out = torch.zeros(value.size()) if dist.get_rank() == 0 else None
        value.gather(dst=0, out=out)
        return out
    if isinstance(value, DTensor):
        return value.full_tensor()
    return value


def by_suffix(named: dict, name: str):
    matches = [v for k, v in named.items() if k.endswith(name) or name.endswith(k)]
    assert len(matches) == 1, (name, list(named))
    return matches[0]


def check_one(sharding_type: str, arch: str) -> None:
    reference = reference_model(arch)
    initial = {k: v.clone() for k, v in reference.state_dict().items()}

    model = build_model(model_config(arch), SCHEMA, torch.device("cpu"))
    apply_sparse_optimizer(model, OPTIM, torch.device("cpu"))
    plan, _ = plan_sharding(
        model,
        ShardingConfig(sharding_types=[sharding_type]),
        SCHEMA,
        torch.device("cpu"),
        BATCH,
        WORLD,
        WORLD,
        dist.group.WORLD,
    )
    chosen = {p.sharding_type for p in plan.plan["model.sparse_arch.embedding_bag_collection"].values()}
    assert chosen == {sharding_type}, chosen
    sharded = shard_model(
        model, plan, ShardingConfig(sharding_types=[sharding_type]), torch.device("cpu"), batch_size=BATCH
    )
    sharded.load_state_dict(initial)
    optimizer = build_optimizer(sharded, OPTIM)

    compare_one_step(
        sharded,
        optimizer,
        reference,
        [make_batch(seed) for seed in range(WORLD)],
        OPTIM.lr,
        f"{sharding_type}/{arch}",
        skip="embedding_bag_collection",
    )


def compare_one_step(sharded, optimizer, reference, batches, lr: float, label: str, skip: str) -> list:
    """Collective: the sharded model's logits and loss on this rank's batch, its gradients (but of
    parameters whose name holds `skip`: the tables, whose fused optimizer steps them in backward)
    and its whole state after one step equal those of `reference`, stepped by plain SGD on the mean
    loss of every rank's batch. Returns the names of the parameters whose gradients were compared."""
    rank = dist.get_rank()
    loss, (_, logits, _) = sharded(batches[rank])
    ref_loss, (_, ref_logits, _) = reference(batches[rank])
    torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)

    optimizer.zero_grad()
    loss.backward()
    (sum(reference(b)[0] for b in batches) / len(batches)).backward()
    ref_params = dict(reference.named_parameters())
    compared = []
    for name, param in sharded.named_parameters():
        if skip in name or param.grad is None:
            continue
        torch.testing.assert_close(
            param.grad,
            by_suffix(ref_params, name).grad,
            atol=1e-6,
            rtol=1e-5,
            msg=lambda m, name=name: f"{label} grad of {name}: {m}",
        )
        compared.append(name)
    optimizer.step()
    with torch.no_grad():
        for param in reference.parameters():
            param -= lr * param.grad

    ref_state = reference.state_dict()
    for name, value in sharded.state_dict().items():
        full = full_tensor(value)
        if rank == 0:
            torch.testing.assert_close(
                full,
                by_suffix(ref_state, name),
                atol=1e-5,
                rtol=1e-5,
                msg=lambda m, name=name: f"{label} {name} after one step: {m}",
            )
    return compared


def native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def worker(rank: int, init_file: str, cases, failures) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for sharding_type, arch in cases:
            try:
                check_one(sharding_type, arch)
            except Exception:
                failures[f"rank {rank} {sharding_type}/{arch}"] = traceback.format_exc()
                raise
            dist.barrier()
    finally:
        shutdown()
    # The sharded models' process groups must be gone with their threads: left to the
    # interpreter's exit, their teardown once aborted a rank ("terminate called without an
    # active exception") after every check had passed.
    left = native_threads()
    gc.collect()
    if native_threads() != left:
        failures[f"rank {rank} shutdown"] = (
            f"{left - native_threads()} threads outlived shutdown() and ended only at a later garbage collection"
        )
        raise AssertionError(failures[f"rank {rank} shutdown"])


CASES = [(t, "dlrm") for t in SHARDING_TYPES] + [("row_wise", "dcn"), ("table_column_wise", "dcn")]


def test_every_sharding_type_matches_the_unsharded_model(tmp_path):
    failures = mp.Manager().dict()
    try:
        mp.spawn(worker, args=(str(tmp_path / "init"), CASES, failures), nprocs=WORLD, join=True)
    except Exception as error:
        pytest.fail(f"{error}\n" + "\n".join(f"--- {k}\n{v}" for k, v in failures.items()))
