"""Writing the synthetic dataset: each split's Parquet files, drawn from the planted model one
file at a time (so row counts are unbounded), and metadata.json with the best AUC and logloss any
model can reach on each split: those of the true probabilities, scored as the files are written.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from app import progress
from app.config import SyntheticConfig
from app.data.planted_model import PROBABILITY_COLUMN, PlantedModel, task_probability_column

if TYPE_CHECKING:  # app.features imports torchrec
    from app.features import FeatureSchema

METADATA_FILE = "metadata.json"
FORMAT_VERSION = 2  # bump when the generator changes what a fingerprint produces


class ScoreTally:
    """Streaming AUC and logloss of probabilities against labels, so a split of any size is scored
    in constant memory: positives and negatives are counted per probability bin (2**20 bins, 16 MB),
    and pairs within one bin count as ties. The AUC is exact up to those ties (width 1e-6)."""

    BINS = 1 << 20

    def __init__(self) -> None:
        self.positives = np.zeros(self.BINS, dtype=np.int64)
        self.negatives = np.zeros(self.BINS, dtype=np.int64)
        self.log_loss_sum = 0.0
        self.rows = 0

    def add(self, labels: np.ndarray, probabilities: np.ndarray) -> None:
        bins = np.minimum((probabilities * self.BINS).astype(np.int64), self.BINS - 1)
        clicked = labels.astype(bool)
        self.positives += np.bincount(bins[clicked], minlength=self.BINS)
        self.negatives += np.bincount(bins[~clicked], minlength=self.BINS)
        p = np.clip(probabilities, 1e-12, 1 - 1e-12)
        self.log_loss_sum -= float(np.sum(np.where(clicked, np.log(p), np.log(1 - p))))
        self.rows += len(labels)

    def auc(self) -> float:
        n_pos, n_neg = int(self.positives.sum()), int(self.negatives.sum())
        if n_pos == 0 or n_neg == 0:
            return float("nan")
        negatives_below = np.cumsum(self.negatives) - self.negatives
        wins = (self.positives * negatives_below).sum() + 0.5 * (self.positives * self.negatives).sum()
        return float(wins / (n_pos * n_neg))

    def logloss(self) -> float:
        return self.log_loss_sum / max(self.rows, 1)

    def click_rate(self) -> float:
        return float(self.positives.sum() / max(self.rows, 1))


def generate(schema: FeatureSchema, cfg: SyntheticConfig, out_dir: Path) -> dict:
    """Write out_dir/<split>/part-NNNNN.parquet for the train, val and (if test_rows) test splits,
    and out_dir/metadata.json; returns the metadata. Files are written one at a time and scored as
    they go, so memory does not grow with the row count."""
    out_dir = Path(out_dir)
    model = PlantedModel(schema, cfg)
    splits = [("train", cfg.train_rows), ("val", cfg.val_rows), ("test", cfg.test_rows)]
    summary: dict[str, dict] = {}
    bar = progress.bar(sum(total for _, total in splits), "generating the dataset", "row")
    for split_index, (split, total) in enumerate(splits):
        if total == 0:
            continue
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        tally = ScoreTally()
        task_tallies = {task: ScoreTally() for task in schema.tasks[1:]}
        for file_index, start in enumerate(range(0, total, cfg.rows_per_file)):
            rows = min(cfg.rows_per_file, total - start)
            rng = np.random.default_rng([cfg.seed, split_index, file_index])
            columns, probability = model.sample(rng, rows, cfg)
            truths = {task_probability_column(task): columns[task_probability_column(task)] for task in task_tallies}
            table = pa.table(
                {**{name: columns[name] for name in schema.columns}, PROBABILITY_COLUMN: probability, **truths}
            )
            pq.write_table(
                table, out_dir / split / f"part-{file_index:05d}.parquet", row_group_size=cfg.rows_per_row_group
            )
            tally.add(columns[schema.label].to_numpy(), probability)
            for task, task_tally in task_tallies.items():
                task_tally.add(columns[task].to_numpy(), columns[task_probability_column(task)].to_numpy())
            bar.update(rows)
        summary[split] = {
            "rows": total,
            "files": -(-total // cfg.rows_per_file),
            "click_rate": tally.click_rate(),
            "best_auc": tally.auc(),
            "best_logloss": tally.logloss(),
        }
        if task_tallies:  # multi-task: every task's rate and best scores, the first's as above
            summary[split]["tasks"] = {
                task: {"positive_rate": t.click_rate(), "best_auc": t.auc(), "best_logloss": t.logloss()}
                for task, t in [(schema.tasks[0], tally), *task_tallies.items()]
            }
    bar.close()
    metadata = {
        "format_version": FORMAT_VERSION,
        "columns": schema.columns,
        "probability_column": PROBABILITY_COLUMN,
        "tables": {f.name: {"num_embeddings": f.num_embeddings, "hotness": f.hotness} for f in schema.sparse},
        "params": asdict(cfg),
        "splits": summary,
        "best_auc": summary["val"]["best_auc"],
        "best_logloss": summary["val"]["best_logloss"],
    }
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    return metadata
