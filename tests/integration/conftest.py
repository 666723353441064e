"""Finished runs that several integration tests inspect, each trained once per session.

A test that only reads a run's files and output takes the fixture; a test that resumes, damages or
otherwise writes into a run works on a copy of it (FinishedRun.copy_to), so that the run stays as
its other readers expect. Under pytest-xdist every worker process has its own session: the run is
trained once into a directory the workers share, under a file lock, and read back by the others."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, run_command
from tests.integration.test_train import tiny, torchrun
from tests.shared_run import build_once, shared_root
from tests.unit.data.conftest import uneven_files  # noqa: F401 (a fixture test_reader_process.py uses)


@dataclass(frozen=True)
class FinishedRun:
    """A run laid out as tiny(root, ...) lays it out: root/data (its generated dataset) and
    root/outputs/tiny (the run directory); `output` is what the command printed (stdout + stderr)."""

    root: Path
    output: str

    @property
    def run_dir(self) -> Path:
        return self.root / "outputs" / "tiny"

    @property
    def dataset(self) -> Path:
        """The generated dataset's directory (root/data/<fingerprint>)."""
        return next((self.root / "data").iterdir())

    def copy_to(self, root: Path) -> Path:
        """The run's data and outputs copied under `root`, to be resumed or damaged there with
        tiny(root, ...): the copy is the run as the test would have trained it in `root`."""
        for name in ("data", "outputs"):
            shutil.copytree(self.root / name, root / name)
        return root


def finished_run(tmp_path_factory: pytest.TempPathFactory, name: str, command: Sequence[str]) -> FinishedRun:
    """The run `name` of this session, which `command` (built for the root given to it) trains
    once (tests/conftest.py's shared_run machinery); a command that fails fails every test that
    uses it, with its output (run once too)."""

    def train(root: Path) -> tuple[int, str]:
        result = run_command([arg.replace("{root}", str(root)) for arg in command], cwd=REPO)
        return result.returncode, result.stdout + result.stderr

    shared = build_once(shared_root(tmp_path_factory), name, train)
    returncode, output = shared.value
    run = FinishedRun(shared.path, output)
    assert returncode == 0, f"the shared run {name} failed: exit {returncode}\n{run.output[-8000:]}"
    return run


ROOT = Path("{root}")  # replaced by the shared run's root when the command runs


def one_process(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "app.train", *tiny(ROOT, *overrides)]


def comm_precision_run(sharding: str, precision: str) -> list[str]:
    """test_qcomms.py's run: one epoch on 2 ranks (15 steps), every loss logged, the embedding
    all-to-alls in `precision`."""
    return torchrun(
        *tiny(
            ROOT,
            f"sharding={sharding}",
            "trainer.max_steps=15",
            "trainer.log_every_n_steps=1",
            f"sharding.comm_forward_precision={precision}",
            f"sharding.comm_backward_precision={precision}",
        )
    )


@pytest.fixture(scope="session")
def one_process_run(tmp_path_factory) -> FinishedRun:
    """experiment=tiny, 1 process, 5 steps: its final checkpoint step_00000005, evaluated at the
    end and so the best; the run the tests that damage, refuse or continue a short run start from."""
    return finished_run(tmp_path_factory, "one_process", one_process("trainer.max_steps=5"))


@pytest.fixture(scope="session")
def one_process_run_of_10_steps(tmp_path_factory) -> FinishedRun:
    """experiment=tiny, 1 process, 10 steps, evaluated and checkpointed every 5 steps: step_00000005
    and step_00000010 kept (keep_last=2), the best whichever evaluation was."""
    return finished_run(
        tmp_path_factory,
        "one_process_10",
        one_process("trainer.max_steps=10", "checkpoint.every_n_steps=5", "trainer.eval_every_n_steps=5"),
    )


@pytest.fixture(scope="session")
def two_rank_run(tmp_path_factory) -> FinishedRun:
    """experiment=tiny on 2 ranks under torchrun, one epoch (15 steps), a checkpoint every 5 steps,
    keep_last=2: step_00000010 and step_00000015 are kept."""
    return finished_run(tmp_path_factory, "two_ranks", torchrun(*tiny(ROOT, "checkpoint.every_n_steps=5")))


@pytest.fixture(scope="session")
def row_wise_run(tmp_path_factory) -> FinishedRun:
    """One epoch on 2 ranks, every table row-wise, fp32 all-to-alls (the default), every loss logged."""
    return finished_run(tmp_path_factory, "row_wise", comm_precision_run("row_wise", "fp32"))


@pytest.fixture(scope="session")
def table_wise_run(tmp_path_factory) -> FinishedRun:
    """One epoch on 2 ranks, every table table-wise, fp32 all-to-alls (the default), every loss logged."""
    return finished_run(tmp_path_factory, "table_wise", comm_precision_run("table_wise", "fp32"))


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory) -> Callable[[str, int], FinishedRun]:
    """test_resume.py's uninterrupted run of an optimizer preset on 1 or 2 ranks (2 epochs, every
    loss logged, a checkpoint every 5 steps, all kept): `uninterrupted_run(preset, ranks)`, each
    trained on first use."""
    from tests.integration.test_resume import uninterrupted_command

    def run(preset: str, ranks: int) -> FinishedRun:
        return finished_run(tmp_path_factory, f"uninterrupted_{preset}_{ranks}", uninterrupted_command(preset, ranks))

    return run


@pytest.fixture(scope="session")
def uninterrupted(uninterrupted_run) -> Callable[[str, int], Path]:
    """The root of `uninterrupted_run(preset, ranks)`: root/data, root/outputs/tiny."""
    return lambda preset, ranks: uninterrupted_run(preset, ranks).root


# ---- ckpt


@pytest.fixture(scope="session")
def k_step_adam_run(tmp_path_factory) -> FinishedRun:
    """adam (test_resume.py's preset, with its live schedule) on 2 ranks, the dense part averaged
    every 4 steps, with test_resume.py's COMMON settings (2 epochs, every loss logged, a checkpoint
    every 5 steps, all kept): test_kstep.py's k=4 run, and the uninterrupted run test_resume.py
    resumes a k-step run against."""
    from tests.integration.test_resume import COMMON, PRESETS

    command = torchrun(*tiny(ROOT, *COMMON, *PRESETS["adam"], "trainer.dense_average_every=4"))
    return finished_run(tmp_path_factory, "k_step_adam", command)
