"""The Hydra callbacks configs/hydra/default.yaml names: part of the Hydra edge (app/train.py,
app/hydra_edge.py), in a module of its own since it imports Hydra at once, which the modules
importing app/hydra_edge.py for its config checks need not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepStart(Callback):
    """Tells app/sweep.py where and when a sweep this process launches begins, so that it can read
    the outcomes of points run as jobs of their own (the submitit launchers) once the sweep has run."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from app import sweep

        sweep.began(Path(str(config.hydra.sweep.dir)))
