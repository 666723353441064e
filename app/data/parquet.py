"""Rank-aware Parquet readers: TrainingBatches (shuffled per epoch, resumable mid-epoch) and
EvaluationBatches (every row once, padded), both over a RowGroupPlan (app/data/row_groups.py),
which says which row groups each rank reads, in which order, and how many batches that makes.

Reading, decoding and shuffling run in `num_workers` reader processes (app/data/reader_process.py:
forked from a fork server, never from the training process), whole windows ahead of training; the
training process only cuts the windows into batches. Each epoch and each evaluation pass starts them.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import numpy as np
from torchrec.datasets.utils import Batch

from app.data import DataError
from app.data.batch import InputPolicy, Rows, label_shape, with_empty_histories
from app.data.reader_process import WindowSource, prefetched
from app.data.row_groups import RowGroupPlan
from app.features import FeatureSchema


@dataclass
class EvalBatch:
    batch: Batch
    valid: int  # the first `valid` rows are real, the rest pad the batch to the common size


# ---- shared by both readers -----------------------------------------------------------------


def _cut(windows: Iterator[Rows], batch_size: int, count: int) -> Iterator[Rows]:
    """`count` batches of `batch_size` rows cut from the stream of windows, and then, should the
    stream end first, the rows left over (fewer; none when it ended on a batch boundary). Batches
    are slices (views) of a window; only a batch that spans two windows is copied."""
    emitted = 0
    carry: Rows | None = None  # the rows left at the end of the previous window
    if count <= 0:
        return
    for rows in windows:
        if carry is not None:
            head = min(batch_size - len(carry), len(rows))
            carry = Rows.concat([carry, rows.slice(0, head)])
            rows = rows.slice(head, len(rows))
            if len(carry) < batch_size:
                continue
            yield carry
            emitted, carry = emitted + 1, None
        start = 0
        while len(rows) - start >= batch_size and emitted < count:
            yield rows.slice(start, start + batch_size)
            emitted += 1
            start += batch_size
        if emitted >= count:
            return  # (the next window is not read)
        if start < len(rows):
            carry = rows.slice(start, len(rows))
    if carry is not None:
        yield carry


class _Reader:
    """What both readers share: the plan, and one pass's batches read through the reader processes."""

    def __init__(
        self,
        plan: RowGroupPlan,
        files: Sequence[str],
        schema: FeatureSchema,
        batch_size: int,
        rank: int,
        prefetch_windows: int,
        num_workers: int,
        policy: InputPolicy,
        pin_memory: bool,
        storage_options: dict[str, Any] | None,
    ) -> None:
        self.plan = plan
        self.files = list(files)
        self.schema = schema
        self.batch_size = batch_size
        self.rank = rank
        self.prefetch_windows = prefetch_windows  # 0: read in this process, between steps
        self.num_workers = num_workers  # reader processes (none when prefetch_windows is 0)
        self.policy = policy
        self.pin_memory = pin_memory  # batches in page-locked memory (see Rows.to_batch): for a CUDA device
        self.storage_options = storage_options  # of files in an object store (data.storage_options)

    def _pass(self, epoch: int, skip_batches: int, count: int) -> Generator[Rows, None, None]:
        """This rank's rows of `epoch` as batches (see _cut), from batch `skip_batches` on. An error
        is re-raised as rank-specific: the other ranks read other row groups, and do not see it."""
        source = WindowSource(
            self.plan.windows(epoch, self.rank),
            self.schema,
            self.policy,
            skip_rows=skip_batches * self.batch_size,
            storage_options=self.storage_options,
        )
        windows = (
            prefetched(source, self.prefetch_windows, self.num_workers) if self.prefetch_windows > 0 else source.rows()
        )
        try:
            yield from _cut(windows, self.batch_size, count - skip_batches)
        except DataError as error:
            error.rank_specific = True
            raise
        finally:
            windows.close()  # stops the reader processes when the consumer stops early


class TrainingBatches(_Reader):
    """This rank's training batches of one epoch (torchrec Batches, all full); `len()` is the same
    on every rank and in every epoch. `set_epoch` picks the epoch's order (shuffled by seed and
    epoch when `shuffle`); `load_state_dict` makes the next iteration resume mid-epoch.
    `pin_memory` (training on CUDA; needs CUDA): batches in page-locked memory, see Rows.to_batch.
    `num_workers` reader processes (with `prefetch_windows` > 0) give the same batches as one."""

    def __init__(
        self,
        files: Sequence[str],
        schema: FeatureSchema,
        batch_size: int,
        rank: int,
        world_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_window: int = 4,
        prefetch_windows: int = 2,
        num_workers: int = 1,
        policy: InputPolicy = InputPolicy(),
        pin_memory: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        plan = RowGroupPlan.from_files(
            files,
            world_size,
            shuffle=shuffle,
            seed=seed,
            shuffle_window=shuffle_window,
            storage_options=storage_options,
        )
        super().__init__(
            plan, files, schema, batch_size, rank, prefetch_windows, num_workers, policy, pin_memory, storage_options
        )
        self._length = plan.training_batches(batch_size)
        self._epoch = 0
        self._start = 0  # batches to skip at the next __iter__ (resume)
        self._taken = 0
        if self._length == 0:
            raise DataError(
                f"not one full batch of {batch_size} rows for every rank: {len(plan.groups)} row "
                f"group(s) in {len(self.files)} file(s) give the {world_size} ranks {plan.rows_per_rank(0)} rows. "
                "Use a smaller batch size, fewer ranks, or files with more (smaller) row groups."
            )

    def __len__(self) -> int:
        return self._length

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches_done": self._taken}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._epoch = int(state["epoch"])
        self._start = int(state["batches_done"])

    def __iter__(self) -> Generator[Batch, None, None]:
        start, self._start = self._start, 0
        self._taken = start
        with closing(self._pass(self._epoch, start, len(self))) as batches:
            for rows in batches:
                self._taken += 1
                yield rows.to_batch(self.schema.sparse_names, self.pin_memory, self.schema.sequence_inputs)


class EvaluationBatches(_Reader):
    """This rank's evaluation batches: every row of the split once over all ranks, as EvalBatches;
    `len()` is the longest rank's count, which every rank runs, padding with rows marked invalid.
    `pin_memory`, `num_workers`: as TrainingBatches'."""

    def __init__(
        self,
        files: Sequence[str],
        schema: FeatureSchema,
        batch_size: int,
        rank: int,
        world_size: int,
        *,
        prefetch_windows: int = 2,
        num_workers: int = 1,
        policy: InputPolicy = InputPolicy(),
        pin_memory: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        plan = RowGroupPlan.from_files(files, world_size, storage_options=storage_options)
        super().__init__(
            plan, files, schema, batch_size, rank, prefetch_windows, num_workers, policy, pin_memory, storage_options
        )
        self._length = plan.evaluation_batches(batch_size)

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Generator[EvalBatch, None, None]:
        emitted = 0
        with closing(self._pass(0, 0, len(self))) as batches:
            for rows in batches:
                yield self._padded(rows)
                emitted += 1
        while emitted < len(self):  # a rank with fewer rows pads up to the longest rank's count
            yield self._padded(None)
            emitted += 1

    def padding(self) -> EvalBatch:
        """A batch of padding rows only (valid 0), for a rank that has no batch of its own to give
        the model's collectives (every rank's forward takes part in the tables' all-to-all)."""
        return self._padded(None)

    def _padded(self, rows: Rows | None) -> EvalBatch:
        """`rows` (up to a batch) followed by padding rows: zeros, with id 0 in every feature."""
        valid = 0 if rows is None else len(rows)
        if valid < self.batch_size:
            count = self.batch_size - valid
            padding = Rows(
                np.zeros((count, len(self.schema.dense)), np.float32),
                np.zeros(label_shape(self.schema, count), np.float32),
                [np.zeros(count, np.int64) for _ in self.schema.sparse],
                [None] * len(self.schema.sparse),
            )
            padding = with_empty_histories(padding, self.schema)
            rows = padding if rows is None else Rows.concat([rows, padding])
        assert rows is not None  # padding alone when none were given
        return EvalBatch(rows.to_batch(self.schema.sparse_names, self.pin_memory, self.schema.sequence_inputs), valid)
