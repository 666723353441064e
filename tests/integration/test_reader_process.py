"""A Parquet reader's processes outlive nothing: a training process killed outright (SIGKILL, which
it cannot handle) takes its readers with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.unit.data.conftest import uneven_files  # noqa: F401  (a fixture)
from tests.unit.data.test_parquet import is_running, parent_of


@pytest.mark.parametrize("num_workers", [1, 2])
def test_the_reader_processes_exit_with_their_training_process(tmp_path, uneven_files, num_workers):
    # Killed outright, the training process cannot stop its readers; each reader, whose parent is
    # the fork server (which lives as long as a reader does), must notice by itself.
    pids = tmp_path / "pids"
    script = (
        "import multiprocessing, os, signal, sys\n"
        "from app.data.parquet import TrainingBatches\n"
        "from tests.unit.data.conftest import SCHEMA\n"
        "batches = iter(TrainingBatches(sys.argv[3:], SCHEMA, 8, 0, 1, prefetch_windows=1,\n"
        "                               num_workers=int(sys.argv[2])))\n"
        "next(batches)\n"
        "open(sys.argv[1], 'w').write(' '.join(str(p.pid) for p in multiprocessing.active_children()))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    trainer = subprocess.run([sys.executable, "-c", script, str(pids), str(num_workers), *uneven_files], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    assert trainer.returncode == -signal.SIGKILL
    readers = [int(pid) for pid in pids.read_text().split()]
    assert len(readers) == num_workers
    servers = {parent_of(pid) for pid in readers if is_running(pid)}
    deadline = time.time() + 20
    while any(is_running(pid) for pid in readers) and time.time() < deadline:
        time.sleep(0.1)
    try:
        assert not any(is_running(pid) for pid in readers)
    finally:
        for pid in (*readers, *servers):
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)
