"""A sweep (`python -m app.train -m ...`) runs every point, whatever earlier points met.

A point that fails is recorded (its summary.json says "failed" with the error, as scripts/report.py
shows it) and returns a FailedPoint instead of its AUC: the basic sweeper, which would stop at a
point that raised, never sees an error, and Optuna's marks the trial failed and goes on
(configs/sweep/optuna.yaml lets every trial fail: max_failure_rate 1.0). The sweep
command then exits non-zero once every point has run: 2 when each failed point failed on bad input,
1 otherwise (see `failures`).

Points run in this process (Hydra's basic launcher) or in jobs of their own (the submitit
launchers: +launcher=local or slurm). Those jobs' outcomes are read, once the sweep has run, from
the summary.json each point wrote in the sweep directory since the sweep began (`began`, told by
the SweepStart callback of app/hydra_callbacks.py), and a failed one's error is said here, since only the
job's log file holds it.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


_points: list[Any] = []  # every point this process ran or collected, in order
_began: tuple[Path, float] | None = None  # (its directory, when) of the sweep this process launched


def began(sweep_dir: Path) -> None:
    """A sweep this process launches begins, in `sweep_dir`."""
    global _began
    _began = (Path(os.path.abspath(sweep_dir)), time.time())


def summary_since(run_dir: Path, since: float) -> dict[str, Any] | None:
    """run_dir's summary.json where a run wrote it since `since` (a time.time()), else None."""
    summary = read_summary(run_dir)
    return summary if summary is not None and float(summary.get("attempt_started") or 0) >= since else None


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


def failures() -> tuple[str, int] | None:
    """(the line that ends a sweep with failed points, its exit code); None when none failed.
    Points that ran as jobs of their own are collected first (`_collect_jobs`)."""
    if not _points and _began is not None:
        _collect_jobs(*_began)
    failed = [p for p in _points if isinstance(p, FailedPoint)]
    if not failed:
        return None
    code = BAD_INPUT if all(p.exit_code == BAD_INPUT for p in failed) else 1
    where = ", ".join(p.run_dir for p in failed)
    return f"error: {len(failed)} of {len(_points)} sweep point(s) failed: {where}", code


def _collect_jobs(sweep_dir: Path, since: float) -> None:
    """The outcomes of the points in `sweep_dir` that ran since `since`, recorded here (every point
    writes its summary.json when it starts, and its failure when it fails; a point directory of an
    earlier sweep is older). A failed one's error is said. Jobs on other hosts compare their clock
    with this one's: they agree to far less than the seconds a job takes to start."""
    for run_dir in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        summary = summary_since(run_dir, since)
        if summary is None:
            continue
        if summary.get("status") != "failed":
            _points.append((summary.get("validation") or {}).get("auc"))
            continue
        point = FailedPoint(str(run_dir), str(summary.get("error")), BAD_INPUT if summary.get("bad_input") else 1)
        sys.stderr.write(f"error: {point}\n")
        sys.stderr.flush()
        _points.append(point)
