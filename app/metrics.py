"""Validation metrics (AUC, logloss, NE, calibration) over all ranks, and the sinks runs write to.

NE (normalized entropy) is the logloss divided by the entropy of the base click rate: 1.0 is no
better than always predicting the average CTR, lower is better. It is what CTR papers report
beside AUC because it also punishes badly calibrated probabilities.

The AUC is computed on the logits, over every rank's rows gathered on every rank: it depends only
on their order, which float32 probabilities lose where logits saturate (sigmoid(20) and
sigmoid(30) are both 1.0). torchmetrics' AUROC applies that sigmoid itself to values outside
[0, 1], and skips its gather on a rank that saw no rows (which then crashes, and leaves the
others waiting), so `auc` below does it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from app.storage_failure import said_in_one_line

log = logging.getLogger(__name__)


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve as the Mann-Whitney statistic: the chance that a positive scores
    above a negative, ties counting half; nan without both classes."""
    positives = labels > 0.5
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ordered, order = torch.sort(scores.double())
    _, group, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2  # 1-based; tied scores share their mean rank
    positive_ranks = mean_rank[group][positives[order]].sum().item()
    return (positive_ranks - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def gather_rows(values: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D `values` (any length, none too), concatenated in rank order on every rank."""
    if not _distributed():
        return values
    count = torch.tensor([values.numel()], dtype=torch.int64, device=values.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    longest = max(int(c.item()) for c in counts)
    padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([rows[: int(c.item())] for rows, c in zip(gathered, counts)])


def batch_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[logloss sum, prediction sum, label sum, row count, non-finite logits] of one batch, on the
    batch's device: every term, the row count too, since stack refuses to mix devices (a CPU count
    beside CUDA sums would fail the first evaluation on a GPU)."""
    losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    count = labels.new_tensor(float(labels.numel()))
    non_finite = (~torch.isfinite(logits)).sum().to(count)
    return torch.stack([losses.sum(), torch.sigmoid(logits).sum(), labels.sum(), count, non_finite])


class EvalMetrics:
    """Accumulates one validation pass on each rank; compute() is collective when distributed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        # Exact AUC (no thresholds): every rank's logits and labels are gathered at compute().
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        # logloss sum, prediction sum, label sum, count, non-finite logits: float64 so millions of
        # rows add up exactly.
        self._sums = torch.zeros(5, dtype=torch.float64, device=self.device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, labels = logits.detach().float(), labels.detach().float()
        if logits.numel() == 0:
            return
        self._logits.append(logits)
        self._labels.append(labels)
        self._sums += batch_sums(logits, labels).to(self._sums)

    def _rows(self, batches: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(batches) if batches else torch.zeros(0, device=self.device)

    def compute(self) -> dict[str, float]:
        sums = self._sums.clone()
        if _distributed():
            dist.all_reduce(sums)
        loss_sum, pred_sum, label_sum, count, non_finite = sums.tolist()
        # Every rank takes part in the gather, one that saw no rows too.
        area = auc(gather_rows(self._rows(self._logits)), gather_rows(self._rows(self._labels)))
        if count == 0 or non_finite:
            # Non-finite predictions (a diverged model) have no metrics: sorted, nan would still
            # give an AUC, and that could become the best.
            if non_finite:
                log.warning(
                    "%d of %d predictions are not finite (nan or inf): the metrics are undefined (nan)",
                    int(non_finite),
                    int(count),
                )
            return {
                "auc": float("nan"),
                "logloss": float("nan"),
                "ne": float("nan"),
                "calibration": float("nan"),
                "samples": int(count),
            }
        logloss = loss_sum / count
        rate = label_sum / count
        base_entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate)) if 0 < rate < 1 else 0.0
        return {
            "auc": area,
            "logloss": logloss,
            "ne": logloss / base_entropy if base_entropy > 0 else float("nan"),
            "calibration": pred_sum / label_sum if label_sum > 0 else float("nan"),
            "samples": int(count),
        }


class TaskMetrics:
    """EvalMetrics of every task of a multi-task model, fed B x T logits and labels. compute()
    names each task's metrics <task>/<metric> (eval/<task>/auc in TensorBoard) and repeats the
    primary task's unprefixed (auc, logloss, ne, calibration, samples): the names single-task runs,
    early stopping, the best checkpoint and sweeps read."""

    def __init__(self, device: torch.device, tasks: Sequence[str], primary: str) -> None:
        self.tasks = list(tasks)
        self.primary = primary
        self._metrics = [EvalMetrics(device) for _ in self.tasks]

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        for task, metrics in enumerate(self._metrics):
            metrics.update(logits[:, task], labels[:, task])

    def compute(self) -> dict[str, float]:
        """Collective when distributed: every rank computes every task, in the same order."""
        per_task = {task: metrics.compute() for task, metrics in zip(self.tasks, self._metrics)}
        result: dict[str, float] = dict(per_task[self.primary])
        for task, values in per_task.items():
            result.update({f"{task}/{key}": value for key, value in values.items() if key != "samples"})
        return result


def evaluation_metrics(device: torch.device, tasks: Sequence[str] = (), primary: str | None = None):
    """EvalMetrics for one task; TaskMetrics for several (B x T logits), `primary` unprefixed."""
    if len(tasks) <= 1:
        return EvalMetrics(device)
    return TaskMetrics(device, tasks, primary or tasks[0])


class MetricsLogger:
    """One record to every sink: metrics.jsonl (appended, so a resumed run continues it),
    TensorBoard scalars under tb/, and `tracking` (an MLflow run, app/tracking.py) where there is
    one. Only rank 0 writes."""

    def __init__(self, run_dir: Path, rank: int, tensorboard: bool = True, tracking: Any | None = None) -> None:
        self.enabled = rank == 0
        self._jsonl = None
        self._tb: Any | None = None
        self.tracking = tracking if self.enabled else None
        if not self.enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._run_dir = run_dir
        self._jsonl = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (open for the logger's life)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tb"))

    def log(self, kind: str, record: dict[str, Any]) -> None:
        if self._jsonl is None:  # not rank 0
            return
        line = {"kind": kind, **record, "time": time.time()}
        with said_in_one_line(f"cannot write the run's metrics to {self._jsonl.name} and {self._run_dir / 'tb'}"):
            self._jsonl.write(json.dumps(line) + "\n")
            self._jsonl.flush()
            if self._tb is not None:
                for key, value in record.items():
                    if key not in ("step", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
                        self._tb.add_scalar(f"{kind}/{key}", value, global_step=record["step"])
                self._tb.flush()
        if self.tracking is not None:
            self.tracking.log(kind, record)

    def start_session(self, hparams: dict[str, Any]) -> None:
        """The run's hyperparameters, for TensorBoard's HParams dashboard: a session of this run
        (tb/), whose metrics are its scalars (eval/auc, ...: their latest values). No experiment
        record: TensorBoard gathers one from the sessions of every run under its logdir, so the
        points of a sweep compare (`tensorboard --logdir outputs/<sweep>`)."""
        from tensorboard.plugins.hparams import plugin_data_pb2

        start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
        for name, value in hparams.items():
            if isinstance(value, bool):
                start.hparams[name].bool_value = value
            elif isinstance(value, (int, float)):
                start.hparams[name].number_value = value
            else:
                start.hparams[name].string_value = str(value)
        self._hparams_record("session_start_info", start)

    def end(self, status: str, artifacts: Sequence[Path] = ()) -> None:
        """The run ended as `status` (finished, failed or preempted): the HParams session ends
        (but a preempted run's, which resumes in a new session of the same hyperparameters), and
        the MLflow run takes `artifacts` and ends."""
        if not self.enabled:
            return
        if status != "preempted":
            from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

            code = {"finished": api_pb2.Status.STATUS_SUCCESS, "failed": api_pb2.Status.STATUS_FAILURE}[status]
            self._hparams_record(
                "session_end_info", plugin_data_pb2.SessionEndInfo(status=code, end_time_secs=time.time())
            )
        if self.tracking is not None:
            self.tracking.finish(status, artifacts)

    def _hparams_record(self, field: str, info: Any) -> None:
        """One record of TensorBoard's hparams plugin (built from its protos: its own writer,
        tensorboard.plugins.hparams.summary, needs TensorFlow)."""
        if self._tb is None:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.hparams import metadata, plugin_data_pb2

        data = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **{field: info})
        tag = {
            "session_start_info": metadata.SESSION_START_INFO_TAG,
            "session_end_info": metadata.SESSION_END_INFO_TAG,
        }[field]
        self._tb.file_writer.add_summary(
            Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(data))])
        )
        self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
