"""A sweep (`python -m app.train -m ...`) runs every point, whatever earlier points met.

A point that fails is recorded (its summary.json says "failed" with the error, as scripts/report.py
shows it) and returns a FailedPoint instead of its AUC: the basic sweeper, which would stop at a
point that raised, never sees an error, and Optuna's marks the trial failed and goes on
(configs/sweep/optuna.yaml lets every trial fail: max_failure_rate 1.0). The sweep
command then exits non-zero once every point has run: 2 when each failed point failed on bad input,
1 otherwise (see `failures`).

Points run in this process (Hydra's basic launcher) or in jobs of their own (the submitit
launchers, whose subclasses in hydra_plugins/rectrain_launchers, where Hydra looks for plugins,
collect each job's FailedPoint into this process's record and say its error, which only the
job's log file holds).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from hydra.core.utils import JobReturn

from app.errors import BAD_INPUT
from app.summary import read_summary


@dataclass(frozen=True)
class FailedPoint:
    """A failed point's return value: where it ran, why, and its exit code. Not a number: Optuna's
    sweeper marks such a trial failed (a NaN it would refuse with a traceback of its own)."""

    run_dir: str
    error: str
    exit_code: int

    def __str__(self) -> str:
        return f"sweep point {self.run_dir} failed: {self.error}"


_points: List[Any] = []  # every point this process ran or collected, in order


def failed_point(run_dir: Path, exit_code: int) -> FailedPoint:
    """The point in `run_dir` failed (it said why, and its summary.json holds the error)."""
    summary = read_summary(run_dir) or {}
    error = summary.get("error") if summary.get("status") == "failed" else None
    point = FailedPoint(str(run_dir), str(error or f"exit code {exit_code}"), exit_code)
    _points.append(point)
    return point


def finished_point(value: float) -> float:
    _points.append(value)
    return value


def failures() -> Optional[Tuple[str, int]]:
    """(the line that ends a sweep with failed points, its exit code); None when none failed."""
    failed = [p for p in _points if isinstance(p, FailedPoint)]
    if not failed:
        return None
    code = BAD_INPUT if all(p.exit_code == BAD_INPUT for p in failed) else 1
    where = ", ".join(p.run_dir for p in failed)
    return f"error: {len(failed)} of {len(_points)} sweep point(s) failed: {where}", code


def collected(returns: Sequence[JobReturn]) -> Sequence[JobReturn]:
    """The outcomes of points run as jobs of their own (hydra_plugins/rectrain_launchers), recorded
    here; a failed one's error said, since only the job's log file holds it."""
    for job in returns:
        value = job.return_value
        if isinstance(value, FailedPoint):
            sys.stderr.write(f"error: {value}\n")
            sys.stderr.flush()
            _points.append(value)
        else:
            finished_point(value)
    return returns
