"""An evaluation that cannot finish, on 2 workers: SIGTERM to the workers' process groups during a
long evaluation (torchrun SIGKILLs them 30 s after its own signal), and a bad row that only one
worker meets in its share of the validation split. Either way every worker abandons the
evaluation at the same batch and the training since the last checkpoint is saved first."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from tests.conftest import REPO, children, kill_tree, run_command, start
from tests.integration.test_train import NO_READERS, _with_bad_id, check, records, tiny, torchrun

PREEMPTED = 128 + signal.SIGTERM


def run_dir(root: Path) -> Path:
    return root / "outputs" / "tiny"


def test_sigterm_during_a_long_evaluation_abandons_it_saves_exits_143_and_the_resumed_run_evaluates_again(tmp_path):
    # 40,000 validation rows at 2 a batch: 10,000 batches for each worker, minutes of evaluation.
    args = tiny(
        tmp_path,
        "data.synthetic.val_rows=40000",
        "data.synthetic.rows_per_file=10000",
        "data.synthetic.rows_per_row_group=1000",
        "data.eval_batch_size=2",
        "trainer.eval_every_n_steps=5",
        "checkpoint.every_n_steps=1000",
        "trainer.epochs=40",
    )
    launch = torchrun(*args)
    launch.insert(launch.index("--standalone"), "--monitor-interval=3")
    job = start(launch, tmp_path / "job.log")
    metrics = run_dir(tmp_path) / "metrics.jsonl"
    deadline = time.time() + 300
    # tiny logs every 5 steps: the step-5 record comes just before the step-5 evaluation.
    while not (metrics.exists() and '"step": 5' in metrics.read_text()):
        assert job.poll() is None and time.time() < deadline, (tmp_path / "job.log").read_text()[-3000:]
        time.sleep(0.05)
    time.sleep(2)  # well into the evaluation
    workers = [pid for pid in children(job.pid) if b"app.train" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(workers) == 2, workers
    signalled = time.time()
    try:
        for worker in workers:
            os.killpg(worker, signal.SIGTERM)
        job.wait(timeout=120)
    finally:
        kill_tree(job.pid)
    log = (tmp_path / "job.log").read_text()
    # Both workers ended by themselves, with 143, well before the evaluation they abandoned would have
    # ended (10,000 batches each: minutes). The bound is loose on purpose: on a loaded 2-core machine
    # the save and torchrun's exit alone can take tens of seconds.
    assert log.count(f"exitcode  : {PREEMPTED} ") == 2 and "forcefully exiting" not in log, log[-4000:]
    assert time.time() - signalled < 90
    assert log.count("SIGTERM during the evaluation at step 5: abandoned; saving a checkpoint to resume from") == 1
    assert "stopped by SIGTERM after saving checkpoint" in log
    assert sorted(p.name for p in (run_dir(tmp_path) / "checkpoints").glob("step_*")) == ["step_00000005"]
    summary = json.loads((run_dir(tmp_path) / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["step"] == 5
    assert records(run_dir(tmp_path), "eval") == []  # abandoned: not counted

    # The same command resumes at step 5 and evaluates it first (fewer batches, to be quick; read in
    # each worker's own process, without the readers' fork server to start).
    resume = torchrun(*args, "trainer.max_steps=6", "trainer.eval_max_batches=20", NO_READERS)
    out = check(run_command(resume, cwd=REPO))
    assert "step_00000005 at step 5 " in out
    assert [r["step"] for r in records(run_dir(tmp_path), "eval")] == [5, 6]


def test_a_bad_row_met_by_one_worker_at_a_periodic_evaluation_saves_the_training_first_then_exits_2(tmp_path):
    check(run_command([sys.executable, "scripts/make_dataset.py", *tiny(tmp_path)[:2]], cwd=REPO))
    synthetic = next((tmp_path / "data").iterdir())
    # In row group 3 of the val split, which rank 1 evaluates; the first row groups are sound.
    late = tmp_path / "late"
    _with_bad_id(synthetic / "val" / "part-00000.parquet", late / "part-00000.parquet", row=3 * 250 + 7)
    shutil.copy(synthetic / "val" / "part-00001.parquet", late)
    result = run_command(
        [
            sys.executable,
            "-m",
            "app.train",
            "distributed.nproc_per_node=2",
            *tiny(
                tmp_path,
                "data=parquet",
                f"data.train_path={synthetic / 'train'}",
                f"data.val_path={late}",
                "trainer.eval_every_n_steps=5",
                "checkpoint.every_n_steps=0",
                "trainer.max_steps=10",
            ),
        ],
        cwd=REPO,
    )
    assert result.returncode == 2, result.stderr[-4000:]
    # Said by rank 1, which met it; rank 0 says where to look.
    lines = sorted(line for line in result.stderr.splitlines() if line.startswith("error"))
    assert len(lines) == 2, result.stderr[-4000:]
    assert lines[0] == (
        "error (rank 1): "
        f"{late / 'part-00000.parquet'} row group 3, row 7: column 'cat_3' has id "
        "10000; expected ids in [0, 10000) (features config: num_embeddings=10000; or set "
        "data.invalid_ids=hash to map each id to id mod num_embeddings)."
    )
    assert lines[1] == (
        "error: the evaluation at step 5 stopped: another rank met bad input in its share of the "
        "data (its error says where); the training up to that step is saved."
    )
    # The 5 steps before the evaluation are saved (no cadence would have saved them).
    assert sorted(p.name for p in (run_dir(tmp_path) / "checkpoints").glob("step_*")) == ["step_00000005"]
    summary = json.loads((run_dir(tmp_path) / "summary.json").read_text())
    assert summary["status"] == "failed" and "rank 1: DataError: " in summary["error"]
    assert "row group 3, row 7" in summary["error"]
