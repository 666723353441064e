"""summary.json: how a run stands, for people (a short table at the end) and for tools
(scripts/report.py, sweeps, dashboards).

It is written when a worker starts (status running), and again when the run ends: finished,
preempted (SIGTERM: a checkpoint was saved and the same command resumes) or failed (with the
error). A run resumed after a preemption adds its time to the earlier attempts': wall_time_s is
the whole run's, samples_per_s the training throughput of the latest attempt. A run killed
without a word (SIGKILL, a lost node) stays "running": scripts/report.py tells a running run from
a dead one by the pid and host recorded here.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.errors import UserError
from app.storage import write_atomically

SUMMARY_FILE = "summary.json"
# Always among a run's hyperparameters, overridden or not, so that any runs side by side compare.
BASE_HPARAMS = ("model.arch", "optim.lr", "optim.sparse_lr", "data.batch_size", "features.embedding_dim")
# Overrides that say where a run is, or how it shows, not what it is.
PLACEMENT_KEYS = ("run_name", "output_root", "distributed.nproc_per_node", "logging.progress_bar", "sweep", "launcher")
# Said anew by every attempt.
_ATTEMPT_KEYS = (
    "status",
    "error",
    "bad_input",
    "attempts",
    "world_size",
    "wall_time_s",
    "attempt_started",
    "updated",
    "pid",
    "host",
)
METRIC_COLUMNS = ("auc", "logloss", "ne", "calibration")


def hyperparameters(config: Any, overrides: Sequence[str]) -> dict[str, Any]:
    """A run's hyperparameters for TensorBoard's HParams dashboard: BASE_HPARAMS and every key
    the command line overrode, with the values the run used (numbers as numbers; a group option
    such as model=dcn by its name; a list by its text)."""
    values: dict[str, Any] = {}
    keys = list(BASE_HPARAMS)
    for override in overrides:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if key in PLACEMENT_KEYS or key.startswith("hydra."):
            continue
        keys.append(key)
        values[key] = value
    result: dict[str, Any] = {}
    for key in keys:
        found = _resolved(config, key)
        value = found if found is not _MISSING else values.get(key, "")
        if isinstance(value, (bool, int, float, str)):
            result[key] = value
        else:
            result[key] = json.dumps(value, default=str)
    return result


_MISSING = object()


def _resolved(config: Any, dotted: str) -> Any:
    """The value at a dotted key of the config's dataclasses, or _MISSING (a group name, +sweep)."""
    import dataclasses

    value = config
    for part in dotted.split("."):
        if dataclasses.is_dataclass(value) and part in {f.name for f in dataclasses.fields(value)}:
            value = getattr(value, part)
        elif isinstance(value, (list, tuple)) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            return _MISSING
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else value


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """A run directory's summary.json; None where there is none, or it is unreadable."""
    try:
        return json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None


def plan_summary(run_dir: Path) -> dict[str, Any] | None:
    """The sharding plan in a few numbers, from the run's plan.json: tables per sharding type and
    the bytes of the most loaded rank."""
    try:
        plan = json.loads((Path(run_dir) / "plan.json").read_text())
    except (OSError, ValueError):
        return None
    types: dict[str, int] = {}
    for table in plan.get("tables", {}).values():
        types[table["sharding_type"]] = types.get(table["sharding_type"], 0) + 1
    ranks = plan.get("ranks", {}).values()
    return {
        "tables": len(plan.get("tables", {})),
        "sharding_types": dict(sorted(types.items())),
        "max_rank_embedding_bytes": max((rank.get("embedding_bytes", 0) for rank in ranks), default=0),
        "imbalance": plan.get("imbalance"),
        "estimated_step_ms": plan.get("estimated_step_ms"),
    }


class RunSummary:
    """summary.json of one run directory, written by rank 0 (and by any rank that fails, since a
    failure seen only there may stop rank 0 before it can say anything)."""

    def __init__(self, run_dir: Path, rank: int, world_size: int) -> None:
        self.path = Path(run_dir) / SUMMARY_FILE
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.world_size = world_size
        self._started = time.time()
        earlier = read_summary(self.run_dir) or {}
        # Attempts before this one (a resume after a preemption) count in the run's time; one that
        # was killed counts up to the last time it wrote here.
        self._earlier_wall_time = float(earlier.get("wall_time_s") or 0.0)
        self._attempts = int(earlier.get("attempts") or 0) + 1
        # What earlier attempts reached stays until this one says more: an attempt that fails at
        # once (a mistyped override on a finished run) does not hide the results the run has.
        self.fields: dict[str, Any] = {k: v for k, v in earlier.items() if k not in _ATTEMPT_KEYS}
        self._failed_with: BaseException | None = None

    def _write(self, status: str, **fields: Any) -> dict[str, Any]:
        self.fields.update(fields)
        now = time.time()
        record = {
            "status": status,
            "error": None,
            "attempts": self._attempts,
            "world_size": self.world_size,
            "wall_time_s": self._earlier_wall_time + (now - self._started),
            "attempt_started": self._started,
            "updated": now,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            **self.fields,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, json.dumps(record, indent=2, default=str))
        return record

    def running(self) -> None:
        if self.rank == 0:
            self._write("running")

    def finished(self, **fields: Any) -> None:
        """The final record: step, validation and best metrics, test, throughput."""
        if self.rank == 0:
            self._write("finished", plan=plan_summary(self.run_dir), **fields)

    def preempted(self, **fields: Any) -> None:
        if self.rank == 0:
            self._write("preempted", plan=plan_summary(self.run_dir), **fields)

    def failed(self, error: BaseException, bad_input: bool | None = None) -> None:
        """Rank 0's error; another rank's only where it is its own (bad rows in its share of the
        data): the others' are mostly the echo of a peer that went away. An error that says only
        that another rank met one (`said_by_another_rank`) is left to that rank. `bad_input` (by
        default: whether `error` is a UserError) says whether the run exits 2, for a sweep that reads
        it here."""
        if (
            error is self._failed_with
            or getattr(error, "said_by_another_rank", False)
            or (self.rank != 0 and not getattr(error, "rank_specific", False))
        ):
            return  # said already (the run's end said it, before the MLflow run took the file)
        self._failed_with = error
        message = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        if self.rank != 0:
            message = f"rank {self.rank}: {message}"
        try:
            self._write(
                "failed", error=message, bad_input=isinstance(error, UserError) if bad_input is None else bad_input
            )
        except OSError as failure:  # the storage that failed the run may fail this too: the error is said anyway
            logging.getLogger(__name__).warning("could not record the failure in %s: %s", self.path, failure)


def best_metrics(run_dir: Path, step: int | None) -> dict[str, Any] | None:
    """The validation metrics of the evaluation at `step` (the best checkpoint's), from metrics.jsonl."""
    if step is None:
        return None
    found = None
    for record in read_metrics(run_dir):
        if record.get("kind") == "eval" and record.get("step") == step:
            found = record
    if found is None:
        return None
    return {key: value for key, value in found.items() if key not in ("kind", "time", "epoch")}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of a run's metrics.jsonl (a line cut short by a crash is left out)."""
    records = []
    try:
        with open(Path(run_dir) / "metrics.jsonl") as lines:
            for line in lines:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        pass
    return records


def format_table(summary: dict[str, Any]) -> str:
    """The short table a run ends with: status, steps, throughput, time, and the metrics of the
    final and best evaluations and of the test split."""
    head = (
        f"{summary['status']}: step {summary.get('step')} of {summary.get('planned_steps')}, "
        f"{summary['world_size']} worker(s), {duration(summary['wall_time_s'])}"
    )
    if summary.get("samples_per_s"):
        head += f", {summary['samples_per_s']:,.0f} samples/s"
    if summary.get("stopped_early"):
        head += f"; stopped early: {summary['stopped_early']}"
    rows: list[tuple[str, ...]] = [("", "step", *METRIC_COLUMNS)]
    for name, metrics in (
        ("final validation", summary.get("validation")),
        ("best validation", summary.get("best")),
        ("test", summary.get("test")),
    ):
        if metrics:
            rows.append(
                (
                    name,
                    str(metrics.get("step", "")),
                    *(f"{metrics[key]:.4f}" if isinstance(metrics.get(key), float) else "-" for key in METRIC_COLUMNS),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [head] + [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    return "\n".join(lines)


def duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"
