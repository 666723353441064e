"""One job per run: a second `python -m app.train` on a run_name a job is training is refused at
start-up (exit 2, naming the holder) and leaves that job's files alone; the 2 workers of one
torchrun job share the run; a job SIGKILLed leaves no lock behind, and the same command resumes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tests.conftest import REPO, kill_tree, pause_tree, run_command, start
from tests.integration.test_train import check, tiny, torchrun


def wait_until_training(run_dir: Path, job, log: Path, timeout: float = 300) -> dict:
    """summary.json of the job once it says running (its workers hold the run by then)."""
    deadline = time.time() + timeout
    while True:
        assert job.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "the job did not start in time"
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
            if summary["status"] == "running":
                return summary
        except (OSError, ValueError):
            pass
        time.sleep(0.2)


def test_a_second_job_on_a_run_in_use_is_refused_and_a_killed_job_leaves_no_lock(tmp_path):
    run_dir = tmp_path / "outputs" / "tiny"
    args = tiny(tmp_path, "trainer.epochs=100")  # long enough to be running throughout
    log = tmp_path / "first.log"
    first = start(torchrun(*args), log)  # 2 workers of one job: they share the run
    try:
        summary = wait_until_training(run_dir, first, log)
        pause_tree(first.pid)
        second = run_command([sys.executable, "-m", "app.train", *args, "trainer.max_steps=3"], cwd=REPO)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert (
            f"error: the run is in use by another job: {run_dir / '.rectrain.lock'} is locked by pid "
            f"{summary['pid']} on host {summary['host']}. Wait for it to end, or choose another run_name"
        ) in second.stderr, second.stderr[-3000:]
        after = json.loads((run_dir / "summary.json").read_text())
        assert (after["status"], after["pid"]) == ("running", summary["pid"])  # the first job's, untouched
        assert first.poll() is None, log.read_text()[-3000:]
    finally:
        kill_tree(first.pid)  # SIGKILL to the launcher and every worker: no word, no clean-up
        first.wait(timeout=60)
    resumed = check(run_command([sys.executable, "-m", "app.train", *tiny(tmp_path, "trainer.max_steps=3")], cwd=REPO))
    assert "final validation AUC" in resumed
