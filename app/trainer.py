"""Trainer: the training loop, evaluation cadence and checkpoint cadence. Never sees Hydra.

Training runs in segments that end at the next evaluation, checkpoint or epoch boundary. Each
segment feeds TrainPipelineSparseDist a slice of the epoch's iterator, so the pipeline drains at
the boundary: checkpoints are taken with no batch in flight, and the data position saved with them
is exactly the number of steps done in the epoch.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from tqdm import tqdm

from app.checkpoint import CheckpointManager, find_checkpoint, model_differences, read_dcp_metadata, read_meta
from app.config import ConfigError, TrainerConfig
from app.data.parquet import ParquetBatches
from app.distributed import DistEnv
from app.metrics import EvalMetrics, MetricsLogger
from app.optim import learning_rates, set_fused_optimizer_step, set_schedule_step
from app.optimizer_state import plan_optimizer_load
from app.preemption import AGREE_EVERY_N_STEPS, Preemption

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batches_done: int = 0  # steps done in the current epoch
    samples: int = 0  # over all ranks


def planned_steps(config: TrainerConfig, steps_per_epoch: int) -> int:
    total = config.epochs * steps_per_epoch
    return total if config.max_steps is None else min(total, config.max_steps)


def _next_multiple(step: int, every: int) -> Optional[int]:
    return (step // every + 1) * every if every > 0 else None


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
        train_data: ParquetBatches,
        val_data: ParquetBatches,
        checkpoints: CheckpointManager,
        checkpoint_every_n_steps: int,
        async_save: bool,
        metrics_logger: MetricsLogger,
        config: TrainerConfig,
        env: DistEnv,
        run_meta: Dict[str, Any],
        preemption: Preemption,
        progress_bar: bool = True,
        control_group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        """`control_group`: a gloo group for the loop's own agreements (which checkpoint to load),
        apart from the checkpoint's group, which an asynchronous save uses from a background
        thread. `preemption` says when SIGTERM asks every rank to stop."""
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.train_data = train_data
        self.val_data = val_data
        self.checkpoints = checkpoints
        self.checkpoint_every = checkpoint_every_n_steps
        self.async_save = async_save
        self.metrics_logger = metrics_logger
        self.config = config
        self.env = env
        self.run_meta = run_meta
        self.progress_bar = progress_bar and env.is_rank0
        self.global_batch_size = train_data.batch_size * env.world_size
        self.steps_per_epoch = len(train_data)
        self.total_steps = planned_steps(config, self.steps_per_epoch)
        self._pipeline: Optional[TrainPipelineSparseDist] = None
        if config.pipeline == "sparse_dist":
            self._pipeline = TrainPipelineSparseDist(model, optimizer, env.device)
        self._last_saved_step = -1
        self.control_group = control_group
        self.dense_averages = 0
        self.preemption = preemption

    # ---- state that checkpoints carry -------------------------------------------------------

    def _checkpoint_state(self) -> Dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def save(self, state: TrainState, final: bool = False) -> None:
        """Checkpoint at `state`; asynchronous when so configured, except the last one of a run."""
        meta = {
            "train_state": asdict(state),
            "world_size": self.env.world_size,
            "global_batch_size": self.global_batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            **self.run_meta,
        }
        background = self.async_save and not final
        path = self.checkpoints.save(state.step, self._checkpoint_state(), meta, asynchronous=background,
                                     samples=state.samples)
        self._last_saved_step = state.step
        log.info("saved checkpoint %s%s", path, " (writing in the background)" if background else "")

    def resume(self, load_from: Optional[str] = None, load_mode: str = "all") -> TrainState:
        """Continue from the newest intact checkpoint of the run; if it has none, start from
        `load_from` (another run's checkpoint: everything, or the model only); else from scratch."""
        # Both collective: every rank verifies its share of the files and gets the same answer.
        own = self.checkpoints.newest_valid()
        if own is not None:
            return self._load(own, everything=True)
        if load_from:
            return self._load(find_checkpoint(Path(load_from), self.control_group), everything=load_mode == "all")
        return TrainState()

    def _load(self, path: Path, everything: bool) -> TrainState:
        meta = read_meta(path)
        differences = model_differences(meta["config"], self.run_meta["config"])
        if differences:
            own = path.parent == self.checkpoints.directory
            advice = ("Restore those settings, or train this model under another run_name." if own else
                      "Restore those settings, or set checkpoint.load_from to a checkpoint of this model.")
            raise ConfigError(f"checkpoint {path} holds another model than this config describes: "
                              + "; ".join(differences) + f". {advice}")
        if not everything:
            state = {"model": self.model.state_dict()}
            self.checkpoints.load(path, state)
            self.model.load_state_dict(state["model"])
            log.info("started from the model weights of %s (step %d)", path, meta["step"])
            return TrainState()
        # The dense optimizers create their state lazily; DCP loads in place, so it must exist.
        for name, part in self.optimizer.optimizers:
            if name != "sparse":
                part.init_state()
        # Each table's optimizer state where this plan keeps it, from wherever the checkpoint's plan did.
        optimizer_load = plan_optimizer_load(self.optimizer.state_dict(), read_dcp_metadata(path))
        state = {"model": self.model.state_dict(), **optimizer_load.targets}
        self.checkpoints.load(path, state)
        self.model.load_state_dict(state["model"])
        train_state = self._position_here(TrainState(**meta["train_state"]), meta)
        self.optimizer.load_state_dict(optimizer_load.finish(train_state.step))
        set_schedule_step(self.lr_scheduler, train_state.step)
        set_fused_optimizer_step(self.optimizer, train_state.step)
        self._last_saved_step = train_state.step if path.parent == self.checkpoints.directory else -1
        log.info("resumed from %s at step %d (epoch %d)", path, train_state.step, train_state.epoch)
        return train_state

    def _position_here(self, saved: TrainState, meta: Dict[str, Any]) -> TrainState:
        """The checkpoint's position in this run's steps. Progress is samples: a run on another
        number of ranks or another batch size continues its epoch after as many samples (less than
        one batch's worth repeated), at the step, and so the LR, an uninterrupted run of this
        shape would be at, and it ends where that run would."""
        saved_batch = meta.get("global_batch_size") or meta["world_size"] * meta["config"]["data"]["batch_size"]
        if meta["world_size"] == self.env.world_size and saved_batch == self.global_batch_size:
            return saved
        saved_steps_per_epoch = meta.get("steps_per_epoch")
        epoch_done = saved_steps_per_epoch is not None and saved.batches_done >= saved_steps_per_epoch
        done = saved.batches_done * saved_batch
        batches = self.steps_per_epoch if epoch_done else min(done // self.global_batch_size, self.steps_per_epoch)
        here = TrainState(step=saved.epoch * self.steps_per_epoch + batches, epoch=saved.epoch,
                          batches_done=batches, samples=saved.samples)
        # Row groups are dealt to ranks by world size: the same samples cannot be replayed on another one.
        log.warning("the checkpoint was written by %d ranks with a global batch of %d, this run has %d ranks and "
                    "%d: epoch %d continues after %d samples, at step %d of %d (was step %d)",
                    meta["world_size"], saved_batch, self.env.world_size, self.global_batch_size, saved.epoch,
                    batches * self.global_batch_size, here.step, self.total_steps, saved.step)
        return here

    # ---- the loop ---------------------------------------------------------------------------

    def fit(self, state: TrainState) -> Optional[Dict[str, float]]:
        """Train from `state` to the end; returns the final validation metrics, or None when
        stopped by SIGTERM (after saving a checkpoint to resume from)."""
        bar = tqdm(total=self.total_steps, initial=state.step, disable=not self.progress_bar,
                   desc="train", unit="step", dynamic_ncols=True)
        window = _Window(time.perf_counter())
        preempted = False
        while state.step < self.total_steps and not preempted:
            if state.batches_done >= self.steps_per_epoch:
                state.epoch, state.batches_done = state.epoch + 1, 0
            self.train_data.set_epoch(state.epoch)
            self.train_data.load_state_dict({"epoch": state.epoch, "batches_done": state.batches_done})
            epoch_batches = iter(self.train_data)
            try:
                while state.batches_done < self.steps_per_epoch and state.step < self.total_steps:
                    segment = self._segment_length(state)
                    for loss in self._train_steps(epoch_batches, segment):
                        state.step += 1
                        state.batches_done += 1
                        state.samples += self.global_batch_size
                        self.lr_scheduler.step()
                        window.add(loss)
                        bar.update(1)
                        if self.config.dense_average_every and state.step % self.config.dense_average_every == 0:
                            self._average_dense()
                        if state.step % self.config.log_every_n_steps == 0:
                            self._log_train(state, window, bar)
                        if state.step % AGREE_EVERY_N_STEPS == 0 and self.preemption.agreed():
                            preempted = True
                            break
                    if preempted:
                        break
                    self._at_boundary(state)
            finally:
                close = getattr(epoch_batches, "close", None)
                if close is not None:
                    close()
        bar.close()
        self._average_if_stale(state)
        if preempted:
            log.warning("SIGTERM: stopping at step %d; saving a checkpoint to resume from", state.step)
            self.save(state, final=True)
            return None
        if self.config.dense_average_every:
            log.info("k-step averaging: %d dense parameter averages in this run", self.dense_averages)
        # Saved before the final evaluation, so that bad validation rows found there (or a crash)
        # cost no training.
        if self._last_saved_step != state.step:
            self.save(state, final=True)
        self.checkpoints.wait()
        return self.evaluate(state)

    def _segment_length(self, state: TrainState) -> int:
        ends = [state.step + self.steps_per_epoch - state.batches_done, self.total_steps]
        for every in (self.config.eval_every_n_steps, self.checkpoint_every):
            boundary = _next_multiple(state.step, every)
            if boundary is not None:
                ends.append(boundary)
        return min(ends) - state.step

    def _train_steps(self, batches: Iterator, count: int) -> Iterator[torch.Tensor]:
        """Yields each step's (local) loss after its optimizer step."""
        segment = itertools.islice(batches, count)
        if self._pipeline is not None:
            for _ in range(count):
                loss, _logits, _labels = self._pipeline.progress(segment)
                yield loss
            return
        for batch in segment:
            batch = batch.to(self.env.device)
            self.optimizer.zero_grad()
            loss, _ = self.model(batch)
            loss.backward()
            self.optimizer.step()
            yield loss.detach()

    def _average_dense(self) -> None:
        """k-step model averaging: every rank's dense (and replicated-table) parameters, and their
        optimizer's state (Adagrad's sums, Adam's moments), become the mean over ranks, in one
        all-reduce of them all flattened. Averaging the state too keeps the ranks one optimizer:
        a checkpoint then holds the state every rank has, not whichever rank's DCP saved."""
        tensors = []
        for name, part in self.optimizer.optimizers:
            if name == "sparse":
                continue
            for param in part.params.values():
                tensors.append(param)
                tensors += [value for key, value in part.state.get(param, {}).items()
                            if key != "step" and isinstance(value, torch.Tensor) and value.is_floating_point()]
        if not tensors or self.env.world_size == 1:
            return
        with torch.no_grad():
            flat = torch.cat([t.detach().reshape(-1) for t in tensors])
            dist.all_reduce(flat)
            flat /= self.env.world_size
            offset = 0
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
        self.dense_averages += 1

    def _average_if_stale(self, state: TrainState) -> None:
        """With k-step averaging, make the ranks' dense parts one model again (unless this step
        just did) before it is evaluated or saved."""
        every = self.config.dense_average_every
        if every and state.step % every:
            self._average_dense()

    def _at_boundary(self, state: TrainState) -> None:
        if state.step >= self.total_steps:
            return  # fit() evaluates and saves at the end
        evaluate = self.config.eval_every_n_steps and state.step % self.config.eval_every_n_steps == 0
        save = self.checkpoint_every and state.step % self.checkpoint_every == 0
        if evaluate or save:
            self._average_if_stale(state)
        if evaluate:
            self.evaluate(state)
        if save:
            self.save(state)

    def _log_train(self, state: TrainState, window: "_Window", bar: tqdm) -> None:
        loss = window.mean_loss()
        elapsed = time.perf_counter() - window.start
        record = {
            "step": state.step,
            "epoch": state.epoch,
            "samples": state.samples,
            "loss": loss,
            **learning_rates(self.optimizer),
            "samples_per_s": window.steps * self.global_batch_size / max(elapsed, 1e-9),
        }
        self.metrics_logger.log("train", record)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        window.reset(time.perf_counter())

    # ---- evaluation -------------------------------------------------------------------------

    def evaluate(self, state: TrainState) -> Dict[str, float]:
        model = self._pipeline.detach() if self._pipeline is not None else self.model
        model.eval()
        metrics = EvalMetrics(self.env.device)
        batches = iter(self.val_data)
        if self.config.eval_max_batches is not None:
            batches = itertools.islice(batches, self.config.eval_max_batches)
        with torch.no_grad():
            for item in batches:
                batch = item.batch.to(self.env.device)
                _, (_loss, logits, labels) = model(batch)
                metrics.update(logits[: item.valid], labels[: item.valid])
        result = metrics.compute()
        model.train()
        if self._pipeline is not None:
            self._pipeline.attach(model)
        self.metrics_logger.log("eval", {"step": state.step, "epoch": state.epoch, "samples": state.samples, **result})
        log.info(
            "eval step %d: auc %.4f  logloss %.4f  ne %.4f  (%d samples)",
            state.step, result["auc"], result["logloss"], result["ne"], result["samples"],
        )
        return result


class _Window:
    """Loss and throughput since the last log line; the loss is averaged over all ranks."""

    def __init__(self, start: float) -> None:
        self.reset(start)

    def reset(self, start: float) -> None:
        self.start = start
        self.steps = 0
        self._loss_sum: Optional[torch.Tensor] = None

    def add(self, loss: torch.Tensor) -> None:
        self.steps += 1
        loss = loss.detach().float()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss

    def totals(self) -> torch.Tensor:
        """[loss sum, steps] on the losses' device (where the all-reduce of mean_loss needs them)."""
        return torch.stack([self._loss_sum, self._loss_sum.new_tensor(float(self.steps))])

    def mean_loss(self) -> float:
        total = self.totals()
        if dist.is_initialized():
            dist.all_reduce(total)
        return (total[0] / total[1]).item()
