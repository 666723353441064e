"""Validation metrics (AUC, logloss, NE, calibration) over all ranks, and the sinks runs write to.

NE (normalized entropy) is the logloss divided by the entropy of the base click rate: 1.0 is no
better than always predicting the average CTR, lower is better. It is what CTR papers report
beside AUC because it also punishes badly calibrated probabilities.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchmetrics.classification import BinaryAUROC

log = logging.getLogger(__name__)


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def batch_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[logloss sum, prediction sum, label sum, row count] of one batch, on the batch's device:
    every term, the row count too, since stack refuses to mix devices (a CPU count beside CUDA
    sums would fail the first evaluation on a GPU)."""
    losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    count = labels.new_tensor(float(labels.numel()))
    return torch.stack([losses.sum(), torch.sigmoid(logits).sum(), labels.sum(), count])


class EvalMetrics:
    """Accumulates one validation pass on each rank; compute() is collective when distributed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # Exact AUC (no thresholds): torchmetrics gathers every rank's predictions at compute().
        self._auc = BinaryAUROC(thresholds=None).to(device)
        self.reset()

    def reset(self) -> None:
        self._auc.reset()
        # logloss sum, prediction sum, label sum, count: float64 so millions of rows add up exactly.
        self._sums = torch.zeros(4, dtype=torch.float64, device=self.device)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, labels = logits.detach().float(), labels.detach().float()
        if logits.numel() == 0:
            return
        self._auc.update(torch.sigmoid(logits), labels.long())
        self._sums += batch_sums(logits, labels).to(self._sums)

    def compute(self) -> Dict[str, float]:
        sums = self._sums.clone()
        if _distributed():
            dist.all_reduce(sums)
        loss_sum, pred_sum, label_sum, count = sums.tolist()
        # Every rank takes part in the AUC gather, even one that saw no rows.
        auc = float(self._auc.compute()) if count > 0 else float("nan")
        if count == 0:
            return {"auc": auc, "logloss": float("nan"), "ne": float("nan"), "calibration": float("nan"), "samples": 0}
        logloss = loss_sum / count
        rate = label_sum / count
        base_entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate)) if 0 < rate < 1 else 0.0
        return {
            "auc": auc,
            "logloss": logloss,
            "ne": logloss / base_entropy if base_entropy > 0 else float("nan"),
            "calibration": pred_sum / label_sum if label_sum > 0 else float("nan"),
            "samples": int(count),
        }


class MetricsLogger:
    """One record to every sink: metrics.jsonl (appended, so a resumed run continues it) and
    TensorBoard scalars under tb/. Only rank 0 writes."""

    def __init__(self, run_dir: Path, rank: int, tensorboard: bool = True) -> None:
        self.enabled = rank == 0
        self._jsonl = None
        self._tb: Optional[Any] = None
        if not self.enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tb"))

    def log(self, kind: str, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = {"kind": kind, **record, "time": time.time()}
        self._jsonl.write(json.dumps(line) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, global_step=record["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
