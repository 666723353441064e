"""Arrow columns -> torchrec Batch (dense features, KeyedJaggedTensor, labels), with input checks.

A row group is checked and decoded once, into numpy arrays (`Rows`); batches are then cut from
those arrays, so the per-batch work is a few slices and concatenations, not a walk over Arrow
columns. Everything is vectorised over the column, no per-row Python, because this runs for every
row that is trained on.

The checks are the ones that would otherwise corrupt training silently or crash deep inside an
FBGEMM kernel: ids outside their table, null ids inside a list, non-finite dense values, labels
that are not 0/1. Each error names where the bad value came from; `InputPolicy` says which of them
to repair instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

if TYPE_CHECKING:
    from torchrec.datasets.utils import Batch

from app.config import DataConfig
from app.data import DataError
from app.features import FeatureSchema


@dataclass(frozen=True)
class InputPolicy:
    """What to do with values that cannot be trained on as they are. Labels outside {0, 1} are
    always an error: no repair of a label is right."""

    # "hash": an id outside [0, num_embeddings) becomes id mod num_embeddings, and a null id inside a
    # list is dropped from its bag (it has no value to hash).
    invalid_ids: str = "error"
    invalid_dense: str = "error"  # "fill": NaN, inf and null dense values become dense_fill_value
    dense_fill_value: float = 0.0

    @classmethod
    def from_config(cls, config: DataConfig) -> InputPolicy:
        """The policy of data.invalid_ids, data.invalid_dense and data.dense_fill_value."""
        return cls(config.invalid_ids, config.invalid_dense, config.dense_fill_value)


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
    """Decoded rows: dense [rows, D] float32, labels [rows] float32 ([rows, tasks] multi-task), and per
    sparse feature its ids.
    A single-hot feature (one id in every row) is just ids[f], row r's id at ids[f][r]; a multi-hot
    one also has offsets[f]: row r's ids are ids[f][offsets[f][r]:offsets[f][r + 1]]. Single-hot
    features, the common case, so need no offsets at all: slicing is a view, shuffling one gather."""

    dense: np.ndarray
    labels: np.ndarray
    ids: list[np.ndarray]
    offsets: list[np.ndarray | None]  # None for a single-hot feature

    def __len__(self) -> int:
        return len(self.labels)

    def slice(self, start: int, stop: int) -> Rows:
        ids = [i if o is not None else i[start:stop] for i, o in zip(self.ids, self.offsets)]
        offsets = [o[start : stop + 1] if o is not None else None for o in self.offsets]
        return Rows(self.dense[start:stop], self.labels[start:stop], ids, offsets)

    def _lengths_and_ids(self, f: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids per row, the ids themselves) of feature f, as the rows are now."""
        offsets = self.offsets[f]
        if offsets is None:
            return np.ones(len(self), dtype=np.int64), self.ids[f]
        return np.diff(offsets), self.ids[f][offsets[0] : offsets[-1]]

    def take(self, order: np.ndarray) -> Rows:
        """The rows in `order` (a permutation or any selection of row indices)."""
        ids: list[np.ndarray] = []
        offsets: list[np.ndarray | None] = []
        for f, feature_ids in enumerate(self.ids):
            old = self.offsets[f]
            if old is None:
                ids.append(feature_ids[order])
                offsets.append(None)
                continue
            lengths = np.diff(old)[order]
            new = _offsets(lengths)
            # Each output id's source position: its row's old start plus its place within the row.
            source = np.repeat(old[:-1][order] - new[:-1], lengths) + np.arange(new[-1])
            ids.append(feature_ids[source])
            offsets.append(new)
        return Rows(self.dense[order], self.labels[order], ids, offsets)

    @staticmethod
    def concat(parts: Sequence[Rows]) -> Rows:
        if len(parts) == 1:
            return parts[0]
        ids: list[np.ndarray] = []
        offsets: list[np.ndarray | None] = []
        for f in range(len(parts[0].ids)):
            if all(p.offsets[f] is None for p in parts):
                ids.append(np.concatenate([p.ids[f] for p in parts]))
                offsets.append(None)
                continue
            pieces = [p._lengths_and_ids(f) for p in parts]
            offsets.append(_offsets(np.concatenate([lengths for lengths, _ in pieces])))
            ids.append(np.concatenate([feature_ids for _, feature_ids in pieces]))
        return Rows(np.concatenate([p.dense for p in parts]), np.concatenate([p.labels for p in parts]), ids, offsets)

    def to_batch(self, keys: list[str], pin_memory: bool = False, sequence: Sequence[tuple[str, int]] = ()) -> Batch:
        """The rows as a torchrec Batch. `pin_memory` (needs CUDA): in page-locked memory, so that
        its copy to the GPU (batch.to(device, non_blocking=True), as TrainPipelineSparseDist makes
        on its copy stream) runs asynchronously, overlapping the step before it, instead of being
        staged through a pageable buffer by a blocking copy. `sequence` (FeatureSchema.sequence_inputs):
        a SequenceBatch, whose sequence_features KJT has these keys, each from the feature it names."""
        # torchrec is imported here, in the training process: the reader processes decode Rows and
        # never build a Batch, and importing torchrec would add seconds to their start.
        from torchrec.datasets.utils import Batch
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        pieces = [self._lengths_and_ids(f) for f in range(len(keys))]  # histories (after them) go apart
        lengths = np.concatenate([lengths for lengths, _ in pieces])
        values = np.concatenate([feature_ids for _, feature_ids in pieces])
        sparse = KeyedJaggedTensor.from_lengths_sync(
            keys=keys, values=torch.from_numpy(values), lengths=torch.from_numpy(lengths)
        )
        batch = Batch(
            dense_features=torch.from_numpy(np.ascontiguousarray(self.dense)),
            sparse_features=sparse,
            labels=torch.from_numpy(np.ascontiguousarray(self.labels)),
        )
        if sequence:
            from app.data.sequence_batch import with_sequences

            batch = with_sequences(batch, [(key, *self._lengths_and_ids(f)) for key, f in sequence])
        return batch.pin_memory() if pin_memory else batch


def _offsets(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _labels(table: pa.Table, schema: FeatureSchema, source: str, name: str | None = None) -> np.ndarray:
    name = name or schema.label
    labels = _flat(table.column(name))
    values = labels.to_numpy(zero_copy_only=False).astype(np.float32)
    bad = (values != 0.0) & (values != 1.0)
    if labels.null_count:
        bad |= ~_valid(labels)
    if bad.any():
        row = _first(bad)
        shown = "null" if not labels[row].is_valid else repr(float(values[row]))
        raise DataError(f"{source}, row {row}: column {name!r} has label {shown}; expected 0 or 1.")
    return values


def label_shape(schema: FeatureSchema, rows: int) -> tuple[int, ...]:
    """Shape of `rows` rows' labels: [rows] for one task, [rows, tasks] for several (multi-task)."""
    return (rows,) if len(schema.tasks) == 1 else (rows, len(schema.tasks))


def _task_labels(table: pa.Table, schema: FeatureSchema, source: str) -> np.ndarray:
    """[rows] labels of the one task, or [rows, tasks] of several, each column checked as one."""
    if len(schema.tasks) == 1:
        return _labels(table, schema, source)
    return np.stack([_labels(table, schema, source, name) for name in schema.tasks], axis=1)


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


def _row(offsets: np.ndarray | None, index: int) -> int:
    """The row that holds ids[index]."""
    return index if offsets is None else int(np.searchsorted(offsets, index, side="right") - 1)


def _sparse(column: pa.Array, name: str, num_embeddings: int | None, source: str, policy: InputPolicy):
    """(offsets, ids) of one sparse feature, offsets None when every row has exactly one id; a
    null row (or null list) has no ids. A null id inside a list is not a row without ids but an id
    nobody wrote: an error, or dropped from its bag under invalid_ids=hash."""
    offsets = None
    if _is_list(column):
        offsets = column.offsets.to_numpy().astype(np.int64)
        ids = column.values.slice(offsets[0], offsets[-1] - offsets[0])
        offsets -= offsets[0]
        if column.null_count:  # a null list may still span values in the child array: drop them
            lengths = np.where(_valid(column), np.diff(offsets), 0)
            ids = ids.filter(pa.array(np.repeat(_valid(column), np.diff(offsets))))
            offsets = _offsets(lengths)
        if ids.null_count:  # (and to_numpy would turn the nulls into -2**63, or every id into a float)
            valid = _valid(ids)
            if policy.invalid_ids != "hash":
                raise DataError(
                    f"{source}, row {_row(offsets, _first(~valid))}: column {name!r} has a null id inside its "
                    f"list; expected {'int64 ids' if num_embeddings is None else f'ids in [0, {num_embeddings})'} "
                    "(or set data.invalid_ids=hash to drop null ids from their lists)."
                )
            rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
            offsets = _offsets(np.bincount(rows[valid], minlength=len(offsets) - 1))
            ids = ids.filter(pa.array(valid))
    elif column.null_count:
        offsets = _offsets(_valid(column).astype(np.int64))
        ids = column.drop_null()
    else:
        ids = column
    values = ids.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    if num_embeddings is None:  # raw ids (id_mapping=managed_collision): every int64 is an id
        return offsets, values
    bad = (values < 0) | (values >= num_embeddings)
    if bad.any():
        if policy.invalid_ids != "hash":
            index = _first(bad)
            row = _row(offsets, index)
            raise DataError(
                f"{source}, row {row}: column {name!r} has id {int(values[index])}; expected ids in "
                f"[0, {num_embeddings}) (features config: num_embeddings={num_embeddings}; or set "
                "data.invalid_ids=hash to map each id to id mod num_embeddings)."
            )
        values = np.mod(values, num_embeddings)
    return offsets, values


def _id_range(feature, policy: InputPolicy) -> tuple[int | None, InputPolicy]:
    """The ids `feature` accepts, as _sparse's num_embeddings (None: any int64), and the policy for
    them: id_mapping=modulo hashes every id into the table (data.invalid_ids=hash's mapping, for
    this column always); managed_collision takes raw ids as they are (its module maps them)."""
    mapping = getattr(feature, "id_mapping", "direct")
    if mapping == "modulo":
        return feature.num_embeddings, replace(policy, invalid_ids="hash")
    if mapping == "managed_collision":
        return None, policy
    return feature.num_embeddings, policy


def decode(
    table: pa.Table, schema: FeatureSchema, source: str = "<memory>", policy: InputPolicy = InputPolicy()
) -> Rows:
    """Check and decode the rows of `table`, raising DataError at the first value that cannot be
    trained on (naming `source`, the row and the column) unless `policy` says to repair it."""
    labels = _task_labels(table, schema, source)
    dense = _dense(table, schema, source, policy)
    ids, offsets = [], []
    for feature in schema.sparse:
        rows, feature_policy = _id_range(feature, policy)
        feature_offsets, feature_ids = _sparse(
            _flat(table.column(feature.name)), feature.name, rows, source, feature_policy
        )
        ids.append(feature_ids)
        offsets.append(feature_offsets)
    for history in schema.sequence:  # after the sparse features (FeatureSchema.sequence_inputs)
        history_offsets, history_ids = _sparse(
            _flat(table.column(history.name)), history.name, history.num_embeddings, source, policy
        )
        history_offsets, history_ids = keep_recent(history_offsets, history_ids, history.max_length)
        ids.append(history_ids)
        offsets.append(history_offsets)
    for history in schema.sequence:  # then the candidates, in their history's table
        index = schema.sparse_names.index(history.target)
        target = schema.sparse[index]
        _, target_policy = _id_range(target, policy)
        if target.num_embeddings == history.num_embeddings or target_policy.invalid_ids != "hash":
            ids.append(ids[index])  # the target's own rows are the history table's rows
            offsets.append(offsets[index])
            continue
        # Hashed ids: mod the target's table is another row than the history's for the same raw id
        # (150 is row 50 of 100 rows, row 150 of 200): the candidate is mapped as the history is.
        candidate_offsets, candidate_ids = _sparse(
            _flat(table.column(target.name)), target.name, history.num_embeddings, source, target_policy
        )
        ids.append(candidate_ids)
        offsets.append(candidate_offsets)
    return Rows(dense, labels, ids, offsets)


def with_empty_histories(rows: Rows, schema: FeatureSchema) -> Rows:
    """`rows` (padding, with the sparse features only) with an empty history for every sequence
    feature, and its candidate's ids (the target's, valid rows of the history's table too)."""
    empty = [np.zeros(len(rows) + 1, np.int64) for _ in schema.sequence]
    targets = [schema.sparse_names.index(history.target) for history in schema.sequence]
    return Rows(
        rows.dense,
        rows.labels,
        [*rows.ids, *(np.zeros(0, np.int64) for _ in empty), *(rows.ids[t] for t in targets)],
        [*rows.offsets, *empty, *(rows.offsets[t] for t in targets)],
    )


def keep_recent(offsets: np.ndarray | None, ids: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, ids) of a history with each row cut to its last `max_length` ids: lists are oldest
    first, so these are the most recent. Always with offsets (a row may hold none)."""
    if offsets is None:
        offsets = np.arange(len(ids) + 1, dtype=np.int64)
    lengths = np.diff(offsets)
    kept = np.minimum(lengths, max_length)
    if (kept == lengths).all():
        return offsets, ids
    new = _offsets(kept)
    # Each kept id's source: its row's end less the ids kept, plus its place among them.
    source = np.repeat(offsets[1:] - kept - new[:-1], kept) + np.arange(new[-1])
    return new, ids[source]


def table_to_batch(
    table: pa.Table, schema: FeatureSchema, source: str = "<memory>", policy: InputPolicy = InputPolicy()
) -> Batch:
    """One Batch from all the rows of `table`."""
    return decode(table, schema, source, policy).to_batch(schema.sparse_names, sequence=schema.sequence_inputs)
