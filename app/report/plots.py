"""The plots of a report: validation AUC over steps, final AUC against each swept parameter, and
for an Optuna sweep its optimization history and parameter importances. Labels are values a user
chose (overrides, directory names): they are drawn as plain text, never as matplotlib's mathtext
(where `$...$` is a formula, and a malformed one an error)."""

from __future__ import annotations

import typing
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.report.run_files import finite as _number
from app.report.sweep import Point, Sweep


def _label(point: Point, swept: Sequence[str]) -> str:
    return ", ".join(f"{k}={point.overrides.get(k, '')}" for k in swept) or point.name


def plot_auc_over_steps(sweep: Sweep, path: Path) -> Path | None:
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


def plot_final_auc_against(sweep: Sweep, key: str, path: Path) -> Path | None:
    """Final validation AUC against one swept parameter: numbers on a (log, where they span a
    decade or more) axis, other values side by side."""
    import matplotlib.pyplot as plt

    scored = [(p.overrides.get(key, ""), _number(p.final.get("auc"))) for p in sweep.points]
    pairs = [(x, y) for x, y in scored if y is not None]
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

    assert sweep.optuna is not None, "a sweep by Optuna"
    parser = OverridesParser.create()
    distributions = {
        key: create_optuna_distribution_from_override(parser.parse_override(f"{key}={value}"))
        for key, value in sweep.optuna["params"].items()
    }
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
                try:
                    params[key] = _optuna_value(raw, distribution)
                except ValueError:
                    break
            else:
                state = optuna.trial.TrialState.COMPLETE if value is not None else optuna.trial.TrialState.FAIL
                try:
                    study.add_trial(
                        optuna.trial.create_trial(params=params, distributions=distributions, value=value, state=state)
                    )
                except ValueError:  # a value outside the search space (an override edited by hand): no trial of it
                    continue
    return study


def _optuna_value(raw: str, distribution: Any) -> Any:
    import optuna

    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return next((c for c in distribution.choices if str(c) == raw), raw)
    if isinstance(
        distribution, (optuna.distributions.IntUniformDistribution, optuna.distributions.IntLogUniformDistribution)
    ):
        return int(raw)
    return float(raw)  # a ValueError where it is no number: no trial of it (see optuna_study)


def plot_optuna(sweep: Sweep, directory: Path) -> dict[str, Path]:
    """Optuna's optimization history (each trial's AUC, and the best so far) and, with 2 or more
    finished trials, its parameter importances. Drawn here: optuna 2's own matplotlib plots call
    a matplotlib API that 3.9 removed."""
    import matplotlib.pyplot as plt
    import optuna
    from matplotlib.ticker import MaxNLocator

    assert sweep.optuna is not None, "a sweep by Optuna"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna_study(sweep)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    written: dict[str, Path] = {}
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
    typing.cast(MaxNLocator, axes.xaxis.get_major_locator()).set_params(integer=True)  # an AutoLocator
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


def write_plots(sweep: Sweep, directory: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    with matplotlib.rc_context({"text.usetex": False, "text.parse_math": False}):  # labels are plain text
        return _draw_plots(sweep, directory)


def _draw_plots(sweep: Sweep, directory: Path) -> dict[str, Path]:
    plots: dict[str, Path] = {}
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
