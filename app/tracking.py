"""MLflow tracking (logging.mlflow.*), a sink beside metrics.jsonl and TensorBoard: the resolved
config as parameters, every metric as it is logged, and at the end the run's files (plan,
summary, plots) as artifacts. Rank 0 logs, through an MlflowClient of its own (no global
"active run" that other code could see or end).

One run directory is one MLflow run: a resumed run (after a preemption, or asked for more steps)
finds its MLflow run again by the tag rectrain.run_dir and goes on logging into it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from app.config import MlflowConfig
from app.errors import UserError

log = logging.getLogger(__name__)

RUN_DIR_TAG = "rectrain.run_dir"
# MLflow's limits: entries per log_batch call, and characters of a parameter's value.
_BATCH = 100
_PARAM_CHARS = 6000
STATUSES = {"finished": "FINISHED", "failed": "FAILED", "preempted": "KILLED"}


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """A config as MLflow parameters: dotted keys (list items by index), values as text."""
    if dataclasses.is_dataclass(value):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    items: Iterable[tuple[Any, Any]]
    if isinstance(value, dict):
        items = value.items()
    elif (
        isinstance(value, (list, tuple))
        and value
        and all(dataclasses.is_dataclass(v) or isinstance(v, dict) for v in value)
    ):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: str(value)[:_PARAM_CHARS]}
    flat: dict[str, str] = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


# MLflow's client retries a request that finds no server for minutes (7 retries, backoff factor 2:
# 273 s measured), and waits up to 120 s for an answer. At start-up a server that does not answer at
# once is a wrong URI or one that is down: the run is refused in seconds instead. Later requests keep
# MLflow's patience (a server that fails mid-run costs metrics, not the training).
_START_UP_REQUESTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


@contextmanager
def _answer_at_once() -> Iterator[None]:
    """MLflow's requests without retries and with a short timeout, unless the environment sets them."""
    chosen = {name: value for name, value in _START_UP_REQUESTS.items() if name not in os.environ}
    os.environ.update(chosen)
    try:
        yield
    finally:
        for name in chosen:
            os.environ.pop(name, None)


class MlflowRun:
    """The run directory's MLflow run."""

    def __init__(
        self, config: MlflowConfig, run_dir: Path, experiment: str, run_name: str, params: dict[str, str]
    ) -> None:
        import mlflow
        from mlflow.entities import Param

        resolved = str(Path(run_dir).resolve())
        experiment = config.experiment or experiment
        uri = config.tracking_uri
        try:
            self._client = mlflow.MlflowClient(tracking_uri=uri)
        except Exception as error:  # e.g. an unknown scheme (htps://)
            raise UserError(
                f"logging.mlflow.tracking_uri={uri!r}: not a tracking URI MLflow can use "
                f"({type(error).__name__}: {' '.join(str(error).split())[:300]})"
            ) from error
        try:
            with _answer_at_once():
                found = self._client.get_experiment_by_name(experiment)
                experiment_id = found.experiment_id if found else self._client.create_experiment(experiment)
                earlier = self._client.search_runs(
                    [experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{resolved}'", max_results=1
                )
        except Exception as error:  # no server there, or it refused: say so before training starts
            raise UserError(
                f"logging.mlflow.tracking_uri={uri!r}: cannot reach MLflow "
                f"({type(error).__name__}: {' '.join(str(error).split())[:300]})"
            ) from error
        if earlier:
            self.run_id = earlier[0].info.run_id
            self._client.update_run(self.run_id, status="RUNNING")
            logged = earlier[0].data.params
            # Parameters cannot change in MLflow: a resume asked for more steps keeps the first value.
            params = {k: v for k, v in params.items() if k not in logged}
            log.info("MLflow: continuing run %s in experiment %r", self.run_id, experiment)
        else:
            run = self._client.create_run(
                experiment_id, run_name=config.run_name or run_name, tags={RUN_DIR_TAG: resolved}
            )
            self.run_id = run.info.run_id
            log.info("MLflow: run %s in experiment %r at %s", self.run_id, experiment, config.tracking_uri)
        entries = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(entries), _BATCH):
            self._client.log_batch(self.run_id, params=entries[start : start + _BATCH])
        self._working = True

    def log(self, kind: str, record: dict[str, Any]) -> None:
        """A record's numbers as metrics <kind>/<key> at its step. A tracking server that fails
        mid-run costs its metrics, not the training: a warning, and no more tries."""
        from mlflow.entities import Metric

        if not self._working:
            return
        now = int(time.time() * 1000)
        metrics = [
            Metric(f"{kind}/{key}", float(value), now, int(record.get("step", 0)))
            for key, value in record.items()
            if key not in ("step", "epoch")
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
        ]
        self._guarded(lambda: self._client.log_batch(self.run_id, metrics=metrics))

    def finish(self, status: str, artifacts: Iterable[Path]) -> None:
        """Uploads the artifacts that exist and ends the run as `status` (finished, failed, preempted)."""
        for path in artifacts:
            if path.exists():
                self._guarded(lambda artifact=path: self._client.log_artifact(self.run_id, str(artifact)))
        self._guarded(lambda: self._client.set_terminated(self.run_id, STATUSES[status]))

    def _guarded(self, call) -> None:
        if not self._working:
            return
        try:
            call()
        except Exception as error:
            self._working = False
            log.warning(
                "MLflow: logging failed, and stops for this run (training goes on): %s: %s", type(error).__name__, error
            )


def run_artifacts(run_dir: Path) -> list[Path]:
    """The run's files worth keeping beside its metrics: the plan, the summary, and its report's
    plots (made here: validation AUC over steps)."""
    from app.report import read_sweep, write_plots

    run_dir = Path(run_dir)
    plots: list[Path] = []
    try:
        directory = run_dir / "report"
        directory.mkdir(exist_ok=True)
        plots = list(write_plots(read_sweep([run_dir]), directory).values())
    except Exception as error:  # a plot is not worth failing a finished run for
        log.warning("could not draw the run's plots: %s: %s", type(error).__name__, error)
    return [run_dir / "plan.txt", run_dir / "plan.json", run_dir / "summary.json", *plots]
