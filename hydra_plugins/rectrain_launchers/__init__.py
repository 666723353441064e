"""Hydra's submitit launchers, which record each sweep point's failure (app/sweep.py) and go on.

Hydra takes launchers from the hydra_plugins package only: configs/launcher/local.yaml and
slurm.yaml name these as hydra.launcher._target_.
"""

from typing import Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher import submitit_launcher

from app import sweep


class LocalLauncher(submitit_launcher.LocalLauncher):
    """hydra/launcher=submitit_local, its failed points collected."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        return sweep.collected(super().launch(job_overrides, initial_job_idx))


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    """hydra/launcher=submitit_slurm, its failed points collected."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        return sweep.collected(super().launch(job_overrides, initial_job_idx))
