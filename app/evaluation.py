"""Evaluation: the model's metrics on a held-out split (validation, test), logged.

Every rank scores its share of the split's batches (each rank has as many, padded), and the
metrics are computed over all ranks' rows (app/metrics.py). The test split is scored with the best
checkpoint's weights.

An evaluation can take longer than a launcher waits after SIGTERM (torchrun: 30 s), and bad rows
past a split's first row group are met only while it is read, by the rank whose share holds them.
So every AGREE_EVERY_N_STEPS batches, and at the end, the ranks agree (app/preemption.py) whether
to go on: SIGTERM on any rank, or bad input met by any rank, abandons the evaluation on every rank
at the same batch (EvaluationStopped), and the trainer saves before it exits. An abandoned
evaluation counts for nothing: a resumed run evaluates that step again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import closing
from typing import Any

import torch

from app import progress
from app.checkpoint import Checkpointer, TrainState
from app.distributed import DistEnv
from app.errors import UserError
from app.metrics import MetricsLogger, evaluation_metrics
from app.preemption import AGREE_EVERY_N_STEPS, BAD_INPUT, CONTINUE, STOP, Preemption

log = logging.getLogger("app.trainer")


class EvaluationStopped(Exception):
    """Every rank abandoned an evaluation: SIGTERM (`code` STOP) or bad input (BAD_INPUT), with
    `error` this rank's own (None where another rank met it)."""

    def __init__(self, code: int, error: UserError | None) -> None:
        super().__init__("evaluation abandoned")
        self.code, self.error = code, error

    @property
    def by_sigterm(self) -> bool:
        return self.code == STOP


class BadInputElsewhere(UserError):
    """What the ranks that did not meet another rank's bad input stop with: that rank says it."""

    said_by_another_rank = True


class Evaluator:
    def __init__(
        self,
        model: torch.nn.Module,
        pipeline: Any | None,
        checkpointer: Checkpointer,
        metrics_logger: MetricsLogger,
        preemption: Preemption,
        env: DistEnv,
        tasks: Sequence[str] = (),
        primary_task: str | None = None,
        progress_bar: bool = True,
    ) -> None:
        """`pipeline`: the train pipeline that holds `model` while it trains (detached from it to
        evaluate), or None. `preemption`: where the ranks agree to abandon an evaluation. `tasks`:
        a multi-task model's label columns, `primary_task` the one whose metrics are also unprefixed."""
        self.model, self.pipeline = model, pipeline
        self.preemption = preemption
        self.checkpointer = checkpointer
        self.metrics_logger = metrics_logger
        self.env = env
        self.tasks, self.primary_task = list(tasks), primary_task
        self.progress_bar = progress_bar
        self.last: tuple[int, dict[str, float]] | None = None  # (step, metrics) of the latest evaluation

    def score(self, data: Any, max_batches: int | None = None) -> dict[str, float]:
        """Collective: the metrics of the model on an evaluation reader's batches (all of them, or
        the first `max_batches` of each rank); raises EvaluationStopped when the ranks abandon it."""
        model = self.pipeline.detach() if self.pipeline is not None else self.model
        model.eval()
        metrics = evaluation_metrics(self.env.device, self.tasks, self.primary_task)
        count = len(data) if max_batches is None else min(len(data), max_batches)
        # Counted in batches, shown in samples (of every rank): the rate is samples/s.
        bar = progress.bar(
            count,
            "eval",
            "sample",
            unit_scale=data.batch_size * self.env.world_size,
            leave=False,
            enabled=self.progress_bar,
        )
        try:
            with torch.no_grad(), closing(bar), closing(iter(data)) as batches:
                self._consume(model, data, batches, count, metrics, bar)
            return metrics.compute()
        finally:
            model.train()
            if self.pipeline is not None:
                self.pipeline.attach(model)

    def _consume(
        self, model: torch.nn.Module, data: Any, batches: Iterator, count: int, metrics: Any, bar: Any
    ) -> None:
        """Scores `count` of `batches` into `metrics`, agreeing with the other ranks every
        AGREE_EVERY_N_STEPS batches and after the last. Each forward is collective (the sharded
        tables' all-to-all): a rank that meets bad input goes on with batches of padding rows up
        to the next agreement, where every rank learns it and stops."""
        error: UserError | None = None
        for done in range(1, count + 1):
            item = None
            if error is None:
                try:
                    item = next(batches, None)
                except UserError as bad:  # a bad row in this rank's share of the split
                    error = bad
            if item is None:
                item = data.padding()
            batch = item.batch.to(self.env.device, non_blocking=True)
            _, (_loss, logits, labels) = model(batch)
            metrics.update(logits[: item.valid], labels[: item.valid])
            bar.update(1)
            if done % AGREE_EVERY_N_STEPS == 0 or done == count:
                self._agree(CONTINUE if error is None else BAD_INPUT, error)

    def _agree(self, code: int, error: UserError | None) -> None:
        agreed = self.preemption.agree(code)
        if agreed != CONTINUE:
            raise EvaluationStopped(agreed, error)

    def evaluate(self, state: TrainState, data: Any, max_batches: int | None) -> dict[str, float]:
        """Collective: the validation split's metrics at `state`, logged (kind eval)."""
        result = self.score(data, max_batches)
        self.last = (state.step, result)
        self.metrics_logger.log("eval", {"step": state.step, "epoch": state.epoch, "samples": state.samples, **result})
        log.info(
            "eval step %d: auc %.4f  logloss %.4f  ne %.4f  (%d samples)",
            state.step,
            result["auc"],
            result["logloss"],
            result["ne"],
            result["samples"],
        )
        self._log_tasks(result)
        return result

    def _log_tasks(self, result: dict[str, Any]) -> None:
        """Multi-task: each task's metrics, on a line of its own (the line above is the primary's)."""
        for task in self.tasks:
            log.info(
                "  task %s: auc %.4f  logloss %.4f  ne %.4f  calibration %.4f",
                task,
                result[f"{task}/auc"],
                result[f"{task}/logloss"],
                result[f"{task}/ne"],
                result[f"{task}/calibration"],
            )

    def test(self, state: TrainState, data: Any) -> dict[str, Any] | None:
        """Collective: the test split's metrics (kind test) with the best checkpoint's weights,
        loaded on every rank unless they are the model's now; None without a test split. Run at
        the end: the model keeps the weights it was tested with."""
        if data is None:
            return None
        best = self.checkpointer.best()
        if best is None:
            step, name, which = state.step, None, "the final model: there is no best checkpoint"
        else:
            step, name = best["step"], best["checkpoint"]
            which = f"{name}, the best by validation {best['metric']} ({best['value']:.6f})"
            if best["samples"] != state.samples:
                self.checkpointer.load_weights(name)
        result = {"step": step, "checkpoint": name, **self.score(data)}
        self.metrics_logger.log("test", result)
        log.info(
            "test with %s: auc %.4f  logloss %.4f  ne %.4f  (%d samples)",
            which,
            result["auc"],
            result["logloss"],
            result["ne"],
            result["samples"],
        )
        self._log_tasks(result)
        return result
