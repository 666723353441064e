"""MLflow tracking (app/tracking.py) against a real MLflow tracking server started on 127.0.0.1
(from the environment `make test` gives it: .venv/mlflow-server): a run logs its resolved config,
every metric and its files, and a resumed run goes on in the same MLflow run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, kill_tree, run_command
from tests.integration.test_train import check, records, tiny

SERVER = REPO / ".venv" / "mlflow-server" / "bin" / "mlflow"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    assert SERVER.exists(), f"{SERVER} is missing: `make test` installs the MLflow server's environment"
    store = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = open(store / "server.log", "w")  # noqa: SIM115 (the server writes to it for its life)
    server = subprocess.Popen(
        [
            str(SERVER),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{store / 'mlflow.db'}",
            "--artifacts-destination",
            str(store / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        deadline = time.time() + 120  # the first start creates its database
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (store / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "the MLflow server did not start in time"
            time.sleep(0.5)
        yield uri
    finally:
        kill_tree(server.pid)
        server.wait()
        log.close()


def test_a_run_logs_config_metrics_and_files_to_mlflow_and_a_resume_continues_it(tmp_path, tracking_uri):
    import mlflow

    overrides = [
        "trainer.eval_every_n_steps=3",
        f"logging.mlflow.tracking_uri={tracking_uri}",
        "logging.mlflow.experiment=tracking_test",
    ]
    check(
        run_command([sys.executable, "-m", "app.train", *tiny(tmp_path, "trainer.max_steps=6", *overrides)], cwd=REPO)
    )
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("tracking_test")
    [first] = client.search_runs([experiment.experiment_id])
    assert first.info.run_name == "tiny" and first.info.status == "FINISHED"

    # Asked for more steps, the run resumes from its checkpoint, and its MLflow run goes on.
    check(
        run_command([sys.executable, "-m", "app.train", *tiny(tmp_path, "trainer.max_steps=9", *overrides)], cwd=REPO)
    )
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    run_dir = tmp_path / "outputs" / "tiny"
    params = run.data.params
    assert params["optim.lr"] == "0.01" and params["data.batch_size"] == "128" and params["model.arch"] == "dlrm"
    assert params["features.sparse.3.name"] == "cat_3" and params["features.sparse.3.num_embeddings"] == "10000"
    assert params["trainer.max_steps"] == "6"  # MLflow parameters cannot change: the first value stays
    evaluations = records(run_dir, "eval")
    history = client.get_metric_history(run.info.run_id, "eval/auc")
    assert [(m.step, m.value) for m in history] == [(e["step"], pytest.approx(e["auc"])) for e in evaluations]
    assert [e["step"] for e in evaluations] == [3, 6, 9]
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [r["step"] for r in records(run_dir, "train")]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plan.txt", "plan.json", "summary.json", "val_auc.png"} <= artifacts
    summary = json.loads(Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))).read_text())
    assert summary["status"] == "finished" and summary["step"] == 9


def test_a_tracking_server_that_cannot_be_reached_stops_the_run_before_training_in_seconds(tmp_path):
    # MLflow's own retries, left as they are (7, with backoff), took 273 s to give up; start-up
    # asks once. A misspelled scheme is refused by the same one line, naming the key.
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        env.pop(name, None)
    unreachable = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    for uri, said in (
        (unreachable, "cannot reach MLflow"),
        ("htps://mlflow.example.com", "not a tracking URI MLflow can use"),
    ):
        started = time.monotonic()
        command = [sys.executable, "-m", "app.train", *tiny(tmp_path, f"logging.mlflow.tracking_uri={uri}")]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        took = time.monotonic() - started
        assert result.returncode == 2, result.stderr[-3000:]
        assert f"error: logging.mlflow.tracking_uri={uri!r}: {said}" in result.stderr
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        assert not (tmp_path / "outputs" / "tiny" / "metrics.jsonl").exists()
        # The whole command, imports and start-up included: 26 to 32 s here on a loaded machine.
        assert took < 150, took
