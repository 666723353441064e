"""Histories (features.sequence) from Arrow to the SequenceBatch's KJT: the most recent max_length
ids kept, empty and null histories, the candidate's key, input errors, evaluation padding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
import torch

from app.config import FeaturesConfig, SequenceFeature, SparseFeature
from app.data import DataError
from app.data.batch import InputPolicy, Rows, keep_recent, table_to_batch, with_empty_histories
from app.data.sequence_batch import SequenceBatch
from app.features import FeatureSchema, target_key

SCHEMA = FeatureSchema.from_config(
    FeaturesConfig(
        dense=["d0"],
        sparse=[SparseFeature("item", 10), SparseFeature("user", 5)],
        embedding_dim=8,
        sequence=[SequenceFeature("history", 12, max_length=3, target="item")],
    )
)


def table(history, items=(1, 2, 3, 4)) -> pa.Table:
    count = len(items)
    return pa.table(
        {
            "label": pa.array([0, 1] * (count // 2)),
            "d0": pa.array(np.ones(count)),
            "item": pa.array(list(items), type=pa.int64()),
            "user": pa.array([0] * count, type=pa.int64()),
            "history": pa.array(history, type=pa.list_(pa.int64())),
        }
    )


def test_the_most_recent_ids_are_kept_and_empty_histories_are_empty():
    batch = table_to_batch(table([[1, 2, 3, 4, 5], [], None, [7, 8]]), SCHEMA)
    assert isinstance(batch, SequenceBatch)
    assert batch.sparse_features.keys() == ["item", "user"]  # the history stays out of the pooled tables
    sequence = batch.sequence_features
    assert sequence.keys() == ["history", target_key("history")]
    history = sequence.to_dict()["history"]
    assert history.lengths().tolist() == [3, 0, 0, 2]
    assert history.values().tolist() == [3, 4, 5, 7, 8]  # lists are oldest first: the last 3 are kept
    candidates = sequence.to_dict()[target_key("history")]
    assert candidates.lengths().tolist() == [1, 1, 1, 1] and candidates.values().tolist() == [1, 2, 3, 4]


def test_keep_recent_of_single_ids_and_of_rows_within_the_limit():
    offsets, ids = keep_recent(None, np.array([4, 5, 6]), 2)  # an int64 column: histories of one
    assert offsets.tolist() == [0, 1, 2, 3] and ids.tolist() == [4, 5, 6]
    offsets, ids = keep_recent(np.array([0, 2, 2, 7]), np.arange(7), 2)
    assert offsets.tolist() == [0, 2, 2, 4] and ids.tolist() == [0, 1, 5, 6]


def test_a_history_id_outside_its_table_names_the_column_or_is_hashed():
    bad = table([[1], [12], [], [3]])
    with pytest.raises(DataError, match=r"row 1: column 'history' has id 12; expected ids in \[0, 12\)"):
        table_to_batch(bad, SCHEMA, source="f.parquet")
    hashed = table_to_batch(bad, SCHEMA, policy=InputPolicy(invalid_ids="hash"))
    assert hashed.sequence_features.to_dict()["history"].values().tolist() == [1, 0, 3]


def test_without_sequence_features_batches_are_plain():
    plain = dataclasses.replace(SCHEMA, sequence=())
    batch = table_to_batch(table([[1], [2], [3], [4]]), plain)
    assert type(batch).__name__ == "Batch" and not hasattr(batch, "sequence_features")
    assert "history" not in plain.columns and "history" in SCHEMA.columns


def test_evaluation_padding_has_empty_histories():
    rows = Rows(np.zeros((2, 1), np.float32), np.zeros(2, np.float32), [np.zeros(2, np.int64)] * 2, [None, None])
    padded = Rows.concat(
        [
            Rows(
                np.ones((1, 1), np.float32),
                np.ones(1, np.float32),
                [np.array([1]), np.array([2]), np.array([5, 6]), np.array([1])],
                [None, None, np.array([0, 2]), None],
            ),
            with_empty_histories(rows, SCHEMA),
        ]
    )
    batch = padded.to_batch(SCHEMA.sparse_names, sequence=SCHEMA.sequence_inputs)
    history = batch.sequence_features.to_dict()["history"]
    assert history.lengths().tolist() == [2, 0, 0] and history.values().tolist() == [5, 6]
    assert batch.sequence_features.to_dict()[target_key("history")].values().tolist() == [1, 0, 0]


@pytest.mark.parametrize("mapping, policy", [("modulo", InputPolicy()), ("direct", InputPolicy(invalid_ids="hash"))])
def test_a_hashed_raw_id_lands_on_the_same_row_as_candidate_and_in_the_history(mapping, policy):
    # The target's table (100 rows) is smaller than the history's (200), which both index.
    schema = FeatureSchema.from_config(
        FeaturesConfig(
            dense=["d0"],
            sparse=[SparseFeature("item", 100, id_mapping=mapping), SparseFeature("user", 5)],
            embedding_dim=8,
            sequence=[SequenceFeature("history", 200, max_length=3, target="item")],
        )
    )
    batch = table_to_batch(table([[7, 150], [150], [], [199]], items=(150, 7, 450, 1)), schema, policy=policy)
    sequence = batch.sequence_features.to_dict()
    assert sequence["history"].values().tolist() == [7, 150, 150, 199]
    # Raw id 150 is row 150 of the history's table as a candidate too (not 150 mod 100 = 50); 450
    # is row 450 mod 200, as it would be in the history.
    assert sequence[target_key("history")].values().tolist() == [150, 7, 50, 1]
    # The candidate's own pooled table keeps its own rows.
    assert batch.sparse_features.to_dict()["item"].values().tolist() == [50, 7, 50, 1]


def test_a_sequence_batch_moves_with_its_histories():
    batch = table_to_batch(table([[1, 2], [], [3], [4]]), SCHEMA)
    moved = batch.to(torch.device("cpu"))
    assert isinstance(moved, SequenceBatch)
    assert torch.equal(moved.sequence_features.values(), batch.sequence_features.values())
    assert torch.equal(moved.labels, batch.labels)
