"""The training loop's bookkeeping: where segments end, when it evaluates, logs and checkpoints.

One real run in this process (`python -m app.train`'s path for one worker, without a subprocess),
inspected by several tests; the multi-process loop runs in tests/integration.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from app import job
from app.checkpoint import RunShape, TrainState
from app.config import EarlyStoppingConfig
from app.early_stopping import EarlyStopping
from app.hydra_edge import compose_config
from app.trainer import segment_length
from app.training_loss import LossWindow

STEPS_PER_EPOCH = 4000 // 128  # experiment=tiny on one rank: 31 full batches
CADENCE = [
    "trainer.epochs=2",
    "trainer.eval_every_n_steps=10",
    "trainer.eval_max_batches=1",
    "checkpoint.every_n_steps=7",
    "checkpoint.keep_last=100",
    "trainer.log_every_n_steps=5",
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """experiment=tiny for 2 epochs, evaluating every 10 steps and saving every 7, run to the end."""
    root = tmp_path_factory.mktemp("trainer")
    config = compose_config(
        [
            "experiment=tiny",
            f"output_root={root}",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            f"data.synthetic.root={root / 'data'}",
            *CADENCE,
        ]
    )
    run_dir = root / config.run_name
    result = job.run(config, run_dir)
    return run_dir, result


def records(run_dir: Path, kind: str):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_segments_end_at_the_epoch_the_run_and_every_cadence():
    shape = RunShape(world_size=1, global_batch_size=128, steps_per_epoch=31, total_steps=62)
    assert segment_length(TrainState(), shape, 10, 7) == 7
    assert segment_length(TrainState(step=7, batches_done=7), shape, 10, 7) == 3
    assert segment_length(TrainState(step=28, batches_done=28), shape, 10, 7) == 2  # 30: eval
    assert segment_length(TrainState(step=30, batches_done=30), shape, 10, 7) == 1  # 31: the epoch ends
    assert segment_length(TrainState(step=31, epoch=1), shape, 10, 7) == 4  # 35: a checkpoint
    assert segment_length(TrainState(step=60, epoch=1, batches_done=29), shape, 10, 7) == 2  # the run ends
    assert segment_length(TrainState(step=3, batches_done=3), shape, 0, 0) == 28  # no cadence: the epoch
    # A resumed run on another shape starts mid-epoch: its boundaries are its own multiples.
    assert segment_length(TrainState(step=13, batches_done=13), shape, 0, 7) == 1


def test_a_run_evaluates_logs_and_checkpoints_at_its_cadences_and_at_the_end(finished_run):
    run_dir, result = finished_run
    total = 2 * STEPS_PER_EPOCH
    assert [r["step"] for r in records(run_dir, "eval")] == [10, 20, 30, 40, 50, 60, total]
    assert records(run_dir, "eval")[-1]["auc"] == result["auc"]
    assert [r["step"] for r in records(run_dir, "train")] == list(range(5, total + 1, 5))
    saved = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    # ... and at every evaluation that improves the best validation AUC (checkpoints/best names the last).
    improved, best = [], -1.0
    for record in records(run_dir, "eval"):
        if record["auc"] > best:
            improved, best = [*improved, record["step"]], record["auc"]
    assert 10 in improved and len(improved) >= 2
    assert saved == sorted({*range(7, total, 7), total, *improved})
    assert json.loads((run_dir / "checkpoints" / "best").read_text())["checkpoint"] == f"step_{improved[-1]:08d}"


def test_checkpoints_hold_the_data_position_across_the_epoch_boundary(finished_run):
    run_dir, _ = finished_run
    positions = {}
    for step in (28, 35, 2 * STEPS_PER_EPOCH):
        meta = json.loads((run_dir / "checkpoints" / f"step_{step:08d}" / "meta.json").read_text())
        positions[step] = {key: meta["train_state"][key] for key in ("step", "epoch", "batches_done", "samples")}
        assert (meta["world_size"], meta["global_batch_size"], meta["steps_per_epoch"]) == (1, 128, STEPS_PER_EPOCH)
    assert positions[28] == {"step": 28, "epoch": 0, "batches_done": 28, "samples": 28 * 128}
    assert positions[35] == {"step": 35, "epoch": 1, "batches_done": 35 - STEPS_PER_EPOCH, "samples": 35 * 128}
    assert positions[62] == {"step": 62, "epoch": 1, "batches_done": STEPS_PER_EPOCH, "samples": 62 * 128}


def test_the_loss_window_keeps_its_totals_on_the_device_of_the_losses():
    # Meta stands in for CUDA: it refuses CPU tensors beside its own, as CUDA does in stack/cat.
    window = LossWindow(start=0.0)
    for loss in (0.5, 0.25):
        window.add(torch.tensor(loss, device="meta"))
    totals = window.totals()
    assert totals.device.type == "meta" and totals.shape == (2,)
    window = LossWindow(start=0.0)
    window.add(torch.tensor(0.5))
    window.add(torch.tensor(0.25))
    assert window.totals().tolist() == [0.75, 2.0]
    assert window.mean_loss() == (0.375, None)


def test_bf16_with_fp16_tables_trains_checkpoints_fp16_and_resumes(tmp_path):
    """trainer.precision=bf16 and features.data_type=fp16 through the job's own path: the
    checkpoint holds the tables in fp16, and the same command resumes from it."""
    from torch.distributed.checkpoint import FileSystemReader

    overrides = [
        "experiment=tiny",
        f"output_root={tmp_path}",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        f"data.synthetic.root={tmp_path / 'data'}",
        "trainer.precision=bf16",
        "features.data_type=fp16",
        "checkpoint.every_n_steps=3",
        "trainer.eval_max_batches=1",
    ]
    first = job.run(compose_config([*overrides, "trainer.max_steps=6"]), tmp_path / "tiny")
    step_6 = tmp_path / "tiny" / "checkpoints" / "step_00000006"
    metadata = FileSystemReader(str(step_6)).read_metadata().state_dict_metadata
    tables = {
        key: value.properties.dtype
        for key, value in metadata.items()
        if key.startswith("model.") and "embedding_bags" in key
    }
    assert tables and set(tables.values()) == {torch.float16}
    second = job.run(compose_config([*overrides, "trainer.max_steps=9"]), tmp_path / "tiny")
    # Resumed at step 6: started over, it would have logged step 5 again.
    assert [r["step"] for r in records(tmp_path / "tiny", "train")] == [5]
    assert [r["step"] for r in records(tmp_path / "tiny", "eval")] == [6, 9]
    assert first["auc"] > 0.5 and second["auc"] > 0.5


def judge(config: EarlyStoppingConfig, values, state=None):
    """The early-stopping record after evaluations of `values`, and the first stop reason (with its index)."""
    stopping, state = EarlyStopping(config), state or TrainState()
    for index, value in enumerate(values):
        state.step = 10 * (index + 1)
        stopping.update(state, {config.metric: value})
        reason = stopping.stop_reason(state, {config.metric: value})
        if reason:
            return state, (index, reason)
    return state, None


def test_early_stopping_counts_evaluations_without_an_improvement_of_more_than_min_delta():
    state, stop = judge(EarlyStoppingConfig(patience=2, min_delta=0.01), [0.70, 0.705, 0.72, 0.725, 0.729, 0.74])
    # 0.705 and 0.725/0.729 are within min_delta of the best: not improvements.
    assert stop is not None and stop[0] == 4 and "in 2 evaluations" in stop[1] and "best 0.720000 at step 30" in stop[1]
    assert (state.best_value, state.best_step, state.evals_since_best) == (0.72, 30, 2)
    # Lower is better for logloss; nan (one class) is never an improvement, nor counted toward the
    # patience; patience 0 never stops.
    state, stop = judge(EarlyStoppingConfig(metric="logloss", patience=1), [0.5, float("nan"), float("nan"), 0.6])
    assert stop[0] == 3 and state.best_value == 0.5 and state.evals_since_best == 1
    assert judge(EarlyStoppingConfig(metric="ne", patience=0), [0.9, 0.95, 0.97, 0.99])[1] is None


def test_early_stopping_stops_at_the_target_and_resumes_from_the_train_state():
    _, stop = judge(EarlyStoppingConfig(target=0.80275), [0.79, 0.8027, 0.80275, 0.81])
    assert stop == (2, "validation auc 0.802750 reached trainer.early_stopping.target=0.80275")
    _, stop = judge(EarlyStoppingConfig(metric="logloss", target=0.45), [0.5, 0.44])
    assert stop[0] == 1
    # Resumed after 2 of 3 evaluations: the same decision as the uninterrupted run.
    config = EarlyStoppingConfig(patience=2)
    straight, straight_stop = judge(config, [0.7, 0.69, 0.68])
    resumed, _ = judge(config, [0.7, 0.69])
    resumed, resumed_stop = judge(config, [0.68], state=TrainState(**dataclasses.asdict(resumed)))
    assert straight_stop[1] == resumed_stop[1] and resumed.evals_since_best == straight.evals_since_best == 2
    # A best by another metric (the config changed) starts over.
    other = TrainState(best_metric="logloss", best_value=0.4, best_step=10, evals_since_best=3)
    EarlyStopping(EarlyStoppingConfig()).resume(other)
    assert (other.best_metric, other.best_value, other.evals_since_best) == (None, None, 0)
