"""Arrow columns -> torchrec Batch (dense features, KeyedJaggedTensor, labels), with input checks.

Everything is vectorised over the column (numpy on Arrow buffers, no per-row Python), because this
runs for every batch. The checks are the ones that would otherwise corrupt training silently or
crash deep inside an FBGEMM kernel: ids outside their table, non-finite dense values, labels that
are not 0/1. Each error names where the bad value came from.
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from app.data import DataError
from app.features import FeatureSchema


def _flat(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _is_list(column: pa.Array) -> bool:
    return pa.types.is_list(column.type) or pa.types.is_large_list(column.type)


def _first(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


def validate_table(table: pa.Table, schema: FeatureSchema, source: str) -> None:
    """Raise DataError at the first value that cannot be trained on, naming source, row and column."""
    labels = _flat(table.column(schema.label))
    values = labels.to_numpy(zero_copy_only=False).astype(np.float64)
    bad = ~np.isin(values, (0.0, 1.0)) | ~labels.is_valid().to_numpy(zero_copy_only=False)
    if bad.any():
        row = _first(bad)
        shown = "null" if not labels[row].is_valid else repr(float(values[row]))
        raise DataError(f"{source}, row {row}: column {schema.label!r} has label {shown}; expected 0 or 1.")
    for name in schema.dense:
        column = _flat(table.column(name))
        values = column.to_numpy(zero_copy_only=False).astype(np.float64)
        bad = ~np.isfinite(values) | ~column.is_valid().to_numpy(zero_copy_only=False)
        if bad.any():
            row = _first(bad)
            raise DataError(f"{source}, row {row}: column {name!r} has {column[row].as_py()}; expected a finite number.")
    for feature in schema.sparse:
        column = _flat(table.column(feature.name))
        if _is_list(column):
            ids = pc.list_flatten(column).to_numpy(zero_copy_only=False)
            rows = np.repeat(np.arange(len(column)), pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False))
        else:
            ids = column.to_numpy(zero_copy_only=False)
            rows = np.arange(len(column))
            if column.null_count:
                valid = column.is_valid().to_numpy(zero_copy_only=False)
                ids, rows = ids[valid], rows[valid]
        bad = (ids < 0) | (ids >= feature.num_embeddings)
        if bad.any():
            index = _first(bad)
            raise DataError(
                f"{source}, row {int(rows[index])}: column {feature.name!r} has id {int(ids[index])}; expected ids "
                f"in [0, {feature.num_embeddings}) (features config: num_embeddings={feature.num_embeddings})."
            )


def _sparse_column(column: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
    """(lengths, ids) of one sparse feature; a null row (or null list) has no ids."""
    if _is_list(column):
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
        ids = pc.list_flatten(column)  # skips the values of null lists
    else:
        lengths = column.is_valid().to_numpy(zero_copy_only=False)
        ids = column.drop_null() if column.null_count else column
    return lengths.astype(np.int64, copy=False), ids.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def table_to_batch(table: pa.Table, schema: FeatureSchema, source: str = "<memory>", validate: bool = True) -> Batch:
    """One Batch from the rows of `table` (any row count); `source` names them in errors. Pass
    validate=False for rows already checked by validate_table (the Parquet reader checks each row
    group once, as it reads it)."""
    if validate:
        validate_table(table, schema, source)
    lengths: List[np.ndarray] = []
    values: List[np.ndarray] = []
    for feature in schema.sparse:
        feature_lengths, ids = _sparse_column(_flat(table.column(feature.name)))
        lengths.append(feature_lengths)
        values.append(ids)
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=schema.sparse_names,
        values=torch.from_numpy(np.concatenate(values)),
        lengths=torch.from_numpy(np.concatenate(lengths)),
    )
    dense = np.empty((table.num_rows, len(schema.dense)), dtype=np.float32)
    for i, name in enumerate(schema.dense):
        dense[:, i] = _flat(table.column(name)).to_numpy(zero_copy_only=False)
    labels = _flat(table.column(schema.label)).to_numpy(zero_copy_only=False).astype(np.float32)
    return Batch(dense_features=torch.from_numpy(dense), sparse_features=sparse, labels=torch.from_numpy(labels))
