"""Export of a sharded checkpoint to one unsharded file, loading it without torch.distributed, and
scoring Parquet files with it. The checkpoints are real ones: a one-rank DMP model, trained a step."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from app.checkpoint import CheckpointStore
from app.config import Config, FeaturesConfig, ModelConfig, ShardingConfig, SparseFeature, TrainerConfig
from app.data import DataError
from app.distributed import DistEnv
from app.export import CONFIG_FILE, MODEL_FILE, ExportError, check_inputs, export_checkpoint, load_exported, score_files
from app.features import FeatureSchema
from app.job import build_sharded_model
from app.optim import optimizer_and_schedule
from tests.conftest import REPO, run_command
from tests.unit.test_checkpoint import forge_metadata

CPU = torch.device("cpu")


def small_config(sharding_type: str = "row_wise", data_type: str = "fp32", precision: str = "fp32") -> Config:
    return Config(
        features=FeaturesConfig(
            dense=["d0", "d1", "d2"],
            sparse=[SparseFeature("a", 50), SparseFeature("b", 20, hotness=3)],
            embedding_dim=8,
            data_type=data_type,
        ),
        model=ModelConfig(dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1]),
        sharding=ShardingConfig(sharding_types=[sharding_type]),
        trainer=TrainerConfig(precision=precision),
    ).validate()


def batch(size: int, seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.cat([torch.ones(size, dtype=torch.long), torch.randint(0, 4, (size,), generator=generator)])
    return Batch(
        dense_features=torch.rand(size, 3, generator=generator),
        sparse_features=KeyedJaggedTensor.from_lengths_sync(
            keys=["a", "b"], values=torch.randint(0, 20, (int(lengths.sum()),), generator=generator), lengths=lengths
        ),
        labels=torch.randint(0, 2, (size,), generator=generator).float(),
    )


@pytest.fixture
def process_group():
    """A one-rank group that the test may destroy itself, to export and load without one."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def train_and_save(run_dir: Path, config: Config) -> torch.Tensor:
    """A sharded model trained one step and checkpointed as the trainer does; returns its logits
    on batch(64, seed=1), then destroys the process group."""
    model = build_sharded_model(config, FeatureSchema.from_config(config.features), DistEnv(0, 1, 0, 1, CPU), None)
    optimizer, _ = optimizer_and_schedule(model, config.optim, total_steps=1)
    loss, _ = model(batch(32))
    loss.backward()
    optimizer.step()
    CheckpointStore(run_dir / "checkpoints", keep_last=1, rank=0).save(
        1,
        {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
        {"world_size": 1, "config": dataclasses.asdict(config)},
    )
    model.eval()
    with torch.no_grad():
        _, (_, logits, _) = model(batch(64, seed=1))
    dist.destroy_process_group()
    return logits


@pytest.mark.parametrize(
    "sharding_type, data_type, precision",
    [
        ("row_wise", "fp32", "fp32"),
        ("table_wise", "fp32", "fp32"),
        ("column_wise", "fp32", "fp32"),
        ("data_parallel", "fp32", "fp32"),
        ("table_wise", "fp16", "fp32"),
        ("table_wise", "fp32", "fp16"),
    ],
)  # the dense part in the run's precision
def test_the_exported_model_scores_exactly_as_the_sharded_one(
    tmp_path, process_group, sharding_type, data_type, precision
):
    config = small_config(sharding_type, data_type, precision)
    expected = train_and_save(tmp_path / "run", config)

    out = export_checkpoint(tmp_path / "run", tmp_path / "exported")  # a run dir: its newest checkpoint
    model, loaded_config = load_exported(out)
    assert not dist.is_initialized()
    assert loaded_config == config and not model.training
    with torch.no_grad():
        _, (_, logits, _) = model(batch(64, seed=1))
    assert torch.equal(logits, expected)

    info = json.loads((out / CONFIG_FILE).read_text())
    assert info["step"] == 1 and info["parameters"] == sum(p.numel() for p in model.parameters())
    # A plain dict of tensors: loadable without unpickling anything else.
    state = torch.load(out / MODEL_FILE, weights_only=True)
    assert type(state) is dict and state.keys() == model.state_dict().keys()
    assert all(type(t) is torch.Tensor for t in state.values())
    table_dtypes = {t.dtype for name, t in state.items() if "embedding_bags" in name}
    assert table_dtypes == {torch.float16 if data_type == "fp16" else torch.float32}


def test_export_accepts_a_checkpoint_dir_and_replaces_an_earlier_export(tmp_path, process_group):
    train_and_save(tmp_path / "run", small_config())
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / MODEL_FILE).write_text("an older export")
    out = export_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000001", tmp_path / "exported")
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, MODEL_FILE]
    load_exported(out)


def test_missing_or_incomplete_checkpoints_fail_naming_the_path(tmp_path, process_group):
    train_and_save(tmp_path / "run", small_config())
    step = tmp_path / "run" / "checkpoints" / "step_00000001"

    def error(path: Path) -> str:
        with pytest.raises(ExportError) as raised:
            export_checkpoint(path, tmp_path / "out")
        assert str(path) in str(raised.value)
        return str(raised.value)

    assert "no such directory" in error(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "no checkpoint there" in error(tmp_path / "empty")
    (step / "__0_0.distcp").rename(tmp_path / "shard")
    assert "__0_0.distcp" in error(step)
    (step / ".metadata").unlink()
    assert ".metadata is missing" in error(step)
    (step / "meta.json").write_text("[1, 2, 3]")
    assert "meta.json is not a JSON object" in error(step)
    (step / "meta.json").unlink()
    assert "meta.json is missing or unreadable" in error(step)
    assert "no checkpoint there" in error(tmp_path / "run")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_whose_metadata_names_code_is_refused_not_run(tmp_path, process_group):
    train_and_save(tmp_path / "run", small_config())
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    marker = tmp_path / "ran"
    forge_metadata(step, marker)
    with pytest.raises(ExportError, match=re.escape(f"{step / '.metadata'}: refused to load: it names io.open")):
        export_checkpoint(tmp_path / "run", tmp_path / "exported")
    assert not marker.exists() and not (tmp_path / "exported").exists()


def test_incomplete_or_foreign_exports_fail_naming_the_path(tmp_path, process_group):
    train_and_save(tmp_path / "run", small_config())
    out = export_checkpoint(tmp_path / "run", tmp_path / "exported")
    with pytest.raises(ExportError, match="no such directory"):
        load_exported(tmp_path / "nowhere")

    torch.save({"w": Payload()}, out / MODEL_FILE)  # anything but tensors is refused, not unpickled
    with pytest.raises(ExportError, match=re.escape(f"{out / MODEL_FILE}: not a file of plain tensors")):
        load_exported(out)
    torch.save({"w": torch.zeros(1)}, out / MODEL_FILE)
    with pytest.raises(ExportError, match=re.escape(f"{out / MODEL_FILE}: not the model {CONFIG_FILE} describes")):
        load_exported(out)
    (out / MODEL_FILE).write_bytes(b"not a torch.save file")
    with pytest.raises(ExportError, match=re.escape(f"{out / MODEL_FILE}: not a file of plain tensors")):
        load_exported(out)
    (out / CONFIG_FILE).unlink()
    with pytest.raises(ExportError, match=re.escape(f"{out}: incomplete export, {CONFIG_FILE} is missing")):
        load_exported(out)


JUNK = {
    "text starting with r": b"rubbish, not a model\n",
    "empty": b"",
    "a pickle of no tensors": b"\x80\x02]q\x00.",
    "random bytes": bytes(range(256)) * 4,
    "a zip of junk": b"PK\x03\x04" + b"\x00" * 26 + b"junk" + bytes(range(200)),
}


@pytest.mark.parametrize("junk", JUNK)
def test_predict_refuses_a_model_file_of_junk_in_one_line(tmp_path, process_group, junk):
    import zipfile

    train_and_save(tmp_path / "run", small_config())
    out = export_checkpoint(tmp_path / "run", tmp_path / "exported")
    if junk == "a zip of junk":  # a valid archive whose data.pkl is junk
        with zipfile.ZipFile(out / MODEL_FILE, "w") as archive:
            archive.writestr("model/data.pkl", b"r" + bytes(range(100)))
            archive.writestr("model/version", b"3\n")
    else:
        (out / MODEL_FILE).write_bytes(JUNK[junk])
    data = write_parquet(tmp_path / "data.parquet", rows=40, start=0)
    result = run_command(
        [
            sys.executable,
            str(REPO / "scripts" / "predict.py"),
            "--model",
            str(out),
            "--data",
            data,
            "--out",
            str(tmp_path / "p.parquet"),
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.startswith(f"error: {out / MODEL_FILE}: not ") and result.stderr.count("\n") == 1, (
        result.stderr[-3000:]
    )


class Payload:
    """Not a tensor: what a model file must never make torch.load build."""


def write_parquet(path: Path, rows: int, start: int, labeled: bool = True) -> str:
    index = np.arange(start, start + rows)
    columns = {
        "d0": pa.array(index / 100.0),
        "d1": pa.array(np.ones(rows)),
        "d2": pa.array(index % 5, type=pa.float32()),
        "a": pa.array(index % 50, type=pa.int64()),
        "b": pa.array([[int(i % 20)] * int(i % 4) for i in index], type=pa.list_(pa.int64())),
    }
    if labeled:
        columns = {"label": pa.array(index % 2), **columns}
    pq.write_table(pa.table(columns), path, row_group_size=30)
    return str(path)


def test_score_files_scores_every_row_in_file_order(tmp_path, process_group):
    train_and_save(tmp_path / "run", small_config())
    model, config = load_exported(export_checkpoint(tmp_path / "run", tmp_path / "exported"))
    schema = FeatureSchema.from_config(config.features)
    files = [write_parquet(tmp_path / "p0.parquet", 70, 0), write_parquet(tmp_path / "p1.parquet", 45, 70)]
    assert check_inputs(files, schema)

    scored = list(score_files(model, config, files, batch_size=16, labeled=True))
    logits, labels = torch.cat([s[0] for s in scored]), torch.cat([s[1] for s in scored])
    assert torch.equal(labels, torch.from_numpy(np.arange(115) % 2).float())
    # Row i of the output is row i of the files read in order: the second file alone gives the tail.
    assert torch.equal(torch.cat([s[0] for s in score_files(model, config, files[1:], 16, True)]), logits[70:])
    unlabeled = [
        write_parquet(tmp_path / "u0.parquet", 70, 0, labeled=False),
        write_parquet(tmp_path / "u1.parquet", 45, 70, labeled=False),
    ]
    assert not check_inputs(unlabeled, schema)
    again = list(score_files(model, config, unlabeled, batch_size=50, labeled=False))
    assert all(s[1] is None for s in again)
    # Other batches, no labels: the same scores (a row's score does not depend on its batch).
    torch.testing.assert_close(torch.cat([s[0] for s in again]), logits, rtol=0, atol=1e-6)

    with pytest.raises(DataError, match=r"u0.parquet: no 'label' column, but .*p0.parquet has one"):
        check_inputs([files[0], unlabeled[0]], schema)
