"""Preemption as launchers deliver it: SIGTERM to whole process groups (which hold each worker's
Parquet reader process too), to torchrun itself, and to a job that starts its own workers. Each
time every rank stops at the same step, one checkpoint is written, and the same command resumes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

from app.report import read_point
from tests.conftest import REPO, children, kill_tree, run_command, start
from tests.integration.test_train import check, records, tiny, torchrun

PREEMPTED = 128 + signal.SIGTERM
# Long enough never to end by itself; no periodic checkpoint, so the one written is SIGTERM's.
LONG = ("trainer.epochs=40", "checkpoint.every_n_steps=1000")


def run_dir(root: Path) -> Path:
    return root / "outputs" / "tiny"


def wait_until_training(root: Path, job) -> None:
    """Until the first training record (tiny logs every 5 steps): the reader processes run."""
    metrics = run_dir(root) / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.exists() and metrics.read_text().strip()):
        assert job.poll() is None, "the job ended before it could be stopped"
        assert time.time() < deadline, "the job did not start training in time"
        time.sleep(0.05)


def stopped_steps(root: Path) -> list:
    """The step at which each rank's log says it stopped."""
    logs = sorted(run_dir(root).glob("train_rank*.log"))
    return [int(m) for log in logs for m in re.findall(r"SIGTERM: stopping at step (\d+)", log.read_text())]


def the_one_checkpoint(root: Path) -> int:
    saved = sorted(p.name for p in (run_dir(root) / "checkpoints").glob("step_*"))
    assert len(saved) == 1, saved
    return int(saved[0].split("_")[1])


def stop(job, send) -> int:
    try:
        send()
        return job.wait(timeout=120)
    finally:
        kill_tree(job.pid)


def test_torchrun_workers_signalled_as_torchrun_signals_them_save_once_and_resume(tmp_path):
    # torchrun lists the exit code of every worker that has ended when it looks (then it stops
    # the others itself): looking every 3 s, it finds both ended.
    launch = torchrun(*tiny(tmp_path, *LONG))
    launch.insert(launch.index("--standalone"), "--monitor-interval=3")
    job = start(launch, tmp_path / "job.log")
    wait_until_training(tmp_path, job)
    workers = [pid for pid in children(job.pid) if b"app.train" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(workers) == 2, workers
    # torchrun starts each worker in a session of its own and stops it with SIGTERM to that whole
    # group: the worker and its Parquet reader process.
    for worker in workers:
        assert os.getpgid(worker) == worker
    stop(job, lambda: [os.killpg(worker, signal.SIGTERM) for worker in workers])

    log = (tmp_path / "job.log").read_text()
    # torchrun reports each worker's exit code when its workers end on their own.
    assert log.count(f"exitcode  : {PREEMPTED} ") == 2, log[-4000:]
    # ... and no worker crashed (its reader process killed by the signal, say): the one traceback
    # is torchrun's own ChildFailedError, which lists them.
    assert "killed by signal" not in log and log.count("Traceback") == 1, log[-6000:]
    steps = stopped_steps(tmp_path)
    assert len(steps) == 2 and steps[0] == steps[1], steps
    assert the_one_checkpoint(tmp_path) == steps[0]
    assert log.count("stopped by SIGTERM after saving checkpoint") == 1  # rank 0 says it

    resumed = check(run_command(torchrun(*tiny(tmp_path, *LONG, f"trainer.max_steps={steps[0] + 2}")), cwd=REPO))
    assert f"resumed from {run_dir(tmp_path) / 'checkpoints'}/step_{steps[0]:08d} at step {steps[0]} " in resumed
    assert records(run_dir(tmp_path), "eval")[-1]["step"] == steps[0] + 2


def test_sigterm_reaching_the_ranks_at_different_steps_stops_them_at_one_step_with_one_checkpoint(tmp_path):
    # Slurm signals every process, but not at the same instant; a node's kubelet stops only its own
    # pods. Rank 1 is signalled first, rank 0 a second (tens of steps) later, if it still runs.
    launch = torchrun(*tiny(tmp_path, *LONG))
    launch.insert(launch.index("--standalone"), "--monitor-interval=3")
    job = start(launch, tmp_path / "job.log")
    wait_until_training(tmp_path, job)
    workers = sorted(pid for pid in children(job.pid) if b"app.train" in Path(f"/proc/{pid}/cmdline").read_bytes())
    ranks = {
        int(
            dict(
                line.split(b"=", 1) for line in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in line
            )[b"RANK"]
        ): pid
        for pid in workers
    }
    assert sorted(ranks) == [0, 1], ranks

    def signal_rank_1_then_rank_0():
        os.killpg(ranks[1], signal.SIGTERM)
        time.sleep(1.0)
        # It may have stopped already: the agreement does not wait for every rank's signal.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(ranks[0], signal.SIGTERM)

    stop(job, signal_rank_1_then_rank_0)
    log = (tmp_path / "job.log").read_text()
    assert log.count(f"exitcode  : {PREEMPTED} ") == 2 and "killed by signal" not in log, log[-4000:]
    steps = stopped_steps(tmp_path)
    assert len(steps) == 2 and steps[0] == steps[1], steps
    assert the_one_checkpoint(tmp_path) == steps[0]


def test_sigterm_to_torchrun_itself_saves_and_torchrun_exits_1(tmp_path):
    # Kubernetes (and `kill`) signal torchrun, the container's first process: it passes SIGTERM on
    # to its workers, waits for them (up to 30 s), then raises its own SignalException: exit 1.
    job = start(torchrun(*tiny(tmp_path, *LONG)), tmp_path / "job.log")
    wait_until_training(tmp_path, job)
    assert stop(job, lambda: os.killpg(job.pid, signal.SIGTERM)) == 1
    log = (tmp_path / "job.log").read_text()
    assert "SignalException: Process" in log and "stopped by SIGTERM after saving checkpoint" in log
    steps = stopped_steps(tmp_path)
    assert len(steps) == 2 and steps[0] == steps[1] == the_one_checkpoint(tmp_path)


def test_sigterm_to_the_process_group_of_one_process_saves_exits_143_and_resumes(tmp_path):
    job = start([sys.executable, "-m", "app.train", *tiny(tmp_path, *LONG)], tmp_path / "job.log")
    wait_until_training(tmp_path, job)
    running = read_point(run_dir(tmp_path), tmp_path)
    assert running.status == "running" and running.summary["pid"] == job.pid
    assert stop(job, lambda: os.killpg(job.pid, signal.SIGTERM)) == PREEMPTED, (tmp_path / "job.log").read_text()[
        -3000:
    ]
    log = (tmp_path / "job.log").read_text()
    assert "stopped by SIGTERM after saving checkpoint" in log and "Traceback" not in log
    step = the_one_checkpoint(tmp_path)
    assert stopped_steps(tmp_path) == [step]
    preempted = json.loads((run_dir(tmp_path) / "summary.json").read_text())
    assert preempted["status"] == "preempted" and preempted["step"] == step and preempted["attempts"] == 1
    out = check(
        run_command(
            [sys.executable, "-m", "app.train", *tiny(tmp_path, *LONG, f"trainer.max_steps={step + 3}")], cwd=REPO
        )
    )
    assert f"at step {step} " in out
    finished = json.loads((run_dir(tmp_path) / "summary.json").read_text())
    assert finished["status"] == "finished" and finished["step"] == step + 3 and finished["attempts"] == 2
    assert finished["wall_time_s"] > preempted["wall_time_s"]
    # The table the run ends with says the same.
    assert f"finished: step {step + 3} of {step + 3}, 1 worker(s)" in out


def test_sigterm_to_a_self_launched_job_saves_and_exits_143_without_a_traceback(tmp_path):
    args = [sys.executable, "-m", "app.train", "distributed.nproc_per_node=2", *tiny(tmp_path, *LONG)]
    job = start(args, tmp_path / "job.log")
    wait_until_training(tmp_path, job)
    assert stop(job, lambda: os.killpg(job.pid, signal.SIGTERM)) == PREEMPTED, (tmp_path / "job.log").read_text()[
        -3000:
    ]
    log = (tmp_path / "job.log").read_text()
    # The workers return as usual: torch's launcher never takes the signal for a death of its own,
    # stops waiting for their results and kills them after its 30 s grace.
    assert "death signal" not in log and "forcefully exiting" not in log, log[-3000:]
    assert "Traceback" not in log and "SignalException" not in log
    assert "stopped by SIGTERM after saving checkpoint" in log
    assert the_one_checkpoint(tmp_path) > 0


def test_a_job_preempted_on_two_workers_resumes_on_one_and_an_evaluation_there_makes_a_best_checkpoint(tmp_path):
    # Preempted between evaluations, the job resumes on 1 worker at the remapped step (twice the
    # stopped one, same samples), which is an evaluation step here: that evaluation, the run's
    # first, is the best so far, and a checkpoint of that step must be saved to be named the best
    # (the one loaded has another step number: it cannot be marked).
    job = start(torchrun(*tiny(tmp_path, *LONG)), tmp_path / "job.log")
    wait_until_training(tmp_path, job)
    stop(job, lambda: os.killpg(job.pid, signal.SIGTERM))
    step = the_one_checkpoint(tmp_path)
    resumed = run_command(
        [
            sys.executable,
            "-m",
            "app.train",
            *tiny(tmp_path, *LONG, "trainer.eval_every_n_steps=1", f"trainer.max_steps={2 * step + 2}"),
        ],
        cwd=REPO,
    )
    out = check(resumed)
    assert f"step_{step:08d} at step {2 * step} " in out
    best = json.loads((run_dir(tmp_path) / "checkpoints" / "best").read_text())
    assert best["step"] >= 2 * step and best["checkpoint"] == f"step_{best['step']:08d}"
    assert records(run_dir(tmp_path), "eval")[0]["step"] == 2 * step
