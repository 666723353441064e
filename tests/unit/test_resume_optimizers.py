"""Each optimizer preset's state across the two plans a resume on another number of ranks meets, in
this process through the Checkpointer's real save and restore: a table sharded on one rank keeps
its state fused in FBGEMM's kernels, a table the planner replicates on 2+ ranks (data_parallel)
keeps it in a torch optimizer of its own. tests/integration/test_resume.py resumes real runs onto
another number of workers for one preset (the one with the most state) under torchrun; the others'
state conversions are proven here, both ways, for the price of a process that is already running."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor

from app.checkpoint import Checkpointer, CheckpointStore, RunParts, RunShape, TrainState
from app.distributed import DistEnv
from app.features import FeatureSchema
from app.hydra_edge import compose_config
from app.job import build_sharded_model
from app.optim import DENSE_PART, FUSED_PART, REPLICATED_PART, OptimizerStep, optimizer_and_schedule
from tests.integration.test_resume import PRESETS
from tests.unit.test_optim_sharded import batch

ENV = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
TABLE_PART = {"table_wise": FUSED_PART, "data_parallel": REPLICATED_PART}  # where each plan keeps table state
FUSED_NAME = {"sum": "momentum1", "exp_avg": "momentum1", "exp_avg_sq": "momentum2"}  # torch's -> FBGEMM's


def checkpointer(run_dir: Path, preset: str, sharding: str) -> Checkpointer:
    """A one-rank run of experiment=tiny with `preset` whose tables are all `sharding`, over fresh parts."""
    config = compose_config(["experiment=tiny", f"sharding={sharding}", *PRESETS[preset]])
    schema = FeatureSchema.from_config(config.features)
    torch.manual_seed(0)
    model = build_sharded_model(config, schema, ENV, run_dir=None)
    shape = RunShape(1, config.data.batch_size, 31, 62)
    optimizer, schedule = optimizer_and_schedule(model, config.optim, shape.total_steps)
    parts = RunParts(model, optimizer, schedule, train_data=None, val_data=None)
    store = CheckpointStore(run_dir / "checkpoints", config.checkpoint.keep_last, rank=0)
    return Checkpointer(store, config.checkpoint, config, parts, shape)


def train_steps(run: Checkpointer, first: int, count: int) -> TrainState:
    """`count` steps on batches that depend on the step only; the position after the last."""
    schema = FeatureSchema.from_config(run.run_config.features)
    step = OptimizerStep(run.parts.optimizer, run.run_config.optim.clip_grad_norm)
    for number in range(first, first + count):
        run.parts.optimizer.zero_grad()  # as the trainer's pipeline does before each step
        loss, _ = run.parts.model(batch(schema, size=32, seed=number))
        step.backward(loss)
        step.step()
        run.parts.lr_scheduler.step()
    last = first + count - 1
    return TrainState(step=last, batches_done=last, samples=last * 128)


def full(value) -> torch.Tensor:
    """A one-rank state's whole tensor (a ShardedTensor has its one shard)."""
    return value.local_shards()[0].tensor if isinstance(value, ShardedTensor) else value


def states(run: Checkpointer) -> dict[tuple[str, str], torch.Tensor]:
    """Every optimizer state tensor but step counters, flat, keyed (parameter, FBGEMM's name for a
    table state), whichever form the plan keeps it in."""
    flat = {}
    for key, named in run.parts.optimizer.state_dict()["state"].items():
        part, _, param = key.partition(".")
        for name, value in named.items():
            if name == "step" or not isinstance(value, torch.Tensor):
                continue
            if part in (FUSED_PART, REPLICATED_PART):
                name = FUSED_NAME.get(name, name.rsplit(".", 1)[-1])
            else:
                assert part == DENSE_PART, key
            flat[param, name] = full(value).detach().flatten().clone()
    return flat


def weights(run: Checkpointer) -> dict[str, torch.Tensor]:
    return {k: full(v).detach().clone() for k, v in run.parts.model.state_dict().items() if torch.is_tensor(v)}


def restored(run_dir: Path, preset: str, sharding: str, caplog) -> Checkpointer:
    """A fresh run of `sharding` resumed from the run's newest checkpoint, with every state loaded
    (no table or dense state starting fresh), in the form this plan keeps it."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run = checkpointer(run_dir, preset, sharding)
        run.restore()
    form = {key.partition(".")[0] for key in run.parts.optimizer.state_dict()["state"]}
    assert preset == "sgd" or TABLE_PART[sharding] in form, form
    assert "starts fresh" not in caplog.text and "Missing key" not in caplog.text, caplog.text
    return run


@pytest.mark.parametrize("preset", PRESETS)
def test_each_presets_state_resumes_exactly_and_across_fused_and_replicated_tables(
    preset, tmp_path, single_process_group, caplog
):
    run = checkpointer(tmp_path, preset, "table_wise")  # fused, as every table is on 1 rank
    assert run.restore() == TrainState()
    run.maybe_save(train_steps(run, 1, 3), force=True)
    saved = states(run), weights(run)
    assert preset == "sgd" or any(value.abs().sum() > 0 for value in saved[0].values())
    train_steps(run, 4, 2)
    uninterrupted = states(run), weights(run)

    # The same plan: resumed at step 3, steps 4 and 5 end bitwise where the uninterrupted run's did.
    same = restored(tmp_path, preset, "table_wise", caplog)
    _equal(same, saved)
    train_steps(same, 4, 2)
    _equal(same, uninterrupted)

    # Fused -> replicated (as small tables are on 2+ ranks), then back: the same numbers, and
    # training goes on from them.
    replicated = restored(tmp_path, preset, "data_parallel", caplog)
    _equal(replicated, saved)
    replicated.maybe_save(train_steps(replicated, 4, 2), force=True)
    assert any(not torch.equal(value, saved[1][key]) for key, value in weights(replicated).items())
    _equal(restored(tmp_path, preset, "table_wise", caplog), (states(replicated), weights(replicated)))


def _equal(run: Checkpointer, expected: tuple[dict, dict]) -> None:
    """The run's optimizer states and weights are bitwise `expected`'s."""
    for got, want in zip((states(run), weights(run)), expected):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert torch.equal(got[key], value), key
