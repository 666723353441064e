"""The optimizers of a real sharded model (one rank): where weight decay applies, and FBGEMM's
step counter, which a resume must give back to the fused table optimizers."""

from __future__ import annotations

import pytest
import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from app.distributed import DistEnv
from app.features import FeatureSchema
from app.hydra_edge import compose_config
from app.job import build_sharded_model
from app.optim import REPLICATED_PART, build_optimizer, set_fused_optimizer_step

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}

ENV = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))


def sharded(*overrides: str, env: DistEnv = ENV):
    config = compose_config(["experiment=tiny", *overrides])
    schema = FeatureSchema.from_config(config.features)
    torch.manual_seed(0)
    model = build_sharded_model(config, schema, env, run_dir=None)
    return model, build_optimizer(model, config.optim), schema


def batch(schema: FeatureSchema, size: int = 16, seed: int = 1) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.ones(size * len(schema.sparse), dtype=torch.int64)
    values = torch.cat([torch.randint(0, f.num_embeddings, (size,), generator=generator) for f in schema.sparse])
    return Batch(
        dense_features=torch.rand(size, len(schema.dense), generator=generator),
        sparse_features=KeyedJaggedTensor.from_lengths_sync(keys=schema.sparse_names, values=values, lengths=lengths),
        labels=torch.randint(0, 2, (size,), generator=generator).float(),
    )


def fused_kernels(optimizer):
    """The FBGEMM modules behind the fused table optimizers (torchrec does not register them as
    submodules of the model)."""
    for _, part in optimizer.optimizers:
        if hasattr(part, "optimizers"):
            yield from fused_kernels(part)
        elif isinstance(getattr(part, "_emb_module", None), SplitTableBatchedEmbeddingBagsCodegen):
            yield part._emb_module


def local(value):
    return value.local_shards()[0].tensor if isinstance(value, ShardedTensor) else value


@pytest.mark.parametrize("sharding", ["data_parallel", "table_wise"])
def test_weight_decay_reaches_the_dense_layers_and_no_table(sharding, single_process_group):
    after = {}
    for weight_decay in (0.0, 0.5):
        model, optimizer, schema = sharded(f"sharding={sharding}", f"optim.weight_decay={weight_decay}")
        before = {name: local(value).clone() for name, value in model.state_dict().items()}
        optimizer.zero_grad()
        loss, _ = model(batch(schema))
        loss.backward()
        optimizer.step()
        after[weight_decay] = {name: local(value).clone() for name, value in model.state_dict().items()}
    tables = [name for name in after[0.0] if "embedding_bags" in name]
    dense = [name for name in after[0.0] if "embedding_bags" not in name]
    assert len(tables) == 26 and dense
    assert any(not torch.equal(after[0.0][name], before[name]) for name in tables)  # the step reached them
    for name in tables:
        assert torch.equal(after[0.0][name], after[0.5][name]), f"{name} decayed"
    assert any(not torch.equal(after[0.0][name], after[0.5][name]) for name in dense)


def test_the_fused_table_optimizers_take_the_step_count_a_resume_gives(single_process_group):
    _, optimizer, _ = sharded("sharding=table_wise")
    kernels = list(fused_kernels(optimizer))
    assert kernels and all(int(kernel.iter[0]) == 0 for kernel in kernels)
    set_fused_optimizer_step(optimizer, 7)
    assert all(int(kernel.iter[0]) == 7 for kernel in kernels)


@pytest.mark.parametrize("optim", ["rowwise_adagrad", "adagrad"])
def test_replicated_fp16_tables_step_with_fp32_state(optim, single_process_group):
    """A replicated fp16 table's torch optimizer keeps its state in fp32, as FBGEMM does for a
    sharded one: in fp16, eps rounds to 0 and every row without a gradient became 0/0 = NaN."""
    results = {}
    for data_type in ("fp32", "fp16"):
        model, optimizer, schema = sharded(
            "sharding=data_parallel", f"features.data_type={data_type}", f"optim.sparse={optim}", "optim.dense=sgd"
        )
        replicated = dict(optimizer.optimizers)[REPLICATED_PART]
        before = {name: param.detach().float().clone() for name, param in replicated.params.items()}
        optimizer.zero_grad()
        loss, _ = model(batch(schema))
        loss.backward()
        optimizer.step()
        assert {param.dtype for param in replicated.params.values()} == {DTYPES[data_type]}
        states = [value for state in replicated.state.values() for key, value in state.items() if key != "step"]
        assert states and {value.dtype for value in states} == {torch.float32}
        results[data_type] = {name: param.detach().float() - before[name] for name, param in replicated.params.items()}
    updates = {data_type: torch.cat([u.flatten() for u in results[data_type].values()]) for data_type in results}
    assert torch.isfinite(updates["fp16"]).all() and updates["fp32"].norm() > 0
    # The same update, up to fp16's rounding of the weights and of the gradients.
    cosine = torch.nn.functional.cosine_similarity(updates["fp16"], updates["fp32"], dim=0)
    assert cosine > 0.99 and abs(updates["fp16"].norm() / updates["fp32"].norm() - 1) < 0.05
