"""The embedded default dataset: Criteo-shaped Parquet files drawn from a planted model.

Labels come from a known logistic model over the features (per-id weights, pairwise interactions
of per-id latent vectors, dense terms), so each row's true click probability is known, and so is
the best AUC and logloss any model can reach on the validation split: they are written to
metadata.json, to judge a trained model against the best possible rather than against 0.5.

Ids follow a power law, like real categorical features (a few ids are very frequent), or, as in
the reference trainers' random benchmark data, a uniform distribution. Nothing is
stored per id: the per-id weights and latent vectors are hashes of (seed, feature, id), so tables
of any size cost no memory, and files are generated one at a time so row counts are unbounded.
With data.synthetic.id_bits, the files hold each id as a raw 64-bit id spread over 2**id_bits
values instead (the same rows, the same truth): data as it arrives without a vocabulary.

Here: where a dataset lies (a fingerprint of what makes it), making it once, and reading its best
scores back. The model is in planted_model.py; synthetic_files.py writes the files and metadata.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.config import SyntheticConfig
from app.data.planted_model import PROBABILITY_COLUMN, task_probability_column
from app.data.synthetic_files import FORMAT_VERSION, METADATA_FILE, ScoreTally, generate

if TYPE_CHECKING:  # app.features imports torchrec; a FeaturesConfig does as well here
    from app.config import DataConfig, FeaturesConfig
    from app.features import FeatureSchema

# The dataset's interface: where it lies, making it, its best scores, and its files' truth columns.
__all__ = [
    "METADATA_FILE",
    "PROBABILITY_COLUMN",
    "ScoreTally",
    "best_achievable",
    "dataset_dir",
    "ensure_dataset",
    "generate",
    "task_probability_column",
]


def dataset_dir(schema: FeatureSchema | FeaturesConfig, cfg: SyntheticConfig) -> Path:
    """cfg.root/<fingerprint>: a changed feature schema or generator setting gets its own dataset."""
    # (id_bits only where set: the datasets generated before it existed keep their fingerprints)
    params = {k: v for k, v in asdict(cfg).items() if k != "root" and not (k == "id_bits" and v == 0)}
    tasks = list(schema.tasks() if callable(schema.tasks) else schema.tasks)  # a FeaturesConfig's is a method
    if not schema.sequence:  # (nor sequence_signal without sequence features, for the same reason)
        params.pop("sequence_signal")
    key = {
        "version": FORMAT_VERSION,
        "label": tasks[0],
        "dense": list(schema.dense),
        "sparse": [(f.name, f.num_embeddings, f.hotness) for f in schema.sparse],
        "params": params,
    }
    if len(tasks) > 1:  # (only then: single-task datasets keep their fingerprints)
        key["labels"] = tasks
    if schema.sequence:
        key["sequence"] = [(f.name, f.num_embeddings, f.max_length, f.target) for f in schema.sequence]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.root) / digest


def ensure_dataset(schema: FeatureSchema, cfg: SyntheticConfig) -> tuple[Path, Path]:
    """(train_dir, val_dir), generating the dataset first if it is not there (a test split, if
    configured, lies beside them). The dataset is built
    under a temporary name and renamed into place, so a crash never leaves one that looks complete."""
    final = dataset_dir(schema, cfg)
    if not (final / METADATA_FILE).is_file():
        staging = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            generate(schema, cfg, staging)
            try:
                os.rename(staging, final)
            except OSError:  # another process published it first
                if not (final / METADATA_FILE).is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final / "train", final / "val"


def best_achievable(features: FeaturesConfig, data: DataConfig, task: str | None = None) -> dict[str, Any] | None:
    """{"auc", "logloss", "path"}: the validation split's best achievable scores (those of the true
    click probabilities; in a multi-task dataset those of `task`, else of the first task trained
    on, and its name under "task") from the metadata.json of the generated dataset it comes from,
    or None where they are not known: for data.source=parquet, a split directory of a generated dataset
    (<dataset>/val, <dataset>/test) is recognised by the metadata.json beside it; other files have none."""
    if data.source == "synthetic":
        metadata_path, split = dataset_dir(features, data.synthetic) / METADATA_FILE, "val"
    else:
        split_dir = Path(data.val_path)
        metadata_path, split = split_dir.parent / METADATA_FILE, split_dir.name
        if not split_dir.is_dir():
            return None
    try:
        scores = json.loads(metadata_path.read_text())["splits"][split]
        named = {}
        if "tasks" in scores:  # a multi-task dataset, read by a model of any of its tasks
            named = {"task": task or features.tasks()[0]}
            scores = scores["tasks"][named["task"]]
        return {
            "auc": float(scores["best_auc"]),
            "logloss": float(scores["best_logloss"]),
            "path": str(metadata_path),
            **named,
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None
