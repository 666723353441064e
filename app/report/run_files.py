"""The files a report reads, each parsed into the shape the report uses, or refused with the
reason: a run directory's summary.json, metrics.jsonl (its evaluations), .hydra/overrides.yaml and
.hydra/hydra.yaml, and a sweep's multirun.yaml. A file that is absent is None (or empty); one that
is there but not what a run writes (not JSON or YAML, binary, another shape, a field of another
type) raises Unreadable naming the file and what is wrong, so that the report can list the point
as unreadable and go on. Only the fields the report uses are checked: others may change freely.
"""

from __future__ import annotations

import json
import math
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from app.summary import METRIC_COLUMNS, SUMMARY_FILE

MAX_PID = 4_194_304  # Linux's PID_MAX_LIMIT: no process id is larger
_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother = 40, 40


class Unreadable(Exception):
    """A file that is there but cannot be used; the message names it and says why."""


@dataclass
class SweepConfig:
    """What a sweep's Hydra config says about its points."""

    grid: dict[str, int] = field(default_factory=dict)  # swept key: its number of values (basic sweeper)
    optuna_params: dict[str, str] | None = None  # Optuna's search space, by key
    n_trials: int | None = None
    direction: str = "maximize"


def _shown(value: Any) -> str:
    return _SHORT.repr(value)


def _kind(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), f"the number {_shown(value)}" if isinstance(value, (int, float)) else "another value")


def _check(record: dict[str, Any], key: str, ok: Any, expected: str, where: str) -> None:
    value = record.get(key)
    if value is not None and not ok(value):
        raise Unreadable(f"{where}: {key} is {_shown(value)}, not {expected}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_metrics(record: dict[str, Any], where: str) -> None:
    for key in METRIC_COLUMNS:
        _check(record, key, _is_number, "a number", where)


def _text(path: Path, name: str) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise Unreadable(f"{name}: not text (binary data?)") from None
    except OSError as error:
        raise Unreadable(f"{name}: {error.strerror or error}") from None


def _yaml(path: Path, name: str) -> Any:
    text = _text(path, name)
    if text is None:
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise Unreadable(f"{name}: not YAML ({' '.join(str(error).split())[:120]})") from None


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """summary.json, checked: None where there is none."""
    text = _text(run_dir / SUMMARY_FILE, SUMMARY_FILE)
    if text is None:
        return None
    try:
        summary = json.loads(text)
    except ValueError:
        raise Unreadable(f"{SUMMARY_FILE}: not JSON") from None
    if not isinstance(summary, dict):
        raise Unreadable(f"{SUMMARY_FILE}: a JSON object was expected, got {_kind(summary)}")
    for key in ("status", "error", "host"):
        _check(summary, key, lambda v: isinstance(v, str), "a string", SUMMARY_FILE)
    for key in ("step", "planned_steps"):
        _check(summary, key, lambda v: _is_int(v) and v >= 0, "a step count", SUMMARY_FILE)
    _check(summary, "pid", lambda v: _is_int(v) and 0 < v <= MAX_PID, "a process id", SUMMARY_FILE)
    for key in ("samples_per_s", "wall_time_s"):
        _check(summary, key, _is_number, "a number", SUMMARY_FILE)
    _check(summary, "validation", lambda v: isinstance(v, dict), "a mapping of metrics", SUMMARY_FILE)
    _check_metrics(summary.get("validation") or {}, f"{SUMMARY_FILE} validation")
    return summary


def read_evaluations(run_dir: Path) -> list[dict[str, Any]]:
    """The eval records of metrics.jsonl, checked (none where there is no file). A line that is
    not JSON is a record cut short by a crash, and left out."""
    text = _text(run_dir / "metrics.jsonl", "metrics.jsonl")
    evaluations = []
    for number, line in enumerate((text or "").splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        where = f"metrics.jsonl line {number}"
        if not isinstance(record, dict):
            raise Unreadable(f"{where}: a JSON object was expected, got {_kind(record)}")
        if record.get("kind") != "eval":
            continue
        if not (_is_int(record.get("step")) and record["step"] >= 0):
            raise Unreadable(f"{where}: an eval record without a step (got {_shown(record.get('step'))})")
        _check_metrics(record, where)
        evaluations.append(record)
    return evaluations


def read_overrides(run_dir: Path) -> list[str]:
    """.hydra/overrides.yaml: the command line's overrides, key=value each."""
    name = ".hydra/overrides.yaml"
    overrides = _yaml(run_dir / ".hydra" / "overrides.yaml", name)
    if overrides is None:
        return []
    if not isinstance(overrides, list) or not all(isinstance(item, str) for item in overrides):
        raise Unreadable(f"{name}: a list of overrides (key=value) was expected, got {_kind(overrides)}")
    return overrides


def _hydra_section(path: Path, name: str) -> dict[str, Any] | None:
    config = _yaml(path, name)
    if config is None:
        return None
    if not isinstance(config, dict):
        raise Unreadable(f"{name}: a mapping was expected, got {_kind(config)}")
    hydra = config.get("hydra")
    if not isinstance(hydra, dict):
        raise Unreadable(f"{name}: hydra is {_kind(hydra)}, a mapping was expected")
    return hydra


def _mapping(section: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = section.get(key)
    if value is not None and not isinstance(value, dict):
        raise Unreadable(f"{where}: {key} is {_kind(value)}, a mapping was expected")
    return value or {}


def read_job_number(run_dir: Path) -> int | None:
    """The point's number in its sweep, from .hydra/hydra.yaml (None for a single run)."""
    name = ".hydra/hydra.yaml"
    hydra = _hydra_section(run_dir / ".hydra" / "hydra.yaml", name)
    number = _mapping(hydra, "job", f"{name} hydra").get("num") if hydra is not None else None
    return number if _is_int(number) else None


def read_sweep_config(path: Path, name: str) -> SweepConfig | None:
    """A sweep's config (multirun.yaml, or an Optuna point's .hydra/hydra.yaml), checked."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    hydra = _hydra_section(path, name)
    if hydra is None:
        return None
    sweeper = _mapping(hydra, "sweeper", f"{name} hydra")
    params = _mapping(sweeper, "params", f"{name} hydra.sweeper")
    parser = OverridesParser.create()
    try:
        if "optuna" in str(sweeper.get("_target_", "")):
            optuna_params = {str(k): str(v) for k, v in params.items()}
            for key, value in optuna_params.items():
                parser.parse_override(f"{key}={value}")
            trials = sweeper.get("n_trials")
            return SweepConfig(
                optuna_params=optuna_params,
                n_trials=trials if _is_int(trials) else None,
                direction="minimize" if sweeper.get("direction") == "minimize" else "maximize",
            )
        task = _mapping(hydra, "overrides", f"{name} hydra").get("task") or []
        if not isinstance(task, list) or not all(isinstance(item, str) for item in task):
            raise Unreadable(f"{name}: hydra.overrides.task is {_kind(task)}, a list of overrides was expected")
        sweeps = [o for o in parser.parse_overrides(task) if o.is_sweep_override()]
    except HydraException as error:
        raise Unreadable(f"{name}: an override Hydra cannot parse ({' '.join(str(error).split())[:120]})") from None
    grid = {o.key_or_group: len(list(o.sweep_string_iterator())) for o in sweeps}
    for key, value in params.items():  # +sweep=lr style: the grid in the config
        grid[str(key)] = len(str(value).split(","))
    return SweepConfig(grid=grid)


def finite(value: Any) -> float | None:
    """A metric as a float, or None where it is missing or not finite."""
    return float(value) if _is_number(value) and math.isfinite(value) else None
