"""The best checkpoint of a resumed run: its train state's best so far, squared with
checkpoints/best before training goes on.

The two can disagree. The end of a run is saved before its final evaluation, so a checkpoint's
train state lacks that evaluation's improvement when it made this very checkpoint the best: the
pointer says so. Rank 0 can die between publishing a checkpoint and writing the pointer that
names it (the train state then names a best the pointer does not), and a pointer can be damaged
or forged (see best.py). The train state decides: the pointer is made to name the checkpoint
saved at the state's best evaluation where one is published, and where none is, the best starts
over, with a warning; an invalid pointer is never used, nor left in place."""

from __future__ import annotations

import json
import logging
from typing import Any

from app.checkpoint import best as best_pointer
from app.checkpoint.collective import barrier, broadcast_text
from app.config import HIGHER_IS_BETTER

log = logging.getLogger(__name__)

_BEST_FIELDS = ("best_metric", "best_value", "best_step", "evals_since_best", "evaluated_samples")


def resume_best(store: Any, state: Any) -> None:
    """Collective: `state` (the TrainState of the checkpoint resumed from, in its own steps) with
    the best that checkpoints/best and it agree on; the pointer repaired or removed where it must
    be (rank 0 decides, every rank takes its decision)."""
    decided = None
    if store.rank == 0:
        decided = json.dumps(_decide(store, state))
    received = broadcast_text(decided, store.group)
    assert received is not None  # rank 0's decision
    for key, value in json.loads(received).items():
        setattr(state, key, value)
    barrier(store.group)


def _decide(store: Any, state: Any) -> dict[str, Any]:
    """Rank 0: the train state's best fields as they must be."""
    storage = store.storage
    record, problem = best_pointer.read(storage)
    if problem is not None:
        log.warning("%s is not valid: %s; it is not used", storage.path(best_pointer.BEST_FILE), problem)
        best_pointer.forget(storage)
    if record is not None and record["samples"] == state.samples:
        return _adopt_final_evaluation(state, record)
    if state.best_value is None or (
        record is not None and (record["metric"], record["value"]) == (state.best_metric, state.best_value)
    ):
        return {}
    saved_at_best = _checkpoint_of_best(store, state)
    if saved_at_best is not None:
        log.warning(
            "%s did not name the checkpoint of the best evaluation so far (validation %s %.6f at step %d: "
            "the run before stopped before it was written): it now names %s",
            storage.path(best_pointer.BEST_FILE),
            state.best_metric,
            state.best_value,
            state.best_step,
            saved_at_best[0],
        )
        best_pointer.write(storage, *saved_at_best, {"metric": state.best_metric, "value": state.best_value})
        return {}
    log.warning(
        "no checkpoint of the best evaluation so far (validation %s %.6f at step %d) is published, and %s "
        "names none: the best starts over",
        state.best_metric,
        state.best_value,
        state.best_step,
        storage.path(best_pointer.BEST_FILE),
    )
    best_pointer.forget(storage)
    return {"best_metric": None, "best_value": None, "best_step": None, "evals_since_best": 0}


def _adopt_final_evaluation(state: Any, record: dict[str, Any]) -> dict[str, Any]:
    """The pointer names the checkpoint resumed from: its final evaluation made it the best after
    it was saved. Taken where it improves on the state's best (a resumed run must not call a worse
    evaluation an improvement, nor move the best to it)."""
    metric, value = record["metric"], record["value"]
    if state.best_metric not in (None, metric):
        return {}
    higher = str(metric).rsplit("/", 1)[-1] in HIGHER_IS_BETTER  # multi-task: <task>/auc
    if state.best_value is None or (value > state.best_value if higher else value < state.best_value):
        return {
            "best_metric": metric,
            "best_value": value,
            "best_step": state.step,
            "evals_since_best": 0,
            "evaluated_samples": state.samples,
        }
    return {}


def _checkpoint_of_best(store: Any, state: Any) -> tuple[str, int, int] | None:
    """(name, step, samples) of the published checkpoint saved at the state's best evaluation, or None."""
    for name in reversed(store.published()):
        try:
            meta = json.loads(store.storage.read(f"{name}/{best_pointer.META_FILE}"))
            saved = meta["train_state"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if (
            isinstance(saved, dict)
            and saved.get("step") == saved.get("best_step") == state.best_step
            and (saved.get("best_metric"), saved.get("best_value")) == (state.best_metric, state.best_value)
        ):
            return name, meta["step"], meta.get("samples", 0)
    return None
