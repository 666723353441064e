"""A report's points and what their sweep says about them: each run directory read into a Point
(its status, metrics and overrides; "unreadable", with the reason, where one of its files is
malformed), and the points of a sweep, or of several runs, into a Sweep."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from app.report.run_files import (
    SweepConfig,
    Unreadable,
    finite,
    read_evaluations,
    read_job_number,
    read_overrides,
    read_summary,
    read_sweep_config,
)
from app.summary import PLACEMENT_KEYS

COLUMNS = (
    "point",
    "status",
    "step",
    "final_auc",
    "final_logloss",
    "final_ne",
    "best_auc",
    "best_step",
    "samples_per_s",
    "wall_time_s",
)
UNREADABLE = "unreadable"
T = TypeVar("T")


@dataclass
class Point:
    """One run directory, read."""

    path: Path
    name: str  # relative to the report's root
    overrides: dict[str, str]
    job_number: int | None
    status: str
    error: str | None
    summary: dict[str, Any]
    evaluations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, Any]:
        """The final validation metrics: the summary's, or (a run not finished) the latest evaluation's."""
        return self.summary.get("validation") or (self.evaluations[-1] if self.evaluations else {})

    @property
    def best(self) -> dict[str, Any]:
        """The evaluation with the highest AUC."""
        scored = [e for e in self.evaluations if finite(e.get("auc")) is not None]
        return max(scored, key=lambda e: e["auc"]) if scored else {}

    def row(self, swept: Sequence[str]) -> dict[str, Any]:
        final, best = self.final, self.best
        return {
            "point": self.name,
            **{key: self.overrides.get(key, "") for key in swept},
            "status": self.status if not self.error else f"{self.status}: {self.error}",
            "step": _steps(self.summary, self.evaluations),
            "final_auc": finite(final.get("auc")),
            "final_logloss": finite(final.get("logloss")),
            "final_ne": finite(final.get("ne")),
            "best_auc": finite(best.get("auc")),
            "best_step": best.get("step"),
            "samples_per_s": finite(self.summary.get("samples_per_s")),
            "wall_time_s": finite(self.summary.get("wall_time_s")),
        }


@dataclass
class Sweep:
    """What a report covers: its points, and what the sweep (if any) says about them."""

    root: Path
    points: list[Point]
    swept: list[str]
    planned_points: int | None = None
    optuna: dict[str, Any] | None = None  # {"direction", "params": {name: override string}}
    problems: list[str] = field(default_factory=list)  # the sweep's own files that could not be read

    def rows(self) -> list[dict[str, Any]]:
        """Every point's row, best first: by best validation AUC, points without one last."""
        rows = [p.row(self.swept) for p in self.points]
        return sorted(rows, key=lambda r: (r["best_auc"] is None, -(r["best_auc"] or 0.0), r["point"]))


def _steps(summary: dict[str, Any], evaluations: list[dict[str, Any]]) -> str:
    step = summary.get("step", evaluations[-1]["step"] if evaluations else None)
    planned = summary.get("planned_steps")
    if step is None:
        return ""
    return f"{step}/{planned}" if planned else str(step)


def _alive(summary: dict[str, Any]) -> bool | None:
    """Whether the process a running summary names still runs; None where that cannot be told
    (another host)."""
    if summary.get("host") != socket.gethostname() or not summary.get("pid"):
        return None
    try:
        os.kill(summary["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _attempt(read: Callable[[], T], problems: list[str], otherwise: T) -> T:
    try:
        return read()
    except Unreadable as error:
        problems.append(str(error))
        return otherwise


def read_point(path: Path, root: Path) -> Point:
    """A run directory as a Point. One whose files are malformed is "unreadable", with every
    reason, and shows no metrics (they could be wrong): only its name, and its overrides where
    they could be read."""
    name = str(path.relative_to(root)) if path != root else path.name
    problems: list[str] = []
    overrides: dict[str, str] = _attempt(lambda: _overrides(read_overrides(path)), problems, {})
    job_number = _attempt(lambda: read_job_number(path), problems, None)
    summary = _attempt(lambda: read_summary(path), problems, None) or {}
    evaluations: list[dict[str, Any]] = _attempt(lambda: read_evaluations(path), problems, [])
    if problems:
        return Point(path, name, overrides, job_number, UNREADABLE, "; ".join(problems), {}, [])
    status = summary.get("status")
    if status is None:
        # A summary from before statuses were recorded was only written by a finished run.
        status = "finished" if summary.get("validation") else ("no summary" if not evaluations else "unknown")
    elif status == "running" and _alive(summary) is False:
        status = "died"  # killed without a word: SIGKILL, out of memory, a lost node
    return Point(path, name, overrides, job_number, status, summary.get("error"), summary, evaluations)


def _overrides(listed: list[str]) -> dict[str, str]:
    overrides = {}
    for item in listed:
        key, _, value = item.partition("=")
        key = key.lstrip("+~")
        if key not in PLACEMENT_KEYS:
            overrides[key] = value
    return overrides


def _is_run_dir(path: Path) -> bool:
    return (
        (path / "summary.json").exists()
        or (path / "metrics.jsonl").exists()
        or ((path / ".hydra" / "overrides.yaml").exists() and not (path / "multirun.yaml").exists())
    )


def find_run_dirs(path: Path, depth: int = 3) -> list[Path]:
    """`path` itself if it is a run directory, else the run directories under it (a sweep's points)."""
    if _is_run_dir(path):
        return [path]
    if depth == 0:
        return []
    found: list[Path] = []
    for child in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found.extend(find_run_dirs(child, depth - 1))
    return found


def read_sweep(paths: Sequence[Path]) -> Sweep:
    """The points of one sweep directory, or of several run (or sweep) directories together."""
    paths = [Path(p) for p in paths]
    for path in paths:
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: not a directory (a run or sweep directory was expected)")
    root = paths[0] if len(paths) == 1 else Path(os.path.commonpath([p.resolve() for p in paths]))
    run_dirs = [d for p in paths for d in find_run_dirs(p)]
    if not run_dirs:
        raise FileNotFoundError(
            f"{', '.join(map(str, paths))}: no run directory (one with summary.json, "
            "metrics.jsonl or .hydra/overrides.yaml) found"
        )
    points = [read_point(d, root if len(paths) > 1 else paths[0]) for d in run_dirs]
    points.sort(key=lambda p: (p.job_number is None, p.job_number or 0, p.name))
    problems: list[str] = []
    config = _sweep_config(paths[0], points, problems) if len(paths) == 1 else None
    planned, optuna, swept = None, None, []
    if config is not None:
        planned, optuna, swept = _sweep_plan(config)
    varying = [
        k for k in sorted({k for p in points for k in p.overrides}) if len({p.overrides.get(k) for p in points}) > 1
    ]
    swept = swept + [k for k in varying if k not in swept]
    return Sweep(paths[0], points, swept, planned, optuna, problems)


def _sweep_config(path: Path, points: list[Point], problems: list[str]) -> SweepConfig | None:
    """The sweep's Hydra config: multirun.yaml (the basic sweeper writes it), else a point's own
    (Optuna's sweeper writes none; its points' .hydra/hydra.yaml hold the search). A malformed
    multirun.yaml is one of the sweep's problems; a malformed point's file is that point's."""
    config = _attempt(lambda: read_sweep_config(path / "multirun.yaml", "multirun.yaml"), problems, None)
    if config is not None or problems:
        return config
    first = points[0] if points else None
    if first is not None and first.path != path:
        config = _attempt(
            lambda: read_sweep_config(first.path / ".hydra" / "hydra.yaml", ".hydra/hydra.yaml"), [], None
        )
        if config is not None and config.optuna_params is not None:
            return config
    return None


def _sweep_plan(config: SweepConfig):
    """(points planned, Optuna's search or None, swept keys)."""
    if config.optuna_params is not None:
        return (
            config.n_trials,
            {"direction": config.direction, "params": config.optuna_params},
            list(config.optuna_params),
        )
    planned = math.prod(config.grid.values()) if config.grid else None
    return planned, None, [k for k in config.grid if k not in PLACEMENT_KEYS]
