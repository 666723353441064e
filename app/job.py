"""One worker's job: config -> data, model, sharding plan, optimizer -> Trainer.fit().

Read top to bottom, run() is the table of contents of a training run. app/train.py (the Hydra
edge) calls it in this process, or in each self-launched worker, once the config is valid.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from app import distributed, progress
from app.checkpoint import Checkpointer, CheckpointStore, RunParts, RunShape, TrainState
from app.clipping import clip_replicated_table_gradients
from app.config import Config, ConfigError, DataConfig
from app.data.batch import InputPolicy
from app.data.files import check_files, check_first_row_group, resolve_files
from app.data.label_classes import warn_one_class
from app.data.parquet import EvaluationBatches, TrainingBatches
from app.data.reader_server import start_reader_server
from app.data.synthetic import ensure_dataset
from app.distributed import DistEnv
from app.features import FeatureSchema
from app.logs import setup_logging
from app.metrics import MetricsLogger
from app.models import build_model
from app.models.managed_collision import prepare_sharded
from app.optim import OptimizerStep, apply_sparse_optimizer, optimizer_and_schedule
from app.precision import TableGradients, autocast_dtype, loss_scaler
from app.preemption import Preemption
from app.run_lock import run_locked
from app.sharding import plan_report, plan_sharding, shard_model, write_plan_report
from app.storage import Storage, UrlPath, storage_at
from app.summary import RunSummary, best_metrics, hyperparameters
from app.tracking import MlflowRun, flatten, run_artifacts
from app.trainer import Trainer, planned_steps

log = logging.getLogger("app.job")


def dataset_files(config: DataConfig, schema: FeatureSchema, is_rank0: bool) -> tuple[list[str], list[str]]:
    """The train and val Parquet files, checked against the schema from their footers, and the
    values of each split's first row group (the same on every rank, so every rank stops alike)."""
    if config.source == "synthetic":
        if is_rank0:
            ensure_dataset(schema, config.synthetic)  # generates once; the others wait here
        distributed.barrier()
        train_dir, val_dir = ensure_dataset(schema, config.synthetic)
        train_path, val_path = str(train_dir), str(val_dir)
    else:
        train_path, val_path = config.train_path, config.val_path
    return (
        _checked_split(config, schema, train_path, "data.train_path"),
        _checked_split(config, schema, val_path, "data.val_path"),
    )


def _checked_split(config: DataConfig, schema: FeatureSchema, path: str, key: str) -> list[str]:
    """A split's files, checked from their footers and its first row group (bad rows found before
    the first step, not after the last); errors name `key`."""
    options = config.storage_options
    files = resolve_files(path, options, key=key)
    check_files(files, schema, options)
    check_first_row_group(files, schema, InputPolicy.from_config(config), options)
    return files


def checkpoint_location(config: Config, run_dir: Path):
    """The run's checkpoints directory: checkpoint.dir (a local path or URL), else <run dir>/checkpoints."""
    return config.checkpoint.dir or run_dir / "checkpoints"


def held_out_test_files(config: DataConfig, schema: FeatureSchema, val_files: list[str]) -> list[str] | None:
    """The test split's Parquet files, checked like the others before the first step: data.test_path,
    or with data.source=synthetic its generated test split (data.synthetic.test_rows > 0, beside
    the val split); None when there is no test split."""
    path = config.test_path
    if path is None and config.source == "synthetic" and config.synthetic.test_rows > 0:
        path = str(Path(val_files[0]).parent.parent / "test")
    if path is None:
        return None
    return _checked_split(config, schema, path, "data.test_path")


def check_writable(storage: Storage, what: str, rank: int, key: str = "output_root and run_name") -> None:
    """Stop before any work when this rank cannot write into `storage` (created if missing),
    naming it, the config `key` it comes from, and why: a save would otherwise fail only at the
    first checkpoint, deep in DCP (in an object store: no bucket, no credentials, no permission)."""
    try:
        storage.check_writable(f".rectrain_write_test_rank{rank}")
    except OSError as error:
        directory = storage.path()
        if isinstance(directory, UrlPath):
            reason = str(error)
        else:
            in_the_way = directory.exists() and not directory.is_dir()
            reason = "a file is in the way" if in_the_way else str(error.strerror or error)
        raise ConfigError(f"cannot write {what} to {directory} (from {key}): {reason}.") from error


def warn_of_readers_beyond_cores(config: DataConfig, workers_per_node: int) -> None:
    """Each reader process decodes on a core of its own: more of them than the node's cores only
    take cores from training (and memory, for the windows each holds)."""
    readers = config.num_workers * workers_per_node if config.prefetch_windows > 0 else 0
    cores = len(os.sched_getaffinity(0))
    if readers > cores:
        log.warning(
            "data.num_workers=%d: %d reader processes on this node (%d per worker x %d worker(s)) for %d "
            "CPU core(s) available; readers beyond the cores compete with training for them.",
            config.num_workers,
            readers,
            config.num_workers,
            workers_per_node,
            cores,
        )


def build_sharded_model(
    config: Config,
    schema: FeatureSchema,
    env: DistEnv,
    run_dir: Path | None,
    table_gradients: TableGradients | None = None,
) -> nn.Module:
    """The model with its sparse optimizer fused in, planned collectively and wrapped in
    DistributedModelParallel; rank 0 writes the plan report into run_dir (when given). Its dense
    part computes in trainer.precision; `table_gradients` is the cut before the tables that fp16's
    loss scale needs (see app/precision.py)."""
    model = build_model(
        config.model,
        schema,
        env.device,
        autocast_dtype=autocast_dtype(config.trainer.precision, env.device),
        table_gradients=table_gradients,
        managed_collision=config.features.managed_collision,
        mc_buckets=env.world_size,
        task_weights=[task.weight for task in config.features.labels] or None,
    )
    apply_sparse_optimizer(model, config.optim, env.device)
    plan, chosen = plan_sharding(
        model,
        config.sharding,
        schema,
        env.device,
        config.data.batch_size,
        env.world_size,
        env.local_world_size,
        dist.group.WORLD,
    )
    if env.is_rank0 and run_dir is not None:
        report = plan_report(plan, schema, env.world_size, chosen)
        log.info("sharding plan:\n%s", write_plan_report(report, run_dir))
    sharded = shard_model(
        model,
        plan,
        config.sharding,
        env.device,
        config.data.batch_size,
        local_dense_gradients=config.trainer.dense_average_every > 0,
        sparse_clip_value=config.optim.sparse_clip_value,
    )
    if config.optim.sparse_clip_value is not None:  # the sharded tables': FBGEMM's, set by shard_model
        clip_replicated_table_gradients(sharded, config.optim.sparse_clip_value, env.world_size)
    prepare_managed_collision(sharded, config, env.world_size)
    return sharded


def prepare_managed_collision(model: nn.Module, config: Config, world_size: int) -> None:
    """The sharded managed-collision tables made exact and CPU-capable (app/models/managed_collision.py).
    A shard's module sees at most every rank's ids of its features in a step: its history holds
    twice that at the configured hotness, and grows when bags are longer than features.sparse[i].hotness."""
    managed = [f for f in config.features.sparse if f.id_mapping == "managed_collision"]
    if managed:
        history = 2 * world_size * config.data.batch_size * max(f.hotness for f in managed)
        prepare_sharded(model, config.seed, history)


def build_loaders(
    config: DataConfig, schema: FeatureSchema, env: DistEnv, train_files: list[str], val_files: list[str]
) -> tuple[TrainingBatches, EvaluationBatches]:
    """This rank's training batches (shuffled per epoch) and evaluation batches (padded)."""
    train = TrainingBatches(
        train_files,
        schema,
        config.batch_size,
        env.rank,
        env.world_size,
        shuffle=config.shuffle,
        seed=config.seed,
        shuffle_window=config.shuffle_window,
        **_reading(config, env),
    )
    return train, evaluation_batches(config, schema, env, val_files)


def evaluation_batches(config: DataConfig, schema: FeatureSchema, env: DistEnv, files: list[str]) -> EvaluationBatches:
    """This rank's evaluation batches of a held-out split (validation or test), padded."""
    return EvaluationBatches(files, schema, config.eval_batch_size, env.rank, env.world_size, **_reading(config, env))


def _reading(config: DataConfig, env: DistEnv) -> dict[str, Any]:
    """How every split is read: the same readers, input policy and storage options."""
    return dict(
        prefetch_windows=config.prefetch_windows,
        num_workers=config.num_workers,
        policy=InputPolicy.from_config(config),
        pin_memory=env.device.type == "cuda",  # so that the copies to the device overlap compute
        storage_options=config.storage_options,
    )


def run(config: Config, run_dir: Path, overrides: Sequence[str] = ()) -> dict[str, float] | None:
    """One worker's whole job; returns the final validation metrics (the same on every rank), or
    None when SIGTERM stopped it early (after a checkpoint). `overrides` (the command line's
    key=value) name the hyperparameters TensorBoard's HParams dashboard compares runs by."""
    if config.data.prefetch_windows > 0:
        start_reader_server()  # its imports overlap the set-up below
    env = distributed.init(config.distributed)
    preemption = Preemption(distributed.new_gloo_group())  # from the start: set-up may take minutes
    try:
        setup_logging(config.logging, env.is_rank0)
        progress.configure(config.logging.progress_bar and env.is_rank0)
        log.info(
            "%d worker(s) on %s, %d on this node, %d CPU threads each",
            env.world_size,
            env.device,
            env.local_world_size,
            torch.get_num_threads(),
        )
        if env.is_rank0:
            warn_of_readers_beyond_cores(config.data, env.local_world_size)
        # Before summary.json: a job refused here must not write over the one that holds the run.
        with run_locked(run_dir, None, env.rank, preemption.group):
            summary = RunSummary(run_dir, env.rank, env.world_size)
            summary.running()
            try:
                # In a function of its own, so that the model and everything holding a process
                # group are garbage when shutdown() collects them.
                return _train(config, run_dir, env, preemption, summary, overrides)
            except BaseException as error:
                summary.failed(error)
                raise
    finally:
        preemption.close()
        distributed.shutdown()


def _train(
    config: Config, run_dir: Path, env: DistEnv, preemption: Preemption, summary: RunSummary, overrides: Sequence[str]
) -> dict[str, float] | None:
    key = "checkpoint.dir" if config.checkpoint.dir else "output_root and run_name"
    checkpoint_storage = storage_at(checkpoint_location(config, run_dir), key=key)
    check_writable(checkpoint_storage, "checkpoints", env.rank, key)  # every rank writes its shards
    with run_locked(run_dir, checkpoint_storage, env.rank, preemption.group):  # where not in run_dir
        return _train_locked(config, run_dir, env, preemption, summary, overrides, checkpoint_storage)


def _train_locked(
    config: Config,
    run_dir: Path,
    env: DistEnv,
    preemption: Preemption,
    summary: RunSummary,
    overrides: Sequence[str],
    checkpoint_storage: Storage,
) -> dict[str, float] | None:
    # Before the set-up's minutes: a tracking server that cannot be reached stops the run now.
    tracking = None
    if env.is_rank0 and config.logging.mlflow.tracking_uri:
        tracking = MlflowRun(
            config.logging.mlflow, run_dir, experiment=config.run_name, run_name=run_dir.name, params=flatten(config)
        )
    torch.manual_seed(config.seed)
    parts, shape, table_gradients = _assemble(config, env, run_dir)
    store = CheckpointStore(
        checkpoint_storage, config.checkpoint.keep_last, env.rank, process_group=distributed.new_gloo_group()
    )
    checkpointer = Checkpointer(store, config.checkpoint, config, parts, shape)
    state = checkpointer.restore(config.checkpoint.load_from, config.checkpoint.load_mode)
    if state.step == 0:
        log.info(
            "starting %s from scratch: %d steps of %d samples", run_dir, shape.total_steps, shape.global_batch_size
        )
    metrics_logger = MetricsLogger(run_dir, env.rank, tensorboard=config.logging.tensorboard, tracking=tracking)
    trainer = Trainer(
        parts,
        checkpointer,
        metrics_logger,
        preemption,
        config.trainer,
        env,
        progress_bar=config.logging.progress_bar,
        optimizer_step=OptimizerStep(
            parts.optimizer,
            config.optim.clip_grad_norm,
            parts.loss_scale,
            table_gradients,
            local_gradients=config.trainer.dense_average_every > 0,
        ),
        tasks=config.features.tasks(),
        primary_task=config.primary_task(),
    )
    metrics_logger.start_session(hyperparameters(config, overrides))
    return _fit(trainer, state, summary, metrics_logger, run_dir, tracked=tracking is not None)


def _assemble(config: Config, env: DistEnv, run_dir: Path) -> tuple[RunParts, RunShape, TableGradients]:
    """The run's data, sharded model, optimizer and schedule, and its shape."""
    schema = FeatureSchema.from_config(config.features)
    train_files, val_files = dataset_files(config.data, schema, env.is_rank0)
    scaler = loss_scaler(config.trainer.precision, env.device)
    table_gradients = TableGradients(scaler)
    model = build_sharded_model(config, schema, env, run_dir, table_gradients)
    train_data, val_data = build_loaders(config.data, schema, env, train_files, val_files)
    test_split = held_out_test_files(config.data, schema, val_files)
    test_data = None if test_split is None else evaluation_batches(config.data, schema, env, test_split)
    if env.is_rank0:
        for split, files in (("validation", val_files), ("test", test_split or [])):
            warn_one_class(split, files, schema.tasks, config.data.storage_options)
    shape = RunShape(
        env.world_size,
        config.data.batch_size * env.world_size,
        len(train_data),
        planned_steps(config.trainer, len(train_data)),
    )
    optimizer, lr_scheduler = optimizer_and_schedule(model, config.optim, shape.total_steps)
    parts = RunParts(model, optimizer, lr_scheduler, train_data, val_data, test_data, loss_scale=scaler)
    return parts, shape, table_gradients


def _fit(
    trainer: Trainer,
    state: TrainState,
    summary: RunSummary,
    metrics_logger: MetricsLogger,
    run_dir: Path,
    tracked: bool,
) -> dict[str, float] | None:
    """Train to the end or a stop, and record how the run ended in summary.json and the trackers."""
    try:
        result = trainer.fit(state)
    except BaseException as error:
        summary.failed(error)
        metrics_logger.end("failed", [run_dir / "summary.json"])
        metrics_logger.close()
        raise
    if result is None:
        summary.preempted(**trainer.outcome)
        metrics_logger.end("preempted", [run_dir / "summary.json"])
    else:
        best = trainer.outcome.get("best")
        if best is not None:
            best = {**best, **(best_metrics(run_dir, best["step"]) or {})}
        summary.finished(**{**trainer.outcome, "best": best})
        metrics_logger.end("finished", run_artifacts(run_dir) if tracked else [])
    metrics_logger.close()
    return result
