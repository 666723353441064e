"""The Checkpointer's decisions, in this process on real checkpoints of a real run: which checkpoint
a run starts from, what it refuses, and where a position lands on another number of ranks or
another batch size."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from app import job
from app.checkpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointStore,
    RunParts,
    RunShape,
    SavedCheckpoint,
    TrainState,
    position_here,
)
from app.config import ConfigError
from app.distributed import DistEnv
from app.features import FeatureSchema
from app.hydra_edge import compose_config
from app.optim import optimizer_and_schedule

ENV = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))
TINY = [
    "experiment=tiny",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
    "trainer.max_steps=20",
    "checkpoint.every_n_steps=10",
]


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A finished run of experiment=tiny with checkpoints at steps 10 and 20 (20 is its last)."""
    root = tmp_path_factory.mktemp("checkpointer")
    config = compose_config([*TINY, f"output_root={root}", f"data.synthetic.root={root / 'data'}"])
    job.run(config, root / config.run_name)
    return root, root / config.run_name


def checkpointer_for(run_dir: Path, *overrides: str, data_root: Path) -> Checkpointer:
    """A Checkpointer over fresh parts of a one-rank run of `overrides` whose own run dir is `run_dir`."""
    config = compose_config([*TINY, f"data.synthetic.root={data_root}", *overrides])
    schema = FeatureSchema.from_config(config.features)
    torch.manual_seed(1)
    model = job.build_sharded_model(config, schema, ENV, run_dir=None)
    train_files, val_files = job.dataset_files(config.data, schema, is_rank0=True)
    train_data, val_data = job.build_loaders(config.data, schema, ENV, train_files, val_files)
    shape = RunShape(1, config.data.batch_size, len(train_data), 40)
    optimizer, lr_scheduler = optimizer_and_schedule(model, config.optim, shape.total_steps)
    parts = RunParts(model, optimizer, lr_scheduler, train_data, val_data)
    store = CheckpointStore(run_dir / "checkpoints", config.checkpoint.keep_last, rank=0)
    return Checkpointer(store, config.checkpoint, config, parts, shape)


def weights(checkpointer: Checkpointer):
    return {k: v.clone() for k, v in checkpointer.parts.model.state_dict().items() if isinstance(v, torch.Tensor)}


def test_a_run_continues_from_its_own_checkpoint_before_load_from(source_run, tmp_path, single_process_group):
    root, source = source_run
    own = checkpointer_for(source, data_root=root / "data")
    state = own.restore(load_from=str(tmp_path / "nowhere"))  # not even looked at
    assert dataclasses.replace(
        state, best_metric=None, best_value=None, best_step=None, evaluated_samples=-1
    ) == TrainState(step=20, epoch=0, batches_done=20, samples=20 * 128)
    # Step 20 became the best at the final evaluation, after its checkpoint was written: the state
    # takes that from checkpoints/best, so a longer run resumed from it never moves the best to a worse one.
    assert (state.best_metric, state.best_step, state.evals_since_best) == ("auc", 20, 0)
    # Its last checkpoint is its own: the end of the run is not saved again.
    assert own.maybe_save(state, force=True) is False


def test_load_from_continues_another_run_or_takes_its_weights_only(source_run, tmp_path, single_process_group):
    root, source = source_run
    everything = checkpointer_for(tmp_path / "new", data_root=root / "data")
    assert everything.restore(str(source), "all").step == 20
    assert everything.maybe_save(TrainState(step=20), force=True) is True  # the new run's first checkpoint
    fresh = weights(checkpointer_for(tmp_path / "other", data_root=root / "data"))
    model_only = checkpointer_for(tmp_path / "other", data_root=root / "data")
    assert model_only.restore(str(source / "checkpoints" / "step_00000010"), "model") == TrainState()
    loaded = weights(model_only)
    assert any(not torch.equal(fresh[k], loaded[k]) for k in fresh)  # the checkpoint's weights,
    assert any(not torch.equal(loaded[k], v) for k, v in weights(everything).items())  # of step 10, not 20


def test_nothing_to_resume_is_a_fresh_start_and_a_missing_load_from_an_error(
    source_run, tmp_path, single_process_group
):
    root, _ = source_run
    assert checkpointer_for(tmp_path / "new", data_root=root / "data").restore() == TrainState()
    with pytest.raises(CheckpointError, match="no such directory"):
        checkpointer_for(tmp_path / "new", data_root=root / "data").restore(str(tmp_path / "nowhere"))


def test_resume_false_refuses_a_run_that_has_checkpoints(source_run, single_process_group):
    root, source = source_run
    with pytest.raises(
        ConfigError, match=r"checkpoint\.resume=false, but .* already holds checkpoints .*step_00000020"
    ):
        checkpointer_for(source, "checkpoint.resume=false", data_root=root / "data").restore()


def test_a_checkpoint_of_another_model_is_refused_naming_the_keys(source_run, tmp_path, single_process_group):
    root, source = source_run
    other = checkpointer_for(tmp_path / "new", "model.over_arch_layer_sizes=[32,1]", data_root=root / "data")
    with pytest.raises(
        ConfigError,
        match=r"another model .*model.over_arch_layer_sizes: \[64, 32, 1\] in the "
        r"checkpoint, \[32, 1\] now.*checkpoint.load_from",
    ):
        other.restore(str(source))


def saved(
    step: int, batches_done: int, epoch: int = 0, world_size: int = 1, batch: int = 128, steps_per_epoch=31
) -> SavedCheckpoint:
    state = TrainState(step, epoch, batches_done, samples=step * batch)
    return SavedCheckpoint(Path("step"), step, state, world_size, batch, steps_per_epoch, config=None)


def test_a_position_on_another_shape_is_the_same_samples_in_its_steps():
    same = RunShape(1, 128, 31, 62)
    assert position_here(saved(35, 4, epoch=1), same) == TrainState(35, 1, 4, 35 * 128)
    twice = RunShape(2, 256, 15, 30)  # 2 ranks: 15 batches of 256 per epoch
    assert position_here(saved(20, 20), twice) == TrainState(10, 0, 10, 20 * 128)
    # Samples are counted as this run counts them: its 10 batches of 256 (half a batch repeats).
    assert position_here(saved(21, 21), twice) == TrainState(10, 0, 10, 10 * 256)
    assert position_here(saved(31, 31), twice) == TrainState(15, 0, 15, 15 * 256)  # a whole epoch stays whole
    assert position_here(saved(35, 4, epoch=1), twice) == TrainState(17, 1, 2, 35 * 128)
    back = RunShape(1, 128, 31, 62)
    assert position_here(saved(10, 10, world_size=2, batch=256, steps_per_epoch=15), back) == TrainState(
        20, 0, 20, 10 * 256
    )
    bigger_batch = RunShape(1, 256, 15, 30)
    assert position_here(saved(20, 20), bigger_batch) == TrainState(10, 0, 10, 20 * 128)
