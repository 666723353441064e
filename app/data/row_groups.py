"""Which rank reads which row groups, in which order, and how many batches that makes.

Every rank reads the footers of all files and derives the same global plan from them alone (which
row groups, in which order, belong to which rank), so no communication is needed to agree on it.
Every rank must run the same number of batches: a rank that ran out early would leave the others
waiting forever in the next all-to-all. So a training epoch is as long as the shortest rank's share
(of any epoch), and an evaluation pass as long as the longest, the other ranks padding theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.data.files import read_metadata


@dataclass(frozen=True)
class RowGroup:
    file: str
    index: int  # in its file
    rows: int
    position: int  # in the unshuffled global list; seeds the row shuffle of the window it starts


def read_row_groups(files: Sequence[str], storage_options: dict[str, Any] | None = None) -> list[RowGroup]:
    """The row groups of `files` that hold rows, in file order, from the footers alone (local
    files or object-store URLs: see app/data/files.py)."""
    groups: list[RowGroup] = []
    for path in files:
        metadata = read_metadata(path, storage_options)
        for index in range(metadata.num_row_groups):
            rows = metadata.row_group(index).num_rows
            if rows:
                groups.append(RowGroup(path, index, rows, len(groups)))
    return groups


# A window's row groups, and the seed of its row shuffle (None: the rows stay in file order).
Window = tuple[list[RowGroup], list[int] | None]


@dataclass(frozen=True)
class RowGroupPlan:
    """The row groups dealt round-robin to `world_size` ranks, in an order shuffled per epoch by
    `seed` when `shuffle` is set (or in file order every epoch), read in windows of `shuffle_window`
    consecutive row groups whose rows are mixed together."""

    groups: tuple[RowGroup, ...]
    world_size: int
    shuffle: bool = False
    seed: int = 0
    shuffle_window: int = 4

    @classmethod
    def from_files(
        cls,
        files: Sequence[str],
        world_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_window: int = 4,
        storage_options: dict[str, Any] | None = None,
    ) -> RowGroupPlan:
        return cls(tuple(read_row_groups(files, storage_options)), world_size, shuffle, seed, shuffle_window)

    def assignment(self, epoch: int, rank: int) -> list[RowGroup]:
        """`rank`'s row groups of `epoch`, in reading order."""
        order = list(self.groups)
        if self.shuffle:
            permutation = np.random.default_rng([self.seed, epoch]).permutation(len(order))
            order = [order[i] for i in permutation]
        return order[rank :: self.world_size]

    def rows_per_rank(self, epoch: int) -> list[int]:
        return [sum(group.rows for group in self.assignment(epoch, rank)) for rank in range(self.world_size)]

    def windows(self, epoch: int, rank: int) -> list[Window]:
        """`rank`'s row groups of `epoch` in windows of `shuffle_window` consecutive groups (one
        group each without shuffle: there is nothing to mix), each with the seed of its row shuffle.
        The window is the shuffle buffer: rows are mixed within it, so it bounds both the memory a
        shuffle takes and how far a row can move; the row group order itself is shuffled per epoch."""
        size = self.shuffle_window if self.shuffle else 1
        groups = self.assignment(epoch, rank)
        windows = [groups[i : i + size] for i in range(0, len(groups), size)]
        return [(window, [self.seed, epoch, window[0].position] if self.shuffle else None) for window in windows]

    def training_batches(self, batch_size: int) -> int:
        """Full batches per training epoch: the same on every rank and in every epoch (0 when some
        rank cannot fill one)."""
        if self.shuffle:
            # Which rank gets which row groups changes every epoch, and with row groups of unequal
            # size so would the shortest share. The trainer needs one epoch length, so take one
            # that every epoch can fill: each rank gets at least len // world_size row groups,
            # and those hold at least as many rows as the smallest ones do.
            per_rank = len(self.groups) // self.world_size
            return sum(sorted(group.rows for group in self.groups)[:per_rank]) // batch_size
        return min(rows // batch_size for rows in self.rows_per_rank(0))

    def evaluation_batches(self, batch_size: int) -> int:
        """Batches per evaluation pass (unshuffled): the longest rank's count, the last one partly
        full; every rank runs that many, padding its own."""
        return max(-(-rows // batch_size) for rows in self.rows_per_rank(0))
