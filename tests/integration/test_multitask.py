"""Multi-task training through the path users take, on planted correlated tasks (a conversion only
after a click, with a signal of its own): 2 gloo ranks with row-wise sharded tables stopped part
way, resumed on 1 worker, the best checkpoint (by the conversion's AUC) exported and predicted,
per-task metrics in metrics.jsonl and TensorBoard, each task learned to near its planted best; and
early stopping judged by a configured task's metric, on an MMoE over DCN."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from app.data.synthetic import PROBABILITY_COLUMN
from app.metrics import auc
from tests.conftest import REPO, run_command
from tests.integration.test_export_predict import script
from tests.integration.test_train import check, records, torchrun

TASKS = ("click", "conversion")
# 16 tables of 10 rows: small enough that 60,000 rows teach every id, so that a short run gets near
# the planted truth. 2 epochs at 128 rows a rank: 468 steps (234 a rank and epoch on 2 ranks).
SPARSE = "[" + ",".join(f"{{name: cat_{i}, num_embeddings: 10}}" for i in range(16)) + "]"


def multitask(root: Path, run_name: str, *overrides: str):
    return [
        f"data.synthetic.root={root / 'data'}",
        f"output_root={root / 'outputs'}",
        f"run_name={run_name}",
        "logging.progress_bar=false",
        "features.dense=[int_0,int_1,int_2]",
        f"features.sparse={SPARSE}",
        "features.labels=[{name: click, weight: 1.0}, {name: conversion, weight: 1.0}]",
        "data.synthetic.train_rows=60000",
        "data.synthetic.val_rows=10000",
        "data.synthetic.rows_per_file=10000",
        "data.synthetic.rows_per_row_group=1000",
        "data.batch_size=128",
        "optim.lr=0.1",
        "trainer.epochs=2",
        *overrides,
    ]


def single_process(*args: str):
    return [sys.executable, "-m", "app.train", *args]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One run: 2 ranks (row-wise tables) to step 350 of 468, resumed on 1 worker to the end (its
    step 700 of 936); the best checkpoint is the conversion's."""
    root = tmp_path_factory.mktemp("multitask")
    # (Evaluations 150 steps apart: the resumed run's first step, 700 on 1 worker, is not one of them.)
    common = (
        "trainer.eval_every_n_steps=150",
        "checkpoint.every_n_steps=150",
        "trainer.early_stopping.task=conversion",
    )
    first = check(
        run_command(torchrun(*multitask(root, "mt", *common, "sharding=row_wise", "trainer.max_steps=350")), cwd=REPO)
    )
    run_dir = root / "outputs" / "mt"
    plan = json.loads((run_dir / "plan.json").read_text())  # before the 1-worker run writes its own
    assert plan["world_size"] == 2 and {t["sharding_type"] for t in plan["tables"].values()} == {"row_wise"}
    second = check(run_command(single_process(*multitask(root, "mt", *common)), cwd=REPO))
    return root, root / "outputs" / "mt", first, second


def test_two_ranks_resumed_on_one_then_exported_predict_a_column_per_task(trained):
    root, run_dir, _first, second = trained
    assert "at step 700 " in second  # resumed where the 2-rank run stopped
    evals = records(run_dir, "eval")
    final = evals[-1]
    assert final["samples"] == 10000
    for record in evals:  # per-task metrics; the unprefixed ones are the configured task's
        for task in TASKS:
            assert {f"{task}/{m}" for m in ("auc", "logloss", "ne", "calibration")} <= record.keys()
        assert record["auc"] == record["conversion/auc"] and record["logloss"] == record["conversion/logloss"]
    assert f"final validation AUC {final['auc']:.4f}" in second
    assert f"task click: validation AUC {final['click/auc']:.4f}" in second

    # checkpoints/best is the best by the conversion's AUC, and export takes it.
    best = json.loads((run_dir / "checkpoints" / "best").read_text())
    assert best["metric"] == "conversion/auc"
    assert best["value"] == max(r["conversion/auc"] for r in evals)
    best_eval = next(r for r in evals if r["step"] == best["step"])
    check(run_command(script("export.py", run_dir, "--out", root / "exported"), cwd=root))
    val = next((root / "data").iterdir()) / "val"
    predictions = root / "predictions.parquet"
    printed = check(
        run_command(script("predict.py", "--model", root / "exported", "--data", val, "--out", predictions), cwd=root)
    )
    table = pq.read_table(predictions)
    assert table.column_names == ["prediction_click", "prediction_conversion", "label_click", "label_conversion"]
    assert table.num_rows == 10000
    for task in TASKS:
        printed_auc = float(re.search(rf"task {task}: AUC ([0-9.]+)", printed).group(1))
        assert printed_auc == pytest.approx(best_eval[f"{task}/auc"], abs=1e-6)
        labels = np.concatenate(
            [pq.read_table(f, columns=[task])[task].to_numpy() for f in sorted(val.glob("*.parquet"))]
        )
        assert np.array_equal(table[f"label_{task}"].to_numpy(), labels)
        written = auc(torch.from_numpy(table[f"prediction_{task}"].to_numpy().copy()), torch.from_numpy(labels))
        assert written == pytest.approx(best_eval[f"{task}/auc"], abs=1e-4)  # float32 probabilities tie a few pairs


def test_per_task_metrics_reach_tensorboard(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, _, _ = trained
    tags, logged = set(), {}
    for events_file in (run_dir / "tb").rglob("events.out.tfevents.*"):  # one per run: 2 ranks, then 1
        events = EventAccumulator(str(events_file))
        events.Reload()
        tags |= set(events.Tags()["scalars"])
        for task in TASKS:
            for event in events.Scalars(f"eval/{task}/auc"):
                logged[(task, event.step)] = event.value
    for task in TASKS:
        assert {f"eval/{task}/{m}" for m in ("auc", "logloss", "ne", "calibration")} <= tags
    assert "eval/auc" in tags
    evals = records(run_dir, "eval")
    assert len(logged) == 2 * len(evals)
    for record in evals:
        for task in TASKS:
            assert logged[(task, record["step"])] == pytest.approx(record[f"{task}/auc"], rel=1e-6)


def test_each_task_is_learned_to_near_its_planted_best(trained):
    root, run_dir, _, _ = trained
    final = records(run_dir, "eval")[-1]
    dataset = next((root / "data").iterdir())
    best = json.loads((dataset / "metadata.json").read_text())["splits"]["val"]["tasks"]
    # Measured: click 0.850 against its best 0.871, conversion 0.879 against 0.918 (CPU training is
    # deterministic: the same figures every run).
    for task in TASKS:
        assert final[f"{task}/auc"] > best[task]["best_auc"] - 0.05, (task, final, best)
    # The conversion's own signal is learned: the model ranks conversions better than the true click
    # probability does (0.829).
    val = pq.read_table(dataset / "val", columns=["conversion", PROBABILITY_COLUMN])
    by_click = auc(torch.from_numpy(val[PROBABILITY_COLUMN].to_numpy()), torch.from_numpy(val["conversion"].to_numpy()))
    assert final["conversion/auc"] > by_click + 0.02


def test_early_stopping_follows_the_configured_tasks_metric(trained, tmp_path):
    root, _, _, _ = trained
    printed = check(
        run_command(
            single_process(
                *multitask(
                    root,
                    "stop",
                    "model=dcn",
                    "model.multi_task=mmoe",
                    "model.num_experts=2",
                    "trainer.eval_every_n_steps=10",
                    "trainer.early_stopping.task=conversion",
                    "trainer.early_stopping.target=0.7",
                    "trainer.max_steps=200",
                )
            ),
            cwd=REPO,
        )
    )
    run_dir = root / "outputs" / "stop"
    evals = records(run_dir, "eval")
    summary = json.loads((run_dir / "summary.json").read_text())
    stop = evals[-1]
    assert stop["conversion/auc"] >= 0.7 and all(r["conversion/auc"] < 0.7 for r in evals[:-1])
    assert summary["step"] == stop["step"] < 200
    assert summary["stopped_early"].startswith(
        f"validation conversion/auc {stop['conversion/auc']:.6f} reached trainer.early_stopping.target=0.7"
    )
    assert "stopping early at step" in printed
