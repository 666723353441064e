"""Benchmarks that print measured figures (nothing here asserts a target).

    python scripts/benchmark.py data                  # Parquet -> Batch rows/s on one core, and from 1, 2, 4 readers
    python scripts/benchmark.py train experiment=bench_reference      # vs the reference trainers, per precision
    python scripts/benchmark.py train experiment=bench_reference_dcn  # the same with DCNv2
    python scripts/benchmark.py data train            # both, and the loader/training ratio
    python scripts/benchmark.py checkpoint            # save/load GB/s of a 1 GB model vs the disk; async stall
    python scripts/benchmark.py checkpoint --checkpoint-dir s3://my-bucket/bench   # the same into an object store
    python scripts/benchmark.py data data.source=parquet data.train_path=s3://my-bucket/train/ \
        data.val_path=s3://my-bucket/val/                                          # rows/s read from an object store
    python scripts/benchmark.py train --steps 20 --warmup 5 --rounds 1 --no-processes experiment=tiny

The train benchmark times, on the same in-memory batches and in alternating rounds: the
reference trainers rebuilt from their configuration (scripts/reference_trainers.py), rectrain in
fp32 and in each reduced precision the device computes fast, rectrain fp32 reading Parquet, and
rectrain fp32 in 2 local processes of one thread each; it prints each as samples/s and as a ratio
to the fastest reference.

Everything after the benchmark names and flags is a config override, as for app.train; the
dataset is the one that config trains on (the synthetic one is generated first if missing).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any

import torch

import reference_trainers
from app import distributed
from app.config import Config
from app.data.parquet import TrainingBatches
from app.errors import UserError
from app.features import FeatureSchema
from app.hydra_edge import compose_config
from app.job import build_loaders, build_sharded_model, dataset_files
from app.optim import OptimizerStep, optimizer_and_schedule
from app.precision import TableGradients, autocast_dtype, loss_scaler
from app.trainer import StepPipeline
from checkpoint_benchmark import bench_checkpoint, print_checkpoint

READER_COUNTS = (1, 2, 4)


def bench_data(loader: TrainingBatches, max_batches: int) -> dict[str, Any]:
    """Decode on the calling thread only (no reader process, one torch thread): rows per second
    of wall time and per CPU-second, i.e. per core; then rows/s as training gets them, from 1, 2
    and 4 reader processes each reading data.prefetch_windows windows ahead (what hides an object
    store's latency)."""
    max_batches = max_batches or len(loader)
    ahead, num_workers = loader.prefetch_windows, loader.num_workers
    read_ahead: dict[int, float] = {}
    if ahead > 0:
        # More readers than cores is part of what is measured: torch's warning about it is noise here.
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        for readers in READER_COUNTS:
            loader.num_workers = readers
            with closing(iter(loader)) as batches:
                next(batches)  # the reader processes started and the first window read: not timed
                wall = time.perf_counter()
                rows = sum(batch.labels.numel() for batch in itertools.islice(batches, max_batches - 1))
                read_ahead[readers] = rows / (time.perf_counter() - wall)
        loader.num_workers = num_workers
    loader.prefetch_windows = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        rows = sum(batch.labels.numel() for batch in itertools.islice(iter(loader), max_batches))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        torch.set_num_threads(threads)
        loader.prefetch_windows = ahead
    figures = {"rows": rows, "rows_per_s": rows / wall, "rows_per_cpu_s": rows / cpu}
    if ahead > 0:
        figures["read_ahead_rows_per_s"], figures["prefetch_windows"] = read_ahead, ahead
    return figures


def _in_memory_batches(config: Config, schema: FeatureSchema, env: distributed.DistEnv, count: int) -> list:
    train_files, val_files = dataset_files(config.data, schema, is_rank0=env.is_rank0)
    loader, _ = build_loaders(config.data, schema, env, train_files, val_files)
    if len(loader) < count:
        raise SystemExit(f"the training split has {len(loader)} batches per rank; --steps + --warmup needs {count}.")
    with closing(iter(loader)) as batches:
        return list(itertools.islice(batches, count))


def _rectrain(config: Config, schema: FeatureSchema, env: distributed.DistEnv, precision: str) -> Callable:
    """rectrain's training step (model, plan, optimizers, pipeline as app.train builds them) in
    `precision`: a function of (batch iterator, steps)."""
    config = dataclasses.replace(config, trainer=dataclasses.replace(config.trainer, precision=precision))
    scaler = loss_scaler(precision, env.device)
    table_gradients = TableGradients(scaler)
    model = build_sharded_model(config, schema, env, run_dir=None, table_gradients=table_gradients)
    optimizer, _ = optimizer_and_schedule(model, config.optim, total_steps=10**9)
    pipeline = StepPipeline(
        model,
        OptimizerStep(
            optimizer,
            config.optim.clip_grad_norm,
            scaler,
            table_gradients,
            local_gradients=config.trainer.dense_average_every > 0,
        ),
        env.device,
    )

    def train(batches: Iterator, steps: int) -> None:
        for _ in range(steps):
            pipeline.progress(batches)

    return train


def _cycled(train: Callable, batches: list) -> Callable[[int], None]:
    cycle = itertools.cycle(batches)
    return lambda steps: train(cycle, steps)


def bench_train(
    config: Config, schema: FeatureSchema, steps: int, warmup: int, rounds: int, processes: bool
) -> dict[str, float]:
    """Samples/s of the reference trainers and of rectrain in each precision this machine runs,
    on the same in-memory batches, in alternating rounds so that all see the same machine state
    (the median over rounds); rectrain fp32 from the Parquet loader too; and, with `processes`,
    rectrain fp32 in 2 local processes of one thread each (global samples/s)."""
    env = distributed.init(config.distributed)
    batch_size = config.data.batch_size
    batches = _in_memory_batches(config, schema, env, warmup + steps + 2)  # +2: the pipeline reads ahead
    contestants: dict[str, Callable[[int], None]] = {}
    if config.model.arch == "dlrm":
        contestants["reference dlrm_s_pytorch"] = reference_trainers.dlrm_s_pytorch(config, batches)
    contestants["reference torchrec_dlrm"] = reference_trainers.torchrec_dlrm(config, batches, env.device)
    for precision in _precisions(env.device):
        contestants[f"rectrain {precision}"] = _cycled(_rectrain(config, schema, env, precision), batches)
    loader_train = _rectrain(config, schema, env, "fp32")
    figures: dict[str, list[float]] = {name: [] for name in [*contestants, "rectrain fp32 from Parquet"]}
    for _ in range(rounds):
        for name, train in contestants.items():
            figures[name].append(reference_trainers.samples_per_s(train, batch_size, steps, warmup))
        train_files, val_files = dataset_files(config.data, schema, is_rank0=True)
        loader, _ = build_loaders(config.data, schema, env, train_files, val_files)
        with closing(iter(loader)) as parquet:  # closing stops the reader process
            figures["rectrain fp32 from Parquet"].append(
                reference_trainers.samples_per_s(lambda n: loader_train(parquet, n), batch_size, steps, warmup)
            )
    distributed.shutdown()
    results = {name: statistics.median(values) for name, values in figures.items()}
    if processes:
        per_rank = distributed.launch_local(_two_process_worker, (config, steps, warmup), nproc=2)
        results["rectrain fp32, 2 processes"] = sum(per_rank.values())
    return results


def _two_process_worker(config: Config, steps: int, warmup: int) -> float:
    """One of 2 local workers (one thread each: 2 cores): this rank's samples/s of fp32 training."""
    config = dataclasses.replace(config, distributed=dataclasses.replace(config.distributed, threads_per_worker=1))
    env = distributed.init(config.distributed)
    schema = FeatureSchema.from_config(config.features)
    batches = _in_memory_batches(config, schema, env, warmup + steps + 2)
    train = _cycled(_rectrain(config, schema, env, "fp32"), batches)
    rate = reference_trainers.samples_per_s(train, config.data.batch_size, steps, warmup)
    distributed.shutdown()
    return rate


def _precisions(device: torch.device) -> list[str]:
    """fp32, and the reduced precisions this device computes fast."""
    fast = ["bf16"] if device.type == "cpu" else ["bf16", "fp16"]
    supported = []
    for precision in fast:
        try:
            autocast_dtype(precision, device)
            supported.append(precision)
        except UserError as error:
            print(f"({precision} not measured: {error})")
    return ["fp32", *supported]


def print_train(results: dict[str, float], config: Config, steps: int, rounds: int) -> None:
    references = {name: rate for name, rate in results.items() if name.startswith("reference")}
    fastest_name = max(references, key=lambda name: references[name])
    fastest = references[fastest_name]
    print(
        f"train ({config.model.arch}, batch {config.data.batch_size} per rank, torch threads "
        f"{torch.get_num_threads()}, median of {rounds} rounds of {steps} steps; in-memory batches unless said):"
    )
    for name, rate in results.items():
        print(f"  {name:<30} {rate:>10,.0f} samples/s  {rate / fastest:5.2f}x {fastest_name}")
    fp32 = results["rectrain fp32"]
    for precision in ("bf16", "fp16"):
        if f"rectrain {precision}" in results:
            print(f"  {precision}/fp32: {results[f'rectrain {precision}'] / fp32:.2f}x")
    print(f"  Parquet loader/in-memory: {results['rectrain fp32 from Parquet'] / fp32:.3f}")
    if "rectrain fp32, 2 processes" in results:
        print(f"  2 processes/1 process: {results['rectrain fp32, 2 processes'] / fp32:.2f}x")


def _parse_args() -> tuple[argparse.Namespace, list[str], list[str]]:
    """The flags, the benchmarks named and the config overrides."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmarks", nargs="+", help="data and/or train, then config overrides (key=value)")
    parser.add_argument(
        "--data-batches", type=int, default=0, help="batches decoded by the data benchmark (0: one whole epoch)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=130,
        help="timed training steps per round and contestant (the reference benchmark's 130)",
    )
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps before each timed stretch")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds over the contestants")
    parser.add_argument(
        "--processes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time 2 local processes (train benchmark)",
    )
    parser.add_argument("--checkpoint-gb", type=float, default=1.0, help="size of the checkpointed tables")
    parser.add_argument("--checkpoint-repeats", type=int, default=3, help="saves and loads timed (median)")
    parser.add_argument("--checkpoint-dir", default="outputs/benchmark", help="where to write (and remove) it")
    args, rest = parser.parse_known_args()
    words = args.benchmarks + rest
    names = [a for a in words if "=" not in a]
    overrides = [a for a in words if "=" in a]
    unknown = set(names) - {"data", "train", "checkpoint"}
    if unknown or not names:
        parser.error(
            f"unknown argument(s) {sorted(unknown)}; name data, train and/or checkpoint, then key=value overrides."
        )
    return args, names, overrides


def print_data(data: dict[str, Any], config: Config) -> None:
    print(
        f"data:  {data['rows']:,} rows from {config.data.train_path or 'the synthetic dataset'} decoded at "
        f"{data['rows_per_s']:,.0f} rows/s on one thread ({data['rows_per_cpu_s']:,.0f} rows per CPU-second)"
    )
    if "read_ahead_rows_per_s" in data:
        read_ahead = data["read_ahead_rows_per_s"]
        for readers, rate in read_ahead.items():
            print(
                f"       {rate:>12,.0f} rows/s as training gets them from {readers} reader process"
                f"{'es' if readers > 1 else ''} ({data['prefetch_windows']} windows ahead each)  "
                f"{rate / read_ahead[1]:5.2f}x 1 reader"
            )


def main() -> None:
    args, names, overrides = _parse_args()
    config = compose_config(overrides)
    schema = FeatureSchema.from_config(config.features)
    results = {}
    if "checkpoint" in names:
        bench = bench_checkpoint(config, args.checkpoint_dir, args.checkpoint_gb, args.checkpoint_repeats)
        print_checkpoint(bench, args.checkpoint_dir, args.checkpoint_repeats)
    if not {"data", "train"} & set(names):
        return
    train_files, val_files = dataset_files(config.data, schema, is_rank0=True)
    env = distributed.DistEnv(0, 1, 0, 1, torch.device("cpu"))
    print(
        f"dataset: {len(train_files)} training file(s), batch size {config.data.batch_size}, "
        f"{len(schema.dense)} dense + {len(schema.sparse)} sparse features; torch threads {torch.get_num_threads()}"
    )
    if "data" in names:
        loader, _ = build_loaders(config.data, schema, env, train_files, val_files)
        results["data"] = data = bench_data(loader, args.data_batches)
        print_data(data, config)
    if "train" in names:
        results["train"] = train = bench_train(
            config, schema, args.steps, args.warmup, args.rounds, processes=args.processes
        )
        print_train(train, config, args.steps, args.rounds)
    if len(results) == 2:
        print(
            f"loader rows/s over training samples/s (fp32, from memory): "
            f"{results['data']['rows_per_s'] / results['train']['rectrain fp32']:.1f}x"
        )


if __name__ == "__main__":
    main()
