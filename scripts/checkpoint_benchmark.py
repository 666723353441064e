"""The checkpoint benchmark of scripts/benchmark.py (python scripts/benchmark.py checkpoint): save
and load speed of a model of a given size against the disk's, the memory a save takes, and the
stall of an asynchronous save."""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from app import distributed
from app.config import Config
from app.features import FeatureSchema
from app.job import build_sharded_model
from app.optim import optimizer_and_schedule

if TYPE_CHECKING:
    from app.checkpoint import CheckpointStore
    from app.storage import PathLike


def _disk_write_speed(directory: Path, gigabytes: float) -> float:
    """GB/s of `dd` writing to `directory` with O_DIRECT (no page cache): the disk's own speed."""
    target = directory / "dd.tmp"
    count = max(1, int(gigabytes * 1024 / 16))
    start = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={count}", "oflag=direct"],
        check=True,
        capture_output=True,
    )
    seconds = time.perf_counter() - start
    target.unlink()
    return count * 16 / 1024 / seconds


class PeakMemory:
    """The process's peak resident memory over a block, sampled every few milliseconds (the
    kernel's own peak, ru_maxrss, cannot be reset between measurements)."""

    def __init__(self) -> None:
        self.before = self.peak = _resident_gb()

    def __enter__(self) -> PeakMemory:
        self.before = self.peak = _resident_gb()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, _resident_gb())

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _resident_gb())


def _resident_gb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def bench_checkpoint(config: Config, directory: str, gigabytes: float, repeats: int) -> dict[str, float]:
    """Save (DCP, fsynced, with the CRC manifest) and load times of a model of `gigabytes` of
    tables, against dd's raw write speed to the same directory; and how long an asynchronous save
    stalls the caller (copying the state) before writing in the background. `directory` may be an
    object-store URL (s3://...): then there is no dd figure."""
    from app.checkpoint import CheckpointStore, verify
    from app.storage import is_url, storage_at

    config = _with_tables_of(config, gigabytes)
    env = distributed.init(config.distributed)
    schema = FeatureSchema.from_config(config.features)
    model = build_sharded_model(config, schema, env, run_dir=None)
    optimizer, _ = optimizer_and_schedule(model, config.optim, total_steps=1)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    remote = is_url(directory)
    storage = storage_at(f"{directory.rstrip('/')}/checkpoints", key="--checkpoint-dir")
    results: dict[str, float] = {}
    if not remote:
        Path(directory).mkdir(parents=True, exist_ok=True)
        results["disk_gb_per_s"] = _disk_write_speed(Path(directory), gigabytes)
    # Its own gloo group, as app/job.py gives it: an asynchronous save coordinates from a thread,
    # which NCCL (the default group on GPUs) does not allow.
    manager = CheckpointStore(storage, keep_last=1, rank=0, process_group=distributed.new_gloo_group())
    synchronize = torch.cuda.synchronize if env.device.type == "cuda" else (lambda: None)

    path = _time_saves_and_loads(manager, state, repeats, synchronize, results)
    results["size_gb"] = sum(storage.files(path.name).values()) / 2**30
    start = time.perf_counter()
    verify(path.name, manager.group, manager.storage)  # what a resume reads before it loads
    results["verify_s"] = time.perf_counter() - start
    _time_async_save(manager, state, repeats + 1, synchronize, results)
    distributed.shutdown()
    storage.delete("")
    return results


def _with_tables_of(config: Config, gigabytes: float) -> Config:
    """The config with every table resized so that all of them hold `gigabytes` of fp32 weights."""
    features = copy.deepcopy(config.features)
    row_bytes = features.embedding_dim * 4
    rows = -(-int(gigabytes * 2**30) // (row_bytes * len(features.sparse)))
    for feature in features.sparse:
        feature.num_embeddings = rows
    return dataclasses.replace(config, features=features)


def _time_saves_and_loads(
    manager: CheckpointStore, state: dict, repeats: int, synchronize: Callable[[], None], results: dict[str, float]
) -> PathLike:
    """`repeats` saves, each loaded back, timed into `results` with the memory they take; returns
    the last checkpoint's path."""
    # One save varies by 2x here (disk and page cache state): the first, and the median of the
    # later ones (what a long run sees), are both reported.
    save_s, load_s, peaks = [], [], []
    for step in range(1, repeats + 1):
        synchronize()
        start = time.perf_counter()
        with PeakMemory() as memory:
            path = manager.save(step, state, {})
        save_s.append(time.perf_counter() - start)
        peaks.append(memory)
        start = time.perf_counter()
        manager.load(path, state)
        synchronize()  # loads into device tensors finish on the device
        load_s.append(time.perf_counter() - start)
    results["first_save_s"], results["save_s"] = save_s[0], statistics.median(save_s[1:] or save_s)
    results["load_s"] = statistics.median(load_s)
    # What the process holds while it trains (the model, its optimizer state) against its peak
    # while it saves: a save that copied the tables would double it.
    results["resident_gb"] = peaks[-1].before
    results["save_peak_gb"] = max(memory.peak for memory in peaks)
    return path


def _time_async_save(
    manager: CheckpointStore, state: dict, step: int, synchronize: Callable[[], None], results: dict[str, float]
) -> None:
    """How long an asynchronous save stalls the caller, and how long until it is published."""
    synchronize()
    start = time.perf_counter()
    manager.save(step, state, {}, asynchronous=True)
    synchronize()  # the copy off the device is part of the stall
    results["async_stall_s"] = time.perf_counter() - start
    manager.wait()
    results["async_total_s"] = time.perf_counter() - start


def print_checkpoint(bench: dict[str, float], directory: str, repeats: int) -> None:
    size = bench["size_gb"]
    disk = f"disk (dd, O_DIRECT) {bench['disk_gb_per_s']:.2f} GB/s" if "disk_gb_per_s" in bench else "an object store"
    print(f"checkpoint: {size:.2f} GB in {directory}; {disk}")
    versus_disk = (
        (lambda seconds: f" ({size / seconds / bench['disk_gb_per_s']:.2f}x dd)")
        if "disk_gb_per_s" in bench
        else (lambda seconds: "")
    )
    print(
        f"  save (median of {repeats - 1 or 1} after the first) {bench['save_s']:.2f} s = "
        f"{size / bench['save_s']:.2f} GB/s{versus_disk(bench['save_s'])}; first save "
        f"{bench['first_save_s']:.2f} s = {size / bench['first_save_s']:.2f} GB/s"
        f"{versus_disk(bench['first_save_s'])} (CRC-32s computed as the files are written)"
    )
    print(f"  verify (CRC-32 of every file, as a resume does) {bench['verify_s']:.2f} s")
    print(f"  load (median of {repeats}) {bench['load_s']:.2f} s = {size / bench['load_s']:.2f} GB/s")
    print(
        f"  memory: {bench['resident_gb']:.2f} GB resident before a save, {bench['save_peak_gb']:.2f} GB at the "
        f"peak of a save ({bench['save_peak_gb'] / bench['resident_gb']:.2f}x)"
    )
    print(
        f"  async save: training stalled {bench['async_stall_s']:.2f} s (copying the state), "
        f"written and published after {bench['async_total_s']:.2f} s"
    )
