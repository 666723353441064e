"""CheckpointStore on real files: atomic publish, latest, keep-last, in-place load, and loads
that refuse a checkpoint naming code rather than run it."""

from __future__ import annotations

import json
import pickle
import re
import zlib
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

from app.checkpoint import (
    BEST_FILE,
    LATEST_FILE,
    META_FILE,
    CheckpointError,
    CheckpointStore,
    find_checkpoint,
    model_differences,
    read_meta,
    verify,
)
from app.config import Config, FeaturesConfig, ModelConfig, SparseFeature


def state(value: float):
    return {"model": {"w": torch.full((4, 3), value)}, "optimizer": {"m": torch.full((2,), value * 2)}}


def test_save_publishes_complete_checkpoints_and_keeps_last_k(tmp_path, single_process_group):
    manager = CheckpointStore(tmp_path / "checkpoints", keep_last=2, rank=0)
    assert manager.latest() is None
    for step in (10, 20, 30):
        path = manager.save(step, state(float(step)), {"train_state": {"step": step}})
        assert path.name == f"step_{step:08d}"
        assert json.loads((path / META_FILE).read_text())["step"] == step
    manager.wait()  # pruned checkpoints are deleted in the background
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [LATEST_FILE, "step_00000020", "step_00000030"]
    assert manager.latest().name == "step_00000030"
    assert (tmp_path / "checkpoints" / LATEST_FILE).read_text() == "step_00000030"


def test_load_fills_state_in_place(tmp_path, single_process_group):
    manager = CheckpointStore(tmp_path, keep_last=1, rank=0)
    manager.save(5, state(1.5), {"note": "x"})
    target = state(0.0)
    meta = manager.load(manager.latest(), target)
    assert {k: meta[k] for k in ("step", "note")} == {"step": 5, "note": "x"}
    assert ".metadata" in meta["files"] and any(name.endswith(".distcp") for name in meta["files"])
    assert torch.equal(target["model"]["w"], torch.full((4, 3), 1.5))
    assert torch.equal(target["optimizer"]["m"], torch.full((2,), 3.0))


def test_half_written_checkpoints_are_never_picked(tmp_path, single_process_group):
    manager = CheckpointStore(tmp_path, keep_last=3, rank=0)
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


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_save_whose_writer_thread_fails_is_not_published(tmp_path, single_process_group, asynchronous):
    """DCP's writer threads only print their errors; a save missing a thread's files must fail,
    not be published looking complete (here the failure is an object that cannot be serialised;
    a full disk fails the same way)."""
    manager = CheckpointStore(tmp_path, keep_last=3, rank=0)
    manager.save(5, state(1.0), {})
    unwritable = {**state(2.0), "extra": lambda: None}
    with pytest.raises(CheckpointException):  # noqa: PT012 (an asynchronous save fails in wait())
        manager.save(10, unwritable, {}, asynchronous=asynchronous)
        manager.wait()
    assert manager.latest().name == "step_00000005" and verify(manager.latest()) is None
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_")) == ["step_00000005"]


def test_saving_a_step_again_replaces_it(tmp_path, single_process_group):
    manager = CheckpointStore(tmp_path, keep_last=2, rank=0)
    manager.save(7, state(1.0), {})
    manager.save(7, state(2.0), {})
    target = state(0.0)
    manager.load(manager.latest(), target)
    assert torch.equal(target["model"]["w"], torch.full((4, 3), 2.0))
    assert not list(tmp_path.glob(".step_*"))


def _distcp(path):
    return next(path.glob("__0_*.distcp"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_intact_one(tmp_path, single_process_group, caplog, damage):
    manager = CheckpointStore(tmp_path, keep_last=3, rank=0)
    manager.save(1, state(1.0), {})
    newest = manager.save(2, state(2.0), {})
    data = _distcp(newest)
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[:-7])
    elif damage == "flip":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    else:
        data.unlink()
    assert verify(newest) is not None
    with caplog.at_level("WARNING"):
        assert manager.newest_valid().name == "step_00000001"
    assert "step_00000002 is not usable" in caplog.text
    # Every checkpoint damaged: a clear error, not a silent start from scratch.
    _distcp(tmp_path / "step_00000001").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*: all 2 failed verification"):
        manager.newest_valid()


@pytest.mark.parametrize("meta", ["[1, 2, 3]", '{"files": 5}', '{"files": {".metadata": [12]}}'])
def test_a_meta_json_of_another_shape_is_damage_too(tmp_path, single_process_group, caplog, meta):
    manager = CheckpointStore(tmp_path, keep_last=3, rank=0)
    manager.save(1, state(1.0), {})
    newest = manager.save(2, state(2.0), {})
    (newest / META_FILE).write_text(meta)
    with caplog.at_level("WARNING"):
        assert manager.newest_valid().name == "step_00000001"
    assert f"step_00000002 is not usable: {META_FILE} is " in caplog.text
    if meta.startswith("["):
        with pytest.raises(CheckpointError, match=f"{newest}.*{META_FILE} is not a JSON object"):
            read_meta(newest)


class Opens:
    """Unpickled, it creates a file: the stand-in for any code a crafted checkpoint could run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def replace_file(checkpoint: Path, name: str, data: bytes) -> None:
    """Replace a checkpoint's file and its manifest entry, as someone who meant it would: it verifies."""
    (checkpoint / name).write_bytes(data)
    meta = json.loads((checkpoint / META_FILE).read_text())
    meta["files"][name] = [len(data), zlib.crc32(data)]
    (checkpoint / META_FILE).write_text(json.dumps(meta))


def forge_metadata(checkpoint: Path, marker: Path) -> None:
    """The checkpoint's .metadata made to create `marker` when unpickled, and still DCP metadata."""
    metadata = pickle.loads((checkpoint / ".metadata").read_bytes())  # our own, just written
    metadata.planner_data = Opens(marker)
    replace_file(checkpoint, ".metadata", pickle.dumps(metadata))


def test_a_checkpoint_whose_metadata_names_code_is_refused_not_run(tmp_path, single_process_group):
    manager = CheckpointStore(tmp_path / "checkpoints", keep_last=1, rank=0)
    path = manager.save(1, state(1.0), {})
    marker = tmp_path / "ran"
    forge_metadata(path, marker)
    assert manager.newest_valid() == path  # the manifest matches: only loading can tell
    refusal = f"{path / '.metadata'}: refused to load: it names io.open, which a checkpoint never contains"
    with pytest.raises(CheckpointError, match=re.escape(refusal)):
        manager.load(path, state(0.0))
    assert not marker.exists()


def test_non_tensor_values_load_as_plain_data_only(tmp_path, single_process_group):
    manager = CheckpointStore(tmp_path, keep_last=2, rank=0)
    # DCP pickles what is not a tensor whole, with torch.save.
    path = manager.save(1, {**state(1.0), "extra": {"epoch": 3, "note": "x"}}, {})
    target = {**state(0.0), "extra": {"epoch": 0, "note": ""}}
    manager.load(path, target)
    assert target["extra"] == {"epoch": 3, "note": "x"}

    marker = tmp_path / "ran"
    path = manager.save(2, {**state(1.0), "extra": {"epoch": Opens(marker)}}, {})
    assert verify(path) is None
    with pytest.raises(
        CheckpointError,
        match=rf"{re.escape(str(path))}/__0_\d+\.distcp: refused to load "
        r"'extra\.epoch': Unsupported global: GLOBAL io\.open",
    ):
        manager.load(path, {**state(0.0), "extra": {"epoch": 0}})
    assert not marker.exists()


def test_async_save_copies_the_state_and_publishes_on_wait(tmp_path, single_process_group):
    manager = CheckpointStore(tmp_path, keep_last=2, rank=0)
    live = state(1.0)
    path = manager.save(3, live, {"note": "async"}, asynchronous=True)
    live["model"]["w"].add_(100.0)  # training goes on while the checkpoint is written
    assert manager.wait() == path
    assert manager.newest_valid() == path
    target = state(0.0)
    manager.load(path, target)
    assert torch.equal(target["model"]["w"], torch.full((4, 3), 1.0))
    assert manager.wait() is None


def test_find_checkpoint_accepts_run_checkpoints_and_step_dirs(tmp_path, single_process_group):
    manager = CheckpointStore(tmp_path / "run" / "checkpoints", keep_last=2, rank=0)
    manager.save(4, state(1.0), {})
    newest = manager.save(8, state(1.0), {})
    assert find_checkpoint(tmp_path / "run") == newest
    assert find_checkpoint(tmp_path / "run" / "checkpoints") == newest
    assert find_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000004").name == "step_00000004"
    with pytest.raises(CheckpointError, match="no such directory"):
        find_checkpoint(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="step_00000005 is not usable"):
        find_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000005")


def test_model_differences_name_each_key():
    def config(**tables):
        return Config(
            features=FeaturesConfig(
                label="label",
                dense=["a"],
                embedding_dim=16,
                pooling="sum",
                sparse=[SparseFeature(n, v, 1) for n, v in tables.items()],
            ),
            model=ModelConfig(
                arch="dlrm",
                dense_arch_layer_sizes=[8, 16],
                over_arch_layer_sizes=[4, 1],
                dcn_num_layers=3,
                dcn_low_rank_dim=32,
            ),
        )

    saved = config(x=10, y=20)
    assert model_differences(saved, config(x=10, y=20)) == []
    current = config(x=10, z=5, y=30)
    current.features.embedding_dim = 8
    assert model_differences(saved, current) == [
        "features.embedding_dim: 16 in the checkpoint, 8 now",
        "features.sparse: 'z' is in the config, not in the checkpoint",
        "features.sparse[y].num_embeddings: 20 in the checkpoint, 30 now",
    ]
    current = config(x=10, y=20)
    current.features.sparse[0].embedding_dim = 32  # a width of its own
    assert model_differences(saved, current) == ["features.sparse[x].embedding_dim: 16 in the checkpoint, 32 now"]
    current.features.sparse[0].embedding_dim = 16  # the same width, stated
    assert model_differences(saved, current) == []


def test_checkpoints_are_ordered_by_samples_trained_not_by_step_number(tmp_path, single_process_group):
    # A run resumed on twice the ranks counts steps twice as large: its step 20 comes after step 30
    # of the run before it, and is what the next resume must take and pruning must keep.
    manager = CheckpointStore(tmp_path, keep_last=1, rank=0)
    manager.save(30, state(1.0), {}, samples=30 * 128)
    manager.save(20, state(2.0), {}, samples=30 * 128 + 5 * 256)
    assert manager.latest().name == "step_00000020"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000020"]
    assert manager.newest_valid().name == "step_00000020"


def test_the_best_checkpoint_is_a_pointer_that_keep_last_never_prunes(tmp_path, single_process_group):
    store = CheckpointStore(tmp_path, keep_last=1, rank=0)
    store.save(10, state(1.0), {}, samples=100, best={"metric": "auc", "value": 0.7})
    store.save(20, state(2.0), {}, samples=200)
    store.save(30, state(3.0), {}, samples=300)
    store.wait()  # pruned checkpoints are deleted in the background
    assert sorted(p.name for p in tmp_path.iterdir()) == [BEST_FILE, LATEST_FILE, "step_00000010", "step_00000030"]
    assert json.loads((tmp_path / BEST_FILE).read_text()) == {
        "checkpoint": "step_00000010",
        "step": 10,
        "samples": 100,
        "metric": "auc",
        "value": 0.7,
    }
    assert store.best_record()["checkpoint"] == "step_00000010"
    # An asynchronous save becomes the best only once it is published; the old best is pruned then.
    store.save(40, state(4.0), {}, asynchronous=True, samples=400)
    store.mark_best("step_00000040", {"metric": "auc", "value": 0.8})
    assert json.loads((tmp_path / BEST_FILE).read_text())["checkpoint"] == "step_00000010"
    store.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == [BEST_FILE, LATEST_FILE, "step_00000040"]
    # A published checkpoint becomes the best at once.
    store.save(50, state(5.0), {}, samples=500)
    store.mark_best("step_00000050", {"metric": "auc", "value": 0.9})
    store.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == [BEST_FILE, LATEST_FILE, "step_00000050"]


def test_find_checkpoint_prefers_the_best_where_asked_and_falls_back_to_the_newest(tmp_path, single_process_group):
    store = CheckpointStore(tmp_path / "checkpoints", keep_last=3, rank=0)
    store.save(1, state(1.0), {}, samples=1)
    assert find_checkpoint(tmp_path, prefer="best").name == "step_00000001"  # no best: the newest
    store.save(2, state(2.0), {}, samples=2, best={"metric": "logloss", "value": 0.4})
    store.save(3, state(3.0), {}, samples=3)
    assert find_checkpoint(tmp_path, prefer="best").name == "step_00000002"
    assert find_checkpoint(tmp_path / "checkpoints" / BEST_FILE).name == "step_00000002"
    assert find_checkpoint(tmp_path).name == "step_00000003"  # prefer="latest": load_from's
    # A damaged best is reported and skipped for the newest intact checkpoint; named itself, it is an error.
    distcp = next((tmp_path / "checkpoints" / "step_00000002").glob("*.distcp"))
    distcp.write_bytes(distcp.read_bytes()[:-1])
    assert find_checkpoint(tmp_path, prefer="best").name == "step_00000003"
    with pytest.raises(CheckpointError, match="the best checkpoint is not usable"):
        find_checkpoint(tmp_path / "checkpoints" / BEST_FILE)
