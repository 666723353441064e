"""Shared test helpers: the repo root, the venv's python, a one-rank process group, the CUDA
devices that only tests marked gpu see, and what lets the suite run in several pytest-xdist workers.

Parallel runs (`make test` runs `pytest -n <workers> --dist loadgroup`):
- `shared_run(name, build)`, a session fixture: a finished run (or any expensive set of files) that
  tests across all workers share, built once per pytest session by whichever worker asks first,
  under a file lock; the others wait for it, then read the same files. It returns a `Shared`:
  `.path`, the directory `build(path)` filled, and `.value`, what `build` returned (anything that
  pickles: a CompletedProcess, its output); the machinery is in tests/shared_run.py. A build that
  failed is not retried by the next worker: each test that asks fails with the first failure's
  traceback. The directory is shared: a test that changes files there (resumes the run, corrupts
  a checkpoint) works on its own copy (`shutil.copytree(shared.path, tmp_path / "copy")`).
  Without xdist it is built once per session too.
      @pytest.fixture(scope="session")
      def finished_tiny_run(shared_run):
          return shared_run("tiny_two_ranks", lambda root: check(run_command(torchrun(*tiny(root)), cwd=REPO)))
- With --dist loadgroup, tests that use a module- or session-scoped fixture defined in a test module
  (not in a conftest.py) run on one worker, grouped by the module that defines the fixture: each
  worker would otherwise build its own. So do tests with the same xdist_group mark. Every other
  test is scheduled on its own. Fixtures in a conftest.py are expected to be cheap or built
  through shared_run. (tests/xdist_groups.py: xdist's own loadgroup does not group on pytest 9.)
- Nothing of a test may use fixed ports or fixed directories: servers and rendezvous pick free ports
  (torchrun --standalone does), every output goes under tmp_path or shared_run's directory.
- no_process_outlives_its_test looks at this process's children only: under xdist, the jobs of the
  worker's own tests.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# The suite runs on CPU and gloo whatever the machine has: with a CUDA device visible,
# distributed.device=auto would put every job on it (and a 2-rank job on a one-GPU machine fails).
# Hidden here, before anything in this process initialises CUDA (which reads the variable once),
# from this process and every process a test starts; tests marked gpu hand their processes the
# devices back (run_command(..., cuda=True)) and do their CUDA work there.
_CUDA_VISIBLE_DEVICES: str | None = os.environ.get("CUDA_VISIBLE_DEVICES")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# One math thread per process (unless the caller chose otherwise), in this process and every one a
# test starts: the suite runs several jobs at once on few cores, where a process of two OpenMP
# threads spins waiting for the one descheduled (a 30-step tiny run trained 4 times slower with 2
# threads than with 1 beside a busy suite). torchrun's workers get 1 anyway; this sets the same for
# the plain processes. The docs' blocks run as a user's shell would (tests/docs: USER_OMP_NUM_THREADS).
USER_OMP_NUM_THREADS: str | None = os.environ.get("OMP_NUM_THREADS")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tests.shared_run import Shared, build_once, shared_root  # noqa: E402

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
    count = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
        env=_environment(cuda=True),
        capture_output=True,
        text=True,
        timeout=120,
    )
    printed = count.stdout.split()
    return int(printed[-1]) if count.returncode == 0 and printed else 0


def run_command(
    args: Sequence[str], cwd: Path, timeout: float = 600, cuda: bool = False
) -> subprocess.CompletedProcess:
    """Run a command with the test's python first on PATH; output kept for assertion messages.
    `cuda`: the command sees the machine's CUDA devices (tests marked gpu only).
    Whatever happens, no process it started outlives it (see kill_tree)."""
    process = subprocess.Popen(
        list(args), cwd=cwd, env=_environment(cuda), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
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
    log = open(log_path, "w")  # noqa: SIM115 (the process writes to it for its life)
    return subprocess.Popen(
        list(args),
        cwd=REPO,
        env=_environment(),
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=new_session,
    )


def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (from /proc: no extra dependency)."""
    return _children_by_parent().get(pid, [])


def _children_by_parent() -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            found.setdefault(parent, []).append(int(entry))
    return found


def descendants(pid: int) -> list[int]:
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
        with contextlib.suppress(ProcessLookupError):
            os.kill(process, signal.SIGKILL)


def pause_tree(pid: int) -> None:
    """SIGSTOP `pid` and every process below it: a job that must stay alive and hold what it holds
    (a run's lock, a lease) but need not train meanwhile, burning no CPU. kill_tree ends it as well."""
    for process in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process, signal.SIGSTOP)


@pytest.fixture(autouse=True)
def no_process_outlives_its_test():
    """A test that fails half-way must not leave processes behind to disturb the next ones."""
    yield
    for pid in children(os.getpid()):
        if _is_test_job(pid):
            kill_tree(pid)
            with contextlib.suppress(ChildProcessError):  # a Popen of the test's reaped it
                os.waitpid(pid, 0)


def _is_test_job(pid: int) -> bool:
    """Jobs the tests start, not the helpers of Python's multiprocessing that live on (its
    resource tracker), nor the session's S3 and MLflow servers (tests/object_store.py,
    tests/integration/test_tracking.py)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return (
        b"python" in command
        and b"multiprocessing" not in command
        and b"moto.server" not in command
        and b"mlflow-server" not in command
    )


# ---- running in several pytest-xdist workers -------------------------------------------------


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, Callable[[Path], Any]], Shared]:
    """See the module's docstring."""
    root = shared_root(tmp_path_factory)
    built: dict[str, Shared] = {}

    def shared(name: str, build: Callable[[Path], Any]) -> Shared:
        assert re.fullmatch(r"[A-Za-z0-9_.-]+", name), f"shared_run name {name!r}: letters, digits, _ . - only"
        if name not in built:
            built[name] = build_once(root, name, build)
        return built[name]

    return shared


def pytest_configure(config: pytest.Config) -> None:
    from tests.cpu_time import CpuTime

    config.pluginmanager.register(CpuTime(config), "rectrain-cpu-time")
    if config.pluginmanager.hasplugin("xdist"):
        from tests.xdist_groups import XdistGroups

        config.pluginmanager.register(XdistGroups(), "rectrain-xdist-groups")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.pluginmanager.hasplugin("xdist"):
        from tests.xdist_groups import write_groups

        write_groups(config, items)
