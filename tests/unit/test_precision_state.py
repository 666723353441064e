"""What a checkpoint says about precision: the tables' data types make another model, and the
loss scale in meta.json is checked before it is used (a checkpoint may come from anyone)."""

from __future__ import annotations

import pytest

from app.checkpoint import model_differences
from app.checkpoint.precision_state import saved_loss_scale
from app.hydra_edge import compose_config

GOOD = {"scale": 32768.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 7}


def test_table_data_types_are_part_of_the_model():
    saved = compose_config(["experiment=tiny"])
    assert model_differences(saved, compose_config(["experiment=tiny"])) == []
    assert model_differences(saved, compose_config(["experiment=tiny", "features.data_type=fp16"])) == [
        "features.data_type: 'fp32' in the checkpoint, 'fp16' now"
    ]
    assert model_differences(saved, compose_config(["experiment=tiny", "features.sparse.3.data_type=fp16"])) == [
        "features.sparse[cat_3].data_type: 'fp32' in the checkpoint, 'fp16' now"
    ]
    # A table that keeps its data type by an override of its own is not named again.
    assert model_differences(
        compose_config(["experiment=tiny", "features.data_type=fp16"]),
        compose_config(["experiment=tiny", "features.sparse.3.data_type=fp16"]),
    ) == ["features.data_type: 'fp16' in the checkpoint, 'fp32' now"]


def test_the_saved_loss_scale_is_checked():
    assert saved_loss_scale({}) is None
    assert saved_loss_scale({"loss_scale": GOOD}) == GOOD
    for bad, message in (
        (5, "must be an object"),
        ({**GOOD, "extra": 1}, "must be an object"),
        ({**GOOD, "scale": float("inf")}, "loss_scale.scale must be a finite number > 0"),
        ({**GOOD, "scale": 0}, "loss_scale.scale"),
        ({**GOOD, "growth_interval": 2.5}, "integer"),
        ({**GOOD, "_growth_tracker": "3"}, "_growth_tracker"),
    ):
        with pytest.raises(ValueError, match=message):
            saved_loss_scale({"loss_scale": bad})
