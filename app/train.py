"""rectrain entrypoint, the Hydra edge: compose the config, validate it, then run the job.

    python -m app.train [key=value ...]                       one process
    torchrun --nproc_per_node=2 -m app.train [key=value ...]  one worker per process
    python -m app.train distributed.nproc_per_node=2 ...      starts 2 local workers itself
    python -m app.train -m optim.lr=0.01,0.1                  a sweep: each point is its own run

Only this module touches Hydra and OmegaConf; app/job.py and everything below it receive plain
dataclasses. torch and torchrec are imported only once the config is valid, so a mistyped
override fails in about a second rather than after several seconds of imports; the readers' fork
server (app/data/reader_server.py) is started just before them, so that its imports overlap theirs.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from app.config import ConfigError
from app.data.reader_server import start_reader_server
from app.errors import BAD_INPUT, UserError
from app.hydra_edge import (
    RunDirectoryRefused,
    adopt_submitit_tasks,
    check_override_keys,
    register_with_hydra,
    to_config,
)

register_with_hydra()
PREEMPTED = 143  # 128 + SIGTERM: stopped by a preemption, after saving a checkpoint


def _say(line: str) -> None:
    """One line on stderr in a single write, so that lines of several ranks never run together."""
    os.write(sys.stderr.fileno(), f"{line}\n".encode())


def _fail(error: UserError) -> None:
    """Bad input (config, data, checkpoint): say what and where, without a traceback; exit 2.
    An error every rank meets alike is said once, by rank 0 (the others' log files keep it);
    one that only some ranks meet (a bad row in their share of the data) by each of them."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 or getattr(error, "rank_specific", False):
        _say(f"error: {error}" if rank == 0 else f"error (rank {rank}): {error}")
    else:
        # The launcher stops every worker as soon as one has ended: leave rank 0 the time to say it.
        time.sleep(_SILENT_RANKS_WAIT_S)
    sys.exit(BAD_INPUT)


_SILENT_RANKS_WAIT_S = 5


_entered_main = False


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> Any:
    global _entered_main
    _entered_main = True
    adopt_submitit_tasks()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    overrides = tuple(HydraConfig.get().overrides.task)
    if HydraConfig.get().mode == RunMode.MULTIRUN and "TORCHELASTIC_RUN_ID" not in os.environ:
        return _sweep_point(cfg, run_dir, overrides)
    return _run(cfg, run_dir, overrides)


def _sweep_point(cfg: DictConfig, run_dir: Path, overrides) -> Any:
    """One point of a sweep: its failure is said and recorded, and the sweep goes on to the next
    point (app/sweep.py). SIGTERM still stops the sweep. (A sweep wrapped in torchrun stops at a
    failing point: its ranks could not agree to go on.)"""
    from app import sweep

    started = time.time()
    try:
        return sweep.finished_point(_run(cfg, run_dir, overrides))
    except SystemExit as exit_:
        if exit_.code != BAD_INPUT:
            raise
        code, failure = BAD_INPUT, exit_.__context__ or exit_  # the UserError that _fail said
    except Exception as error:
        logging.getLogger("app.train").exception("sweep point %s failed", run_dir)
        code, failure = 1, error
    recorded = sweep.summary_since(run_dir, started)
    if recorded is None or recorded["status"] != "failed":  # a failure its workers did not record
        _record_failure(run_dir, failure, bad_input=code == BAD_INPUT)
    return sweep.failed_point(run_dir, code)


def _run(cfg: DictConfig, run_dir: Path, overrides) -> float:
    """The job of `cfg` in run_dir: exits 2 on bad input, 143 when SIGTERM stopped it."""
    try:
        config = to_config(cfg)
    except ConfigError as error:
        _record_failure(run_dir, error)
        _fail(error)
    launches_workers = config.distributed.nproc_per_node > 1 and not _under_launcher()
    if config.data.prefetch_windows > 0 and not launches_workers:
        start_reader_server()  # before torch: the server's imports overlap this process's (seconds)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from app import distributed

    try:
        if launches_workers:
            result = distributed.launch_local(_worker, (config, run_dir, overrides), config.distributed.nproc_per_node)[
                0
            ]
        else:
            result = _worker(config, run_dir, overrides)
    except ChildFailedError as error:  # a self-launched worker failed
        if error.get_first_failure()[1].exitcode == BAD_INPUT:
            sys.exit(BAD_INPUT)  # it said why, as a worker under torchrun does
        raise
    if result is None:  # SIGTERM: not done, so not exit code 0
        if os.environ.get("RANK", "0") == "0":
            _say(_stopped_message(config, run_dir))
        sys.exit(PREEMPTED)
    if os.environ.get("RANK", "0") == "0":
        _print_summary(run_dir)
        print(
            f"final validation AUC {result['auc']:.4f}  logloss {result['logloss']:.4f}  "
            f"NE {result['ne']:.4f}  run dir {run_dir}",
            flush=True,
        )
        tasks = config.features.tasks()
        for task in tasks if len(tasks) > 1 else ():  # multi-task: the line above is the primary task's
            print(
                f"  task {task}: validation AUC {result[task + '/auc']:.4f}  "
                f"logloss {result[task + '/logloss']:.4f}  "
                f"NE {result[task + '/ne']:.4f}",
                flush=True,
            )
        _say_best_achievable(config, result["auc"])
    return result["auc"]  # the value a sweeper plugin optimises


def _under_launcher() -> bool:
    """app.distributed.under_launcher(), without importing torch: inside a worker that torchrun or
    elastic_launch started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _record_failure(run_dir: Path, error: BaseException, bad_input: bool = True) -> None:
    """A run (a sweep point) that fails where its workers do not record it (on its config, setting
    up) is reported as failed in its summary.json, like one failing later."""
    from app.summary import RunSummary

    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        RunSummary(run_dir, rank, world_size).failed(error, bad_input)


def _print_summary(run_dir: Path) -> None:
    from app.summary import format_table, read_summary

    summary = read_summary(run_dir)
    if summary is not None:
        print(format_table(summary), flush=True)


def _say_best_achievable(config, auc: float) -> None:
    """The dataset's best achievable validation AUC beside the one reached, where it is known (a
    generated dataset records it in its metadata.json)."""
    from app.data.synthetic import best_achievable

    task = config.primary_task()
    best = best_achievable(config.features, config.data, task)
    if best is not None:
        truth = f"{best['task']!r}" if "task" in best else "click"
        print(
            f"best achievable validation AUC {best['auc']:.4f} (the true {truth} probabilities', "
            f"{best['path']}): reached {auc:.4f}, gap {best['auc'] - auc:.4f}",
            flush=True,
        )


def _worker(config, run_dir: Path, overrides=()):
    """One worker's job, in this process or self-launched: bad input is said, and exit code 2."""
    from app import job

    try:
        return job.run(config, run_dir, overrides)
    except UserError as error:
        _fail(error)


def _stopped_message(config, run_dir: Path) -> str:
    from app.checkpoint import CheckpointStore
    from app.job import checkpoint_location

    newest = CheckpointStore(checkpoint_location(config, run_dir), keep_last=1, rank=0).latest()
    saved = f"after saving checkpoint {newest}" if newest is not None else "before any checkpoint was saved"
    return f"stopped by SIGTERM {saved}; run the same command to resume ({run_dir})"


def cli() -> None:
    """`python -m app.train`: Hydra's main, with exit code 2 for every config error. Hydra exits
    with 1 when it cannot compose the config (an unknown group option, a value of the wrong
    type), before main() runs; 1 stays for failures of the job itself."""
    try:
        check_override_keys(sys.argv[1:])
    except ConfigError as error:
        _fail(error)
    try:
        main()
    except RunDirectoryRefused as refused:
        _fail(refused.error)
    except SystemExit as exit_:
        if exit_.code == 1 and not _entered_main:
            sys.exit(BAD_INPUT)
        raise
    _end_sweep()


def _end_sweep() -> None:
    """A sweep whose points all ran exits non-zero when one failed, naming the failed points."""
    sweep = sys.modules.get("app.sweep")  # imported by a sweep's points or its launcher only
    failed = sweep.failures() if sweep is not None else None
    if failed is not None:
        line, code = failed
        _say(line)
        sys.exit(code)


if __name__ == "__main__":
    cli()
