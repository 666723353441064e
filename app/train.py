"""rectrain entrypoint, the Hydra edge: compose the config, validate it, then run the job.

    python -m app.train [key=value ...]                       one process
    torchrun --nproc_per_node=2 -m app.train [key=value ...]  one worker per process
    python -m app.train distributed.nproc_per_node=2 ...      starts 2 local workers itself
    python -m app.train -m optim.lr=0.01,0.1                  a sweep: each point is its own run

Only this module touches Hydra and OmegaConf; app/job.py and everything below it receive plain
dataclasses. torch and torchrec are imported only once the config is valid, so a mistyped
override fails in about a second rather than after several seconds of imports.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from app.config import ConfigError, register_with_hydra, to_config
from app.data import DataError

register_with_hydra()


def _fail(error: Exception) -> None:
    """Bad input (config, data, checkpoint): say what and where, without a traceback; exit 2."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    try:
        config = to_config(cfg)
    except ConfigError as error:
        _fail(error)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    from app import distributed, job
    from app.checkpoint import CheckpointError

    try:
        if config.distributed.nproc_per_node > 1 and not distributed.under_launcher():
            result = distributed.launch_local(job.run, (config, run_dir), config.distributed.nproc_per_node)[0]
        else:
            result = job.run(config, run_dir)
    except (ConfigError, DataError, CheckpointError) as error:
        _fail(error)
    if result is None:  # SIGTERM: a checkpoint was saved; not done, so not exit code 0
        print(f"stopped by SIGTERM after saving a checkpoint; run the same command to resume ({run_dir})",
              file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGTERM)
    if os.environ.get("RANK", "0") == "0":
        print(f"final validation AUC {result['auc']:.4f}  logloss {result['logloss']:.4f}  "
              f"NE {result['ne']:.4f}  run dir {run_dir}", flush=True)
    return result["auc"]  # the value a sweeper plugin optimises


if __name__ == "__main__":
    main()
