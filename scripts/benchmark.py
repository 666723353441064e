"""Benchmarks that print measured figures (nothing here asserts a target).

    python scripts/benchmark.py data                  # Parquet -> Batch rows/s on one core
    python scripts/benchmark.py train                 # training samples/s: Parquet vs in-memory batches
    python scripts/benchmark.py data train            # both, and the loader/training ratio
    python scripts/benchmark.py checkpoint            # save/load GB/s of a 1 GB model vs the disk; async stall
    python scripts/benchmark.py train --steps 400 experiment=tiny data.batch_size=1024

Everything after the benchmark names and flags is a config override, as for app.train; the
dataset is the one that config trains on (the synthetic one is generated first if missing).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator

import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from app import distributed
from app.config import Config
from app.hydra_edge import compose_config
from app.data.parquet import TrainingBatches
from app.features import FeatureSchema
from app.job import build_loaders, build_sharded_model, dataset_files
from app.optim import optimizer_and_schedule


def bench_data(loader: TrainingBatches, max_batches: int) -> Dict[str, float]:
    """Decode on the calling thread only (no reader process, one torch thread): rows per second
    of wall time and per CPU-second, i.e. per core."""
    loader.prefetch_windows = 0
    max_batches = max_batches or len(loader)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        rows = sum(batch.labels.numel() for batch in itertools.islice(iter(loader), max_batches))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        torch.set_num_threads(threads)
    return {"rows": rows, "rows_per_s": rows / wall, "rows_per_cpu_s": rows / cpu}


def _timed_steps(pipeline: TrainPipelineSparseDist, batches: Iterator, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        pipeline.progress(batches)
    return time.perf_counter() - start


def bench_train(config: Config, loader: TrainingBatches, steps: int, warmup: int, rounds: int) -> Dict[str, float]:
    """Samples/s of the same model trained from the Parquet loader (prefetching as configured) and
    from batches already in memory, alternating rounds so both see the same machine state."""
    env = distributed.init(config.distributed)
    schema = FeatureSchema.from_config(config.features)
    model = build_sharded_model(config, schema, env, run_dir=None)
    optimizer, _ = optimizer_and_schedule(model, config.optim, total_steps=10**9)
    pipeline = TrainPipelineSparseDist(model, optimizer, env.device)
    needed = warmup + steps
    if len(loader) < needed + 2:
        raise SystemExit(f"the training split has {len(loader)} batches; --steps + --warmup needs {needed + 2}.")
    in_memory = list(itertools.islice(iter(loader), needed + 2))  # +2: the pipeline reads ahead
    parquet_s, memory_s = 0.0, 0.0
    for _ in range(rounds):
        for source in ("parquet", "memory"):
            batches = iter(loader) if source == "parquet" else iter(in_memory)
            _timed_steps(pipeline, batches, warmup)
            seconds = _timed_steps(pipeline, batches, steps)
            if source == "parquet":
                parquet_s += seconds
                batches.close()  # stops the reader process
            else:
                memory_s += seconds
    samples = rounds * steps * loader.batch_size
    distributed.shutdown()
    return {"parquet": samples / parquet_s, "memory": samples / memory_s}


def _disk_write_speed(directory: Path, gigabytes: float) -> float:
    """GB/s of `dd` writing to `directory` with O_DIRECT (no page cache): the disk's own speed."""
    target = directory / "dd.tmp"
    count = max(1, int(gigabytes * 1024 / 16))
    start = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=16M", f"count={count}", "oflag=direct"],
                   check=True, capture_output=True)
    seconds = time.perf_counter() - start
    target.unlink()
    return count * 16 / 1024 / seconds


def bench_checkpoint(config: Config, directory: Path, gigabytes: float, repeats: int) -> Dict[str, float]:
    """Save (DCP, fsynced, with the CRC manifest) and load times of a model of `gigabytes` of
    tables, against dd's raw write speed to the same directory; and how long an asynchronous save
    stalls the caller (copying the state) before writing in the background."""
    from app.checkpoint import CheckpointStore, manifest

    features = copy.deepcopy(config.features)
    row_bytes = features.embedding_dim * 4
    rows = -(-int(gigabytes * 2**30) // (row_bytes * len(features.sparse)))
    for feature in features.sparse:
        feature.num_embeddings = rows
    config = dataclasses.replace(config, features=features)
    env = distributed.init(config.distributed)
    schema = FeatureSchema.from_config(config.features)
    model = build_sharded_model(config, schema, env, run_dir=None)
    optimizer, _ = optimizer_and_schedule(model, config.optim, total_steps=1)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    directory.mkdir(parents=True, exist_ok=True)
    manager = CheckpointStore(directory / "checkpoints", keep_last=1, rank=0)
    results: Dict[str, float] = {"disk_gb_per_s": _disk_write_speed(directory, gigabytes)}

    # One save varies by 2x here (disk and page cache state): the first, and the median of the
    # later ones (what a long run sees), are both reported.
    save_s, load_s = [], []
    for step in range(1, repeats + 1):
        start = time.perf_counter()
        path = manager.save(step, state, {})
        save_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        manager.load(path, state)
        load_s.append(time.perf_counter() - start)
    results["first_save_s"], results["save_s"] = save_s[0], statistics.median(save_s[1:] or save_s)
    results["load_s"] = statistics.median(load_s)
    results["size_gb"] = sum(f.stat().st_size for f in path.iterdir()) / 2**30
    start = time.perf_counter()
    manifest(manager.storage, path.name)
    results["manifest_s"] = time.perf_counter() - start

    start = time.perf_counter()
    manager.save(repeats + 1, state, {}, asynchronous=True)
    results["async_stall_s"] = time.perf_counter() - start
    manager.wait()
    results["async_total_s"] = time.perf_counter() - start
    distributed.shutdown()
    shutil.rmtree(directory / "checkpoints")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmarks", nargs="+", help="data and/or train, then config overrides (key=value)")
    parser.add_argument("--data-batches", type=int, default=0,
                        help="batches decoded by the data benchmark (0: one whole epoch)")
    parser.add_argument("--steps", type=int, default=1500,
                        help="timed training steps per round and source: enough to span several shuffle "
                             "windows, so that reading ahead is measured at its steady rate")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps before each timed stretch")
    parser.add_argument("--rounds", type=int, default=2, help="alternating Parquet / in-memory rounds")
    parser.add_argument("--checkpoint-gb", type=float, default=1.0, help="size of the checkpointed tables")
    parser.add_argument("--checkpoint-repeats", type=int, default=3, help="saves and loads timed (median)")
    parser.add_argument("--checkpoint-dir", default="outputs/benchmark", help="where to write (and remove) it")
    args, rest = parser.parse_known_args()
    words = args.benchmarks + rest
    names = [a for a in words if "=" not in a]
    overrides = [a for a in words if "=" in a]
    unknown = set(names) - {"data", "train", "checkpoint"}
    if unknown or not names:
        parser.error(f"unknown argument(s) {sorted(unknown)}; name data, train and/or checkpoint, "
                     "then key=value overrides.")

    config = compose_config(overrides)
    schema = FeatureSchema.from_config(config.features)
    results = {}
    if "checkpoint" in names:
        bench = bench_checkpoint(config, Path(args.checkpoint_dir), args.checkpoint_gb, args.checkpoint_repeats)
        size = bench["size_gb"]
        print(f"checkpoint: {size:.2f} GB in {args.checkpoint_dir}; disk (dd, O_DIRECT) {bench['disk_gb_per_s']:.2f} GB/s")
        print(f"  save (median of {args.checkpoint_repeats - 1 or 1} after the first) {bench['save_s']:.2f} s = "
              f"{size / bench['save_s']:.2f} GB/s; first save {bench['first_save_s']:.2f} s = "
              f"{size / bench['first_save_s']:.2f} GB/s; CRC manifest {bench['manifest_s']:.2f} s of each")
        print(f"  load (median of {args.checkpoint_repeats}) {bench['load_s']:.2f} s = {size / bench['load_s']:.2f} GB/s")
        print(f"  async save: training stalled {bench['async_stall_s']:.2f} s (copying the state), "
              f"written and published after {bench['async_total_s']:.2f} s")
    if not {"data", "train"} & set(names):
        return
    train_files, val_files = dataset_files(config.data, schema, is_rank0=True)
    env = distributed.DistEnv(0, 1, 0, 1, torch.device("cpu"))
    print(f"dataset: {len(train_files)} training file(s), batch size {config.data.batch_size}, "
          f"{len(schema.dense)} dense + {len(schema.sparse)} sparse features; torch threads {torch.get_num_threads()}")
    if "data" in names:
        loader, _ = build_loaders(config.data, schema, env, train_files, val_files)
        results["data"] = data = bench_data(loader, args.data_batches)
        print(f"data:  {data['rows']:,} rows decoded at {data['rows_per_s']:,.0f} rows/s on one thread "
              f"({data['rows_per_cpu_s']:,.0f} rows per CPU-second)")
    if "train" in names:
        loader, _ = build_loaders(config.data, schema, env, train_files, val_files)
        results["train"] = train = bench_train(config, loader, args.steps, args.warmup, args.rounds)
        print(f"train: from Parquet {train['parquet']:,.0f} samples/s, from memory {train['memory']:,.0f} "
              f"samples/s: ratio {train['parquet'] / train['memory']:.3f} ({args.rounds} x {args.steps} steps each)")
    if len(results) == 2:
        print(f"loader rows/s over training samples/s (from memory): "
              f"{results['data']['rows_per_s'] / results['train']['memory']:.1f}x")


if __name__ == "__main__":
    main()
