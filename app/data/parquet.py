"""Rank-aware Parquet reader: row groups split across ranks, the same batch count everywhere.

Every rank reads the footers of all files and derives the same global plan from them alone (which
row groups, in which order, belong to which rank), so no communication is needed to agree on it.
Training must give every rank the same number of batches: a rank that ran out early would leave
the others waiting forever in the next all-to-all. So a training epoch is as long as the shortest
rank's share, and an evaluation pass as long as the longest, with padding rows marked invalid.
Reading and decoding run in a worker process, ahead of training.
"""

from __future__ import annotations

import glob
import os
import signal
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.data import DataLoader, IterableDataset
from torchrec.datasets.utils import Batch

from app.data import DataError
from app.data.batch import InputPolicy, Rows, decode
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


def _expected_kind(schema: FeatureSchema, name: str) -> str:
    return "a number type" if name in (schema.label, *schema.dense) else \
        "int64 (one id per row) or list<int64> (multi-hot)"


def check_files(files: Sequence[str], schema: FeatureSchema) -> None:
    """Check columns, types and row counts from the footers alone (cheap), before training starts:
    a missing column, a column of the wrong type, a file with no rows, or files that disagree on a
    column's type. Each error names the file and the column."""
    if not files:
        raise DataError("no Parquet files to read.")
    first_types: Dict[str, pa.DataType] = {}
    for path in files:
        try:
            metadata = pq.read_metadata(path)
            arrow_schema = metadata.schema.to_arrow_schema()
        except Exception as error:  # pyarrow raises several types for a damaged file
            raise DataError(f"{path}: not a readable Parquet file ({error}).") from error
        present = set(arrow_schema.names)
        missing = [c for c in schema.columns if c not in present]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; the features config expects {schema.columns}.")
        for name in schema.columns:
            arrow_type = arrow_schema.field(name).type
            fits = _is_number(arrow_type) if name in (schema.label, *schema.dense) else _is_id_column(arrow_type)
            if not fits:
                raise DataError(f"{path}: column {name!r} has type {arrow_type}; expected {_expected_kind(schema, name)}.")
            if name not in first_types:
                first_types[name] = arrow_type
            elif arrow_type != first_types[name]:
                raise DataError(
                    f"{path}: column {name!r} has type {arrow_type}, but {files[0]} has {first_types[name]}; "
                    "every file of a split must have the same schema."
                )
        if metadata.num_rows == 0:
            raise DataError(f"{path}: the file holds no rows; remove it or write rows into it.")


# What pyarrow raises for a row group whose pages it cannot read: OSError for most damage (a page
# header that does not deserialize, compressed data that does not decompress, bad levels) and
# ArrowInvalid for some (a page that decompresses to the wrong size).
_READ_ERRORS = (OSError, pa.ArrowException)


def _read_row_group(path: str, index: int, schema: FeatureSchema, policy: InputPolicy,
                    open_file: Callable[[str], pq.ParquetFile] = pq.ParquetFile) -> Rows:
    """Row group `index` of `path`, read and decoded; a damaged page is a DataError naming the row
    group, as a bad value is. One thread: the reader already runs beside training, which needs the
    other cores."""
    source = f"{path} row group {index}"
    try:
        table = open_file(path).read_row_group(index, columns=schema.columns, use_threads=False)
    except _READ_ERRORS as error:
        raise DataError(
            f"{source}: cannot be read ({' '.join(str(error).split())}); the file is damaged: write it "
            "again, or remove it from the split."
        ) from error
    return decode(table, schema, source, policy)


def check_first_row_group(files: Sequence[str], schema: FeatureSchema, policy: InputPolicy = InputPolicy()) -> None:
    """Read and decode a split's first row group as the loader will, before the first step: values
    the loader would refuse there (or a page it cannot read) stop the job now, not at the first
    evaluation after training. One row group on one thread, so it is cheap; the others are checked
    as they are read. Call it after check_files, which has checked the footers."""
    for path in files:
        metadata = pq.read_metadata(path)
        for index in range(metadata.num_row_groups):
            if metadata.row_group(index).num_rows:
                _read_row_group(path, index, schema, policy)
                return


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


class _Windows(IterableDataset):
    """A reader's windows of one epoch, as its worker process sends them: numpy arrays (tensors on
    the way), and an input error as its message, which the reader re-raises as a DataError."""

    def __init__(self, reader: "ParquetBatches", epoch: int, skip_rows: int) -> None:
        self.reader, self.epoch, self.skip_rows = reader, epoch, skip_rows

    def __iter__(self) -> Iterator[tuple]:
        # Arrays decoded zero-copy from Arrow are read-only. The DataLoader copies them into shared
        # memory on the way, and nothing writes to them, so torch's warning about it is noise.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        try:
            for rows in self.reader._window_rows(self.epoch, self.skip_rows):
                yield "rows", rows.dense, rows.labels, tuple(rows.ids), tuple(rows.offsets)
        except DataError as error:
            yield "error", str(error)


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """The reader process ignores SIGTERM and SIGINT. Launchers signal a whole process group
    (torchrun each worker's, Slurm every process, a terminal's Ctrl-C its foreground group): a
    reader killed by them would crash the training process before it could save a checkpoint.
    Its training process decides when to stop and shuts it down (as does that process's death)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
        prefetch_windows: int = 2,
        shuffle_window: int = 4,
        policy: InputPolicy = InputPolicy(),
    ) -> None:
        self.files = list(files)
        self.schema = schema
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.pad_to_equal = pad_to_equal
        self.prefetch_windows = prefetch_windows
        self.shuffle_window = shuffle_window if shuffle else 1
        self.policy = policy
        self._open_files: "OrderedDict[str, pq.ParquetFile]" = OrderedDict()
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
        if self.shuffle and not self.pad_to_equal:
            # Which rank gets which row groups changes every epoch, and with row groups of unequal
            # size so would the shortest share. The trainer needs one epoch length, so take one
            # that every epoch can fill: each rank gets at least len // world_size row groups,
            # and those hold at least as many rows as the smallest ones do.
            per_rank = len(self._row_groups) // self.world_size
            return sum(sorted(rg.rows for rg in self._row_groups)[:per_rank]) // self.batch_size
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
        skip_rows = start * self.batch_size
        if self.prefetch_windows <= 0:
            windows = self._window_rows(self._epoch, skip_rows)
        else:
            windows = self._prefetched(skip_rows)
        try:
            for item in self._batches(windows, start):
                self._taken += 1
                yield item
        except DataError as error:
            error.rank_specific = True
            raise
        finally:
            windows.close()  # stops the worker process when the consumer stops early

    def _prefetched(self, skip_rows: int) -> Iterator[Rows]:
        """The epoch's windows read, decoded and shuffled in a worker process, `prefetch_windows`
        ahead. A process, not a thread, so that this work never holds the training loop's GIL;
        whole windows travel (through shared memory), so the per-batch cost here is a slice."""
        loader = DataLoader(_Windows(self, self._epoch, skip_rows), batch_size=None, num_workers=1,
                            prefetch_factor=self.prefetch_windows, multiprocessing_context="fork",
                            worker_init_fn=_leave_stop_signals_to_the_trainer)
        items = iter(loader)
        try:
            for packed in items:
                if packed[0] == "error":
                    raise DataError(packed[1])
                _, dense, labels, ids, offsets = packed
                yield Rows(dense.numpy(), labels.numpy(), [i.numpy() for i in ids],
                           [None if o is None else o.numpy() for o in offsets])
        finally:
            del items  # shuts the worker down

    def _windows(self, epoch: int) -> List[List[_RowGroup]]:
        """This rank's row groups of the epoch in windows of `shuffle_window` consecutive groups:
        the shuffle buffer. Rows are mixed within a window, so it bounds both the memory a shuffle
        takes and how far a row can move; the row group order itself is shuffled per epoch."""
        groups = self._assignment(epoch, self.rank)
        return [groups[i : i + self.shuffle_window] for i in range(0, len(groups), self.shuffle_window)]

    def _window_rows(self, epoch: int, skip_rows: int) -> Iterator[Rows]:
        """The rows of each window in order, decoded and shuffled, from `skip_rows` on."""
        for window in self._windows(epoch):
            window_rows = sum(group.rows for group in window)
            if skip_rows >= window_rows:  # resume: whole windows are skipped unread
                skip_rows -= window_rows
                continue
            rows = self._read(window, epoch)
            if skip_rows:
                rows, skip_rows = rows.slice(skip_rows, len(rows)), 0
            yield rows

    def _batches(self, windows: Iterator[Rows], skip_batches: int) -> Iterator:
        """Cuts the stream of rows into this rank's batches, from batch `skip_batches` to len().
        Batches are slices (views) of a window; only a batch that spans two windows is copied."""
        total = len(self)
        emitted = skip_batches
        carry: Optional[Rows] = None  # the rows left at the end of the previous window
        for rows in windows:
            if emitted >= total:
                return
            if carry is not None:
                head = min(self.batch_size - len(carry), len(rows))
                carry = Rows.concat([carry, rows.slice(0, head)])
                rows = rows.slice(head, len(rows))
                if len(carry) < self.batch_size:
                    continue
                yield self._convert(carry, self.batch_size)
                emitted, carry = emitted + 1, None
            start = 0
            while len(rows) - start >= self.batch_size and emitted < total:
                yield self._convert(rows.slice(start, start + self.batch_size), self.batch_size)
                emitted += 1
                start += self.batch_size
            if start < len(rows):
                carry = rows.slice(start, len(rows))
        if not self.pad_to_equal:
            return
        while emitted < total:  # evaluation: pad this rank up to the longest rank's count
            valid = len(carry) if carry is not None else 0
            rows = carry if carry is not None else self._read(self._row_groups[:1], 0)
            yield self._convert(self._pad(rows), valid)
            emitted, carry = emitted + 1, None

    def _file(self, path: str) -> pq.ParquetFile:
        """An open file, kept for the next row group (reopening re-reads the footer); a few at a
        time, since a shuffled epoch visits files in any order."""
        if path in self._open_files:
            self._open_files.move_to_end(path)
        else:
            self._open_files[path] = pq.ParquetFile(path, memory_map=True)
            while len(self._open_files) > 8:
                self._open_files.popitem(last=False)
        return self._open_files[path]

    def _read(self, window: List[_RowGroup], epoch: int) -> Rows:
        rows = Rows.concat([_read_row_group(group.file, group.index, self.schema, self.policy, self._file)
                            for group in window])
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, window[0].position]).permutation(len(rows))
            rows = rows.take(order)
        return rows

    def _pad(self, rows: Rows) -> Rows:
        repeats = -(-self.batch_size // len(rows))
        return Rows.concat([rows] * repeats).slice(0, self.batch_size)

    def _convert(self, rows: Rows, valid: int):
        batch = rows.to_batch(self.schema.sparse_names)
        return EvalBatch(batch, valid) if self.pad_to_equal else batch
