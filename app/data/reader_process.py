"""The reader processes: what they run, and how they handle signals.

Each epoch and each evaluation pass of a reader (app/data/parquet.py) reads, decodes and shuffles
its windows in data.num_workers reader processes (one by default), whole windows ahead of
training. They are forked from a fork server, never from the training process (see
app/data/reader_server.py, which starts it), and this module is all the server preloads: it
imports numpy, pyarrow and torch, never torchrec, so that the server starts in about the time
torch takes to import.

Launchers signal a whole process group (torchrun each worker's, Slurm every process, a terminal's
Ctrl-C its foreground group), and the fork server and the readers are in the training process's.
They ignore SIGTERM and SIGINT from birth: a server killed by one would take its readers with it,
and a reader killed by one would crash the training process before it could save a checkpoint. The
server is started with both signals blocked (the mask it inherits), and its preload, this module,
ignores them and keeps them blocked; each reader inherits that mask and that ignore when forked, and
keeps them blocked until its first call (_start_worker) has replaced the SIGTERM handler the
DataLoader installs with an ignore. The training process decides when its readers stop, and they
stop whatever they ignore: a reader's terminate() is a kill (SIGKILL), so the DataLoader's shutdown
(a terminate after its timeout) and multiprocessing's at exit (it terminates daemonic children, then
joins them) end it; and a reader exits by itself when its training process is gone. The server
stops when the last process holding its "alive" pipe (the trainer, its readers) is gone.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import Generator, Iterator
from types import FrameType
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from app.data import DataError
from app.data.batch import InputPolicy, Rows
from app.data.files import open_parquet, read_row_group
from app.data.reader_server import STOP_SIGNALS, worker_context
from app.data.row_groups import RowGroup, Window
from app.features import FeatureSchema


class WindowSource(IterableDataset):
    """One rank's windows of one pass, read, decoded and shuffled, from row `skip_rows` on, and
    dealt round-robin to the reader processes. It is sent to each of them, so it holds only what
    pickles: files are opened where they are read (memory-mapped, or through fsspec from an object
    store with `storage_options`), and a few kept open for the next row group (reopening re-reads
    the footer)."""

    def __init__(
        self,
        windows: list[Window],
        schema: FeatureSchema,
        policy: InputPolicy,
        skip_rows: int,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.windows, self.schema, self.policy, self.skip_rows = windows, schema, policy, skip_rows
        self.storage_options = storage_options
        self._open_files: OrderedDict[str, pq.ParquetFile] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open_files": OrderedDict()}

    def rows(self, reader: int = 0, readers: int = 1) -> Generator[Rows, None, None]:
        """The rows of reader `reader` of `readers`, window by window, decoded and shuffled: windows
        reader, reader + readers, ... of those left after `skip_rows` (all of them for a lone
        reader). Taking one window from each reader in turn gives back every window in order."""
        windows, skip_rows = self._remaining()
        if reader > 0:
            skip_rows = 0  # only the first window left, reader 0's first, is partly skipped
        for groups, row_seed in windows[reader::readers]:
            rows = self._read(groups, row_seed)
            if skip_rows:
                rows, skip_rows = rows.slice(skip_rows, len(rows)), 0
            yield rows

    def _remaining(self) -> tuple[list[Window], int]:
        """The windows not wholly skipped, and the rows to skip in the first of them. Whole windows
        are dropped before the dealing, not by each reader from its own share: the windows taken
        in turn must start at reader 0 with the first window left, wherever a resume starts."""
        skip_rows = self.skip_rows
        for first, (groups, _) in enumerate(self.windows):
            window_rows = sum(group.rows for group in groups)
            if skip_rows < window_rows:
                return self.windows[first:], skip_rows
            skip_rows -= window_rows  # resume: whole windows are skipped unread
        return [], 0

    def __iter__(self) -> Iterator[tuple]:
        """A reader process's side: numpy arrays (tensors on the way), and an input error as its
        message, which the training process re-raises as a DataError."""
        # Arrays decoded zero-copy from Arrow are read-only. The DataLoader copies them into shared
        # memory on the way, and nothing writes to them, so torch's warning about it is noise.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        worker = get_worker_info()
        reader, readers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        try:
            for rows in self.rows(reader, readers):
                yield "rows", rows.dense, rows.labels, tuple(rows.ids), tuple(rows.offsets)
        except DataError as error:
            yield "error", str(error)

    def _file(self, path: str) -> pq.ParquetFile:
        """An open file; a few at a time, since a shuffled epoch visits files in any order."""
        if path in self._open_files:
            self._open_files.move_to_end(path)
        else:
            self._open_files[path] = open_parquet(path, self.storage_options)
            while len(self._open_files) > 8:
                self._open_files.popitem(last=False)
        return self._open_files[path]

    def _read(self, groups: list[RowGroup], row_seed: list[int] | None) -> Rows:
        rows = Rows.concat([read_row_group(g.file, g.index, self.schema, self.policy, self._file) for g in groups])
        if row_seed is not None:
            rows = rows.take(np.random.default_rng(row_seed).permutation(len(rows)))
        return rows


# ---- the worker process ---------------------------------------------------------------------


def _start_worker(worker_id: int) -> None:
    """In each reader process, before it reads. It was born with the stop signals ignored and
    blocked (see the module's docstring); the DataLoader has since installed a SIGTERM handler
    that exits, so they stay blocked until ignored again here (which discards one pending).
    Should the training process die, the reader exits at once: its parent is the fork server,
    which lives as long as any reader does, so the DataLoader's own check (that the worker's parent
    is alive) would never fire, and the reader of a killed training process would run on."""
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    trainer = multiprocessing.parent_process()
    if trainer is not None:
        threading.Thread(target=_exit_with, args=(trainer,), daemon=True, name="exit-with-trainer").start()


def _exit_with(trainer: multiprocessing.process.BaseProcess) -> None:
    trainer.join()  # returns when the training process has exited
    os._exit(0)


def prefetched(source: WindowSource, prefetch_windows: int, num_workers: int = 1) -> Generator[Rows, None, None]:
    """The windows read, decoded and shuffled in `num_workers` reader processes, each
    `prefetch_windows` ahead. Processes, not threads, so that this work never holds the training
    loop's GIL; whole windows travel (through shared memory), so the per-batch cost here is a slice.
    The source deals the windows round-robin to the readers; the DataLoader, in order, takes one
    item from each reader in turn and passes over a reader once it is done, which is the order they
    were dealt in: the stream is the same for any number of readers."""
    loader = DataLoader(
        source,
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=prefetch_windows,
        in_order=True,
        multiprocessing_context=worker_context(),
        worker_init_fn=_start_worker,
    )
    items = iter(loader)
    try:
        for packed in items:
            if packed[0] == "error":
                raise DataError(packed[1])
            _, dense, labels, ids, offsets = packed
            yield Rows(
                dense.numpy(),
                labels.numpy(),
                [i.numpy() for i in ids],
                [None if o is None else o.numpy() for o in offsets],
            )
    finally:
        del items  # shuts the readers down


def _imported_by_the_fork_server() -> bool:
    """True while the fork server's main() imports this module (its preload); anywhere else,
    importing it must not change how the process handles signals."""
    frame: FrameType | None = sys._getframe()
    while frame is not None:
        if frame.f_code is multiprocessing.forkserver.main.__code__:
            return True
        frame = frame.f_back
    return False


if _imported_by_the_fork_server():
    for _stop in STOP_SIGNALS:
        signal.signal(_stop, signal.SIG_IGN)  # the server's main() then hands this SIGINT ignore to each reader
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # and each reader this mask (see _start_worker)
