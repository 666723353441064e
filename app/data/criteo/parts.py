"""The output rows and the Parquet parts they are written in.

The columns are the features config's, in raw field order: the label as int8 (0/1); the dense
columns as float32, log(1 + max(x, 0)) by default as the DLRM reference feeds them (the model takes
dense values as they are), an empty field as 0; the sparse columns as int64 ids, an empty field as
null (the loader reads it as an empty bag). A column of hotness h > 1 is list<int64>: each row's
id, then h - 1 ids derived from it (multi_hot.py); an empty field stays null.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from app.data import DataError
from app.data.criteo.multi_hot import multi_hot_bags
from app.data.criteo.options import CriteoColumns
from app.data.criteo.tsv import distinct_values
from app.data.criteo.vocabulary import Vocabulary

# Every input is written in at least this many row groups (unless it has fewer rows): the loader
# deals whole row groups to ranks, so a small conversion in one or two row groups could not be
# trained on one node's 8 GPUs, or even on 2 ranks.
MIN_ROW_GROUPS = 8


def output_schema(columns: CriteoColumns) -> pa.Schema:
    return pa.schema(
        [(columns.label, pa.int8())]
        + [(name, pa.float32()) for name in columns.dense]
        + [
            (name, pa.int64() if hot == 1 else pa.list_(pa.int64()))
            for name, hot in zip(columns.sparse, columns.hotness)
        ]
    )


def output_rows(
    batch: pa.RecordBatch,
    first_line: int,
    path: str,
    columns: CriteoColumns,
    log_dense: bool,
    vocabularies: list[Vocabulary] | None,
    multi_hot_seed: int = 0,
    raw: bool = False,
) -> pa.Table:
    """One block's rows in the output schema: ids from the vocabularies, or without them, hashed
    (int(hex, 16) mod the table's rows), or as they are with `raw` (int(hex, 16))."""
    raw_label = batch.column(columns.label)
    label = pc.fill_null(raw_label, -1).to_numpy()
    bad = (label != 0) & (label != 1)
    if bad.any():
        row = int(np.argmax(bad))
        shown = repr(str(label[row])) if raw_label[row].is_valid else "an empty field"
        raise DataError(
            f"{path}, line {first_line + row}, column {columns.label!r} (field 1): {shown}; expected 0 or 1."
        )
    arrays = [pa.array(label.astype(np.int8))]
    for name in columns.dense:
        values = pc.fill_null(batch.column(name), 0).to_numpy()
        if log_dense:
            arrays.append(pa.array(np.log1p(np.maximum(values, 0)).astype(np.float32)))
        else:
            arrays.append(pa.array(values.astype(np.float32)))
    for index, (name, num_embeddings, hotness) in enumerate(
        zip(columns.sparse, columns.num_embeddings, columns.hotness)
    ):
        values, rows = distinct_values(batch.column(name), name, path, first_line, columns)
        if raw:
            ids = _as_int64(values, rows, batch.column(name), name, path, first_line, columns)
        elif vocabularies is None:
            ids = (values % np.uint64(num_embeddings)).astype(np.int64)
        else:
            ids = vocabularies[index].lookup(values)
        if hotness == 1:
            arrays.append(pa.array(ids, pa.int64()).take(rows))  # null rows stay null
        else:  # a bag per distinct value, then per row
            bags = multi_hot_bags(ids, hotness, num_embeddings, index, multi_hot_seed)
            per_value = pa.FixedSizeListArray.from_arrays(pa.array(bags.ravel()), hotness)
            arrays.append(per_value.take(rows).cast(pa.list_(pa.int64())))
    return pa.Table.from_arrays(arrays, schema=output_schema(columns))


def _as_int64(
    values: np.ndarray, rows: pa.Array, column: pa.Array, name: str, path: str, first_line: int, columns: CriteoColumns
) -> np.ndarray:
    """Raw ids as int64, the loader's type: a value of 2**63 or more (16 hex digits from 8) is refused."""
    too_large = values >= np.uint64(2**63)
    if too_large.any():
        at = pc.is_in(rows, value_set=pa.array(np.flatnonzero(too_large), rows.type))
        row = int(np.argmax(pc.fill_null(at, False).to_numpy(zero_copy_only=False)))
        raise DataError(
            f"{path}, line {first_line + row}, column {name!r} (field {columns.field(name)}): {column[row].as_py()!r} "
            "is 2**63 or more, which no int64 id holds; --categorical raw takes values below 8000000000000000."
        )
    return values.astype(np.int64)


def part_name(stem: str, index: int) -> str:
    return f"{stem}-{index:05d}.parquet"


class PartWriter:
    """Parquet parts <stem>-NNNNN.parquet of rows_per_file rows in row groups of rows_per_row_group
    rows (the last of each shorter), each written to the path open_part(name) gives. An input of
    fewer than MIN_ROW_GROUPS row groups is written in MIN_ROW_GROUPS smaller ones instead, of
    equal size: its first rows are held until they fill that many row groups, or the input ends."""

    def __init__(
        self,
        open_part: Callable[[str], Path],
        stem: str,
        schema: pa.Schema,
        rows_per_file: int,
        rows_per_row_group: int,
    ) -> None:
        self.open_part, self.stem, self.schema = open_part, stem, schema
        self.rows_per_file, self.rows_per_row_group = rows_per_file, rows_per_row_group
        self.parts: list[str] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_file = 0
        self._holding = True  # while the input may still be small

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self._writer is not None:
            self._writer.close()

    def _group_rows(self) -> int:
        return min(self.rows_per_row_group, self.rows_per_file - self._rows_in_file)

    def write(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._holding and self._pending_rows < MIN_ROW_GROUPS * self.rows_per_row_group:
            return
        self._holding = False
        while self._pending_rows >= self._group_rows():
            self._write_group(self._group_rows())

    def close(self) -> list[str]:
        """Writes what is left; returns the part names."""
        if self._holding:  # the whole input: MIN_ROW_GROUPS row groups, equal but for a row
            rows = self._pending_rows
            for i in range(MIN_ROW_GROUPS):
                group = rows * (i + 1) // MIN_ROW_GROUPS - rows * i // MIN_ROW_GROUPS
                while group:  # split where a part ends
                    written = min(group, self.rows_per_file - self._rows_in_file)
                    self._write_group(written)
                    group -= written
        if self._pending_rows:
            self._write_group(self._pending_rows)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.parts

    def _write_group(self, rows: int) -> None:
        pending = pa.concat_tables(self._pending)
        group, rest = pending.slice(0, rows), pending.slice(rows)
        if self._writer is None:
            self.parts.append(part_name(self.stem, len(self.parts)))
            self._writer = pq.ParquetWriter(str(self.open_part(self.parts[-1])), self.schema)
        self._writer.write_table(group, row_group_size=rows)
        self._rows_in_file += rows
        if self._rows_in_file == self.rows_per_file:
            self._writer.close()
            self._writer, self._rows_in_file = None, 0
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows -= rows
