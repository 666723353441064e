"""Multi-task training's parts: the config's checks, the models (towers, MMoE) and their loss, labels
decoded per task, per-task metrics, the planted correlated tasks, and checkpoints of another task set."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from torchrec.models.dlrm import DLRMTrain
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from app.checkpoint.checkpointer import model_differences
from app.config import ConfigError, DataConfig, FeaturesConfig, ModelConfig, SparseFeature, SyntheticConfig, TaskLabel
from app.data import DataError
from app.data.batch import decode
from app.data.synthetic import (
    PROBABILITY_COLUMN,
    best_achievable,
    dataset_dir,
    ensure_dataset,
    generate,
    task_probability_column,
)
from app.features import FeatureSchema
from app.hydra_edge import compose_config
from app.metrics import EvalMetrics, TaskMetrics, auc
from app.models import build_model
from app.models.multitask import MixtureOfExperts, MultiTaskTrain, TaskTowers

TASKS = "features.labels=[{name: click, weight: 1.0}, {name: conversion, weight: 0.5}]"


def features(**overrides) -> FeaturesConfig:
    values = dict(
        dense=["d0", "d1", "d2"],
        sparse=[SparseFeature("a", 50), SparseFeature("b", 20, hotness=3)],
        embedding_dim=8,
        labels=[TaskLabel("click", 1.0), TaskLabel("conversion", 0.5)],
    )
    values.update(overrides)
    return FeaturesConfig(**values)


SCHEMA = FeatureSchema.from_config(features())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["features.labels=[{name: click}]"], "features.labels must list at least two tasks"),
        (["features.labels=[{name: click}, {name: conv, weight: -1}]"], "features.labels[1].weight must be a finite"),
        (
            ["features.labels=[{name: click, weight: 0}, {name: conv, weight: 0}]"],
            "at least one task needs a weight > 0",
        ),
        (["features.labels=[{name: click}, {name: ''}]"], "features.labels[1].name must be a non-empty"),
        (["features.labels=[{name: click}, {name: int_0}]"], "column names must be unique; repeated: ['int_0']"),
        (
            [TASKS, "trainer.early_stopping.task=purchase"],
            "trainer.early_stopping.task='purchase' is not a task: the "
            "tasks (features.labels) are ['click', 'conversion']",
        ),
        (["trainer.early_stopping.task=label"], "with one task leave it null"),
        ([TASKS, "model.multi_task=moe"], "model.multi_task='moe' is not allowed"),
        ([TASKS, "model.num_experts=0"], "model.num_experts must be >= 1"),
        ([TASKS, "model.tower_layer_sizes=[0]"], "model.tower_layer_sizes must be positive sizes"),
    ],
)
def test_impossible_task_settings_fail_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose_config(overrides)


def test_the_primary_task_is_the_configured_one_or_the_first():
    assert compose_config([]).features.tasks() == ["label"]
    config = compose_config([TASKS])
    assert config.features.tasks() == ["click", "conversion"] and config.primary_task() == "click"
    assert compose_config([TASKS, "trainer.early_stopping.task=conversion"]).primary_task() == "conversion"
    assert FeatureSchema.from_config(config.features).columns[:3] == ["click", "conversion", "int_0"]


def batch(size: int, tasks: int) -> Batch:
    lengths = torch.tensor([1] * size + [2] * size)
    return Batch(
        dense_features=torch.rand(size, 3),
        sparse_features=KeyedJaggedTensor.from_lengths_sync(
            keys=["a", "b"], values=torch.randint(0, 20, (int(lengths.sum()),)), lengths=lengths
        ),
        labels=torch.randint(0, 2, (size, tasks)).float(),
    )


@pytest.mark.parametrize("arch", ["dlrm", "dcn", "deepfm"])
@pytest.mark.parametrize("kind", ["shared_bottom", "mmoe"])
def test_every_architecture_gets_a_logit_per_task_and_a_weighted_loss(arch, kind, single_process_group):
    torch.manual_seed(0)
    config = ModelConfig(
        arch=arch,
        dense_arch_layer_sizes=[16, 8],
        over_arch_layer_sizes=[16, 1],
        dcn_low_rank_dim=4,
        multi_task=kind,
        tower_layer_sizes=[4],
        num_experts=3,
    )
    plain = build_model(config, SCHEMA, torch.device("cpu"), task_weights=[1.0, 0.5])
    assert isinstance(plain, MultiTaskTrain)
    assert isinstance(plain.model.over_arch, MixtureOfExperts if kind == "mmoe" else TaskTowers)
    # The shared parts keep their single-task names: sharding plans and the tables' path see no difference.
    single = build_model(config, dataclasses.replace(SCHEMA, labels=()), torch.device("cpu"))
    assert isinstance(single, DLRMTrain)
    shared = {k for k in single.state_dict() if not k.startswith("model.over_arch.")}
    assert shared <= set(plain.state_dict())

    model = DistributedModelParallel(plain, device=torch.device("cpu"))
    data = batch(6, 2)
    loss, (detached, logits, labels) = model(data)
    assert logits.shape == (6, 2) and torch.equal(labels, data.labels)
    expected = F.binary_cross_entropy_with_logits(
        logits[:, 0], labels[:, 0]
    ) + 0.5 * F.binary_cross_entropy_with_logits(logits[:, 1], labels[:, 1])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6) and detached.item() == pytest.approx(loss.item())
    loss.backward()
    for tower in plain.model.over_arch.towers:  # every tower learns (its logit's bias at least)
        assert sum(float(p.grad.abs().sum()) for p in tower.parameters() if p.grad is not None) > 0


def test_a_task_of_weight_zero_trains_nothing_of_its_own():
    torch.manual_seed(0)
    config = ModelConfig(dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1])
    model = build_model(config, SCHEMA, torch.device("cpu"), tables_device=torch.device("cpu"), task_weights=[1.0, 0.0])
    loss, _ = model(batch(6, 2))
    loss.backward()
    towers = model.model.over_arch.towers
    assert all(p.grad is None or not p.grad.any() for p in towers[1].parameters())
    assert any(p.grad is not None and p.grad.any() for p in towers[0].parameters())


def test_labels_are_decoded_per_task_and_a_bad_one_names_its_column():
    columns = {
        "click": pa.array([0, 1, 1]),
        "conversion": pa.array([0.0, 0.0, 1.0]),
        "d0": pa.array([1.0, 2.0, 3.0]),
        "d1": pa.array([0.0] * 3),
        "d2": pa.array([0.0] * 3),
        "a": pa.array([1, 2, 3]),
        "b": pa.array([[1], [2, 3], []], type=pa.list_(pa.int64())),
    }
    rows = decode(pa.table(columns), SCHEMA, "f.parquet row group 0")
    assert rows.labels.tolist() == [[0, 0], [1, 0], [1, 1]]
    assert rows.take(np.array([2, 0])).labels.tolist() == [[1, 1], [0, 0]]
    assert rows.to_batch(SCHEMA.sparse_names).labels.shape == (3, 2)
    columns["conversion"] = pa.array([0, 2, 1])
    with pytest.raises(DataError, match=re.escape("f.parquet row group 0, row 1: column 'conversion' has label 2.0")):
        decode(pa.table(columns), SCHEMA, "f.parquet row group 0")


def test_task_metrics_are_each_tasks_and_the_primarys_unprefixed():
    logits = torch.tensor([[2.0, -1.0], [-1.0, 0.5], [0.5, 1.5], [-2.0, -0.5]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    metrics = TaskMetrics(torch.device("cpu"), ["click", "conversion"], primary="conversion")
    metrics.update(logits[:2], labels[:2])
    metrics.update(logits[2:], labels[2:])
    result = metrics.compute()
    for task, column in (("click", 0), ("conversion", 1)):
        alone = EvalMetrics(torch.device("cpu"))
        alone.update(logits[:, column], labels[:, column])
        for key, value in alone.compute().items():
            if key != "samples":
                assert result[f"{task}/{key}"] == pytest.approx(value)
            if task == "conversion":
                assert result[key] == pytest.approx(value)


def synthetic(tmp_path) -> SyntheticConfig:
    return SyntheticConfig(
        root=str(tmp_path), train_rows=2000, val_rows=4000, rows_per_file=4000, rows_per_row_group=500, seed=3
    )


def test_planted_tasks_leave_the_first_tasks_rows_as_they_were(tmp_path):
    single = FeatureSchema.from_config(features(labels=[], label="click"))
    assert "labels" not in json.dumps(str(dataset_dir(single, synthetic(tmp_path))))
    assert dataset_dir(single, synthetic(tmp_path)) != dataset_dir(SCHEMA, synthetic(tmp_path))
    # A FeaturesConfig finds the dataset its schema was generated under.
    assert dataset_dir(features(), synthetic(tmp_path)) == dataset_dir(SCHEMA, synthetic(tmp_path))
    generate(single, synthetic(tmp_path), tmp_path / "single")
    metadata = generate(SCHEMA, synthetic(tmp_path), tmp_path / "multi")
    alone = pq.read_table(tmp_path / "single/val/part-00000.parquet")
    both = pq.read_table(tmp_path / "multi/val/part-00000.parquet")
    assert both.select(alone.column_names).equals(alone)  # the features, click and its probability: the same rows
    click, conversion = both["click"].to_numpy(), both["conversion"].to_numpy()
    assert conversion.sum() > 0 and not (conversion & ~click.astype(bool)).any()  # only after a click
    truth = both[task_probability_column("conversion")].to_numpy()
    assert (truth <= both[PROBABILITY_COLUMN].to_numpy() + 1e-12).all()
    val = metadata["splits"]["val"]["tasks"]
    assert val["click"]["best_auc"] == metadata["splits"]["val"]["best_auc"]
    assert val["conversion"]["positive_rate"] == pytest.approx(conversion.mean())
    # Correlated: the click truth ranks conversions well; the conversion's own signal ranks them better still.
    by_click = auc(torch.from_numpy(both[PROBABILITY_COLUMN].to_numpy()), torch.from_numpy(conversion))
    assert 0.6 < by_click < val["conversion"]["best_auc"] - 0.02
    # The best achievable AUC printed after training is the primary task's, whichever it is.
    ensure_dataset(SCHEMA, synthetic(tmp_path))
    data = DataConfig(synthetic=synthetic(tmp_path))
    assert best_achievable(features(), data, "conversion")["auc"] == val["conversion"]["best_auc"]
    assert best_achievable(features(), data)["auc"] == val["click"]["best_auc"]


def test_a_checkpoint_of_other_tasks_or_towers_is_another_model():
    base = compose_config([TASKS])
    assert model_differences(base, compose_config([TASKS.replace("0.5", "2.0")])) == []  # weights change no shape
    other = compose_config(["features.labels=[{name: click}, {name: purchase}]", "model.multi_task=mmoe"])
    assert model_differences(base, other) == [
        "features.labels: ['click', 'conversion'] in the checkpoint, ['click', 'purchase'] now",
        "model.multi_task: 'shared_bottom' in the checkpoint, 'mmoe' now",
    ]
    assert (
        model_differences(compose_config([]), base)[0]
        == "features.labels: ['label'] in the checkpoint, ['click', 'conversion'] now"
    )


def test_a_multi_task_model_takes_sequence_features_too():
    from app.config import SequenceFeature
    from app.data.batch import table_to_batch

    torch.manual_seed(0)
    schema = FeatureSchema.from_config(
        features(
            dense=["d0"],
            sparse=[SparseFeature("item", 10)],
            sequence=[SequenceFeature("history", 12, max_length=4, target="item")],
        )
    )
    config = ModelConfig(dense_arch_layer_sizes=[8], over_arch_layer_sizes=[16, 1], sequence_attention_layer_sizes=[6])
    model = build_model(config, schema, torch.device("cpu"), tables_device=torch.device("cpu"))
    data = table_to_batch(
        pa.table(
            {
                "click": pa.array([0, 1, 1]),
                "conversion": pa.array([0, 0, 1]),
                "d0": pa.array(np.ones(3)),
                "item": pa.array([1, 2, 3], type=pa.int64()),
                "history": pa.array([[1, 5, 7], [], [3]], type=pa.list_(pa.int64())),
            }
        ),
        schema,
    )
    loss, (_, logits, labels) = model(data)
    assert logits.shape == labels.shape == (3, 2)
    loss.backward()
    assert any(p.grad is not None and p.grad.any() for p in model.model.sequence_arch.parameters())
