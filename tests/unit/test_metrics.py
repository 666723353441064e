"""AUC / logloss / NE / calibration against hand-computed values, across 2 real gloo ranks, and
the jsonl and TensorBoard sinks."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from app.metrics import EvalMetrics, MetricsLogger, batch_sums

LOGITS = torch.tensor([-2.0, 0.5, 1.0, -0.3, 2.0, -1.0, 0.1, 0.7])
LABELS = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0])


def reference(logits, labels):
    p = torch.sigmoid(logits).double()
    y = labels.double()
    pos, neg = p[y == 1], p[y == 0]
    auc = sum(float(a > b) + 0.5 * float(a == b) for a in pos for b in neg) / (len(pos) * len(neg))
    logloss = float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())
    rate = float(y.mean())
    entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    return {"auc": auc, "logloss": logloss, "ne": logloss / entropy, "calibration": float(p.sum() / y.sum())}


def test_single_process_values():
    metrics = EvalMetrics(torch.device("cpu"))
    metrics.update(LOGITS[:5], LABELS[:5])
    metrics.update(LOGITS[5:], LABELS[5:])
    result = metrics.compute()
    for key, value in reference(LOGITS, LABELS).items():
        assert result[key] == pytest.approx(value, rel=1e-6), key
    assert result["samples"] == 8


def test_perfect_and_base_rate_predictions():
    metrics = EvalMetrics(torch.device("cpu"))
    metrics.update(torch.where(LABELS > 0, 5.0, -5.0), LABELS)
    assert metrics.compute()["auc"] == 1.0
    metrics.reset()
    metrics.update(torch.zeros(8), LABELS)  # p = 0.5 = the base rate of LABELS
    assert metrics.compute()["ne"] == pytest.approx(1.0)


def test_batch_sums_stay_on_the_device_of_the_batch():
    # The meta device stands in for CUDA here: like CUDA, it refuses to stack a CPU tensor with its
    # own, which is how a CPU row count broke the first evaluation on a GPU.
    meta = batch_sums(LOGITS.to("meta"), LABELS.to("meta"))
    assert meta.device.type == "meta" and meta.shape == (5,)
    sums = batch_sums(LOGITS, LABELS).tolist()
    assert sums[3] == 8 and sums[2] == float(LABELS.sum()) and sums[4] == 0
    assert sums[1] == pytest.approx(float(torch.sigmoid(LOGITS).sum()))


def test_non_finite_predictions_give_no_metric_that_could_become_the_best():
    # Sorted, nan logits would still rank the rows: a finite AUC of a diverged model.
    metrics = EvalMetrics(torch.device("cpu"))
    metrics.update(LOGITS.masked_fill(LABELS > 0.5, float("nan")), LABELS)
    result = metrics.compute()
    assert all(math.isnan(result[key]) for key in ("auc", "logloss", "ne", "calibration")) and result["samples"] == 8
    metrics.reset()
    metrics.update(LOGITS.masked_fill(LABELS < 0.5, float("-inf")), LABELS)  # inf is no prediction either
    assert math.isnan(metrics.compute()["auc"])


def _two_rank_worker(rank: int, init_file: str, first_rank_rows: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    metrics = EvalMetrics(torch.device("cpu"))
    rows = slice(0, first_rank_rows) if rank == 0 else slice(first_rank_rows, 8)
    if rows.stop > rows.start:
        metrics.update(LOGITS[rows], LABELS[rows])
    results[rank] = metrics.compute()
    # A pass where no rank has a row: the gathers of nothing still pair up, and nothing is measured.
    metrics.reset()
    results[rank, "empty"] = metrics.compute()
    dist.destroy_process_group()


# Uneven halves (3 and 5 rows), and a rank that has no validation rows at all (a validation split
# of fewer row groups than ranks): torchmetrics' AUROC raised "No samples to concatenate" there.
@pytest.mark.parametrize("first_rank_rows", [3, 0])
def test_two_ranks_agree_with_one_process(tmp_path, first_rank_rows):
    results = mp.Manager().dict()
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), first_rank_rows, results), nprocs=2, join=True)
    expected = reference(LOGITS, LABELS)
    for rank in (0, 1):
        for key, value in expected.items():
            assert results[rank][key] == pytest.approx(value, rel=1e-6), (rank, key)
        assert results[rank]["samples"] == 8
        assert math.isnan(results[rank, "empty"]["auc"]) and results[rank, "empty"]["samples"] == 0


def test_auc_orders_saturated_logits_that_float32_probabilities_tie():
    from torchmetrics.functional.classification import binary_auroc

    logits, labels = torch.tensor([20.0, 25.0, 30.0, 35.0]), torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert torch.sigmoid(logits).tolist() == [1.0] * 4
    assert binary_auroc(torch.sigmoid(logits), labels.long(), thresholds=None) < 1.0
    metrics = EvalMetrics(torch.device("cpu"))
    metrics.update(logits, labels)
    assert metrics.compute()["auc"] == 1.0


def test_auc_is_nan_without_rows_or_without_both_classes():
    metrics = EvalMetrics(torch.device("cpu"))
    empty = metrics.compute()
    assert math.isnan(empty["auc"]) and empty["samples"] == 0
    metrics.update(torch.tensor([-1.0, 2.0]), torch.ones(2))
    assert math.isnan(metrics.compute()["auc"])


def test_auc_equals_torchmetrics_where_probabilities_keep_the_order():
    from torchmetrics.functional.classification import binary_auroc

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5000, generator=generator).mul(2).round(decimals=1)  # many ties
    labels = (torch.rand(5000, generator=generator) < torch.sigmoid(logits)).float()
    metrics = EvalMetrics(torch.device("cpu"))
    for part in range(5):
        metrics.update(logits[part * 1000 : (part + 1) * 1000], labels[part * 1000 : (part + 1) * 1000])
    expected = binary_auroc(torch.sigmoid(logits), labels.long(), thresholds=None).item()
    assert metrics.compute()["auc"] == pytest.approx(expected, abs=1e-6)


def test_logger_writes_jsonl_and_tensorboard_on_rank0_only(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, rank=0)
    logger.log("train", {"step": 5, "epoch": 0, "loss": 0.5, "samples_per_s": 100.0})
    logger.close()
    again = MetricsLogger(tmp_path, rank=0, tensorboard=False)
    again.log("eval", {"step": 10, "auc": 0.75})
    again.close()
    MetricsLogger(tmp_path / "rank1", rank=1).log("train", {"step": 1, "loss": 1.0})

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in lines] == [("train", 5), ("eval", 10)]
    assert all(isinstance(r["time"], float) for r in lines)
    assert not (tmp_path / "rank1").exists()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(5, 0.5)]
    assert "train/epoch" not in events.Tags()["scalars"]
