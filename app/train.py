"""rectrain entrypoint: Hydra config -> typed Config -> model, plan, data, optimizer -> Trainer.fit().

    python -m app.train [key=value ...]                       one process
    torchrun --nproc_per_node=2 -m app.train [key=value ...]  one worker per process
    python -m app.train distributed.nproc_per_node=2 ...      starts 2 local workers itself
    python -m app.train -m optim.lr=0.01,0.1                  a sweep: each point is its own run

Only this module touches Hydra and OmegaConf; everything below receives plain dataclasses.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import hydra
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from app import distributed
from app.checkpoint import CheckpointManager
from app.config import Config, ConfigError, DataConfig, register_with_hydra, to_config
from app.data.batch import DataError
from app.data.parquet import ParquetBatches, check_files, resolve_files
from app.data.synthetic import ensure_dataset
from app.features import FeatureSchema
from app.metrics import MetricsLogger
from app.model import build_model
from app.optim import apply_sparse_optimizer, optimizer_and_schedule
from app.sharding import plan_report, plan_sharding, shard_model, write_plan_report
from app.trainer import Trainer, TrainState, planned_steps

log = logging.getLogger("app.train")
register_with_hydra()


def dataset_files(config: DataConfig, schema: FeatureSchema, is_rank0: bool) -> Tuple[List[str], List[str]]:
    """The train and val Parquet files, checked against the schema from their footers."""
    if config.source == "synthetic":
        if is_rank0:
            ensure_dataset(schema, config.synthetic)  # generates once; the others wait here
        distributed.barrier()
        train_dir, val_dir = ensure_dataset(schema, config.synthetic)
        train_path, val_path = str(train_dir), str(val_dir)
    else:
        train_path, val_path = config.train_path, config.val_path
    files = resolve_files(train_path), resolve_files(val_path)
    for split in files:
        check_files(split, schema)
    return files


def run(config: Config, run_dir: Path) -> Dict[str, float]:
    """One worker's whole job; returns the final validation metrics (the same on every rank)."""
    if not logging.getLogger().handlers:  # a self-launched worker has no Hydra logging
        logging.basicConfig(level=config.logging.level, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    logging.getLogger().setLevel(config.logging.level)
    # TorchRec logs every pipeline fill and drain at INFO; keep its warnings.
    logging.getLogger("torchrec").setLevel(max(logging.WARNING, logging.getLevelName(config.logging.level)))
    env = distributed.init(config.distributed)
    if not env.is_rank0:  # one console voice; every rank's log file keeps everything
        for handler in logging.getLogger().handlers:
            if type(handler) is logging.StreamHandler:
                handler.setLevel(logging.WARNING)
    try:
        torch.manual_seed(config.seed)
        schema = FeatureSchema.from_config(config.features)
        train_files, val_files = dataset_files(config.data, schema, env.is_rank0)

        model = build_model(config.model, schema, env.device)
        apply_sparse_optimizer(model, config.optim, env.device)
        plan = plan_sharding(model, config.sharding, schema, env.device, config.data.batch_size,
                             env.world_size, env.local_world_size, dist.group.WORLD)
        if env.is_rank0:
            log.info("sharding plan:\n%s", write_plan_report(plan_report(plan, schema, env.world_size), run_dir))
        model = shard_model(model, plan, env.device)

        train_data = ParquetBatches(train_files, schema, config.data.batch_size, env.rank, env.world_size,
                                    shuffle=config.data.shuffle, seed=config.data.seed,
                                    prefetch_batches=config.data.prefetch_batches)
        val_data = ParquetBatches(val_files, schema, config.data.eval_batch_size, env.rank, env.world_size,
                                  pad_to_equal=True, prefetch_batches=config.data.prefetch_batches)
        optimizer, lr_scheduler = optimizer_and_schedule(
            model, config.optim, planned_steps(config.trainer, len(train_data)))

        checkpoints = CheckpointManager(run_dir / "checkpoints", config.checkpoint.keep_last, env.rank)
        if not config.checkpoint.resume and checkpoints.latest() is not None:
            # Starting over beside them would mix two runs' steps, and pruning would delete the new ones.
            raise ConfigError(
                f"checkpoint.resume=false, but {checkpoints.directory} already holds checkpoints (newest: "
                f"{checkpoints.latest().name}); choose another run_name or remove them."
            )
        metrics_logger = MetricsLogger(run_dir, env.rank, tensorboard=config.logging.tensorboard)
        trainer = Trainer(
            model, optimizer, lr_scheduler, train_data, val_data,
            checkpoints=checkpoints,
            checkpoint_every_n_steps=config.checkpoint.every_n_steps,
            metrics_logger=metrics_logger,
            config=config.trainer,
            env=env,
            run_meta={"config": dataclasses.asdict(config)},
            progress_bar=config.logging.progress_bar,
        )
        state = trainer.resume() if config.checkpoint.resume else TrainState()
        if state.step == 0:
            log.info("starting %s from scratch: %d steps of %d samples", run_dir, trainer.total_steps,
                     trainer.global_batch_size)
        result = trainer.fit(state)
        metrics_logger.close()
        return result
    finally:
        distributed.shutdown()


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    try:
        config = to_config(cfg)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        if config.distributed.nproc_per_node > 1 and not distributed.under_launcher():
            result = distributed.launch_local(run, (config, run_dir), config.distributed.nproc_per_node)[0]
        else:
            result = run(config, run_dir)
    except (ConfigError, DataError) as error:  # bad input: say what and where, no traceback
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    if os.environ.get("RANK", "0") == "0":
        print(f"final validation AUC {result['auc']:.4f}  logloss {result['logloss']:.4f}  "
              f"NE {result['ne']:.4f}  run dir {run_dir}", flush=True)
    return result["auc"]  # what sweepers (e.g. Optuna) maximise


if __name__ == "__main__":
    main()
