"""Checkpoint names: step_<N> (8 digits), or step_<N>_samples_<S> where a published checkpoint of
another position already has the name step_<N>.

A run resumed on another number of ranks or another global batch size counts steps of another
size: its step N is not the step N of the run before. Its checkpoint then takes the samples
trained into its name rather than replace the published one (which checkpoints/best may name).
Old run directories, whose checkpoints are all step_<N>, resume as before."""

from __future__ import annotations

import re

_STEP_DIR = re.compile(r"^step_(\d{8})(?:_samples_(\d+))?$")


def step_name(step: int, samples: int | None = None) -> str:
    """The name of the checkpoint of `step`; with `samples`, the one unique to that position."""
    name = f"step_{step:08d}"
    return name if samples is None else f"{name}_samples_{samples}"


def is_step_name(name: str) -> bool:
    """Whether `name` is a checkpoint's directory name (published or not)."""
    return _STEP_DIR.match(name) is not None
