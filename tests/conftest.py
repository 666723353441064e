"""Shared test helpers: the repo root, the venv's python, and a one-rank process group."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pytest
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.fixture
def single_process_group():
    """A real one-rank gloo group, as `python -m app.train` creates for one process."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def run_command(args: Sequence[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command with the test's python first on PATH; output kept for assertion messages."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    env.pop("RANK", None)
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
