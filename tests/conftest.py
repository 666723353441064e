"""Shared test helpers: the repo root, the venv's python, a one-rank process group, and the CUDA
devices that only tests marked gpu see."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

# The suite runs on CPU and gloo whatever the machine has: with a CUDA device visible,
# distributed.device=auto would put every job on it (and a 2-rank job on a one-GPU machine fails).
# Hidden here, before anything in this process initialises CUDA (which reads the variable once),
# from this process and every process a test starts; tests marked gpu hand their processes the
# devices back (run_command(..., cuda=True)) and do their CUDA work there.
_CUDA_VISIBLE_DEVICES: Optional[str] = os.environ.get("CUDA_VISIBLE_DEVICES")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.fixture
def single_process_group():
    """A real one-rank gloo group, as `python -m app.train` creates for one process."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _environment(cuda: bool = False) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    env.pop("RANK", None)
    if cuda:
        env.pop("CUDA_VISIBLE_DEVICES", None)
        if _CUDA_VISIBLE_DEVICES is not None:
            env["CUDA_VISIBLE_DEVICES"] = _CUDA_VISIBLE_DEVICES
    return env


@functools.cache
def cuda_device_count() -> int:
    """CUDA devices the machine gives the tests marked gpu. Counted in a process of its own: this
    one must not initialise CUDA (see _CUDA_VISIBLE_DEVICES)."""
    if torch.version.cuda is None:
        return 0
    count = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           env=_environment(cuda=True), capture_output=True, text=True, timeout=120)
    printed = count.stdout.split()
    return int(printed[-1]) if count.returncode == 0 and printed else 0


def run_command(args: Sequence[str], cwd: Path, timeout: float = 600, cuda: bool = False) -> subprocess.CompletedProcess:
    """Run a command with the test's python first on PATH; output kept for assertion messages.
    `cuda`: the command sees the machine's CUDA devices (tests marked gpu only).
    Whatever happens, no process it started outlives it (see kill_tree)."""
    process = subprocess.Popen(list(args), cwd=cwd, env=_environment(cuda), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            kill_tree(process.pid)
            process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def start(args: Sequence[str], log_path: Path, new_session: bool = True) -> subprocess.Popen:
    """Start a command in the background, output to `log_path`; in a process group of its own by
    default, as a job under a launcher is (so that a test can signal the group)."""
    log = open(log_path, "w")
    return subprocess.Popen(list(args), cwd=REPO, env=_environment(), stdout=log, stderr=subprocess.STDOUT,
                            text=True, start_new_session=new_session)


def children(pid: int) -> List[int]:
    """Direct child processes of `pid` (from /proc: no extra dependency)."""
    return _children_by_parent().get(pid, [])


def _children_by_parent() -> Dict[int, List[int]]:
    found: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            found.setdefault(parent, []).append(int(entry))
    return found


def descendants(pid: int) -> List[int]:
    tree, found, todo = _children_by_parent(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it. torchrun starts each worker in a session of its
    own, and a worker its reader process: killing the launcher alone would leave them running
    (and, orphaned, no longer findable as its descendants), so they are found first."""
    for process in [*descendants(pid), pid]:
        try:
            os.kill(process, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(autouse=True)
def no_process_outlives_its_test():
    """A test that fails half-way must not leave processes behind to disturb the next ones."""
    yield
    for pid in children(os.getpid()):
        if _is_test_job(pid):
            kill_tree(pid)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:  # a Popen of the test's reaped it
                pass


def _is_test_job(pid: int) -> bool:
    """Jobs the tests start, not the helpers of Python's multiprocessing that live on (its
    resource tracker), nor the session's S3 and MLflow servers (tests/object_store.py,
    tests/integration/test_tracking.py)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return (b"python" in command and b"multiprocessing" not in command and b"moto.server" not in command
            and b"mlflow-server" not in command)
