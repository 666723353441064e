"""Running one job per input file, in worker processes or in this one."""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed

from app import progress

log = logging.getLogger(__name__)


def map_in_processes(function: Callable, jobs: list, workers: int, done: str) -> list:
    """function(job) for each job in `workers` processes (in this one for 1), results in job order.
    Each job and `function` must pickle (module-level, plain data), and `done` is logged per job."""
    bar = progress.bar(len(jobs), f"{done} files", "file", unit_scale=False)
    if workers <= 1 or len(jobs) <= 1:
        results = []
        with bar:
            for job in jobs:
                results.append(function(job))
                log.info("%s %s", done, job.path)
                bar.update(1)
        return results
    # spawn, not fork: a fork would copy this process's threads (Arrow's pools, torch's) mid-state.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context)
    try:
        futures = {pool.submit(function, job): job for job in jobs}
        for future in as_completed(futures):
            future.result()  # the first failure stops the run; `finally` cancels jobs not started
            log.info("%s %s", done, futures[future].path)
            bar.update(1)
        return [future.result() for future in futures]
    finally:
        bar.close()
        pool.shutdown(cancel_futures=True)
