"""CheckpointStore: a run's published checkpoints, written with torch.distributed.checkpoint (DCP).

Layout under the run's checkpoints/ directory:
    step_00000100/   DCP files of every rank + meta.json (train state, config, and the size and
                     CRC-32 of every file: the manifest); step_00000100_samples_<S> where a
                     published step_00000100 is of another position (see names.py)
    latest           the name of the newest complete checkpoint, replaced last
    best             JSON naming the checkpoint with the best validation metric so far and that
                     metric (app/checkpoint/best.py): a pointer, published after the step directory
                     it names, which keep-last never prunes. Keeping the best costs no copy of any table.
Checkpoints are ordered by the samples trained when each was written, then by step: a run resumed
on another number of ranks counts steps of another size, so its step_N can be below older ones,
and no save ever replaces a published checkpoint of another position.
A checkpoint is written under a hidden temporary name by all ranks, and only after every rank has
finished does rank 0 add meta.json and publish it under its name. So a crash at any point leaves
either the previous checkpoints untouched or a new complete one: never a half-written step_* that
looks complete. An object store (a URL: s3://...) has no rename: there a checkpoint is written
under its own name and published by its meta.json, written last; a step_* without one is a save
that never finished, ignored on resume and removed by the next prune. A save that fails (a full
disk, a store that stops answering) is removed and fails the job with a StorageFailure naming the
checkpoint and the cause (app/storage_failure.py). The manifest catches what happens to a checkpoint
afterwards (a truncated or damaged file): such a checkpoint is skipped, with a warning, for the
newest one that is intact.
Every rank verifies its share of the files, so the check reads a checkpoint once, in parallel.

An asynchronous save copies the state to host memory (pinned where the process uses CUDA, so that
tables on the GPU, UVM ones included, never take a second copy of device memory), returns, and
writes while training goes on; it is published by the next call that needs it finished (the next
save, or wait()), on every rank at the same point of the run, since publishing takes a barrier.
DCP stores each rank's shards separately, which is what lets a sharded table be saved without
gathering it anywhere, and loaded onto another number of ranks or another sharding plan. Each
rank's files are written by app/checkpoint/writers.py, listed and published through a storage
(app/storage.py), and loaded
through app/checkpoint/safe_load.py, which unpickles nothing but data. Pruning is pruning.py's.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import BlockingAsyncStager

from app.checkpoint import best as best_pointer
from app.checkpoint.collective import barrier, broadcast_text, first_problem, gather_texts
from app.checkpoint.names import is_step_name, step_name
from app.checkpoint.pruning import Pruner
from app.checkpoint.safe_load import CheckpointError, load_state
from app.checkpoint.verification import META_FILE, manifest, read_meta, verify
from app.checkpoint.writers import FileWriter, HostCopyStager, ObjectWriter, SavePlanner
from app.storage import LocalStorage, ObjectStorage, PathLike, Storage, location, storage_at
from app.storage_failure import StorageFailure, describe, said_in_one_line, storage_cause

log = logging.getLogger(__name__)

LATEST_FILE = "latest"
BEST_FILE = best_pointer.BEST_FILE


class CheckpointStore:
    def __init__(
        self,
        storage: Storage | str | Path,
        keep_last: int,
        rank: int,
        process_group: dist.ProcessGroup | None = None,
        io_threads: int = 4,
    ) -> None:
        """`storage`: where the checkpoints live (a path is a local directory, a URL an object
        store's). `process_group`
        carries the checkpoint's own coordination (a gloo group, so that an asynchronous save's
        background thread never shares a group with training)."""
        self.storage = storage if isinstance(storage, (LocalStorage, ObjectStorage)) else storage_at(storage)
        self.directory = self.storage.path()
        self.keep_last = keep_last
        self.rank = rank
        self.group = process_group
        self.io_threads = io_threads
        self._pending: tuple | None = None  # (future, step, staging, final, meta, checksums, best) of an async save
        self._pinned_stager: BlockingAsyncStager | None = None
        self._pruner = Pruner(self.storage, keep_last)  # deleting pruned checkpoints (rank 0)

    def published(self) -> list[str]:
        """Names of the published checkpoints (with meta.json), oldest first. Reads each meta.json
        once, for its samples."""
        self._finish_removal()  # a checkpoint half deleted would look published, and damaged
        found = [name for name in self.storage.list() if is_step_name(name) and META_FILE in self.storage.files(name)]
        return sorted(found, key=lambda name: (self._samples(name), name))

    def _samples(self, name: str) -> float:
        """The samples trained when checkpoint `name` was written (0 if its meta.json predates the
        count). A damaged meta.json counts as newest, so that resuming tries it first and reports
        why it is not usable."""
        try:
            samples = json.loads(self.storage.read(f"{name}/{META_FILE}")).get("samples", 0)
        except (OSError, ValueError, AttributeError):
            return math.inf
        return samples if type(samples) is int else math.inf

    def latest(self) -> PathLike | None:
        """The newest published checkpoint (not verified; see newest_valid)."""
        published = self.published()
        return self.storage.path(published[-1]) if published else None

    def newest_valid(self) -> PathLike | None:
        """Collective (see verify()): the newest checkpoint whose files match its manifest; each
        newer one that does not is reported with a warning and skipped. None when there are no
        checkpoints at all; a CheckpointError when there are some but none is intact."""
        listed = json.dumps(self.published()) if self.rank == 0 else None
        received = broadcast_text(listed, self.group)
        assert received is not None  # rank 0's list
        published = json.loads(received)
        for name in reversed(published):
            problem = verify(name, self.group, self.storage)
            if problem is None:
                return self.storage.path(name)
            log.warning("checkpoint %s is not usable: %s; trying the previous one", self.storage.path(name), problem)
        if published:
            raise CheckpointError(
                f"no intact checkpoint in {self.directory}: all {len(published)} failed verification (see the "
                "warnings above). Remove them to start over, or point checkpoint.load_from at another run."
            )
        return None

    def holds(self, path: Any) -> bool:
        """Whether the checkpoint at `path` is one of this store's."""
        return location(path).parent == self.directory

    # ---- saving -------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: dict[str, Any],
        meta: dict[str, Any],
        asynchronous: bool = False,
        samples: int = 0,
        best: dict[str, Any] | None = None,
    ) -> PathLike:
        """Collective: every rank calls it with its own shards in `state`; `meta` (JSON-able, the
        same on all ranks) is written by rank 0, with `samples` (trained so far: what orders
        checkpoints). Asynchronous: returns once `state` is copied; the checkpoint appears when the
        next save() or wait() publishes it. `best` (the metric and its value): the checkpoint
        becomes the best one once it is published (see mark_best). Storage that fails: a
        StorageFailure, and nothing of this save left behind."""
        with said_in_one_line(f"cannot write checkpoint {self.storage.path(step_name(step))}"):
            return self._save(step, state, meta, asynchronous, samples, best)

    def _save(
        self,
        step: int,
        state: dict[str, Any],
        meta: dict[str, Any],
        asynchronous: bool,
        samples: int,
        best: dict[str, Any] | None,
    ) -> PathLike:
        meta = {**meta, "samples": samples}
        self._publish_pending()
        final, staging = self._names_for(step, samples)
        writer = self._writer(staging)
        try:
            if asynchronous:
                future = dcp.async_save(
                    state,
                    storage_writer=writer,
                    planner=SavePlanner(),
                    process_group=self.group,
                    async_stager=self._stager(),
                )
                self._pending = (future, step, staging, final, meta, writer.checksums, best)
                return self.storage.path(final)
            dcp.save(state, storage_writer=writer, planner=SavePlanner(), process_group=self.group)
        except BaseException as error:
            self._abandon(staging, final, error)
            raise
        self._publish(step, staging, final, meta, writer.checksums, best)
        return self.storage.path(final)

    def _names_for(self, step: int, samples: int) -> tuple[str, str]:
        """Collective: (the name the checkpoint of `step` after `samples` is published under, the
        name it is written under, cleared), as rank 0 finds them; a StorageFailure on every rank
        where rank 0 cannot reach the storage."""
        names = None
        if self.rank == 0:
            try:
                names = json.dumps(self._free_names(step, samples))
            except Exception as error:
                cause = storage_cause(error)
                if cause is None:
                    raise
                names = json.dumps(f"cannot write checkpoint {self.storage.path(step_name(step))}: {describe(cause)}.")
        received = broadcast_text(names, self.group)
        assert received is not None  # rank 0's names
        decided = json.loads(received)
        if isinstance(decided, str):
            raise StorageFailure(decided)
        return decided[0], decided[1]

    def _free_names(self, step: int, samples: int) -> list[str]:
        final = step_name(step)
        taken = META_FILE in self.storage.files(final)
        if taken and self._samples(final) != samples:
            # Another position's (a run resumed on another global batch counts steps of another
            # size), which checkpoints/best may name: never replaced (see names.py).
            final = step_name(step, samples)
            taken = META_FILE in self.storage.files(final)
        staging = self.storage.staging_name(final)
        if staging == final and taken:
            # Written in place, this save would destroy the published checkpoint of the same
            # position before it is complete.
            staging = f".{final}.tmp"
        # Left by a run that died while saving; in an object store, where staging is the final
        # name, also the same step saved before (a resumed run that had nothing left to do).
        self.storage.delete(staging)
        return [final, staging]

    def _abandon(self, staging: str, final: str, error: BaseException) -> None:
        """A save that failed on some rank (every rank gets DCP's error): its files are removed,
        and a storage error becomes a StorageFailure naming the checkpoint and the cause."""
        self._remove_failed_save(staging, final)
        cause = storage_cause(error)
        if cause is not None and not isinstance(cause, StorageFailure):
            raise StorageFailure(
                f"cannot write checkpoint {self.storage.path(final)}: {describe(cause)}; "
                "the checkpoints before it are untouched."
            ) from error

    def _remove_failed_save(self, staging: str, final: str) -> None:
        """Rank 0: removes what a failed save wrote: never a published checkpoint (see _names_for),
        nor one published in place before the failure (an object store's, whose meta.json is written)."""
        if self.rank != 0:
            return
        try:
            if staging != final or META_FILE not in self.storage.files(final):
                self.storage.delete(staging)
        except Exception as cleanup:  # the storage that failed the save may fail this too
            log.warning("could not remove the failed save %s: %s", self.storage.path(staging), describe(cleanup))

    def _stager(self) -> BlockingAsyncStager:
        """DCP's staging of an asynchronous save, in async_save itself: a copy of the state in host
        memory that training can no longer change, ShardedTensors and DTensors included
        (DefaultStager refuses ShardedTensors, which torchrec's sharded tables and their optimizer
        states are). Where this process uses CUDA, the copy is pinned, allocated at the first save
        and refilled by each later one (pinning is slow, and every save of a run has the same
        shapes; the previous save is written before the next is staged). Elsewhere pinning is not
        possible, nor of use, and each save takes a copy of its own (see HostCopyStager)."""
        if not torch.cuda.is_initialized():
            return HostCopyStager()
        if self._pinned_stager is None:
            self._pinned_stager = BlockingAsyncStager(cache_staged_state_dict=True)
        return self._pinned_stager

    def _writer(self, staging: str) -> FileWriter | ObjectWriter:
        # Several writer threads: one thread leaves most of a disk's bandwidth unused (measured by
        # scripts/benchmark.py checkpoint). Files are fsynced before the checkpoint is published;
        # an object is durable once its upload completes.
        if isinstance(self.storage, ObjectStorage):
            return ObjectWriter(str(self.storage.path(staging)), thread_count=self.io_threads, **self.storage.options)
        return FileWriter(str(self.storage.path(staging)), thread_count=self.io_threads)

    def wait(self) -> PathLike | None:
        """Collective: finish what goes on in the background: the pending asynchronous save, if
        any, written and published (its path returned), and the deletion of pruned checkpoints."""
        with said_in_one_line(f"cannot write checkpoints to {self.directory}"):
            path = self._publish_pending()
            self._finish_removal()
        return path

    def _publish_pending(self) -> PathLike | None:
        self._finish_removal()
        if self._pending is None:
            return None
        future, step, staging, final, meta, checksums, best = self._pending
        self._pending = None
        try:
            future.result()  # a plain Future: the state was staged synchronously (see _stager)
        except BaseException as error:
            self._abandon(staging, final, error)
            raise
        self._publish(step, staging, final, meta, checksums, best)
        return self.storage.path(final)

    def _publish(
        self,
        step: int,
        staging: str,
        final: str,
        meta: dict[str, Any],
        checksums: dict[str, list[int]],
        best: dict[str, Any] | None = None,
    ) -> None:
        # Every rank's files are written once every rank has sent what its writers computed.
        written = gather_texts(json.dumps(checksums), self.group)
        problem = None
        if self.rank == 0:
            checksums = {name: entry for text in written for name, entry in json.loads(text).items()}
            try:
                self._publish_files(step, staging, final, meta, checksums, best)
            except Exception as error:
                cause = storage_cause(error)
                if cause is None:
                    raise
                problem = f"cannot publish checkpoint {self.storage.path(final)}: {describe(cause)}"
                self._remove_failed_save(staging, final)
        problem = first_problem(problem, self.group)  # every rank stops alike
        if problem is not None:
            raise StorageFailure(f"{problem}; the checkpoints before it are untouched.")
        barrier(self.group)

    def _publish_files(
        self,
        step: int,
        staging: str,
        final: str,
        meta: dict[str, Any],
        checksums: dict[str, list[int]],
        best: dict[str, Any] | None,
    ) -> None:
        """Rank 0: the manifest written, the checkpoint published, then latest and the best
        pointer; then pruning."""
        record = {"step": step, **meta, "files": manifest(self.storage, staging, checksums)}
        self.storage.write(f"{staging}/{META_FILE}", json.dumps(record, indent=2))
        # Replaces the same position saved before (a resumed run that had nothing left to do).
        self.storage.publish(staging, final)
        self.storage.write(LATEST_FILE, final)
        if best is not None:
            best_pointer.write(self.storage, final, step, meta.get("samples", 0), best)
        self._prune()

    def mark_best(self, name: str, best: dict[str, Any]) -> None:
        """Collective: make checkpoint `name` (saved by this run, published or being written in
        the background) the best one; `best`: {"metric", "value"}. The pointer is replaced in one
        write after the checkpoint it names is published, and the previous best, no longer exempt,
        is pruned if keep-last would have pruned it."""
        if self._pending is not None and self._pending[3] == name:
            self._pending = (*self._pending[:6], best)  # published with it
            return
        self._finish_removal()
        if self.rank == 0:
            if META_FILE not in self.storage.files(name):
                raise CheckpointError(f"checkpoint {self.storage.path(name)} is not published: it cannot be the best.")
            meta = json.loads(self.storage.read(f"{name}/{META_FILE}"))
            best_pointer.write(self.storage, name, meta["step"], meta.get("samples", 0), best)
            self._prune()
        barrier(self.group)

    def best_record(self) -> dict[str, Any] | None:
        """Collective where distributed: rank 0's reading of the best pointer, on every rank: the
        record, or None when there is none or it is not valid (with a warning: see app/checkpoint/best.py)."""
        text = None
        if self.rank == 0:
            self._finish_removal()
            record, problem = best_pointer.read(self.storage)
            if problem is not None:
                log.warning("%s is not valid: %s; it is not used", self.storage.path(BEST_FILE), problem)
            text = None if record is None else json.dumps(record)
        text = broadcast_text(text, self.group)
        return None if text is None else json.loads(text)

    def _prune(self) -> None:
        """Rank 0: the checkpoints beyond keep-last (never the best) and the saves that died before
        publishing, deleted in the background (pruning.py)."""
        self._pruner.start(self.published())

    def _finish_removal(self) -> None:
        """Waits for the checkpoints being deleted, and raises what went wrong deleting them."""
        self._pruner.finish()

    # ---- loading ------------------------------------------------------------------------------

    def load(self, path: PathLike, state: dict[str, Any], metadata: Any = None) -> dict[str, Any]:
        """Collective: fills `state` (a structure like the one save() got, with this rank's
        tensors, or a part of it) in place from `path`, resharding as needed; returns the meta.
        `metadata`: the checkpoint's DCP metadata, where the caller has read it already."""
        meta = read_meta(path)
        load_state(path, state, self.group, metadata=metadata)
        return meta
