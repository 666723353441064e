"""Arrow columns -> torchrec Batch (dense features, KeyedJaggedTensor, labels), with input checks.

A row group is checked and decoded once, into numpy arrays (`Rows`); batches are then cut from
those arrays, so the per-batch work is a few slices and concatenations, not a walk over Arrow
columns. Everything is vectorised over the column, no per-row Python, because this runs for every
row that is trained on.

The checks are the ones that would otherwise corrupt training silently or crash deep inside an
FBGEMM kernel: ids outside their table, non-finite dense values, labels that are not 0/1. Each
error names where the bad value came from; `InputPolicy` says which of them to repair instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import pyarrow as pa
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from app.data import DataError
from app.features import FeatureSchema

INVALID_ID_POLICIES = ("error", "hash")
INVALID_DENSE_POLICIES = ("error", "fill")


@dataclass(frozen=True)
class InputPolicy:
    """What to do with values that cannot be trained on as they are. Labels outside {0, 1} are
    always an error: no repair of a label is right."""

    invalid_ids: str = "error"  # "hash": an id outside [0, num_embeddings) becomes id mod num_embeddings
    invalid_dense: str = "error"  # "fill": NaN, inf and null dense values become dense_fill_value
    dense_fill_value: float = 0.0


def _flat(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _is_list(column: pa.Array) -> bool:
    return pa.types.is_list(column.type) or pa.types.is_large_list(column.type)


def _first(mask: np.ndarray) -> int:
    return int(np.argmax(mask))


def _valid(column: pa.Array) -> np.ndarray:
    return column.is_valid().to_numpy(zero_copy_only=False)


@dataclass
class Rows:
    """Decoded rows: dense [rows, D] float32, labels [rows] float32, and for sparse feature f the
    row offsets offsets[f] into its id array: row r's ids are ids[f][offsets[f, r]:offsets[f, r + 1]].
    One offsets matrix for all features makes slicing and batching one numpy call each."""

    dense: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray  # [features, rows + 1] int64
    ids: List[np.ndarray]
    single_hot: Tuple[bool, ...]  # per feature: exactly one id in every row (the fast path)

    def __len__(self) -> int:
        return len(self.labels)

    def slice(self, start: int, stop: int) -> "Rows":
        return Rows(self.dense[start:stop], self.labels[start:stop], self.offsets[:, start : stop + 1], self.ids,
                    self.single_hot)

    def _feature_ids(self, f: int) -> np.ndarray:
        return self.ids[f][self.offsets[f, 0] : self.offsets[f, -1]]

    def take(self, order: np.ndarray) -> "Rows":
        """The rows in `order` (a permutation or any selection of row indices)."""
        offsets = np.empty((len(self.ids), len(order) + 1), dtype=np.int64)
        ids = []
        for f, feature_ids in enumerate(self.ids):
            if self.single_hot[f]:  # row r's id sits at offsets[f, 0] + r: a plain gather
                offsets[f] = np.arange(len(order) + 1)
                ids.append(feature_ids[self.offsets[f, 0] + order])
                continue
            lengths = np.diff(self.offsets[f])[order]
            offsets[f, 0] = 0
            np.cumsum(lengths, out=offsets[f, 1:])
            # Each output id's source position: its row's old start plus its place within the row.
            source = np.repeat(self.offsets[f, :-1][order] - offsets[f, :-1], lengths) + np.arange(offsets[f, -1])
            ids.append(feature_ids[source])
        return Rows(self.dense[order], self.labels[order], offsets, ids, self.single_hot)

    @staticmethod
    def concat(parts: Sequence["Rows"]) -> "Rows":
        if len(parts) == 1:
            return parts[0]
        offsets = _offsets(np.concatenate([np.diff(p.offsets, axis=1) for p in parts], axis=1))
        ids = [np.concatenate([p._feature_ids(f) for p in parts]) for f in range(len(parts[0].ids))]
        single_hot = tuple(all(flags) for flags in zip(*(p.single_hot for p in parts)))
        return Rows(np.concatenate([p.dense for p in parts]), np.concatenate([p.labels for p in parts]), offsets, ids,
                    single_hot)

    def to_batch(self, keys: List[str]) -> Batch:
        lengths = np.diff(self.offsets, axis=1).ravel()
        values = np.concatenate([self._feature_ids(f) for f in range(len(self.ids))])
        sparse = KeyedJaggedTensor.from_lengths_sync(
            keys=keys, values=torch.from_numpy(values), lengths=torch.from_numpy(lengths))
        return Batch(dense_features=torch.from_numpy(np.ascontiguousarray(self.dense)),
                     sparse_features=sparse, labels=torch.from_numpy(np.ascontiguousarray(self.labels)))


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """[features, rows] lengths -> [features, rows + 1] offsets from 0."""
    offsets = np.zeros((lengths.shape[0], lengths.shape[1] + 1), dtype=np.int64)
    np.cumsum(lengths, axis=1, out=offsets[:, 1:])
    return offsets


def _labels(table: pa.Table, schema: FeatureSchema, source: str) -> np.ndarray:
    labels = _flat(table.column(schema.label))
    values = labels.to_numpy(zero_copy_only=False).astype(np.float32)
    bad = (values != 0.0) & (values != 1.0)
    if labels.null_count:
        bad |= ~_valid(labels)
    if bad.any():
        row = _first(bad)
        shown = "null" if not labels[row].is_valid else repr(float(values[row]))
        raise DataError(f"{source}, row {row}: column {schema.label!r} has label {shown}; expected 0 or 1.")
    return values


def _dense(table: pa.Table, schema: FeatureSchema, source: str, policy: InputPolicy) -> np.ndarray:
    dense = np.empty((table.num_rows, len(schema.dense)), dtype=np.float32)
    for i, name in enumerate(schema.dense):
        column = _flat(table.column(name))
        values = column.to_numpy(zero_copy_only=False).astype(np.float32)
        bad = ~np.isfinite(values)
        if column.null_count:
            bad |= ~_valid(column)
        if bad.any():
            if policy.invalid_dense != "fill":
                row = _first(bad)
                raise DataError(
                    f"{source}, row {row}: column {name!r} has {column[row].as_py()}; expected a finite number "
                    "(or set data.invalid_dense=fill to replace NaN, inf and null with data.dense_fill_value)."
                )
            values[bad] = policy.dense_fill_value
        dense[:, i] = values
    return dense


def _sparse(column: pa.Array, name: str, num_embeddings: int, source: str, policy: InputPolicy):
    """(offsets, ids) of one sparse feature; a null row (or null list) has no ids."""
    if _is_list(column):
        offsets = column.offsets.to_numpy().astype(np.int64)
        ids = column.values.slice(offsets[0], offsets[-1] - offsets[0])
        offsets -= offsets[0]
        if column.null_count:  # a null list may still span values in the child array: drop them
            lengths = np.where(_valid(column), np.diff(offsets), 0)
            keep = np.repeat(_valid(column), np.diff(offsets))
            ids = ids.filter(pa.array(keep))
            offsets = np.zeros(len(column) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
    else:
        valid = _valid(column) if column.null_count else None
        offsets = np.zeros(len(column) + 1, dtype=np.int64)
        if valid is None:
            offsets[1:] = np.arange(1, len(column) + 1)
        else:
            np.cumsum(valid, out=offsets[1:])
        ids = column.drop_null() if column.null_count else column
    values = ids.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    bad = (values < 0) | (values >= num_embeddings)
    if bad.any():
        if policy.invalid_ids != "hash":
            index = _first(bad)
            row = int(np.searchsorted(offsets, index, side="right") - 1)
            raise DataError(
                f"{source}, row {row}: column {name!r} has id {int(values[index])}; expected ids in "
                f"[0, {num_embeddings}) (features config: num_embeddings={num_embeddings}; or set "
                "data.invalid_ids=hash to map each id to id mod num_embeddings)."
            )
        values = np.mod(values, num_embeddings)
    return offsets, values


def decode(table: pa.Table, schema: FeatureSchema, source: str = "<memory>",
           policy: InputPolicy = InputPolicy()) -> Rows:
    """Check and decode the rows of `table`, raising DataError at the first value that cannot be
    trained on (naming `source`, the row and the column) unless `policy` says to repair it."""
    labels = _labels(table, schema, source)
    dense = _dense(table, schema, source, policy)
    offsets = np.empty((len(schema.sparse), table.num_rows + 1), dtype=np.int64)
    ids, single_hot = [], []
    for f, feature in enumerate(schema.sparse):
        column = _flat(table.column(feature.name))
        offsets[f], feature_ids = _sparse(column, feature.name, feature.num_embeddings, source, policy)
        ids.append(feature_ids)
        single_hot.append(not _is_list(column) and column.null_count == 0)
    return Rows(dense, labels, offsets, ids, tuple(single_hot))


def table_to_batch(table: pa.Table, schema: FeatureSchema, source: str = "<memory>",
                   policy: InputPolicy = InputPolicy()) -> Batch:
    """One Batch from all the rows of `table`."""
    return decode(table, schema, source, policy).to_batch(schema.sparse_names)
