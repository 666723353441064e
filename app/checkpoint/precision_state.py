"""What a checkpoint says about precision: fp16's loss scale, and the tables' data types.

The loss scale (trainer.precision=fp16) is GradScaler's state: the scale and the count of good
steps towards its next growth. Every rank has the same one (each step's overflow verdict is
all-reduced, app/precision.py), so it is saved once, in meta.json, and resumes on any number of
ranks; without it a resumed run would start again at 65536 and back off again, on other steps
than the uninterrupted run. A checkpoint without one (written under another trainer.precision)
starts the scale fresh, and a run without a loss scale ignores a saved one.

A table's data type (features.data_type, features.sparse[i].data_type) is part of the model: DCP
would load fp32 weights into an fp16 table (or the reverse) by silently casting them, so a
checkpoint of other data types is refused like one of other shapes.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from app.config import Config

log = logging.getLogger(__name__)

LOSS_SCALE_KEY = "loss_scale"  # in meta.json
_NUMBERS = {
    "scale": float,
    "growth_factor": float,
    "backoff_factor": float,
    "growth_interval": int,
    "_growth_tracker": int,
}


def loss_scale_meta(scaler: torch.amp.GradScaler | None) -> dict[str, Any]:
    """meta.json's entry for the loss scale: none without one."""
    return {} if scaler is None else {LOSS_SCALE_KEY: scaler.state_dict()}


def saved_loss_scale(meta: dict[str, Any]) -> dict[str, Any] | None:
    """meta.json's loss scale, checked (it is a file a user may have been given); None when it
    has none. A value that is not a GradScaler state is a ValueError saying what was expected."""
    saved = meta.get(LOSS_SCALE_KEY)
    if saved is None:
        return None
    if not isinstance(saved, dict) or set(saved) != set(_NUMBERS):
        raise ValueError(f"{LOSS_SCALE_KEY} must be an object with the keys {sorted(_NUMBERS)}")
    for key, kind in _NUMBERS.items():
        value = saved[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
            or (kind is int and value != int(value))
            or (key == "scale" and value <= 0)
        ):
            raise ValueError(
                f"{LOSS_SCALE_KEY}.{key} must be a finite {'integer' if kind is int else 'number'} "
                f"{'> 0' if key == 'scale' else '>= 0'}, got {value!r}"
            )
    return {key: kind(saved[key]) for key, kind in _NUMBERS.items()}


def restore_loss_scale(scaler: torch.amp.GradScaler | None, saved: dict[str, Any] | None, path: Any) -> None:
    """Continue the loss scale of the checkpoint at `path` (see saved_loss_scale)."""
    if scaler is None:
        return
    if saved is None:
        log.info(
            "checkpoint %s holds no fp16 loss scale (trainer.precision was not fp16): it starts at %g",
            path,
            scaler.get_scale(),
        )
        return
    scaler.load_state_dict(saved)


def table_precision_differences(saved: Config, current: Config) -> list[str]:
    """How the tables' data types of a checkpoint's config differ from the current config's, one
    line per config key (model_differences' form)."""
    lines = []
    if saved.features.data_type != current.features.data_type:
        lines.append(
            f"features.data_type: {saved.features.data_type!r} in the checkpoint, {current.features.data_type!r} now"
        )
    old = {f.name: f.data_type or saved.features.data_type for f in saved.features.sparse}
    new = {f.name: f.data_type or current.features.data_type for f in current.features.sparse}
    overridden = {f.name for f in (*saved.features.sparse, *current.features.sparse) if f.data_type is not None}
    for name in sorted((old.keys() & new.keys()) & overridden):
        if old[name] != new[name]:
            lines.append(f"features.sparse[{name}].data_type: {old[name]!r} in the checkpoint, {new[name]!r} now")
    return lines
