"""How a rank's share of a checkpoint is written: DCP's writers, made to write without a second
copy of the tables (SavePlanner, HostCopyStager), to fail rather than publish a save a writer
thread lost (CheckedWrites), to record each file's size and CRC-32 as it is written (the
manifest then needs no second pass), and on a local disk to write around the page cache.
CheckpointStore (store.py) decides where, and publishes what they wrote.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import mmap
import os
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter  # DCP's writer of URLs
from torch.distributed.checkpoint.staging import BlockingAsyncStager
from torch.distributed.tensor import DTensor

from app.storage_failure import is_storage_error

WRITE_BUFFER = 8 << 20  # bytes per write to a local disk: large writes reach its full speed
# Bytes per part of an object's upload: what an object store's writer holds per file (with a copy
# or two on the way out). Multipart uploads have at most 10,000 parts: 160 GB per file.
OBJECT_PART = 16 << 20
_DIRECT_ALIGNMENT = 4096  # O_DIRECT writes: offset, length and memory aligned to the disk's blocks


class SavePlanner(DefaultSavePlanner):
    """Hands DCP's writers each tensor over memory of its own size, without copying it. The tables
    of a sharded model are views into FBGEMM's one buffer per group of tables, and DCP's writer
    clones every such view (so as not to serialise the whole buffer) and keeps the clones until
    its file is written: with a writer thread per quarter of the state, the whole state, twice
    the tables' memory at the peak of every save."""

    def resolve_data(self, write_item):
        data = super().resolve_data(write_item)
        if (
            isinstance(data, torch.Tensor)
            and data.device.type == "cpu"
            and data.is_contiguous()
            and data.untyped_storage().nbytes() != data.nbytes
        ):
            # numpy's array of the view's own bytes, shared: a storage exactly the tensor's size.
            data = torch.from_numpy(data.reshape(-1).view(torch.uint8).numpy()).view(data.dtype).view(data.shape)
        return data


class HostCopyStager(BlockingAsyncStager):
    """An asynchronous save's copy of a state in host memory, tensor by tensor. DCP's own staging
    deep-copies each ShardedTensor of host tables, and a deep copy of a view copies the storage
    under it: every table copied FBGEMM's whole buffer of all the tables (1 GB of tables: 7.5 s
    of training stalled, with a peak of the buffer's size per table)."""

    def stage(self, state_dict):
        return _host_copy(state_dict)


def _host_copy(value: Any) -> Any:
    if isinstance(value, ShardedTensor):
        shards = [Shard(shard.tensor.detach().clone(), shard.metadata) for shard in value.local_shards()]
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            shards, value.metadata(), process_group=value._process_group
        )
    if isinstance(value, DTensor):
        return DTensor.from_local(
            value.to_local().detach().clone(),
            value.device_mesh,
            value.placements,
            run_check=False,
            shape=value.shape,
            stride=value.stride(),
        )
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _host_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_host_copy(item) for item in value)
    return copy.deepcopy(value)


@contextmanager
def _without_record_checksums() -> Iterator[None]:
    """torch.save's per-record CRC-32s off while a checkpoint is written: a second pass over every
    byte, on one thread (0.2-0.4 s per GB here), that nothing reads (torch.load does not check
    them). The manifest's CRC-32 of every file, computed as it is written, is what a resume checks."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


class _CheckedWrites(FileSystemWriter):
    """DCP's file writers write a rank's shards from several threads, and a thread that fails (a
    full disk, a refused upload, an object that cannot be serialised) only prints its traceback:
    the save returns as if complete, and would be published without that thread's files. Here a
    save whose results do not cover every item of the rank's plan fails instead."""

    _checksumming: _ChecksummingFileSystem  # the writer's file system, wrapped by each class below

    def write_data(self, plan, planner):
        try:
            with _without_record_checksums():
                future = super().write_data(plan, planner)
                written = {result.index for result in future.wait()}
        except BaseException:
            self._raise_storage_failure()
            raise
        missing = [item.index.fqn for item in plan.items if item.index not in written]
        if missing:
            self._raise_storage_failure()
            raise RuntimeError(
                f"{len(missing)} of the {len(plan.items)} items of this rank's checkpoint files "
                f"were not written ({', '.join(sorted(set(missing))[:3])}...): a writer thread "
                "failed, see its traceback above"
            )
        return future

    def _raise_storage_failure(self) -> None:
        """The first storage error a writer thread met, if any (the cause, said once)."""
        failures = self._checksumming.failures
        if failures:
            path, error = failures[0]
            if isinstance(error, OSError) and error.strerror and not error.filename:
                raise OSError(error.errno, error.strerror, path) from error
            raise error


def _quiet_writer_threads(args: threading.ExceptHookArgs) -> None:
    """A DCP writer thread's storage error is reported by the save it failed (_CheckedWrites), in
    one line: its traceback is not printed too. Anything else is, as Python prints it."""
    if (
        args.thread is not None
        and args.thread.name.endswith("(_write_files_from_queue)")
        and args.exc_value is not None
        and is_storage_error(args.exc_value)
    ):
        return
    _previous_thread_hook(args)


_previous_thread_hook = threading.excepthook
threading.excepthook = _quiet_writer_threads


class UncachedFile:
    """A new file written in large writes that bypass the page cache (O_DIRECT), and fsynced when
    closed. Through the page cache, each save's gigabytes first take fresh pages of it (the
    kernel zeroes and maps every one: 0.4-1 GB/s here, where the disk takes 1.7-2.6), then evict
    what training had cached. O_DIRECT needs block-aligned offsets, lengths and memory, so writes
    are gathered in a page-aligned buffer of whole blocks; only the file's last partial block is
    written through the cache. Where the file system refuses O_DIRECT (tmpfs, some network file
    systems), or `direct` is false, the same writes go through the cache, which is dropped once
    they are synced."""

    def __init__(self, path: str, buffer_size: int = WRITE_BUFFER, direct: bool = True) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        self._fd, self.direct = -1, False
        if direct:
            with contextlib.suppress(OSError):
                self._fd, self.direct = os.open(path, flags | os.O_DIRECT, 0o666), True
        if self._fd < 0:
            self._fd = os.open(path, flags, 0o666)
        self._buffer = mmap.mmap(-1, buffer_size)  # anonymous: page-aligned memory
        self._view = memoryview(self._buffer)
        self._filled = 0  # bytes waiting in the buffer
        self._position = 0  # bytes written to this file so far, buffered ones included
        self.closed = False

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        done = 0
        while done < data.nbytes:
            count = min(data.nbytes - done, len(self._buffer) - self._filled)
            self._view[self._filled : self._filled + count] = data[done : done + count]
            self._filled += count
            done += count
            if self._filled == len(self._buffer):
                self._write_out(self._view)
                self._filled = 0
        self._position += done
        return done

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        """Nothing: a partial block cannot be written around the cache before the file's end."""

    def fileno(self) -> int:
        return self._fd

    def _write_out(self, view: memoryview) -> None:
        while view.nbytes:
            try:
                written = os.write(self._fd, view)
            except OSError as error:
                if not (self.direct and error.errno == errno.EINVAL):
                    raise
                # Taken at open, refused at write: a device of larger blocks, a file system that
                # only pretends to support O_DIRECT. The same bytes go through the cache instead.
                self._through_cache()
                continue
            view = view[written:]
            if view.nbytes and written % _DIRECT_ALIGNMENT:
                self._through_cache()  # a short write left the file unaligned for O_DIRECT

    def _through_cache(self) -> None:
        if self.direct:
            fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            self.direct = False

    def close(self) -> None:
        """Writes what is buffered, syncs the file to the disk and closes it."""
        if self.closed:
            return
        try:
            whole_blocks = self._filled - self._filled % _DIRECT_ALIGNMENT
            self._write_out(self._view[:whole_blocks])
            if whole_blocks < self._filled:
                self._through_cache()
                self._write_out(self._view[whole_blocks : self._filled])
            os.fsync(self._fd)
            # What did go through the cache is of no use to training: released, not left to
            # push out pages training uses.
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            self._release()

    def _release(self) -> None:
        self.closed = True
        os.close(self._fd)
        try:
            self._view.release()
            self._buffer.close()
        except BufferError:
            pass  # a failed write's traceback still holds a slice: the buffer goes with it

    def __enter__(self) -> UncachedFile:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        elif not self.closed:
            self._release()  # the save failed: the file is left unsynced, and never published


class _ChecksummedStream:
    """A file being written, with the size and CRC-32 of what went into it so far. `piece`: the
    largest write passed on (0: any), since an object's writer copies each write into its buffer
    whole, and torch.save writes a tensor in one piece."""

    def __init__(self, stream, piece: int = 0) -> None:
        self._stream, self.size, self.crc, self._piece = stream, 0, 0, piece

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if self._piece and data.nbytes > self._piece:
            for start in range(0, data.nbytes, self._piece):
                self._stream.write(data[start : start + self._piece])
        else:
            self._stream.write(data)
        self.crc = zlib.crc32(data, self.crc)  # zlib releases the GIL: other writer threads go on
        self.size += data.nbytes
        return data.nbytes

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class _ChecksummingFileSystem:
    """DCP's file system of a writer, recording {file name: [size, crc32]} of each file written,
    so that the manifest needs no second pass over the checkpoint (a download, in an object store).
    `uncached`: files on a local disk are written as UncachedFiles; otherwise objects, uploaded in
    parts of OBJECT_PART bytes."""

    def __init__(self, fs, checksums: dict[str, list[int]], uncached: bool = False) -> None:
        self._fs, self.checksums, self._uncached = fs, checksums, uncached
        self.failures: list[tuple] = []  # (file, storage error) met by any writer thread

    def _open(self, path, mode: str):
        if "w" not in mode:
            return self._fs.create_stream(path, mode)
        return UncachedFile(str(path)) if self._uncached else self._object(os.fspath(path), mode)

    @contextmanager
    def _object(self, path: str, mode: str):
        # As DCP's own: an fsspec file that fails is still closed, which completes its upload;
        # the partial object is removed. (Its part size, fsspec's 50 MB by default, is set here.)
        with self._fs.fs.open(path, mode, block_size=OBJECT_PART) as stream:
            try:
                yield stream
            except BaseException:
                with contextlib.suppress(Exception):
                    self._fs.fs.rm_file(path)
                raise

    @contextmanager
    def create_stream(self, path, mode: str):
        if "w" not in mode:
            with self._open(path, mode) as stream:
                yield stream
            return
        try:
            with self._open(path, mode) as stream:
                checksummed = _ChecksummedStream(stream, piece=0 if self._uncached else OBJECT_PART // 2)
                yield checksummed
        except BaseException as error:
            if is_storage_error(error):
                self.failures.append((str(path), error))
            raise
        self.checksums[_file_name(path)] = [checksummed.size, checksummed.crc]

    def rename(self, path, new_path) -> None:
        self._fs.rename(path, new_path)
        if _file_name(path) in self.checksums:
            self.checksums[_file_name(new_path)] = self.checksums.pop(_file_name(path))

    def __getattr__(self, name: str):
        return getattr(self._fs, name)


def _file_name(path) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


class FileWriter(_CheckedWrites, FileSystemWriter):
    """A rank's files in a local directory, as UncachedFiles (which sync themselves when closed),
    with the size and CRC-32 of each in `checksums`."""

    def __init__(self, path: str, thread_count: int) -> None:
        super().__init__(path, thread_count=thread_count, sync_files=False)
        self.checksums: dict[str, list[int]] = {}
        self._checksumming = _ChecksummingFileSystem(self.fs, self.checksums, uncached=True)
        self.fs = self._checksumming  # type: ignore[assignment]  # a wrapper with FileSystem's methods


class ObjectWriter(_CheckedWrites, FsspecWriter):
    """A rank's objects under a URL, through fsspec, with the size and CRC-32 of each in
    `checksums`. An object is durable once its upload completes: there is nothing to sync."""

    def __init__(self, path: str, thread_count: int, **storage_options) -> None:
        super().__init__(path, thread_count=thread_count, sync_files=False, **storage_options)
        self.checksums: dict[str, list[int]] = {}
        self._checksumming = _ChecksummingFileSystem(self.fs, self.checksums)
        self.fs = self._checksumming  # type: ignore[assignment]  # a wrapper with FileSystem's methods
