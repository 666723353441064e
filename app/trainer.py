"""Trainer: the training loop, its evaluation cadence and its logging. Never sees Hydra.

Training runs in segments that end at the next evaluation, checkpoint or epoch boundary. Each
segment feeds TrainPipelineSparseDist a slice of the epoch's iterator, so the pipeline drains at
the boundary: checkpoints are taken with no batch in flight, and the data position saved with them
is exactly the number of steps done in the epoch. What a checkpoint holds, when one is written and
how a run continues from one is the Checkpointer's (app/checkpoint/).

Every evaluation (app/evaluation.py) is judged by trainer.early_stopping (app/early_stopping.py):
one that improves the best validation metric is saved, whatever the checkpoint cadence, and
becomes checkpoints/best; the run stops early when the metric has not improved for `patience`
evaluations or reaches `target`. The
best so far and the evaluations since are part of the train state, so a resumed run decides as an
uninterrupted one would, and a run that stopped early trains no further when run again. At the
end, the test split is evaluated with the best checkpoint's weights.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import closing
from typing import Any

import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from tqdm import tqdm

from app.checkpoint import Checkpointer, RunParts, RunShape, TrainState
from app.config import TrainerConfig
from app.distributed import DistEnv
from app.early_stopping import EarlyStopping
from app.evaluation import BadInputElsewhere, EvaluationStopped, Evaluator
from app.metrics import MetricsLogger
from app.optim import FUSED_PART, OptimizerStep
from app.preemption import AGREE_EVERY_N_STEPS, Preemption
from app.training_loss import DivergedError, LossWindow, NonFiniteLoss

log = logging.getLogger(__name__)


def planned_steps(config: TrainerConfig, steps_per_epoch: int) -> int:
    total = config.epochs * steps_per_epoch
    return total if config.max_steps is None else min(total, config.max_steps)


def segment_length(state: TrainState, shape: RunShape, *cadences: int) -> int:
    """Steps from `state` to the next boundary: the end of its epoch, the end of the run, or the
    next multiple of any of `cadences` (evaluation, checkpoint; 0 is none)."""
    ends = [state.step + shape.steps_per_epoch - state.batches_done, shape.total_steps]
    ends += [(state.step // every + 1) * every for every in cadences if every > 0]
    return min(ends) - state.step


class StepPipeline(TrainPipelineSparseDist):
    """TrainPipelineSparseDist whose backward and optimizer step are an OptimizerStep's (loss
    scaling, clipping)."""

    def __init__(self, model: torch.nn.Module, optimizer_step: OptimizerStep, device: torch.device) -> None:
        super().__init__(model, optimizer_step.optimizer, device)
        self.optimizer_step = optimizer_step

    def _backward(self, losses: torch.Tensor) -> None:
        self.optimizer_step.backward(torch.sum(losses, dim=0))

    def _optimizer_step(self) -> None:
        self.optimizer_step.step()


class Trainer:
    def __init__(
        self,
        parts: RunParts,
        checkpointer: Checkpointer,
        metrics_logger: MetricsLogger,
        preemption: Preemption,
        config: TrainerConfig,
        env: DistEnv,
        progress_bar: bool = True,
        optimizer_step: OptimizerStep | None = None,
        tasks: Sequence[str] = (),
        primary_task: str | None = None,
    ) -> None:
        """`preemption` says when SIGTERM asks every rank to stop; the run's shape (steps per
        epoch, total steps, global batch) is the checkpointer's, which converts positions by it.
        `optimizer_step` does backward and step (default: plain, for parts.optimizer). `tasks`:
        the label columns of a multi-task model (each gets its metrics), `primary_task` the one
        that decides and whose metrics are also unprefixed (default: the first)."""
        self.parts = parts
        self.model, self.optimizer, self.lr_scheduler = parts.model, parts.optimizer, parts.lr_scheduler
        self.checkpointer = checkpointer
        self.metrics_logger = metrics_logger
        self.preemption = preemption
        self.config = config
        self.env = env
        self.progress_bar = progress_bar and env.is_rank0
        self.shape = checkpointer.shape  # the checkpointer's: it converts positions by it
        self.optimizer_step = optimizer_step or OptimizerStep(self.optimizer)
        self._pipeline: StepPipeline | None = None
        if config.pipeline == "sparse_dist":
            self._pipeline = StepPipeline(self.model, self.optimizer_step, env.device)
        self.dense_averages = 0
        self.tasks = list(tasks) if len(tasks) > 1 else []
        self.primary_task = (primary_task or self.tasks[0]) if self.tasks else None
        self.early_stopping = EarlyStopping(config.early_stopping, self.primary_task)
        self.outcome: dict[str, Any] = {}  # how fit() ended, for summary.json
        self.nonfinite = NonFiniteLoss(config.max_nonfinite_steps, env.rank, env.world_size)
        self.evaluator = Evaluator(
            self.model,
            self._pipeline,
            checkpointer,
            metrics_logger,
            preemption,
            env,
            self.tasks,
            self.primary_task,
            self.progress_bar,
        )

    # ---- the loop ---------------------------------------------------------------------------

    def fit(self, state: TrainState) -> dict[str, float] | None:
        """Train from `state` to the end, or until trainer.early_stopping stops it; then evaluate
        the test split (if any) with the best checkpoint. Returns the final validation metrics, or
        None when stopped by SIGTERM (after saving a checkpoint to resume from). Raises
        DivergedError when the training loss stops being finite, and a rank's bad input met in an
        evaluation (after saving the training done)."""
        self.early_stopping.resume(state)
        self._started = (time.perf_counter(), state.samples)
        try:
            return self._fit(state)
        except EvaluationStopped as stopped:
            self._after_abandoned_evaluation(state, stopped)
            return None

    def _fit(self, state: TrainState) -> dict[str, float] | None:
        stopped_before = state.stopped_early
        if stopped_before:
            log.info(
                "this run stopped early at step %d (%s): it trains no further (checkpoint.load_from=<this run> "
                "in a new run trains on from it)",
                state.step,
                stopped_before,
            )
        elif self._evaluation_missed(state):
            self._evaluate_and_judge(state)
        # Counted in steps, shown in samples: the rate is samples/s, and the time left is the run's.
        bar = tqdm(
            total=self.shape.total_steps,
            initial=state.step,
            desc="train",
            unit="sample",
            unit_scale=self.shape.global_batch_size,
            dynamic_ncols=True,
            disable=not self.progress_bar or bool(stopped_before),
        )
        with closing(bar):
            stopped = self._train(state, LossWindow(time.perf_counter()), bar)
        self._record_outcome(state)
        self._average_if_stale(state)
        if stopped:
            log.warning("SIGTERM: stopping at step %d; saving a checkpoint to resume from", state.step)
            self._save_to_resume(state)
            return None
        if state.stopped_early and not stopped_before:
            log.warning("stopping early at step %d of %d: %s", state.step, self.shape.total_steps, state.stopped_early)
        if self.config.dense_average_every:
            log.info("k-step averaging: %d dense parameter averages in this run", self.dense_averages)
        if not self._trusted(state):
            raise DivergedError(self.nonfinite.at_the_end(state.step))
        # Saved before the final evaluation, so that bad validation rows found there (or a crash)
        # cost no training.
        self.checkpointer.maybe_save(state, force=True)
        result = self._final_evaluation(state, judge=not stopped_before)
        test = self.evaluator.test(state, self.parts.test_data)
        self.outcome.update(
            stopped_early=state.stopped_early,
            validation={"step": state.step, **result},
            best=self.checkpointer.best(),
            test=test,
        )
        return result

    def _record_outcome(self, state: TrainState) -> None:
        """Training as it went, evaluations and checkpoints at its boundaries included."""
        start, samples_before = self._started
        trained = state.samples - samples_before
        self.outcome = {
            "step": state.step,
            "epoch": state.epoch,
            "planned_steps": self.shape.total_steps,
            "samples": state.samples,
            "samples_per_s": trained / (time.perf_counter() - start) if trained else None,
        }

    def _save_to_resume(self, state: TrainState) -> None:
        """A forced save at `state` (none when its step is saved already), unless its latest
        training loss was not finite: a run resumes from the checkpoint before, then."""
        if self._trusted(state):
            self.checkpointer.maybe_save(state, force=True)

    def _after_abandoned_evaluation(self, state: TrainState, stopped: EvaluationStopped) -> None:
        """The ranks abandoned an evaluation at `state` (its model was trusted: no evaluation runs
        otherwise): the training up to it is saved, then SIGTERM's stop (None) or the bad input's
        error. The evaluation is not counted: a resumed run evaluates that step again."""
        self._record_outcome(state)
        reason = "SIGTERM" if stopped.by_sigterm else "bad input"
        log.warning(
            "%s during the evaluation at step %d: abandoned; saving a checkpoint to resume from", reason, state.step
        )
        self.checkpointer.maybe_save(state, force=True)
        if stopped.by_sigterm:
            return None
        raise stopped.error or BadInputElsewhere(
            f"the evaluation at step {state.step} stopped: another rank met bad input in its share of the data "
            "(its error says where); the training up to that step is saved."
        )

    def _final_evaluation(self, state: TrainState, judge: bool) -> dict[str, float]:
        """The validation metrics at the end: those of the evaluation that stopped the run early,
        or a new evaluation, which (when `judge`: not a report of a run that had stopped before)
        can make the final checkpoint, saved just before it, the best."""
        last = self.evaluator.last
        if last is not None and last[0] == state.step:
            return last[1]
        result = self.evaluate(state)
        if judge and self.early_stopping.update(state, result):
            self.checkpointer.maybe_save(state, best=self._best_of(state))  # saved already: it becomes the best
        return result

    def _train(self, state: TrainState, window: LossWindow, bar: tqdm) -> bool:
        """Train `state` on to the last step; True when the ranks agreed to stop (SIGTERM) first."""
        train_data = self.parts.train_data
        while state.step < self.shape.total_steps and not state.stopped_early:
            if state.batches_done >= self.shape.steps_per_epoch:
                state.epoch, state.batches_done = state.epoch + 1, 0
            train_data.set_epoch(state.epoch)
            train_data.load_state_dict({"epoch": state.epoch, "batches_done": state.batches_done})
            with closing(iter(train_data)) as epoch_batches:
                while (
                    state.batches_done < self.shape.steps_per_epoch
                    and state.step < self.shape.total_steps
                    and not state.stopped_early
                ):
                    length = segment_length(
                        state, self.shape, self.config.eval_every_n_steps, self.checkpointer.every_n_steps
                    )
                    for loss in self._train_steps(epoch_batches, length):
                        self._count_step(state, loss, window, bar)
                        if state.step % AGREE_EVERY_N_STEPS == 0 and self.preemption.agreed():
                            return True
                    self._at_boundary(state)
        return False

    def _count_step(self, state: TrainState, loss: torch.Tensor, window: LossWindow, bar: tqdm) -> None:
        state.step += 1
        state.batches_done += 1
        state.samples += self.shape.global_batch_size
        self.lr_scheduler.step()
        window.add(loss)
        self.nonfinite.add(loss, state.step)
        bar.update(1)
        if self.config.dense_average_every and state.step % self.config.dense_average_every == 0:
            self._average_dense()
        if state.step % self.config.log_every_n_steps == 0:
            self._log_train(state, window, bar)

    def _train_steps(self, batches: Iterator, count: int) -> Iterator[torch.Tensor]:
        """Yields each step's (local) loss after its optimizer step."""
        segment = itertools.islice(batches, count)
        if self._pipeline is not None:
            for _ in range(count):
                loss, _logits, _labels = self._pipeline.progress(segment)
                yield loss
            return
        for batch in segment:
            batch = batch.to(self.env.device, non_blocking=True)
            self.optimizer.zero_grad()
            loss, _ = self.model(batch)
            self.optimizer_step.backward(loss)
            self.optimizer_step.step()
            yield loss.detach()

    def _average_dense(self) -> None:
        """k-step model averaging: every rank's dense (and replicated-table) parameters, and their
        optimizer's state (Adagrad's sums, Adam's moments), become the mean over ranks, in one
        all-reduce of them all flattened. Averaging the state too keeps the ranks one optimizer:
        a checkpoint then holds the state every rank has, not whichever rank's DCP saved."""
        tensors = []
        for name, part in self.optimizer.optimizers:
            if name == FUSED_PART:
                continue
            for param in part.params.values():
                tensors.append(param)
                tensors += [
                    value
                    for key, value in part.state.get(param, {}).items()
                    if key != "step" and isinstance(value, torch.Tensor) and value.is_floating_point()
                ]
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
        if state.step >= self.shape.total_steps:
            return  # fit() evaluates and saves at the end
        evaluate = self.config.eval_every_n_steps and state.step % self.config.eval_every_n_steps == 0
        save = self.checkpointer.is_due(state.step)
        if not (evaluate or save) or not self._trusted(state):
            return
        self._average_if_stale(state)
        if evaluate:
            self._evaluate_and_judge(state, save)
        else:
            self.checkpointer.maybe_save(state)

    def _trusted(self, state: TrainState) -> bool:
        """Collective: whether the model at `state` may be saved or evaluated: every rank's latest
        training loss was finite (DivergedError once one's has not been for
        trainer.max_nonfinite_steps steps)."""
        if self.nonfinite.latest_finite(self.env.device):
            return True
        log.warning(
            "the training loss of step %d is not finite on some rank: its model is neither saved nor evaluated",
            state.step,
        )
        return False

    def _evaluate_and_judge(self, state: TrainState, save: bool = False) -> None:
        """A boundary's evaluation, judged by trainer.early_stopping. An improvement is saved
        whatever the cadence (checkpoints/best names it); an early stop is the end of the run,
        saved now and synchronously; `save`: the cadence saves here anyway."""
        result = self.evaluate(state)
        best = self._best_of(state) if self.early_stopping.update(state, result) else None
        state.stopped_early = self.early_stopping.stop_reason(state, result)
        if save or best is not None or state.stopped_early:
            self.checkpointer.maybe_save(state, force=bool(state.stopped_early), best=best)

    def _evaluation_missed(self, state: TrainState) -> bool:
        """Whether a run resumed at `state` is at an evaluation step that the train state has not
        counted: the run before stopped there by SIGTERM (before that step's boundary), or ended
        there, its final evaluation coming after its final checkpoint. Evaluated first, it counts
        as in the uninterrupted run."""
        every = self.config.eval_every_n_steps
        return (
            0 < state.step < self.shape.total_steps
            and every > 0
            and state.step % every == 0
            and state.evaluated_samples != state.samples
        )

    def evaluate(self, state: TrainState) -> dict[str, float]:
        return self.evaluator.evaluate(state, self.parts.val_data, self.config.eval_max_batches)

    def _best_of(self, state: TrainState) -> dict[str, Any]:
        return {"metric": state.best_metric, "value": state.best_value}

    def _log_train(self, state: TrainState, window: LossWindow, bar: tqdm) -> None:
        loss, nonfinite = window.mean_loss(self.nonfinite.slots(self.env.device))
        elapsed = time.perf_counter() - window.start
        record = {
            "step": state.step,
            "epoch": state.epoch,
            "samples": state.samples,
            "loss": loss,
            **self.optimizer_step.logged(),
            "samples_per_s": window.steps * self.shape.global_batch_size / max(elapsed, 1e-9),
        }
        self.metrics_logger.log("train", record)
        bar.set_postfix(step=state.step, loss=f"{loss:.4f}", refresh=False)
        window.reset(time.perf_counter())
        self.nonfinite.judge(nonfinite)  # after the line that shows it
