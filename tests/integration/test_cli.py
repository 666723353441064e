"""The entrypoint's command line as users type it: every config error exits 2 with one line saying
what and where (said once, by rank 0), before any run directory exists; --help documents every key."""

from __future__ import annotations

import json
import sys

import pytest

from app.config import field_docs
from tests.conftest import REPO, run_command


@pytest.mark.parametrize("prefix", ["", "+", "++"])
def test_entrypoint_rejects_an_unknown_key_whatever_its_prefix(tmp_path, prefix):
    # `+optim.lrr=0.1` is what Hydra itself suggests for an unknown key; it used to train at the default lr.
    result = run_command(
        [sys.executable, "-m", "app.train", f"{prefix}optim.lrr=0.1", f"output_root={tmp_path}"], cwd=REPO
    )
    assert result.returncode == 2, result.stderr
    assert (
        "error: 'optim.lrr' is not a config key: 'optim' has no field 'lrr'. Did you mean 'optim.lr'?" in result.stderr
    )
    assert not list(tmp_path.iterdir()), "a rejected config must not create a run directory"


def test_every_config_error_exits_2_and_group_schemas_are_not_options(tmp_path):
    for override in ("model=nope", "model=schema", "data.batch_size=many", "optim.lr=-1"):
        result = run_command([sys.executable, "-m", "app.train", override, f"output_root={tmp_path}"], cwd=REPO)
        assert result.returncode == 2, (override, result.stderr)
    # A run (a sweep's point) that fails on its config says so in its summary, as one failing later would.
    summary = json.loads((tmp_path / "default" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "ConfigError: optim.lr must be > 0, got -1.0."
    # --help lists the options of a group without its schema: test_help_lists_every_key_with_its_default_and_help.


def test_a_config_error_is_said_by_rank_0_only(tmp_path):
    # Every worker composes the same config and meets the same error: one line on the console
    # (torchrun's workers share it), not one per rank run together.
    import os
    import subprocess

    command = [sys.executable, "-m", "app.train", "optim.lr=-1", f"output_root={tmp_path}"]
    for rank, expected in (("0", "error: optim.lr must be > 0, got -1.0.\n"), ("1", "")):
        env = dict(os.environ, PYTHONPATH=str(REPO), RANK=rank, WORLD_SIZE="2")
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stderr == expected, (rank, result.stderr)


def test_help_lists_every_key_with_its_default_and_help():
    result = run_command([sys.executable, "-m", "app.train", "--help"], cwd=REPO)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "checkpoint.every_n_steps: int = 500\n" in text
    assert "trainer.epochs: int = 2\n" in text and "optim.lr: float = 0.05\n" in text
    assert "sharding.hbm_cap_gb: Optional[float] = null\n" in text
    assert "    Save a checkpoint every this many steps, and always at the end (0: only at the end); also at" in text
    assert "model: dcn, deepfm, dlrm" in text, "Hydra's list of groups and options stays"
    assert "schema" not in text  # a group's schema (model=schema) is not an option
    flat = " ".join(text.split())
    for doc in field_docs():
        if not doc.is_group:
            assert f"{doc.key}: {doc.type} = " in text, doc.key
        assert " ".join(doc.help.split()) in flat, doc.key
    # The group options and overrides given show where they change a default.
    text = run_command(
        [sys.executable, "-m", "app.train", "--help", "experiment=tiny", "optim.lr=0.5"], cwd=REPO
    ).stdout
    assert "checkpoint.every_n_steps: int = 500  (composed: 10)\n" in text
    assert "optim.lr: float = 0.05  (composed: 0.5)\n" in text and "optim.eps: float = 1e-08\n" in text
    assert "features.sparse: List[SparseFeature] = []  (composed: [26 entries])\n" in text


def _files(directory):
    """{relative path: bytes} of every file below `directory`."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_refused_run_name_writes_nothing_into_another_run(one_process_run, tmp_path):
    # A finished run, then a command whose run_name climbs out of its output_root into that run:
    # refused before Hydra writes its .hydra/ or log file, or the run's summary says "failed".
    # The finished run: a copy of the session's shared one (tests/integration/conftest.py).
    import shutil

    from tests.integration.test_train import tiny

    victim = tmp_path / "outputs" / "victim"
    shutil.copytree(one_process_run.run_dir, victim)
    before = _files(victim)
    assert json.loads(before["summary.json"])["status"] == "finished" and ".hydra/config.yaml" in before
    other = tmp_path / "outputs" / "other"
    for sweep in ([], ["-m", "seed=1,2"]):
        result = run_command(
            [sys.executable, "-m", "app.train", *sweep, *tiny(tmp_path, f"output_root={other}", "run_name=../victim")],
            cwd=REPO,
        )
        assert result.returncode == 2, (sweep, result.stderr[-3000:])
        assert _files(victim) == before, sweep
        assert not other.exists()
        assert result.stderr == (
            "error: run_name='../victim' must be a non-empty name without '/' (and not '.' or '..').\n"
        ), result.stderr[-3000:]


@pytest.fixture
def mount_point(tmp_path):
    """A directory to mount a tmpfs on (as root: the tests run as root here); unmounted after."""
    import subprocess

    point = tmp_path / "mnt"
    point.mkdir()
    mounted = []

    def mount(options: str):
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], check=True)
        mounted.append(point)
        return point

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=True)


def _refused_run(tmp_path, output_root):
    from tests.integration.test_train import tiny

    result = run_command([sys.executable, "-m", "app.train", *tiny(tmp_path, f"output_root={output_root}")], cwd=REPO)
    assert result.returncode == 2, result.stderr[-3000:]
    return result.stderr


def test_a_run_directory_that_cannot_be_written_is_one_line_and_exit_2(tmp_path, mount_point):
    import subprocess

    # Made immutable (chattr +i): nothing can be created in it, not even as root.
    immutable = tmp_path / "immutable"
    (immutable / "tiny").mkdir(parents=True)
    subprocess.run(["chattr", "+i", str(immutable / "tiny")], check=True)
    try:
        stderr = _refused_run(tmp_path, immutable)
    finally:
        subprocess.run(["chattr", "-i", str(immutable / "tiny")], check=True)
    assert stderr == (
        f"error: cannot write the run directory {immutable / 'tiny'} (from output_root and run_name): "
        "Operation not permitted.\n"
    )
    # A read-only file system.
    read_only = mount_point("ro,size=1m")
    assert _refused_run(tmp_path, read_only) == (
        f"error: cannot write the run directory {read_only / 'tiny'} (from output_root and run_name): "
        "Read-only file system.\n"
    )


def test_a_full_disk_under_the_run_directory_is_one_line_and_exit_2(tmp_path, mount_point):
    full = mount_point("size=256k")
    (full / "tiny").mkdir()
    with open(full / "filler", "wb", buffering=0) as filler:  # every block of the file system taken
        try:
            while True:
                filler.write(bytes(4096))
        except OSError:
            pass
    assert _refused_run(tmp_path, full) == (
        f"error: cannot write the run directory {full / 'tiny'} (from output_root and run_name): "
        "No space left on device.\n"
    )
