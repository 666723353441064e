"""Reports of runs and sweeps (scripts/report.py): a table of every point, best first, as text,
CSV, Markdown and HTML, and plots of how they trained.

A point is a run directory: what Hydra wrote (.hydra/overrides.yaml, .hydra/hydra.yaml), what the
run wrote (summary.json, metrics.jsonl). A sweep directory is one holding several, and Hydra's
multirun.yaml: from it come the swept parameters, how many points the sweep has (so a sweep still
running shows what is missing), and for an Optuna sweep its search space and direction. Nothing
here needs torch: a report can be made on any machine that can read the directories.
"""

from __future__ import annotations

import base64
import csv
import html
import math
import os
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from app.summary import PLACEMENT_KEYS, duration, read_metrics, read_summary

COLUMNS = ("point", "status", "step", "final_auc", "final_logloss", "final_ne", "best_auc", "best_step",
           "samples_per_s", "wall_time_s")


@dataclass
class Point:
    """One run directory, read."""

    path: Path
    name: str  # relative to the report's root
    overrides: Dict[str, str]
    job_number: Optional[int]
    status: str
    error: Optional[str]
    summary: Dict[str, Any]
    evaluations: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def final(self) -> Dict[str, Any]:
        """The final validation metrics: the summary's, or (a run not finished) the latest evaluation's."""
        return self.summary.get("validation") or (self.evaluations[-1] if self.evaluations else {})

    @property
    def best(self) -> Dict[str, Any]:
        """The evaluation with the highest AUC."""
        scored = [e for e in self.evaluations if _number(e.get("auc")) is not None]
        return max(scored, key=lambda e: e["auc"]) if scored else {}

    def row(self, swept: Sequence[str]) -> Dict[str, Any]:
        final, best = self.final, self.best
        row = {
            "point": self.name,
            **{key: self.overrides.get(key, "") for key in swept},
            "status": self.status if not self.error else f"{self.status}: {self.error}",
            "step": _steps(self.summary, self.evaluations),
            "final_auc": _number(final.get("auc")),
            "final_logloss": _number(final.get("logloss")),
            "final_ne": _number(final.get("ne")),
            "best_auc": _number(best.get("auc")),
            "best_step": best.get("step"),
            "samples_per_s": _number(self.summary.get("samples_per_s")),
            "wall_time_s": _number(self.summary.get("wall_time_s")),
        }
        return row


@dataclass
class Sweep:
    """What a report covers: its points, and what the sweep (if any) says about them."""

    root: Path
    points: List[Point]
    swept: List[str]
    planned_points: Optional[int] = None
    optuna: Optional[Dict[str, Any]] = None  # {"direction", "params": {name: override string}}

    def rows(self) -> List[Dict[str, Any]]:
        """Every point's row, best first: by best validation AUC, points without one last."""
        rows = [p.row(self.swept) for p in self.points]
        return sorted(rows, key=lambda r: (r["best_auc"] is None, -(r["best_auc"] or 0.0), r["point"]))


def _number(value: Any) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _steps(summary: Dict[str, Any], evaluations: List[Dict[str, Any]]) -> str:
    step = summary.get("step", evaluations[-1]["step"] if evaluations else None)
    planned = summary.get("planned_steps")
    if step is None:
        return ""
    return f"{step}/{planned}" if planned else str(step)


def _alive(summary: Dict[str, Any]) -> Optional[bool]:
    """Whether the process a running summary names still runs; None where that cannot be told
    (another host)."""
    if summary.get("host") != socket.gethostname() or not summary.get("pid"):
        return None
    try:
        os.kill(int(summary["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_point(path: Path, root: Path) -> Point:
    summary = read_summary(path) or {}
    evaluations = [r for r in read_metrics(path) if r.get("kind") == "eval"]
    status = summary.get("status")
    if status is None:
        # A summary from before statuses were recorded was only written by a finished run.
        status = "finished" if summary.get("validation") else ("no summary" if not evaluations else "unknown")
    elif status == "running" and _alive(summary) is False:
        status = "died"  # killed without a word: SIGKILL, out of memory, a lost node
    hydra_dir = path / ".hydra"
    overrides = _overrides(hydra_dir / "overrides.yaml")
    job_number = None
    try:
        job_number = yaml.safe_load((hydra_dir / "hydra.yaml").read_text())["hydra"]["job"].get("num")
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        pass
    name = str(path.relative_to(root)) if path != root else path.name
    return Point(path, name, overrides, job_number, status, summary.get("error"), summary, evaluations)


def _overrides(path: Path) -> Dict[str, str]:
    try:
        listed = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError):
        return {}
    overrides = {}
    for item in listed:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if key not in PLACEMENT_KEYS:
            overrides[key] = value
    return overrides


def _is_run_dir(path: Path) -> bool:
    return (path / "summary.json").exists() or (path / "metrics.jsonl").exists() or (
        (path / ".hydra" / "overrides.yaml").exists() and not (path / "multirun.yaml").exists())


def find_run_dirs(path: Path, depth: int = 3) -> List[Path]:
    """`path` itself if it is a run directory, else the run directories under it (a sweep's points)."""
    if _is_run_dir(path):
        return [path]
    if depth == 0:
        return []
    found: List[Path] = []
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
        raise FileNotFoundError(f"{', '.join(map(str, paths))}: no run directory (one with summary.json, "
                                "metrics.jsonl or .hydra/overrides.yaml) found")
    points = [read_point(d, root if len(paths) > 1 else paths[0]) for d in run_dirs]
    points.sort(key=lambda p: (p.job_number is None, p.job_number or 0, p.name))
    multirun = _multirun(paths[0], points) if len(paths) == 1 else None
    planned, optuna, swept = None, None, []
    if multirun is not None:
        planned, optuna, swept = _sweep_plan(multirun)
    varying = [k for k in sorted({k for p in points for k in p.overrides})
               if len({p.overrides.get(k) for p in points}) > 1]
    swept = swept + [k for k in varying if k not in swept]
    return Sweep(paths[0], points, swept, planned, optuna)


def _multirun(path: Path, points: List[Point]) -> Optional[Dict[str, Any]]:
    """The sweep's Hydra config: multirun.yaml (the basic sweeper writes it), else a point's own
    (Optuna's sweeper writes none; its points' .hydra/hydra.yaml hold the search)."""
    candidates = [path / "multirun.yaml"] + [p.path / ".hydra" / "hydra.yaml" for p in points[:1] if p.path != path]
    for candidate in candidates:
        try:
            config = yaml.safe_load(candidate.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if candidate.name == "multirun.yaml" or "optuna" in str(config["hydra"].get("sweeper", {}).get("_target_")):
            return config
    return None


def _sweep_plan(multirun: Dict[str, Any]):
    """(points planned, Optuna's search or None, swept keys) from a sweep's multirun.yaml."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra_config = multirun.get("hydra", {})
    sweeper = hydra_config.get("sweeper", {}) or {}
    if "optuna" in str(sweeper.get("_target_", "")):
        params = {k: str(v) for k, v in (sweeper.get("params") or {}).items()}
        return sweeper.get("n_trials"), {"direction": sweeper.get("direction", "maximize"), "params": params}, \
            list(params)
    task = (hydra_config.get("overrides") or {}).get("task") or []
    sweeps = [o for o in OverridesParser.create().parse_overrides(task) if o.is_sweep_override()]
    params = {o.key_or_group: len(list(o.sweep_string_iterator())) for o in sweeps}
    for key, value in (sweeper.get("params") or {}).items():  # +sweep=lr style: the grid in the config
        params[key] = len(str(value).split(","))
    planned = math.prod(params.values()) if params else None
    return planned, None, [k for k in params if k not in PLACEMENT_KEYS]


# ---- outputs ------------------------------------------------------------------------------


def _cell(value: Any, key: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if key == "samples_per_s":
            return f"{value:,.0f}"
        if key == "wall_time_s":
            return duration(value)
        return f"{value:.4f}"
    return str(value)


def columns(sweep: Sweep) -> List[str]:
    return ["point", *sweep.swept, *COLUMNS[1:]]


def text_table(sweep: Sweep, width: int = 60) -> str:
    """The table for a terminal: an error cut to `width` characters (report.csv keeps it whole)."""
    keys = columns(sweep)
    rows = [keys] + [[_cell(row[k], k) for k in keys] for row in sweep.rows()]
    rows = [[c if len(c) <= width else c[:width - 3] + "..." for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(keys))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def markdown_table(sweep: Sweep) -> str:
    keys = columns(sweep)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in sweep.rows():
        lines.append("| " + " | ".join(_cell(row[k], k).replace("|", "\\|") for k in keys) + " |")
    return "\n".join(lines)


def write_csv(sweep: Sweep, path: Path) -> None:
    """Unrounded values, for tools."""
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=columns(sweep))
        writer.writeheader()
        for row in sweep.rows():
            writer.writerow({k: "" if v is None else v for k, v in row.items()})


def headline(sweep: Sweep) -> str:
    counts: Dict[str, int] = {}
    for point in sweep.points:
        counts[point.status] = counts.get(point.status, 0) + 1
    said = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    planned = f" of {sweep.planned_points} planned" if sweep.planned_points else ""
    missing = ""
    if sweep.planned_points and len(sweep.points) < sweep.planned_points:
        missing = f"; {sweep.planned_points - len(sweep.points)} not started"
    return f"{sweep.root}: {len(sweep.points)} point(s){planned} ({said}{missing})"


# ---- plots --------------------------------------------------------------------------------


def _label(point: Point, swept: Sequence[str]) -> str:
    return ", ".join(f"{k}={point.overrides.get(k, '')}" for k in swept) or point.name


def plot_auc_over_steps(sweep: Sweep, path: Path) -> Optional[Path]:
    import matplotlib.pyplot as plt

    points = [p for p in sweep.points if p.evaluations]
    if not points:
        return None
    figure, axes = plt.subplots(figsize=(8, 5))
    for point in points:
        steps = [e["step"] for e in point.evaluations if _number(e.get("auc")) is not None]
        aucs = [e["auc"] for e in point.evaluations if _number(e.get("auc")) is not None]
        axes.plot(steps, aucs, marker="o", markersize=3, label=f"{_label(point, sweep.swept)} ({point.status})")
    axes.set_xlabel("step")
    axes.set_ylabel("validation AUC")
    axes.set_title("Validation AUC over training")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, path)


def plot_final_auc_against(sweep: Sweep, key: str, path: Path) -> Optional[Path]:
    """Final validation AUC against one swept parameter: numbers on a (log, where they span a
    decade or more) axis, other values side by side."""
    import matplotlib.pyplot as plt

    pairs = [(p.overrides.get(key, ""), _number(p.final.get("auc"))) for p in sweep.points]
    pairs = [(x, y) for x, y in pairs if y is not None]
    if not pairs:
        return None
    figure, axes = plt.subplots(figsize=(6, 4))
    try:
        xs = [float(x) for x, _ in pairs]
        axes.scatter(xs, [y for _, y in pairs])
        if min(xs) > 0 and max(xs) / min(xs) >= 10:
            axes.set_xscale("log")
    except ValueError:
        names = sorted({x for x, _ in pairs})
        axes.scatter([names.index(x) for x, _ in pairs], [y for _, y in pairs])
        axes.set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes.set_xlabel(key)
    axes.set_ylabel("final validation AUC")
    axes.set_title(f"Final validation AUC against {key}")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def optuna_study(sweep: Sweep):
    """An in-memory Optuna study of the sweep's trials (in the order they ran), from their
    parameters and final AUCs, for Optuna's own plots."""
    import optuna
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    parser = OverridesParser.create()
    distributions = {key: create_optuna_distribution_from_override(parser.parse_override(f"{key}={value}"))
                     for key, value in sweep.optuna["params"].items()}
    study = optuna.create_study(direction=sweep.optuna["direction"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # add_trial, create_trial
        for point in sweep.points:
            value = _number(point.final.get("auc")) if point.status == "finished" else None
            params = {}
            for key, distribution in distributions.items():
                raw = point.overrides.get(key)
                if raw is None:
                    break
                params[key] = _optuna_value(raw, distribution)
            else:
                state = optuna.trial.TrialState.COMPLETE if value is not None else optuna.trial.TrialState.FAIL
                study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=value,
                                                          state=state))
    return study


def _optuna_value(raw: str, distribution: Any) -> Any:
    import optuna

    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return next((c for c in distribution.choices if str(c) == raw), raw)
    if isinstance(distribution, (optuna.distributions.IntUniformDistribution,
                                 optuna.distributions.IntLogUniformDistribution)):
        return int(raw)
    return float(raw)


def plot_optuna(sweep: Sweep, directory: Path) -> Dict[str, Path]:
    """Optuna's optimization history (each trial's AUC, and the best so far) and, with 2 or more
    finished trials, its parameter importances. Drawn here: optuna 2's own matplotlib plots call
    a matplotlib API that 3.9 removed."""
    import matplotlib.pyplot as plt
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna_study(sweep)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    written: Dict[str, Path] = {}
    if not complete:
        return written
    pick = max if sweep.optuna["direction"] == "maximize" else min
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.scatter([t.number for t in complete], [t.value for t in complete], label="trial's final AUC")
    best_so_far = [pick(t.value for t in complete if t.number <= trial.number) for trial in complete]
    axes.step([t.number for t in complete], best_so_far, where="post", color="C3", label="best so far")
    failed = [t.number for t in study.trials if t.state != optuna.trial.TrialState.COMPLETE]
    for number in failed:
        axes.axvline(number, color="0.7", linestyle=":")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_xlabel("trial" + (" (dotted: not finished)" if failed else ""))
    axes.set_ylabel("validation AUC")
    axes.set_title("Optuna optimization history")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    written["optuna_history"] = _save(figure, directory / "optuna_history.png")
    if len(complete) >= 2:
        # Mean decrease in impurity of a random forest over the trials: optuna 2's default (fANOVA)
        # reads scikit-learn's tree arrays in a layout that scikit-learn 1.3 changed.
        evaluator = optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=0)
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
        names = list(importances)[::-1]
        figure, axes = plt.subplots(figsize=(7, 1.5 + 0.5 * len(names)))
        axes.barh(names, [importances[n] for n in names])
        axes.set_xlabel("importance for the final AUC (mean decrease in impurity)")
        axes.set_title("Optuna parameter importances")
        written["optuna_importances"] = _save(figure, directory / "optuna_importances.png")
    return written


def _save(figure: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_plots(sweep: Sweep, directory: Path) -> Dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    plots: Dict[str, Path] = {}
    path = plot_auc_over_steps(sweep, directory / "val_auc.png")
    if path:
        plots["val_auc"] = path
    for key in sweep.swept:
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in key)
        path = plot_final_auc_against(sweep, key, directory / f"final_auc_vs_{safe}.png")
        if path:
            plots[f"final_auc_vs_{key}"] = path
    if sweep.optuna:
        plots.update(plot_optuna(sweep, directory))
    return plots


def write_html(sweep: Sweep, plots: Dict[str, Path], path: Path) -> None:
    """One page: the headline, the table, and every plot embedded (the page needs no other file)."""
    keys = columns(sweep)
    header = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(row[k], k))}</td>" for k in keys) + "</tr>"
                   for row in sweep.rows())
    images = "".join(
        f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,"
        f"{base64.b64encode(p.read_bytes()).decode()}'><figcaption>{html.escape(name)}</figcaption></figure>"
        for name, p in plots.items())
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>rectrain report: {html.escape(str(sweep.root))}"
            "</title><style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
            "figure{display:inline-block;margin:1em}</style></head><body>"
            f"<h1>rectrain report</h1><p>{html.escape(headline(sweep))}</p>"
            f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>{images}</body></html>")
    path.write_text(page)


def write_report(sweep: Sweep, directory: Path) -> Dict[str, Path]:
    """report.csv, report.md, report.html and the PNGs into `directory`; returns what was written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = {"csv": directory / "report.csv", "markdown": directory / "report.md"}
    write_csv(sweep, written["csv"])
    written["markdown"].write_text(f"{headline(sweep)}\n\n{markdown_table(sweep)}\n")
    plots = write_plots(sweep, directory)
    written["html"] = directory / "report.html"
    write_html(sweep, plots, written["html"])
    return {**written, **plots}

