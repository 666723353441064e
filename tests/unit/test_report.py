"""scripts/report.py's reading of run and sweep directories where runs did not all finish: a
failed point, a point whose process died, points a sweep has not started yet. (Finished sweeps,
a grid and Optuna's, are reported from real runs in tests/integration/test_train.py.)"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from app.report import read_sweep, text_table, write_report
from app.summary import RunSummary, format_table


def point(root: Path, lr: str, status: str, **fields) -> Path:
    path = root / f"optim.lr={lr}"
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"optim.lr={lr}", "run_name=sweep"]))
    evaluations = fields.pop("evaluations", [])
    (path / "metrics.jsonl").write_text("".join(json.dumps({"kind": "eval", **e}) + "\n" for e in evaluations))
    (path / "summary.json").write_text(json.dumps({"status": status, "world_size": 2, "wall_time_s": 5.0, **fields}))
    return path


def test_a_sweep_with_failed_dead_and_missing_points_reports_each_as_it_is(tmp_path):
    root = tmp_path / "sweep"
    root.mkdir()
    (root / "multirun.yaml").write_text(
        yaml.safe_dump(
            {"hydra": {"overrides": {"task": ["optim.lr=0.1,0.2,0.3,0.4", "run_name=sweep"]}, "sweeper": {}}}
        )
    )
    point(
        root,
        "0.1",
        "finished",
        step=4,
        planned_steps=4,
        samples_per_s=100.0,
        validation={"step": 4, "auc": 0.7, "logloss": 0.5, "ne": 0.9},
        evaluations=[{"step": 2, "auc": 0.75}, {"step": 4, "auc": 0.7, "logloss": 0.5}],
    )
    point(
        root,
        "0.2",
        "failed",
        error="DataError: part-0.parquet: column 'cat_3' has id 10000",
        evaluations=[{"step": 2, "auc": 0.6}],
    )
    dead = subprocess.Popen([sys.executable, "-c", "pass"])  # a pid that no longer runs
    dead.wait()
    point(root, "0.3", "running", pid=dead.pid, host=socket.gethostname())

    sweep = read_sweep([root])
    assert sweep.swept == ["optim.lr"] and sweep.planned_points == 4
    rows = {row["optim.lr"]: row for row in sweep.rows()}
    assert [row["optim.lr"] for row in sweep.rows()] == ["0.1", "0.2", "0.3"]  # best AUC first, none last
    assert rows["0.1"]["best_auc"] == 0.75 and rows["0.1"]["best_step"] == 2 and rows["0.1"]["final_auc"] == 0.7
    assert rows["0.2"]["status"] == "failed: DataError: part-0.parquet: column 'cat_3' has id 10000"
    assert rows["0.2"]["final_auc"] == 0.6  # its latest evaluation
    assert rows["0.3"]["status"] == "died" and rows["0.3"]["best_auc"] is None
    table = text_table(sweep)
    assert "failed: DataError: part-0.parquet: column 'cat_3' has id ..." in table and "died" in table  # cut to 60
    written = write_report(sweep, tmp_path / "out")
    assert "(1 died, 1 failed, 1 finished; 1 not started)" in written["markdown"].read_text()
    assert written["val_auc"].exists() and written["final_auc_vs_optim.lr"].exists()


def test_an_attempt_that_fails_keeps_what_the_run_reached_and_the_time_adds_up(tmp_path):
    first = RunSummary(tmp_path, rank=0, world_size=2)
    first.running()
    first.finished(
        step=10, planned_steps=10, validation={"step": 10, "auc": 0.8, "logloss": 0.4, "ne": 0.9, "calibration": 1.0}
    )
    finished = json.loads((tmp_path / "summary.json").read_text())
    again = RunSummary(tmp_path, rank=0, world_size=1)
    again.failed(ValueError("bad"))
    failed = json.loads((tmp_path / "summary.json").read_text())
    assert failed["status"] == "failed" and failed["error"] == "ValueError: bad" and failed["attempts"] == 2
    assert failed["validation"]["auc"] == 0.8 and failed["wall_time_s"] >= finished["wall_time_s"]
    # Another rank's failure is said only when it is its own (bad rows in its share of the data).
    RunSummary(tmp_path, rank=1, world_size=2).failed(ConnectionError("peer closed"))
    assert json.loads((tmp_path / "summary.json").read_text())["error"] == "ValueError: bad"
    table = format_table(finished)
    assert table.splitlines()[0].startswith("finished: step 10 of 10, 2 worker(s), 0m00s")
    assert "final validation    10  0.8000   0.4000  0.9000       1.0000" in table
