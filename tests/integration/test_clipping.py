"""optim.sparse_clip_value and optim.clip_grad_norm on 2 real gloo ranks, with the model, plan,
sharding and optimizer step that app.train builds (app/job.py's build_sharded_model, OptimizerStep).

sparse_clip_value: FBGEMM clamps each sample's gradient of a table's pooled embedding before summing
it into the rows, so a row met k times in the global batch moves by at most k x value (lr 1, SGD);
a replicated (data_parallel) table gets the same update as a sharded one (it was not clipped at all).
clip_grad_norm under k-step averaging: ranks with different gradients scale them by one factor,
taken from the root mean square of their norms (each clipped by its own norm before)."""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from app.clipping import replicated_tables
from app.config import Config, FeaturesConfig, ModelConfig, OptimConfig, ShardingConfig, SparseFeature, TrainerConfig
from app.distributed import DistEnv, shutdown
from app.features import FeatureSchema
from app.job import build_sharded_model
from app.models import build_model
from app.optim import OptimizerStep, build_optimizer, dense_parameters
from tests.integration.test_sharding_equivalence import full_tensor

WORLD, BATCH, HOT_ROW = 2, 8, 7
SPARSE_CLIP, NORM_CLIP = 1e-6, 1e-4
CPU = torch.device("cpu")


def config(sharding: str, dense_average_every: int = 0, **optim) -> Config:
    return Config(
        features=FeaturesConfig(
            dense=["d0", "d1", "d2"],
            sparse=[SparseFeature("a", 30), SparseFeature("b", 40, hotness=3)],
            embedding_dim=8,
        ),
        model=ModelConfig(dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1]),
        sharding=ShardingConfig(sharding_types=[sharding]),
        optim=OptimConfig(dense="sgd", sparse="sgd", lr=1.0, **optim),
        trainer=TrainerConfig(dense_average_every=dense_average_every),
    ).validate()


def make_batch(rank: int) -> Batch:
    """Every sample of every rank meets row HOT_ROW of table a; b's first bag holds row 3 three times."""
    g = torch.Generator().manual_seed(rank)
    b_lengths = torch.cat([torch.tensor([3]), torch.randint(1, 4, (BATCH - 1,), generator=g)])
    b_values = torch.cat([torch.tensor([3, 3, 3]), torch.randint(0, 40, (int(b_lengths[1:].sum()),), generator=g)])
    return Batch(
        dense_features=torch.rand(BATCH, 3, generator=g) * (1 + 4 * rank),  # the ranks' gradients differ
        sparse_features=KeyedJaggedTensor.from_lengths_sync(
            keys=["a", "b"],
            values=torch.cat([torch.full((BATCH,), HOT_ROW), b_values]),
            lengths=torch.cat([torch.ones(BATCH, dtype=torch.long), b_lengths]),
        ),
        labels=torch.randint(0, 2, (BATCH,), generator=g).float(),
    )


def built(cfg: Config, rank: int):
    """The sharded model from one initial state (whatever the sharding) and its optimizer step."""
    schema = FeatureSchema.from_config(cfg.features)
    torch.manual_seed(0)
    initial = build_model(cfg.model, schema, CPU, tables_device=CPU).state_dict()
    model = build_sharded_model(cfg, schema, DistEnv(rank, WORLD, rank, WORLD, CPU), None)
    model.load_state_dict(initial)
    step = OptimizerStep(
        build_optimizer(model, cfg.optim), cfg.optim.clip_grad_norm, local_gradients=cfg.trainer.dense_average_every > 0
    )
    return model, step


def tables(model) -> dict:
    """Every table in full on rank 0 (collective)."""
    full = {name: full_tensor(value) for name, value in model.state_dict().items() if "embedding_bags" in name}
    return {name: value.clone() for name, value in full.items() if value is not None}  # a replica's is itself


def table_updates(sharding: str, rank: int) -> dict:
    model, step = built(config(sharding, sparse_clip_value=SPARSE_CLIP), rank)
    assert bool(replicated_tables(model)) == (sharding == "data_parallel")
    before = tables(model)
    loss, _ = model(make_batch(rank))
    step.backward(loss)
    step.step()
    after = tables(model)
    return {name: after[name] - before[name] for name in before} if rank == 0 else {}


def check_sparse_clip_value(rank: int) -> None:
    sharded, replicated = table_updates("table_wise", rank), table_updates("data_parallel", rank)
    if rank != 0:
        return
    for name, update in sharded.items():
        torch.testing.assert_close(
            replicated[name], update, atol=1e-10, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )
    hot = sharded["model.sparse_arch.embedding_bag_collection.embedding_bags.t_a.weight"]
    met = WORLD * BATCH  # times row HOT_ROW is met in the global batch
    assert hot[HOT_ROW].abs().max() <= met * SPARSE_CLIP * (1 + 1e-4)
    assert hot[HOT_ROW].abs().max() > SPARSE_CLIP  # each sample is clipped, not the row's sum
    assert hot.abs().sum() == hot[HOT_ROW].abs().sum()  # no other row moved


def check_clip_grad_norm_under_k_step_averaging(rank: int) -> None:
    model, step = built(config("table_wise", dense_average_every=4, clip_grad_norm=NORM_CLIP), rank)
    params = dense_parameters(step.optimizer)
    before = [p.detach().clone() for p in params]
    loss, _ = model(make_batch(rank))
    step.backward(loss)
    grad = torch.cat([p.grad.flatten() for p in params]).clone()  # before clipping: DDP kept it local
    step.step()
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)])
    factor = (update.norm() / grad.norm()).reshape(1)  # lr 1: SGD's update is -factor x gradient
    norms, factors = torch.zeros(WORLD), torch.zeros(WORLD)
    dist.all_gather_into_tensor(norms, grad.norm().reshape(1))
    dist.all_gather_into_tensor(factors, factor)
    assert abs(norms[0] - norms[1]) > 0.5 * norms.min(), norms  # the ranks' gradients differ
    torch.testing.assert_close(factors[0], factors[1], rtol=1e-4, atol=0)
    torch.testing.assert_close(factors[0], NORM_CLIP / norms.pow(2).mean().sqrt(), rtol=1e-4, atol=0)
    torch.testing.assert_close(step.last_grad_norm, norms.pow(2).mean().sqrt(), rtol=1e-5, atol=0)


CHECKS = {"sparse_clip_value": check_sparse_clip_value, "clip_grad_norm": check_clip_grad_norm_under_k_step_averaging}


def worker(rank: int, init_file: str, results) -> None:
    """Both checks in one process group (its 2 processes cost more than the checks): each one's
    outcome on this rank in `results`. A failure ends the process, as it did with one check a
    group: the other rank may wait in a collective the failed check never reaches."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for name, check in CHECKS.items():
            try:
                check(rank)
            except Exception:
                results[name, rank] = traceback.format_exc()
                raise
            results[name, rank] = "passed"
    finally:
        shutdown()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """(each check's outcome on each rank, the error of the spawned group if it failed)."""
    results = mp.Manager().dict()
    try:
        mp.spawn(worker, args=(str(tmp_path_factory.mktemp("clipping") / "init"), results), nprocs=WORLD, join=True)
    except Exception as error:
        return dict(results), error
    return dict(results), None


@pytest.mark.parametrize("name", CHECKS)
def test_clipping_on_two_ranks(outcomes, name):
    results, error = outcomes
    mine = {rank: results.get((name, rank), "not run: a check before it failed") for rank in range(WORLD)}
    if error is not None or any(outcome != "passed" for outcome in mine.values()):
        pytest.fail(f"{error}\n" + "\n".join(f"--- rank {rank}\n{outcome}" for rank, outcome in mine.items()))
