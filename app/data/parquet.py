"""Rank-aware Parquet reader: row groups split across ranks, the same batch count everywhere.

Every rank reads the footers of all files and derives the same global plan from them alone (which
row groups, in which order, belong to which rank), so no communication is needed to agree on it.
Training must give every rank the same number of batches: a rank that ran out early would leave
the others waiting forever in the next all-to-all. So a training epoch is as long as the shortest
rank's share, and an evaluation pass as long as the longest, with padding rows marked invalid.
Decoding runs on a background thread, ahead of training.
"""

from __future__ import annotations

import glob
import os
import queue
import threading
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torchrec.datasets.utils import Batch

from app.data import DataError
from app.data.batch import table_to_batch, validate_table
from app.features import FeatureSchema


def resolve_files(path: str) -> List[str]:
    """A directory (every *.parquet below it), one file, or a glob -> sorted file list."""
    if os.path.isdir(path):
        files = glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True)
    elif os.path.isfile(path):
        files = [path]
    else:
        files = [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
    if not files:
        raise DataError(f"no Parquet files at {path!r}: expected a directory of .parquet files, a file, or a glob.")
    return sorted(files)


def _is_number(arrow_type: pa.DataType) -> bool:
    return pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type) or pa.types.is_boolean(arrow_type)


def _is_id_column(arrow_type: pa.DataType) -> bool:
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        arrow_type = arrow_type.value_type
    return pa.types.is_integer(arrow_type)


def check_files(files: Sequence[str], schema: FeatureSchema) -> None:
    """Check columns and types from the footers alone (cheap), before any training starts."""
    if not files:
        raise DataError("no Parquet files to read.")
    total_rows = 0
    for path in files:
        try:
            metadata = pq.read_metadata(path)
            arrow_schema = metadata.schema.to_arrow_schema()
        except Exception as error:  # pyarrow raises several types for a damaged file
            raise DataError(f"{path}: not a readable Parquet file ({error}).") from error
        total_rows += metadata.num_rows
        present = set(arrow_schema.names)
        missing = [c for c in schema.columns if c not in present]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; the features config expects {schema.columns}.")
        for name in (schema.label, *schema.dense):
            if not _is_number(arrow_schema.field(name).type):
                raise DataError(f"{path}: column {name!r} has type {arrow_schema.field(name).type}; expected a number type.")
        for name in schema.sparse_names:
            if not _is_id_column(arrow_schema.field(name).type):
                raise DataError(
                    f"{path}: column {name!r} has type {arrow_schema.field(name).type}; "
                    "expected int64 (one id per row) or list<int64> (multi-hot)."
                )
    if total_rows == 0:
        raise DataError(f"the Parquet files hold no rows: {list(files)[:5]}{' ...' if len(files) > 5 else ''}")


@dataclass(frozen=True)
class _RowGroup:
    file: str
    index: int
    rows: int
    position: int  # in the unshuffled global list; seeds the row shuffle inside it


@dataclass
class EvalBatch:
    batch: Batch
    valid: int  # the first `valid` rows are real, the rest pad the batch to the common size


class _Error:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()


class ParquetBatches:
    """Iterable over this rank's batches of one epoch; `len()` is the same on every rank."""

    def __init__(
        self,
        files: Sequence[str],
        schema: FeatureSchema,
        batch_size: int,
        rank: int,
        world_size: int,
        shuffle: bool = False,
        seed: int = 0,
        pad_to_equal: bool = False,
        prefetch_batches: int = 4,
    ) -> None:
        self.files = list(files)
        self.schema = schema
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.pad_to_equal = pad_to_equal
        self.prefetch_batches = prefetch_batches
        self._row_groups = self._read_footers()
        self._epoch = 0
        self._start = 0  # batches to skip at the next __iter__ (resume)
        self._taken = 0
        if not pad_to_equal and len(self) == 0:
            rows = [sum(rg.rows for rg in self._assignment(0, r)) for r in range(world_size)]
            raise DataError(
                f"not one full batch of {batch_size} rows for every rank: {len(self._row_groups)} row "
                f"group(s) in {len(self.files)} file(s) give the {world_size} ranks {rows} rows. Use a "
                "smaller batch size, fewer ranks, or files with more (smaller) row groups."
            )

    def _read_footers(self) -> List[_RowGroup]:
        groups: List[_RowGroup] = []
        for path in self.files:
            metadata = pq.read_metadata(path)
            for i in range(metadata.num_row_groups):
                rows = metadata.row_group(i).num_rows
                if rows:
                    groups.append(_RowGroup(path, i, rows, len(groups)))
        return groups

    def _assignment(self, epoch: int, rank: int) -> List[_RowGroup]:
        order = self._row_groups
        if self.shuffle:
            permutation = np.random.default_rng([self.seed, epoch]).permutation(len(order))
            order = [order[i] for i in permutation]
        return order[rank :: self.world_size]

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def __len__(self) -> int:
        rows = [sum(rg.rows for rg in self._assignment(self._epoch, r)) for r in range(self.world_size)]
        if self.pad_to_equal:
            return max(-(-n // self.batch_size) for n in rows)
        return min(n // self.batch_size for n in rows)

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self._epoch, "batches_done": self._taken}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self._epoch = int(state["epoch"])
        self._start = int(state["batches_done"])

    # ---- iteration --------------------------------------------------------------------------

    def __iter__(self) -> Iterator:
        start, self._start = self._start, 0
        self._taken = start
        produce = self._produce(self._epoch, start)
        if self.prefetch_batches <= 0:
            for item in produce:
                self._taken += 1
                yield item
            return
        yield from self._prefetched(produce)

    def _prefetched(self, produce: Iterator) -> Iterator:
        """Runs `produce` on a thread, `prefetch_batches` ahead; stops it if the consumer stops."""
        items: "queue.Queue" = queue.Queue(maxsize=self.prefetch_batches)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    items.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                for item in produce:
                    if not put(item):
                        return
                put(_DONE)
            except BaseException as error:  # handed to the consumer, which re-raises it
                put(_Error(error))

        thread = threading.Thread(target=work, name="parquet-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = items.get()
                if item is _DONE:
                    return
                if isinstance(item, _Error):
                    raise item.error
                self._taken += 1
                yield item
        finally:
            stop.set()
            thread.join()

    def _produce(self, epoch: int, skip_batches: int) -> Iterator:
        total = len(self)
        pending: List[pa.Table] = []
        pending_rows = 0
        emitted = skip_batches
        skip_rows = skip_batches * self.batch_size
        for group in self._assignment(epoch, self.rank):
            if emitted >= total:
                return
            if skip_rows >= group.rows:  # resume: whole row groups are skipped unread
                skip_rows -= group.rows
                continue
            table = self._read(group, epoch)
            if skip_rows:
                table, skip_rows = table.slice(skip_rows), 0
            pending.append(table)
            pending_rows += table.num_rows
            while pending_rows >= self.batch_size and emitted < total:
                rows = pa.concat_tables(pending)
                batch_rows, rest = rows.slice(0, self.batch_size), rows.slice(self.batch_size)
                yield self._convert(batch_rows, self.batch_size)
                emitted += 1
                pending, pending_rows = ([rest], rest.num_rows) if rest.num_rows else ([], 0)
        if not self.pad_to_equal:
            return
        while emitted < total:  # evaluation: pad this rank up to the longest rank's count
            valid = pending_rows
            rows = pa.concat_tables(pending) if pending else self._padding_rows()
            yield self._convert(self._pad(rows), valid)
            emitted += 1
            pending, pending_rows = [], 0

    def _read(self, group: _RowGroup, epoch: int) -> pa.Table:
        table = pq.ParquetFile(group.file).read_row_group(group.index, columns=self.schema.columns)
        validate_table(table, self.schema, f"{group.file} row group {group.index}")
        if self.shuffle:
            rows = np.random.default_rng([self.seed, epoch, group.position]).permutation(table.num_rows)
            table = table.take(rows)
        return table

    def _padding_rows(self) -> pa.Table:
        first = self._row_groups[0]
        return pq.ParquetFile(first.file).read_row_group(first.index, columns=self.schema.columns)

    def _pad(self, rows: pa.Table) -> pa.Table:
        repeats = -(-self.batch_size // rows.num_rows)
        return pa.concat_tables([rows] * repeats).slice(0, self.batch_size)

    def _convert(self, rows: pa.Table, valid: int):
        batch = table_to_batch(rows, self.schema, validate=False)  # checked row group by row group in _read
        return EvalBatch(batch, valid) if self.pad_to_equal else batch

