"""A Parquet reader's process outlives nothing: a training process killed outright (SIGKILL, which
it cannot handle) takes its reader with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.conftest import REPO
from tests.unit.data.conftest import uneven_files  # noqa: F401  (a fixture)
from tests.unit.data.test_parquet import is_running, parent_of


def test_the_reader_process_exits_with_its_training_process(tmp_path, uneven_files):
    # Killed outright, the training process cannot stop its reader; the reader, whose parent is the
    # fork server (which lives as long as a reader does), must notice by itself.
    pids = tmp_path / "pids"
    script = (
        "import multiprocessing, os, signal, sys\n"
        "from app.data.parquet import TrainingBatches\n"
        "from tests.unit.data.conftest import SCHEMA\n"
        "batches = iter(TrainingBatches(sys.argv[2:], SCHEMA, 8, 0, 1, prefetch_windows=1))\n"
        "next(batches)\n"
        "(reader,) = multiprocessing.active_children()\n"
        "open(sys.argv[1], 'w').write(str(reader.pid))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    trainer = subprocess.run([sys.executable, "-c", script, str(pids), *uneven_files], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    assert trainer.returncode == -signal.SIGKILL
    reader_pid = int(pids.read_text())
    server = parent_of(reader_pid) if is_running(reader_pid) else None
    deadline = time.time() + 20
    while is_running(reader_pid) and time.time() < deadline:
        time.sleep(0.1)
    try:
        assert not is_running(reader_pid)
    finally:
        for pid in (reader_pid, server):
            if pid is not None and is_running(pid):
                os.kill(pid, signal.SIGKILL)
