"""Progress bars: training, evaluation, and the long steps before training (generating the
synthetic dataset, converting Criteo files, verifying a checkpoint to resume from), each with
its rate and the time left.

One switch for the process (`configure`, set once by the job from logging.progress_bar and the
rank: only rank 0's console shows bars), so that the modules doing the work need not carry it.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

_enabled = True


def configure(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


def bar(
    total: float | None,
    desc: str,
    unit: str,
    unit_scale: Any = True,
    leave: bool = True,
    enabled: bool | None = None,
    **kwargs: Any,
) -> tqdm:
    """A bar of `total` units of `unit` (scaled by `unit_scale`: a number counts each update as that
    many units, True writes 12.3k), showing the rate and the time left; off where configure()
    said so (or `enabled`, where the caller knows better)."""
    shown = _enabled if enabled is None else enabled
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit_scale,
        leave=leave,
        dynamic_ncols=True,
        disable=not shown,
        file=sys.stderr,
        **kwargs,
    )
