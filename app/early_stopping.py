"""trainer.early_stopping's judgement of each evaluation: the best so far, the patience, the target.

What it decides lives in the train state (best metric, value and step, evaluations since the
best, why the run stopped), so a resumed run decides as an uninterrupted one would. An evaluation
whose metric is undefined (nan: a split with one class, or no rows; non-finite predictions) is
neither an improvement nor counted toward the patience: it says nothing about whether training
still improves the model.
"""

from __future__ import annotations

import logging
import math

from app.checkpoint import TrainState
from app.config import HIGHER_IS_BETTER, EarlyStoppingConfig

log = logging.getLogger("app.trainer")  # its lines were the trainer's: logs and tests read them so


class EarlyStopping:
    def __init__(self, config: EarlyStoppingConfig, task: str | None = None) -> None:
        """`task`: multi-task, the task whose metric decides (<task>/<metric> in the results)."""
        self.config = config
        self.metric = config.metric if task is None else f"{task}/{config.metric}"
        self.higher = config.metric in HIGHER_IS_BETTER

    def resume(self, state: TrainState) -> None:
        """A state whose best is by another metric (the config changed) starts its best over."""
        if state.best_metric not in (None, self.metric):
            log.warning(
                "trainer.early_stopping.metric is %s, the best so far was by %s: the best starts over",
                self.metric,
                state.best_metric,
            )
            state.best_metric = state.best_value = state.best_step = None
            state.evals_since_best = 0

    def improves(self, value: float, best: float | None) -> bool:
        if not math.isfinite(value):
            return False
        if best is None:
            return True
        delta = self.config.min_delta
        return value > best + delta if self.higher else value < best - delta

    def update(self, state: TrainState, result: dict[str, float]) -> bool:
        """Count the evaluation `result` at `state`; True when it is the best so far."""
        value = result[self.metric]
        state.evaluated_samples = state.samples
        if not math.isfinite(value):
            log.warning(
                "validation %s is undefined (%s) at step %d: the evaluation cannot be the best and does not "
                "count toward trainer.early_stopping.patience",
                self.metric,
                value,
                state.step,
            )
            return False
        if not self.improves(value, state.best_value):
            state.evals_since_best += 1
            return False
        state.best_metric, state.best_value, state.best_step = self.metric, value, state.step
        state.evals_since_best = 0
        return True

    def stop_reason(self, state: TrainState, result: dict[str, float]) -> str | None:
        """Why training should stop after the evaluation `result` (counted by update), or None."""
        value, target, patience = result[self.metric], self.config.target, self.config.patience
        if target is not None and math.isfinite(value) and (value >= target if self.higher else value <= target):
            return f"validation {self.metric} {value:.6f} reached trainer.early_stopping.target={target}"
        if patience and state.evals_since_best >= patience:
            best = "none yet" if state.best_value is None else f"{state.best_value:.6f} at step {state.best_step}"
            return (
                f"validation {self.metric} has not improved by more than {self.config.min_delta} in "
                f"{state.evals_since_best} evaluations (trainer.early_stopping.patience={patience}; "
                f"best {best})"
            )
        return None
