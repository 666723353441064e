"""CheckpointManager on real files: atomic publish, latest, keep-last, in-place load."""

from __future__ import annotations

import json

import torch

from app.checkpoint import LATEST_FILE, META_FILE, CheckpointManager


def state(value: float):
    return {"model": {"w": torch.full((4, 3), value)}, "optimizer": {"m": torch.full((2,), value * 2)}}


def test_save_publishes_complete_checkpoints_and_keeps_last_k(tmp_path, single_process_group):
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=2, rank=0)
    assert manager.latest() is None
    for step in (10, 20, 30):
        path = manager.save(step, state(float(step)), {"train_state": {"step": step}})
        assert path.name == f"step_{step:08d}"
        assert json.loads((path / META_FILE).read_text())["step"] == step
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [LATEST_FILE, "step_00000020", "step_00000030"]
    assert manager.latest().name == "step_00000030"
    assert (tmp_path / "checkpoints" / LATEST_FILE).read_text() == "step_00000030"


def test_load_fills_state_in_place(tmp_path, single_process_group):
    manager = CheckpointManager(tmp_path, keep_last=1, rank=0)
    manager.save(5, state(1.5), {"note": "x"})
    target = state(0.0)
    meta = manager.load(manager.latest(), target)
    assert meta == {"step": 5, "note": "x"}
    assert torch.equal(target["model"]["w"], torch.full((4, 3), 1.5))
    assert torch.equal(target["optimizer"]["m"], torch.full((2,), 3.0))


def test_half_written_checkpoints_are_never_picked(tmp_path, single_process_group):
    manager = CheckpointManager(tmp_path, keep_last=3, rank=0)
    manager.save(1, state(1.0), {})
    # A run that died while saving step 2 leaves its staging dir; one that died before meta.json
    # was written leaves a step dir without it (cannot happen through save(), but a copy can).
    (tmp_path / ".step_00000002.tmp").mkdir()
    (tmp_path / "step_00000003").mkdir()
    assert manager.latest().name == "step_00000001"
    # A crash between the rename and the pointer update leaves the pointer one behind.
    manager.save(4, state(4.0), {})
    (tmp_path / LATEST_FILE).write_text("step_00000001")
    assert manager.latest().name == "step_00000004"


def test_saving_a_step_again_replaces_it(tmp_path, single_process_group):
    manager = CheckpointManager(tmp_path, keep_last=2, rank=0)
    manager.save(7, state(1.0), {})
    manager.save(7, state(2.0), {})
    target = state(0.0)
    manager.load(manager.latest(), target)
    assert torch.equal(target["model"]["w"], torch.full((4, 3), 2.0))
    assert not list(tmp_path.glob(".step_*"))
