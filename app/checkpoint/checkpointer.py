"""Checkpointer: what a run is made of, when it is saved, and how a run continues from a checkpoint.

It is given the parts of a run that a checkpoint carries (model, optimizer, LR schedule; the data
position is the train state's epoch and batches done) and decides everything about them: the
cadence (checkpoint.every_n_steps), asynchronous saves, the final save, which checkpoint a run
starts from (its own newest intact one, else checkpoint.load_from, else none), refusing a
checkpoint of another model (what differs is found by compatibility.py), the optimizers' lazily
created state, and converting the saved position to this run's steps when the number of ranks or
the batch size changed. The files themselves are the CheckpointStore's (app/checkpoint/store.py).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from app.checkpoint.compatibility import check_managed_collision_world_size, model_differences
from app.checkpoint.lookup import find_checkpoint
from app.checkpoint.optimizer_state import plan_optimizer_load
from app.checkpoint.precision_state import loss_scale_meta, restore_loss_scale, saved_loss_scale
from app.checkpoint.resumed_best import resume_best
from app.checkpoint.safe_load import CheckpointError, load_state, read_dcp_metadata
from app.checkpoint.store import CheckpointStore
from app.checkpoint.verification import read_meta
from app.config import CheckpointConfig, Config, ConfigError
from app.optim import FUSED_PART, set_fused_optimizer_step, set_schedule_step
from app.storage import PathLike, location

log = logging.getLogger(__name__)

# The two parts of a checkpoint's state (DCP keys are "<part>.<the part's state_dict key>").
MODEL_KEY = "model"
OPTIMIZER_KEY = "optimizer"


@dataclass
class TrainState:
    """Where a run is: what a checkpoint resumes. The data position is (epoch, batches_done); the
    best validation metric so far and the evaluations since it improved (trainer.early_stopping)
    are resumed too, so a resumed run stops, and picks its best checkpoint, as an uninterrupted
    one would."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0  # steps done in the current epoch
    samples: int = 0  # over all ranks
    best_metric: str | None = None  # the validation metric best_value is of
    best_value: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0  # evaluations since the last improvement
    evaluated_samples: int = -1  # `samples` at the last evaluation counted: is this position's counted?
    stopped_early: str | None = None  # why the run stopped before its planned steps: it trains no further

    def forget_best(self) -> None:
        self.best_metric = self.best_value = self.best_step = self.stopped_early = None
        self.evals_since_best, self.evaluated_samples = 0, -1


@dataclass(frozen=True)
class RunShape:
    """How many samples a step is and how many steps an epoch and the run are."""

    world_size: int
    global_batch_size: int
    steps_per_epoch: int
    total_steps: int


@dataclass(frozen=True)
class SavedCheckpoint:
    """A checkpoint's meta.json, typed: the position it was saved at, in the shape of its run."""

    path: PathLike
    step: int
    state: TrainState
    world_size: int
    global_batch_size: int
    steps_per_epoch: int | None  # None in checkpoints that predate it
    config: Config
    loss_scale: dict[str, Any] | None = None  # fp16's GradScaler state (precision_state.py)

    @classmethod
    def read(cls, path: PathLike) -> SavedCheckpoint:
        from app.hydra_edge import config_from_dict  # the config's dict form is checked like a composed one

        meta = read_meta(path)
        try:
            config = config_from_dict(meta["config"])
            state = TrainState(**meta["train_state"])
            world_size = int(meta["world_size"])
            global_batch_size = int(meta.get("global_batch_size") or world_size * config.data.batch_size)
            steps_per_epoch = meta.get("steps_per_epoch")
            loss_scale = saved_loss_scale(meta)
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(
                f"checkpoint {path} is not usable: its meta.json does not describe a run of this "
                f"version of rectrain ({type(error).__name__}: {error})."
            ) from error
        return cls(
            location(path), int(meta["step"]), state, world_size, global_batch_size, steps_per_epoch, config, loss_scale
        )


@dataclass
class RunParts:
    """What a run trains and on what. A checkpoint saves the model and the optimizer (and a restore
    fills them in place); the LR schedule is recomputed for the step and the training data is
    positioned by the TrainState, so neither needs state of its own in the files."""

    model: nn.Module
    optimizer: Any  # torchrec's CombinedOptimizer (app/optim.py)
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    train_data: Any  # app/data/parquet.py's training reader: set_epoch, load_state_dict, len(), iter()
    val_data: Any  # its evaluation reader
    test_data: Any = None  # an evaluation reader of the test split, if there is one
    loss_scale: torch.amp.GradScaler | None = None  # fp16's: saved in meta.json (precision_state.py)


def position_here(saved: SavedCheckpoint, here: RunShape) -> TrainState:
    """The checkpoint's position in this run's steps. Progress is samples: a run on another number
    of ranks or another batch size continues its epoch after as many samples (less than one batch's
    worth repeated), at the step, and so the LR, an uninterrupted run of this shape would be at,
    with the samples that run counts there, and it ends where that run would."""
    if saved.world_size == here.world_size and saved.global_batch_size == here.global_batch_size:
        return dataclasses.replace(saved.state)
    epoch_done = saved.steps_per_epoch is not None and saved.state.batches_done >= saved.steps_per_epoch
    done = saved.state.batches_done * saved.global_batch_size
    batches = here.steps_per_epoch if epoch_done else min(done // here.global_batch_size, here.steps_per_epoch)
    # Samples as this run counts them: those of the epochs before, and this run's batches since.
    samples = saved.state.samples - done + batches * here.global_batch_size
    evaluated = samples if saved.state.evaluated_samples == saved.state.samples else saved.state.evaluated_samples
    position = dataclasses.replace(
        saved.state,
        step=saved.state.epoch * here.steps_per_epoch + batches,
        batches_done=batches,
        samples=samples,
        evaluated_samples=evaluated,
    )
    # Row groups are dealt to ranks by world size: the same samples cannot be replayed on another one.
    log.warning(
        "the checkpoint was written by %d ranks with a global batch of %d, this run has %d ranks and "
        "%d: epoch %d continues after %d samples, at step %d of %d (was step %d)",
        saved.world_size,
        saved.global_batch_size,
        here.world_size,
        here.global_batch_size,
        saved.state.epoch,
        batches * here.global_batch_size,
        position.step,
        here.total_steps,
        saved.state.step,
    )
    return position


class Checkpointer:
    def __init__(
        self, store: CheckpointStore, config: CheckpointConfig, run_config: Config, parts: RunParts, shape: RunShape
    ) -> None:
        """`run_config`: the whole config, saved with every checkpoint (the model is compared
        against it on load, and export rebuilds the model from it)."""
        self.store = store
        self.config = config
        self.run_config = run_config
        self.parts = parts
        self.shape = shape
        self._last_saved: tuple[int, str] = (-1, "")  # (step, name) of this run's latest checkpoint

    @property
    def every_n_steps(self) -> int:
        return self.config.every_n_steps

    def is_due(self, step: int) -> bool:
        """Whether the cadence saves at `step` (the end of a run is saved whatever it says)."""
        return self.config.every_n_steps > 0 and step % self.config.every_n_steps == 0

    # ---- saving -------------------------------------------------------------------------------

    def maybe_save(self, state: TrainState, force: bool = False, best: dict[str, Any] | None = None) -> bool:
        """Collective. Save at `state` when the cadence says so (asynchronously, if so configured);
        `force`: the end of a run, an early stop or a preemption, saved now and synchronously unless
        this step is saved already, and any asynchronous save published. `best` ({"metric",
        "value"}): this step's evaluation is the best so far: it is saved whatever the cadence
        (unless it is already), and becomes checkpoints/best. Returns whether it saved."""
        if self._last_saved[0] == state.step and (force or best is not None):
            if best is not None:
                self.store.mark_best(self._last_saved[1], best)
            if force:
                self.store.wait()
            return False
        if not (force or best is not None or self.is_due(state.step)):
            return False
        background = self.config.async_save and not force
        meta = {
            "train_state": asdict(state),
            "world_size": self.shape.world_size,
            "global_batch_size": self.shape.global_batch_size,
            "steps_per_epoch": self.shape.steps_per_epoch,
            "config": dataclasses.asdict(self.run_config),
            **loss_scale_meta(self.parts.loss_scale),
        }
        state_dict = {MODEL_KEY: self.parts.model.state_dict(), OPTIMIZER_KEY: self.parts.optimizer.state_dict()}
        path = self.store.save(state.step, state_dict, meta, asynchronous=background, samples=state.samples, best=best)
        self._last_saved = (state.step, path.name)
        log.info("saved checkpoint %s%s", path, " (writing in the background)" if background else "")
        if force:
            self.store.wait()  # nothing left in the background: old checkpoints are deleted too
        return True

    def wait(self) -> None:
        """Collective: publish an asynchronous save still being written, and finish deleting the
        checkpoints keep-last pruned."""
        self.store.wait()

    def best(self) -> dict[str, Any] | None:
        """Collective: the best checkpoint's record ({"checkpoint", "step", "samples", "metric",
        "value"}, see CheckpointStore), or None; an asynchronous save is published first."""
        self.store.wait()
        return self.store.best_record()

    def load_weights(self, name: str) -> None:
        """Collective: this run's checkpoint `name` (step_N) model weights into the model, in place
        (the optimizer and the position are left as they are)."""
        path = self.store.storage.path(name)
        state = {MODEL_KEY: self.parts.model.state_dict()}
        load_state(path, state, self.store.group)
        self.parts.model.load_state_dict(state[MODEL_KEY])

    # ---- restoring ----------------------------------------------------------------------------

    def restore(self, load_from: str | None = None, mode: str = "all") -> TrainState:
        """Collective. Continue from the newest intact checkpoint of the run; if it has none, start
        from `load_from` (another run's checkpoint: everything, or with mode "model" the weights
        only); else from scratch. With checkpoint.resume=false, a run that has checkpoints is refused."""
        newest = None if self.config.resume else self.store.latest()
        if newest is not None:
            # Starting over beside them would mix two runs' steps, and pruning would delete the new ones.
            raise ConfigError(
                f"checkpoint.resume=false, but {self.store.directory} already holds checkpoints (newest: "
                f"{newest.name}); choose another run_name or remove them."
            )
        own = self.store.newest_valid()
        if own is not None:
            return self._load(own, everything=True)
        if load_from:
            state = self._load(find_checkpoint(location(load_from), self.store.group), everything=mode == "all")
            state.forget_best()  # another run's: this run has its own best, and its own patience
            return state
        return TrainState()

    def _load(self, path: PathLike, everything: bool) -> TrainState:
        saved = SavedCheckpoint.read(path)
        own = self.store.holds(path)
        if own:
            resume_best(self.store, saved.state)  # in the checkpoint's own steps and samples
        check_managed_collision_world_size(saved, self.shape.world_size)
        differences = model_differences(saved.config, self.run_config)
        if differences:
            advice = (
                "Restore those settings, or train this model under another run_name."
                if own
                else "Restore those settings, or set checkpoint.load_from to a checkpoint of this model."
            )
            raise ConfigError(
                f"checkpoint {path} holds another model than this config describes: "
                + "; ".join(differences)
                + f". {advice}"
            )
        model, optimizer = self.parts.model, self.parts.optimizer
        metadata = read_dcp_metadata(path)
        if not everything:
            state = {MODEL_KEY: model.state_dict()}
            load_state(path, state, self.store.group, metadata=metadata)
            model.load_state_dict(state[MODEL_KEY])
            log.info("started from the model weights of %s (step %d)", path, saved.step)
            return TrainState()
        # The dense optimizers create their state lazily; DCP loads in place, so it must exist.
        for name, part in optimizer.optimizers:
            if name != FUSED_PART:
                part.init_state()
        # Each table's optimizer state where this plan keeps it, from wherever the checkpoint's plan did.
        optimizer_load = plan_optimizer_load(optimizer.state_dict(), metadata)
        state = {MODEL_KEY: model.state_dict(), **optimizer_load.targets}
        load_state(path, state, self.store.group, metadata=metadata)
        model.load_state_dict(state[MODEL_KEY])
        position = position_here(saved, self.shape)
        optimizer.load_state_dict(optimizer_load.finish(position.step))
        # The schedule is recomputed for the step, not loaded: a changed optim.lr takes effect.
        set_schedule_step(self.parts.lr_scheduler, position.step)
        set_fused_optimizer_step(optimizer, position.step)
        restore_loss_scale(self.parts.loss_scale, saved.loss_scale, path)
        # This run's checkpoint of this position, which a best evaluation here marks: the one
        # loaded, unless the position was remapped (another global batch).
        if own and (position.step, position.samples) == (saved.step, saved.state.samples):
            self._last_saved = (position.step, path.name)
        log.info("resumed from %s at step %d (epoch %d)", path, position.step, position.epoch)
        return position
