"""The planted sequence signal (features.sequence, data.synthetic.sequence_signal): exactly the
candidate-in-recent-history term of the true logit, and nothing changes for datasets without it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq

from app.config import FeaturesConfig, SequenceFeature, SparseFeature, SyntheticConfig
from app.data.synthetic import PROBABILITY_COLUMN, dataset_dir, generate
from app.features import FeatureSchema
from app.hydra_edge import compose_config

SCHEMA = FeatureSchema.from_config(
    FeaturesConfig(
        dense=["d0"],
        sparse=[SparseFeature("item", 30), SparseFeature("user", 8)],
        embedding_dim=8,
        sequence=[SequenceFeature("history", 40, max_length=5, target="item")],
    )
)


def config(tmp_path, **overrides) -> SyntheticConfig:
    return SyntheticConfig(
        root=str(tmp_path),
        train_rows=2000,
        val_rows=500,
        rows_per_file=2000,
        rows_per_row_group=500,
        seed=3,
        **overrides,
    )


def logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1 - p))


def test_the_signal_is_the_candidate_among_the_most_recent_ids(tmp_path):
    generate(SCHEMA, config(tmp_path, sequence_signal=3.0), tmp_path / "on")
    generate(SCHEMA, config(tmp_path, sequence_signal=0.0), tmp_path / "off")
    on = pq.read_table(tmp_path / "on/train/part-00000.parquet")
    off = pq.read_table(tmp_path / "off/train/part-00000.parquet")
    for name in ("d0", "item", "user", "history"):  # the same rows: only the truth differs
        assert on[name].equals(off[name])
    histories, items = on["history"].to_pylist(), on["item"].to_pylist()
    assert min(map(len, histories)) == 0 and max(map(len, histories)) == 10  # 0 to 2 x max_length ids
    hit = np.array([item in history[-5:] for item, history in zip(items, histories)], dtype=np.float64)
    assert 0.5 < hit.mean() < 0.8  # half planted, some by chance
    older = np.array([item in history[:-5] and item not in history[-5:] for item, history in zip(items, histories)])
    assert older.any()  # an older match exists, and carries nothing:
    difference = logit(on[PROBABILITY_COLUMN].to_numpy()) - logit(off[PROBABILITY_COLUMN].to_numpy())
    np.testing.assert_allclose(difference, 3.0 * (hit - 0.5), atol=1e-6)


def test_datasets_without_sequence_features_keep_their_fingerprint(tmp_path):
    default = compose_config([])
    assert dataset_dir(default.features, default.data.synthetic).name == "2c12df897326"  # the README's
    signal = dataclasses.replace(default.data.synthetic, sequence_signal=1.0)
    assert dataset_dir(default.features, signal) == dataset_dir(default.features, default.data.synthetic)
    assert dataset_dir(SCHEMA, config(tmp_path)) != dataset_dir(SCHEMA, config(tmp_path, sequence_signal=1.0))
    longer = dataclasses.replace(SCHEMA, sequence=(dataclasses.replace(SCHEMA.sequence[0], max_length=6),))
    assert dataset_dir(longer, config(tmp_path)) != dataset_dir(SCHEMA, config(tmp_path))
