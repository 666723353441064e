"""Trainer: the training loop, its evaluation cadence and its logging. Never sees Hydra.

Training runs in segments that end at the next evaluation, checkpoint or epoch boundary. Each
segment feeds TrainPipelineSparseDist a slice of the epoch's iterator, so the pipeline drains at
the boundary: checkpoints are taken with no batch in flight, and the data position saved with them
is exactly the number of steps done in the epoch. What a checkpoint holds, when one is written and
how a run continues from one is the Checkpointer's (app/checkpoint/).

Every evaluation is judged by trainer.early_stopping (EarlyStopping): one that improves the best
validation metric is saved, whatever the checkpoint cadence, and becomes checkpoints/best; the run
stops early when the metric has not improved for `patience` evaluations or reaches `target`. The
best so far and the evaluations since are part of the train state, so a resumed run decides as an
uninterrupted one would, and a run that stopped early trains no further when run again. At the
end, the test split is evaluated with the best checkpoint's weights.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from contextlib import closing
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from tqdm import tqdm

from app import progress
from app.checkpoint import Checkpointer, RunParts, RunShape, TrainState
from app.config import HIGHER_IS_BETTER, EarlyStoppingConfig, TrainerConfig
from app.distributed import DistEnv
from app.metrics import MetricsLogger, evaluation_metrics
from app.optim import FUSED_PART, OptimizerStep
from app.preemption import AGREE_EVERY_N_STEPS, Preemption

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


class EarlyStopping:
    """trainer.early_stopping's judgement of each evaluation, kept in the train state."""

    def __init__(self, config: EarlyStoppingConfig, task: Optional[str] = None) -> None:
        """`task`: multi-task, the task whose metric decides (<task>/<metric> in the results)."""
        self.config = config
        self.metric = config.metric if task is None else f"{task}/{config.metric}"
        self.higher = config.metric in HIGHER_IS_BETTER

    def resume(self, state: TrainState) -> None:
        """A state whose best is by another metric (the config changed) starts its best over."""
        if state.best_metric not in (None, self.metric):
            log.warning("trainer.early_stopping.metric is %s, the best so far was by %s: the best starts over",
                        self.metric, state.best_metric)
            state.best_metric = state.best_value = state.best_step = None
            state.evals_since_best = 0

    def improves(self, value: float, best: Optional[float]) -> bool:
        if not math.isfinite(value):
            return False  # nan: one class only, or no rows
        if best is None:
            return True
        delta = self.config.min_delta
        return value > best + delta if self.higher else value < best - delta

    def update(self, state: TrainState, result: Dict[str, float]) -> bool:
        """Count the evaluation `result` at `state`; True when it is the best so far."""
        value = result[self.metric]
        state.evaluated_samples = state.samples
        if not self.improves(value, state.best_value):
            state.evals_since_best += 1
            return False
        state.best_metric, state.best_value, state.best_step = self.metric, value, state.step
        state.evals_since_best = 0
        return True



    def stop_reason(self, state: TrainState, result: Dict[str, float]) -> Optional[str]:
        """Why training should stop after the evaluation `result` (counted by update), or None."""
        value, target, patience = result[self.metric], self.config.target, self.config.patience
        if target is not None and math.isfinite(value) and (value >= target if self.higher else value <= target):
            return f"validation {self.metric} {value:.6f} reached trainer.early_stopping.target={target}"
        if patience and state.evals_since_best >= patience:
            best = "none yet" if state.best_value is None else f"{state.best_value:.6f} at step {state.best_step}"
            return (f"validation {self.metric} has not improved by more than {self.config.min_delta} in "
                    f"{state.evals_since_best} evaluations (trainer.early_stopping.patience={patience}; "
                    f"best {best})")
        return None


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
    def __init__(self, parts: RunParts, checkpointer: Checkpointer, metrics_logger: MetricsLogger,
                 preemption: Preemption, config: TrainerConfig, env: DistEnv, progress_bar: bool = True,
                 optimizer_step: Optional[OptimizerStep] = None, tasks: Sequence[str] = (),
                 primary_task: Optional[str] = None) -> None:
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
        self._pipeline: Optional[StepPipeline] = None
        if config.pipeline == "sparse_dist":
            self._pipeline = StepPipeline(self.model, self.optimizer_step, env.device)
        self.dense_averages = 0
        self.tasks = list(tasks) if len(tasks) > 1 else []
        self.primary_task = (primary_task or self.tasks[0]) if self.tasks else None
        self.early_stopping = EarlyStopping(config.early_stopping, self.primary_task)
        self.outcome: Dict[str, Any] = {}  # how fit() ended, for summary.json
        self._last_eval: Optional[Tuple[int, Dict[str, float]]] = None  # (step, metrics) of the latest evaluation

    # ---- the loop ---------------------------------------------------------------------------

    def fit(self, state: TrainState) -> Optional[Dict[str, float]]:
        """Train from `state` to the end, or until trainer.early_stopping stops it; then evaluate
        the test split (if any) with the best checkpoint. Returns the final validation metrics, or
        None when stopped by SIGTERM (after saving a checkpoint to resume from)."""
        self.early_stopping.resume(state)
        stopped_before = state.stopped_early
        if stopped_before:
            log.info("this run stopped early at step %d (%s): it trains no further (checkpoint.load_from=<this run> "
                     "in a new run trains on from it)", state.step, stopped_before)
        elif self._evaluation_missed(state):
            self._evaluate_and_judge(state)
        # Counted in steps, shown in samples: the rate is samples/s, and the time left is the run's.
        bar = tqdm(total=self.shape.total_steps, initial=state.step, desc="train", unit="sample",
                   unit_scale=self.shape.global_batch_size, dynamic_ncols=True,
                   disable=not self.progress_bar or bool(stopped_before))
        start, samples_before = time.perf_counter(), state.samples
        with closing(bar):
            stopped = self._train(state, _Window(time.perf_counter()), bar)
        trained = state.samples - samples_before
        # Training as it went, evaluations and checkpoints at its boundaries included.
        self.outcome = {"step": state.step, "epoch": state.epoch, "planned_steps": self.shape.total_steps,
                        "samples": state.samples,
                        "samples_per_s": trained / (time.perf_counter() - start) if trained else None}
        self._average_if_stale(state)
        if stopped:
            log.warning("SIGTERM: stopping at step %d; saving a checkpoint to resume from", state.step)
            self.checkpointer.maybe_save(state, force=True)
            return None
        if state.stopped_early and not stopped_before:
            log.warning("stopping early at step %d of %d: %s", state.step, self.shape.total_steps, state.stopped_early)
        if self.config.dense_average_every:
            log.info("k-step averaging: %d dense parameter averages in this run", self.dense_averages)
        # Saved before the final evaluation, so that bad validation rows found there (or a crash)
        # cost no training.
        self.checkpointer.maybe_save(state, force=True)
        result = self._final_evaluation(state, judge=not stopped_before)
        test = self.test(state)
        self.outcome.update(stopped_early=state.stopped_early, validation={"step": state.step, **result},
                            best=self.checkpointer.best(), test=test)
        return result

    def _final_evaluation(self, state: TrainState, judge: bool) -> Dict[str, float]:
        """The validation metrics at the end: those of the evaluation that stopped the run early,
        or a new evaluation, which (when `judge`: not a report of a run that had stopped before)
        can make the final checkpoint, saved just before it, the best."""
        if self._last_eval is not None and self._last_eval[0] == state.step:
            return self._last_eval[1]
        result = self.evaluate(state)
        if judge and self.early_stopping.update(state, result):
            self.checkpointer.maybe_save(state, best=self._best_of(state))  # saved already: it becomes the best
        return result

    def _train(self, state: TrainState, window: "_Window", bar: tqdm) -> bool:
        """Train `state` on to the last step; True when the ranks agreed to stop (SIGTERM) first."""
        train_data = self.parts.train_data
        while state.step < self.shape.total_steps and not state.stopped_early:
            if state.batches_done >= self.shape.steps_per_epoch:
                state.epoch, state.batches_done = state.epoch + 1, 0
            train_data.set_epoch(state.epoch)
            train_data.load_state_dict({"epoch": state.epoch, "batches_done": state.batches_done})
            with closing(iter(train_data)) as epoch_batches:
                while (state.batches_done < self.shape.steps_per_epoch and state.step < self.shape.total_steps
                       and not state.stopped_early):
                    length = segment_length(state, self.shape, self.config.eval_every_n_steps,
                                            self.checkpointer.every_n_steps)
                    for loss in self._train_steps(epoch_batches, length):
                        self._count_step(state, loss, window, bar)
                        if state.step % AGREE_EVERY_N_STEPS == 0 and self.preemption.agreed():
                            return True
                    self._at_boundary(state)
        return False

    def _count_step(self, state: TrainState, loss: torch.Tensor, window: "_Window", bar: tqdm) -> None:
        state.step += 1
        state.batches_done += 1
        state.samples += self.shape.global_batch_size
        self.lr_scheduler.step()
        window.add(loss)
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
        if state.step >= self.shape.total_steps:
            return  # fit() evaluates and saves at the end
        evaluate = self.config.eval_every_n_steps and state.step % self.config.eval_every_n_steps == 0
        save = self.checkpointer.is_due(state.step)
        if evaluate or save:
            self._average_if_stale(state)
        if evaluate:
            self._evaluate_and_judge(state, save)
        elif save:
            self.checkpointer.maybe_save(state)

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
        return (0 < state.step < self.shape.total_steps and every > 0 and state.step % every == 0
                and state.evaluated_samples != state.samples)

    def _best_of(self, state: TrainState) -> Dict[str, Any]:
        return {"metric": state.best_metric, "value": state.best_value}

    def _log_train(self, state: TrainState, window: "_Window", bar: tqdm) -> None:
        loss = window.mean_loss()
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

    # ---- evaluation -------------------------------------------------------------------------

    def _score(self, data: Any, max_batches: Optional[int] = None) -> Dict[str, float]:
        """Collective: the metrics of the model on an evaluation reader's batches (all of them, or
        the first `max_batches` of each rank)."""
        model = self._pipeline.detach() if self._pipeline is not None else self.model
        model.eval()
        metrics = evaluation_metrics(self.env.device, self.tasks, self.primary_task)
        batches = iter(data)
        count = len(data)
        if max_batches is not None:
            batches = itertools.islice(batches, max_batches)
            count = min(count, max_batches)
        # Counted in batches, shown in samples (of every rank): the rate is samples/s.
        bar = progress.bar(count, "eval", "sample", unit_scale=data.batch_size * self.env.world_size, leave=False,
                           enabled=self.progress_bar)
        with torch.no_grad(), closing(bar):
            for item in batches:
                batch = item.batch.to(self.env.device, non_blocking=True)
                _, (_loss, logits, labels) = model(batch)
                metrics.update(logits[: item.valid], labels[: item.valid])
                bar.update(1)
        result = metrics.compute()
        model.train()
        if self._pipeline is not None:
            self._pipeline.attach(model)
        return result

    def evaluate(self, state: TrainState) -> Dict[str, float]:
        result = self._score(self.parts.val_data, self.config.eval_max_batches)
        self._last_eval = (state.step, result)
        self.metrics_logger.log("eval", {"step": state.step, "epoch": state.epoch, "samples": state.samples, **result})
        log.info(
            "eval step %d: auc %.4f  logloss %.4f  ne %.4f  (%d samples)",
            state.step, result["auc"], result["logloss"], result["ne"], result["samples"],
        )
        self._log_tasks(result)
        return result

    def _log_tasks(self, result: Dict[str, float]) -> None:
        """Multi-task: each task's metrics, on a line of its own (the line above is the primary's)."""
        for task in self.tasks:
            log.info("  task %s: auc %.4f  logloss %.4f  ne %.4f  calibration %.4f", task, result[f"{task}/auc"],
                     result[f"{task}/logloss"], result[f"{task}/ne"], result[f"{task}/calibration"])

    def test(self, state: TrainState) -> Optional[Dict[str, Any]]:
        """Collective: the test split's metrics (kind test) with the best checkpoint's weights,
        loaded on every rank unless they are the model's now; None without a test split. Run at
        the end: the model keeps the weights it was tested with."""
        if self.parts.test_data is None:
            return None
        best = self.checkpointer.best()
        if best is None:
            step, name, which = state.step, None, "the final model: there is no best checkpoint"
        else:
            step, name = best["step"], best["checkpoint"]
            which = f"{name}, the best by validation {best['metric']} ({best['value']:.6f})"
            if best["samples"] != state.samples:
                self.checkpointer.load_weights(name)
        result = {"step": step, "checkpoint": name, **self._score(self.parts.test_data)}
        self.metrics_logger.log("test", result)
        log.info("test with %s: auc %.4f  logloss %.4f  ne %.4f  (%d samples)",
                 which, result["auc"], result["logloss"], result["ne"], result["samples"])
        self._log_tasks(result)
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
