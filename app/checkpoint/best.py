"""checkpoints/best: the pointer to the checkpoint with the best validation metric so far.

A small JSON record, {"checkpoint": "step_00000080", "step", "samples", "metric", "value"},
replaced in one write once the checkpoint it names is published. It is trusted only when it holds
together: it names a published checkpoint whose meta.json has the same step and samples (so it
is the checkpoint that was evaluated, not a later save under the same name), and its value is a
finite number. Anything else (a damaged or forged file, a pointer left behind by a crash) is
reported once, with a warning, and not used."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from app.checkpoint.names import is_step_name
from app.checkpoint.verification import META_FILE
from app.storage import Storage

log = logging.getLogger(__name__)

BEST_FILE = "best"


def write(storage: Storage, name: str, step: int, samples: int, best: dict[str, Any]) -> None:
    """Make checkpoint `name` (published, at `step` after `samples`) the best; `best`: {"metric", "value"}."""
    record = {"checkpoint": name, "step": step, "samples": samples, **best}
    storage.write(BEST_FILE, json.dumps(record))
    log.info("best checkpoint: %s (validation %s %.6f)", name, best.get("metric"), best.get("value", math.nan))


def forget(storage: Storage) -> None:
    storage.delete(BEST_FILE)


def named(storage: Storage) -> str | None:
    """The checkpoint name the pointer holds, valid or not (what pruning must spare)."""
    try:
        record = json.loads(storage.read(BEST_FILE))
    except (OSError, ValueError):
        return None
    name = record.get("checkpoint") if isinstance(record, dict) else None
    return name if isinstance(name, str) else None


def read(storage: Storage) -> tuple[dict[str, Any] | None, str | None]:
    """(the pointer's record, None) when it is valid; (None, what is wrong with it) when it is not;
    (None, None) when there is none."""
    try:
        record = json.loads(storage.read(BEST_FILE))
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as error:
        return None, f"it is not readable ({error})"
    problem = _problem(storage, record)
    return (None, problem) if problem is not None else (record, None)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _problem(storage: Storage, record: Any) -> str | None:
    if not isinstance(record, dict):
        return "it is not a JSON object"
    name = record.get("checkpoint")
    if not isinstance(name, str) or not is_step_name(name) or META_FILE not in storage.files(name):
        return f"it names no published checkpoint ({name!r})"
    if (
        not isinstance(record.get("metric"), str)
        or not _is_number(record.get("value"))
        or not math.isfinite(record["value"])
    ):
        return (
            f"its metric and value ({record.get('metric')!r}, {record.get('value')!r}) are not a metric "
            "name and a finite number"
        )
    try:
        meta = json.loads(storage.read(f"{name}/{META_FILE}"))
        saved = (meta["step"], meta.get("samples", 0))
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"the meta.json of {name} is not readable ({error})"
    if (record.get("step"), record.get("samples")) != saved:
        return (
            f"it says step {record.get('step')!r} after {record.get('samples')!r} samples, but {name} was saved "
            f"at step {saved[0]!r} after {saved[1]!r} samples: another checkpoint of that name"
        )
    return None
