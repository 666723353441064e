"""Storage that fails under a running job, through `python -m app.train`: a file-size limit
(RLIMIT_FSIZE, as a full disk fails a write: the save's files cannot grow) met while a checkpoint
is written, and the S3 server stopped while the run checkpoints into it. The job ends in one line
naming the path and the cause, exit 2, with the half-written save removed, summary.json "failed"
with that line, and the checkpoints before it intact."""

from __future__ import annotations

import json
import re
import sys

from app.checkpoint import verify
from tests.conftest import REPO, run_command
from tests.integration.test_train import tiny

# Runs the rest of its command line with files limited to argv[1] bytes: a write beyond fails
# with EFBIG (Python ignores SIGXFSZ), as one on a full disk fails with ENOSPC.
_LIMITED = (
    "import os, resource, sys; limit = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)


def with_file_size_limit(limit: int, *command: str):
    return [sys.executable, "-c", _LIMITED, str(limit), *command]


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-5000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, stderr[-5000:]
    return errors[0]


def test_a_save_that_meets_a_full_disk_fails_in_one_line_and_leaves_the_checkpoints_intact(one_process_run, tmp_path):
    # A finished run of 5 steps (a copy of the session's shared one, tests/integration/conftest.py),
    # continued under the limit: its next save, step 10's (experiment=tiny saves every 10), fails.
    run_dir = one_process_run.copy_to(tmp_path) / "outputs" / "tiny"
    checkpoints = run_dir / "checkpoints"
    failed = run_command(
        with_file_size_limit(256 << 10, "-m", "app.train", *tiny(tmp_path, "trainer.max_steps=20")), cwd=REPO
    )
    assert failed.returncode == 2, failed.stderr[-5000:]
    line = one_error_line(failed.stderr)
    assert line.startswith(
        f"error: cannot write checkpoint {checkpoints / 'step_00000010'}: [Errno 27] File too "
        f"large ({checkpoints / '.step_00000010.tmp'}/"
    ) and line.endswith("; the checkpoints before it are untouched."), line
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best", "latest", "step_00000005"]  # nothing half-written
    assert verify(checkpoints / "step_00000005") is None
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == f"StorageFailure: {line.removeprefix('error: ')}"


def test_an_object_store_that_dies_during_a_run_fails_it_in_one_line(tmp_path):
    import time

    from tests.conftest import kill_tree, start
    from tests.object_store import s3, s3_server

    bucket = "rectrain-dying"
    with s3_server(tmp_path) as _:
        s3().mkdir(bucket)
        url = f"s3://{bucket}/runs/dying"
        args = tiny(tmp_path, f"checkpoint.dir={url}", "checkpoint.every_n_steps=5", "trainer.epochs=100")
        job = start([sys.executable, "-m", "app.train", *args], tmp_path / "job.log")
        try:
            deadline = time.time() + 300
            while not s3().exists(f"{bucket}/runs/dying/step_00000005/meta.json"):
                assert job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
                assert time.time() < deadline, "no checkpoint published in time"
                time.sleep(0.2)
        except BaseException:
            kill_tree(job.pid)
            raise
    # The server is gone (s3_server stopped it): the next save meets a store that does not answer.
    try:
        job.wait(timeout=400)
    finally:
        kill_tree(job.pid)
    output = (tmp_path / "job.log").read_text()
    assert job.returncode == 2, output[-5000:]
    line = one_error_line(output)
    # The server may die while step 5 is still being published (under load) or at a later save's write.
    assert re.match(rf"error: cannot (write|publish) checkpoint {re.escape(url)}/step_000000", line), line
    assert "EndpointConnectionError" in line, line
    summary = json.loads((tmp_path / "outputs" / "tiny" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == f"StorageFailure: {line.removeprefix('error: ')}"
