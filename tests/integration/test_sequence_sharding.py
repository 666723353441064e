"""The histories' EmbeddingCollection (features.sequence), sharded on 2 real gloo ranks by each type
allowed for it on CPU (table_wise, column_wise, row_wise), computes what the unsharded model
computes: logits and loss, the dense gradients (the attention units' included), and every
parameter, the tables gathered in full, after one SGD step. As test_sharding_equivalence.py does
for the pooled tables, whose helpers it uses."""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from app.config import FeaturesConfig, ModelConfig, OptimConfig, SequenceFeature, ShardingConfig, SparseFeature
from app.data.sequence_batch import SequenceBatch
from app.distributed import shutdown
from app.features import FeatureSchema, target_key
from app.models import build_model
from app.models.sequence import SEQUENCE_TABLES_PATH
from app.optim import apply_sparse_optimizer, build_optimizer
from app.sharding import plan_sharding, shard_model
from tests.integration.test_sharding_equivalence import compare_one_step

SCHEMA = FeatureSchema.from_config(
    FeaturesConfig(
        dense=["d0", "d1"],
        sparse=[SparseFeature("item", 40), SparseFeature("user", 30)],
        embedding_dim=8,
        sequence=[SequenceFeature("history", 50, max_length=4, target="item")],
    )
)
OPTIM = OptimConfig(dense="sgd", sparse="sgd", lr=0.1)
BATCH = 6
WORLD = 2
MODEL = ModelConfig(dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1], sequence_attention_layer_sizes=[8])


def make_batch(seed: int) -> SequenceBatch:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(0, 40, (BATCH,), generator=g)
    users = torch.randint(0, 30, (BATCH,), generator=g)
    history_lengths = torch.randint(0, 5, (BATCH,), generator=g)  # 0 (an empty history) to max_length
    history = torch.randint(0, 50, (int(history_lengths.sum()),), generator=g)
    ones = torch.ones(BATCH, dtype=torch.long)
    return SequenceBatch(
        dense_features=torch.rand(BATCH, 2, generator=g),
        sparse_features=KeyedJaggedTensor.from_lengths_sync(
            keys=["item", "user"], values=torch.cat([items, users]), lengths=torch.cat([ones, ones])
        ),
        labels=torch.randint(0, 2, (BATCH,), generator=g).float(),
        sequence_features=KeyedJaggedTensor.from_lengths_sync(
            keys=["history", target_key("history")],
            values=torch.cat([history, items]),
            lengths=torch.cat([history_lengths, ones]),
        ),
    )


def reference_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(MODEL, SCHEMA, torch.device("cpu"), tables_device=torch.device("cpu"))
    for name, weight in model.named_parameters():
        if "embedding" in name:
            torch.nn.init.uniform_(weight, -0.5, 0.5)
    return model


def check_one(sharding_type: str) -> None:
    reference = reference_model()
    initial = {k: v.clone() for k, v in reference.state_dict().items()}

    config = ShardingConfig(sharding_types=[sharding_type])
    model = build_model(MODEL, SCHEMA, torch.device("cpu"))
    apply_sparse_optimizer(model, OPTIM, torch.device("cpu"))
    plan, _ = plan_sharding(model, config, SCHEMA, torch.device("cpu"), BATCH, WORLD, WORLD, dist.group.WORLD)
    chosen = {p.sharding_type for p in plan.plan[SEQUENCE_TABLES_PATH].values()}
    assert chosen == {sharding_type}, chosen
    sharded = shard_model(model, plan, config, torch.device("cpu"), batch_size=BATCH)
    sharded.load_state_dict(initial)
    optimizer = build_optimizer(sharded, OPTIM)

    assert any("embedding_collection.embeddings.t_history" in k for k in sharded.state_dict())
    compared = compare_one_step(
        sharded,
        optimizer,
        reference,
        [make_batch(seed) for seed in range(WORLD)],
        OPTIM.lr,
        sharding_type,
        skip="embedding",
    )
    assert any("attention" in name for name in compared), "no attention unit's gradient was compared"


def worker(rank: int, init_file: str, cases, failures) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for sharding_type in cases:
            try:
                check_one(sharding_type)
            except Exception:
                failures[f"rank {rank} {sharding_type}"] = traceback.format_exc()
                raise
            dist.barrier()
    finally:
        shutdown()


def test_every_sequence_sharding_type_matches_the_unsharded_model(tmp_path):
    failures = mp.Manager().dict()
    try:
        mp.spawn(
            worker,
            args=(str(tmp_path / "init"), ["table_wise", "column_wise", "row_wise"], failures),
            nprocs=WORLD,
            join=True,
        )
    except Exception as error:
        pytest.fail(f"{error}\n" + "\n".join(f"--- {k}\n{v}" for k, v in failures.items()))
