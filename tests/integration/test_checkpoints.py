"""Checkpoints under real conditions: resharding resume across world sizes and plans, bitwise
determinism with and without an interruption, SIGKILL under torchrun --max-restarts, a kill
during a save, damaged checkpoints, refused and foreign checkpoints. (SIGTERM: test_preemption.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from app.export import MODEL_FILE, export_checkpoint
from tests.conftest import REPO, children, kill_tree, run_command, start
from tests.integration.test_train import check, records, tiny, torchrun


def one_process(*args: str):
    return [sys.executable, "-m", "app.train", *args]


def final_eval(root: Path):
    return records(root / "outputs" / "tiny", "eval")[-1]


def checkpoints(root: Path):
    return sorted(p.name for p in (root / "outputs" / "tiny" / "checkpoints").glob("step_*"))


def exported_parameters(root: Path, tmp_path: Path):
    out = export_checkpoint(root / "outputs" / "tiny", tmp_path / f"export-{root.name}", prefer="latest")
    return torch.load(out / MODEL_FILE, weights_only=True)


def test_resume_onto_other_world_sizes_and_sharding_plans(row_wise_run, tmp_path):
    # 2 ranks, row-wise tables -> 1 rank, table-wise -> 2 ranks, column-wise: one chain, each
    # resume giving the same outputs from the same model. Its first run is a copy of the session's
    # 2-rank row-wise run (tests/integration/conftest.py): 15 steps of 256 samples, evaluated at the end.
    row_wise_run.copy_to(tmp_path)
    before = final_eval(tmp_path)
    table_wise = ["sharding=table_wise"]
    out = check(run_command(one_process(*tiny(tmp_path, *table_wise)), cwd=REPO))
    assert (
        "resumed from" in out and "written by 2 ranks with a global batch of 256, this run has 1 ranks and 128" in out
    )
    after = final_eval(tmp_path)
    # 15 steps of 256 samples are the epoch, whole: its 31 steps of 128, nothing left to train.
    assert (before["step"], after["step"]) == (15, 31)
    assert after["logloss"] == pytest.approx(before["logloss"], abs=1e-6)
    assert after["auc"] == pytest.approx(before["auc"], abs=1e-6)
    # ... and training goes on there (the fused optimizer state was resharded too), into a 2nd epoch.
    longer = ["trainer.epochs=2", "trainer.max_steps=35"]
    check(run_command(one_process(*tiny(tmp_path, *table_wise, *longer)), cwd=REPO))
    assert checkpoints(tmp_path)[-1] == "step_00000035"

    # 1 rank, table-wise -> 2 ranks, column-wise: 35 steps of 128 are 17 steps of 256 (an epoch of
    # 15, then 2), nothing left to train.
    before = final_eval(tmp_path)
    column_wise = ["sharding=column_wise", "trainer.epochs=2", "trainer.max_steps=17"]
    out = check(run_command(torchrun(*tiny(tmp_path, *column_wise)), cwd=REPO))
    assert "written by 1 ranks with a global batch of 128, this run has 2 ranks and 256" in out
    after = final_eval(tmp_path)
    assert (before["step"], after["step"]) == (35, 17)
    assert after["logloss"] == pytest.approx(before["logloss"], abs=1e-6)
    assert after["auc"] == pytest.approx(before["auc"], abs=1e-6)


def test_bitwise_determinism_with_and_without_an_interruption(two_rank_run, tmp_path):
    # The uninterrupted run is the session's shared one (tests/integration/conftest.py): the same job
    # but for its checkpoints every 5 steps. The interrupted one is a second run of the job, stopped
    # at step 6 (its checkpoint is the last of that run), then resumed to the end: ending bitwise
    # where the shared run does, it proves with one run less that two runs of one job train the
    # same (its first 6 steps are a fresh run's), that checkpoints every 5 steps change nothing,
    # and that an interruption changes nothing.
    common = ["trainer.epochs=1", "checkpoint.every_n_steps=0"]
    check(run_command(torchrun(*tiny(tmp_path / "interrupted", *common, "trainer.max_steps=6")), cwd=REPO))
    check(run_command(torchrun(*tiny(tmp_path / "interrupted", *common)), cwd=REPO))

    reference = exported_parameters(two_rank_run.root, tmp_path)
    assert len(reference) > 26  # every table and dense layer
    other = exported_parameters(tmp_path / "interrupted", tmp_path)
    assert other.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(other[key], value), f"interrupted: {key} differs"


def _wait_for_checkpoint(root: Path, process: subprocess.Popen, at_least: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        names = checkpoints(root) if (root / "outputs" / "tiny" / "checkpoints").is_dir() else []
        if names and int(names[-1].split("_")[1]) >= at_least:
            return
        assert process.poll() is None, "the job ended before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")


def test_a_worker_killed_under_max_restarts_resumes_and_finishes(tmp_path):
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--max-restarts=1",
        "-m",
        "app.train",
        *tiny(tmp_path, "trainer.epochs=4", "checkpoint.every_n_steps=10"),
    ]
    job = start(args, tmp_path / "job.log")
    try:
        _wait_for_checkpoint(tmp_path, job, at_least=20)
        workers = [c for c in children(job.pid) if b"app.train" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        assert job.wait(timeout=300) == 0, (tmp_path / "job.log").read_text()[-4000:]
    finally:
        kill_tree(job.pid)
    log = (tmp_path / "job.log").read_text()
    assert "resumed from" in log
    assert checkpoints(tmp_path)[-1] == f"step_{4 * 15:08d}"  # 15 steps per epoch on 2 ranks
    steps = [r["step"] for r in records(tmp_path / "outputs" / "tiny", "train")]
    assert steps[-1] == 4 * 15


_SAVE_FOREVER = """
import sys, torch, torch.distributed as dist
from pathlib import Path
from app.checkpoint import CheckpointStore
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
manager = CheckpointStore(Path(sys.argv[1]), keep_last=3, rank=0)
manager.save(1, {"w": torch.ones(1000)}, {})
print("saved", flush=True)
big = {"w": torch.ones(1000), "big": torch.randn(64 * 2**20)}  # 256 MB: long enough to be killed in
for step in range(2, 100):
    manager.save(step, big, {})
"""


def _big_save_under_way(directory: Path) -> bool:
    """Whether a save's staging directory holds a file of more than 1 MB (files come and go as
    they are written, renamed and published: one gone is no save)."""
    for staging in directory.glob(".step_*.tmp"):
        try:
            if any(p.stat().st_size > 2**20 for p in staging.glob("*")):
                return True
        except FileNotFoundError:
            continue
    return False


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path):
    from app.checkpoint import CheckpointStore, verify

    directory = tmp_path / "checkpoints"
    for _ in range(5):  # a kill that lands between two saves (a save takes ~0.3 s) is tried again
        job = start([sys.executable, "-c", _SAVE_FOREVER, str(directory)], tmp_path / "save.log")
        try:
            deadline = time.time() + 60
            while time.time() < deadline and not _big_save_under_way(directory):
                time.sleep(0.01)
            job.send_signal(signal.SIGKILL)
            job.wait(timeout=30)
        finally:
            kill_tree(job.pid)
        if list(directory.glob(".step_*.tmp")):
            break
    assert list(directory.glob(".step_*.tmp")), "killed too late: no save was under way"
    manager = CheckpointStore(directory, keep_last=3, rank=0)
    newest = manager.newest_valid()
    assert newest is not None and verify(newest) is None


def test_damaged_incompatible_and_foreign_checkpoints(one_process_run_of_10_steps, tmp_path):
    # A copy of the session's run of `trainer.max_steps=10 checkpoint.every_n_steps=5` (evaluated
    # every 5 steps too; tests/integration/conftest.py).
    run = one_process_run_of_10_steps.copy_to(tmp_path) / "outputs" / "tiny"
    assert checkpoints(tmp_path) == ["step_00000005", "step_00000010"]

    # A truncated newest checkpoint: a warning, and the run continues from the previous one.
    shard = next((run / "checkpoints" / "step_00000010").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    out = check(run_command(one_process(*tiny(tmp_path, "trainer.max_steps=6")), cwd=REPO))
    assert "step_00000010 is not usable" in out and "at step 5 " in out

    # A config whose model differs is refused, naming what differs; nothing is written.
    before = checkpoints(tmp_path)
    refused = run_command(
        one_process(
            *tiny(tmp_path, "trainer.max_steps=8", "features.embedding_dim=8", "model.dense_arch_layer_sizes=[64,8]")
        ),
        cwd=REPO,
    )
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "features.embedding_dim: 16 in the checkpoint, 8 now" in refused.stderr
    assert "train this model under another run_name" in refused.stderr and "load_from" not in refused.stderr
    assert checkpoints(tmp_path) == before

    # Another run starts from this one's weights only, at step 0.
    out = check(
        run_command(
            one_process(
                *tiny(
                    tmp_path,
                    "run_name=other",
                    "trainer.max_steps=1",
                    f"checkpoint.load_from={run}",
                    "checkpoint.load_mode=model",
                )
            ),
            cwd=REPO,
        )
    )
    assert "started from the model weights of" in out
    assert [r["step"] for r in records(tmp_path / "outputs" / "other", "eval")] == [1]


def test_asynchronous_saves_are_published_intact_and_resume(tmp_path):
    from app.checkpoint import verify

    check(
        run_command(
            torchrun(
                *tiny(tmp_path, "checkpoint.async_save=true", "checkpoint.every_n_steps=4", "trainer.max_steps=13")
            ),
            cwd=REPO,
        )
    )
    assert checkpoints(tmp_path) == ["step_00000012", "step_00000013"]
    for name in checkpoints(tmp_path):
        assert verify(tmp_path / "outputs" / "tiny" / "checkpoints" / name) is None
    out = check(run_command(torchrun(*tiny(tmp_path, "checkpoint.async_save=true", "trainer.max_steps=15")), cwd=REPO))
    assert "at step 13 " in out


def test_two_ranks_share_the_verification_of_a_checkpoint(two_rank_run, tmp_path):
    # A copy of the session's 2-rank run (tests/integration/conftest.py): checkpoints at steps 10 and 15.
    two_rank_run.copy_to(tmp_path)
    newest = tmp_path / "outputs" / "tiny" / "checkpoints" / "step_00000015"
    names = sorted(p.name for p in newest.iterdir() if p.name != "meta.json")
    # Rank 1 reads every second file: damage one of those only, keeping its size, so that rank 0
    # (which checks sizes) sees nothing wrong and only rank 1's CRC-32 can catch it.
    victim = newest / names[1::2][0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    out = check(run_command(torchrun(*tiny(tmp_path)), cwd=REPO))
    assert f"{victim.name} is damaged" in out and "at step 10 " in out
