"""Loading a checkpoint without running anything it names.

DCP's .metadata file is a pickle, which DCP itself would load with plain pickle.load: it is
unpickled here admitting only the classes DCP's metadata is made of. Its non-tensor values (which
DCP would load with torch.load(weights_only=False)) are loaded with weights_only=True, like its
tensors. A file that names anything else is refused with a CheckpointError naming it. Every
checkpoint, in training and in export, is loaded through load_state.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from collections import OrderedDict
from pathlib import PosixPath, PurePosixPath
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader  # DCP's reader of URLs
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    _MEM_FORMAT_ENCODING,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem

from app.errors import UserError
from app.storage import UrlPath, location


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint where one was asked for; the message says where and why."""


# Everything a DCP .metadata pickle names: the classes of torch.distributed.checkpoint.metadata,
# FileSystemWriter's _StorageInfo, and the torch values and path types they hold. Calling any of
# them builds data and nothing else.
_METADATA_GLOBALS: dict[str, Any] = {
    f"{value.__module__}.{value.__name__}": value
    for value in (
        Metadata,
        StorageMeta,
        MetadataIndex,
        TensorStorageMetadata,
        BytesStorageMetadata,
        ChunkStorageMetadata,
        TensorProperties,
        _MEM_FORMAT_ENCODING,
        _StorageInfo,
        torch.Size,
        torch.serialization._get_layout,
        OrderedDict,
        PosixPath,
        PurePosixPath,
    )
}
_METADATA_GLOBALS.update(
    {
        f"torch.{name}": value
        for name, value in vars(torch).items()
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format))
    }
)


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, stream: Any, path: os.PathLike) -> None:
        super().__init__(stream)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        found = _METADATA_GLOBALS.get(f"{module}.{name}")
        if found is None:
            raise CheckpointError(
                f"{self.path}: refused to load: it names {module}.{name}, which a checkpoint "
                "never contains (the file may have been tampered with)."
            )
        return found


class _SafeMetadata(FileSystemReader):
    """DCP's file readers, but .metadata is unpickled with _METADATA_GLOBALS only (or given:
    a caller that has read it already need not have it read again)."""

    def __init__(self, path: str, metadata: Metadata | None = None) -> None:
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = self._metadata
        if metadata is None:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as stream:
                metadata = _MetadataUnpickler(stream, path).load()
            if not isinstance(metadata, Metadata):
                raise CheckpointError(f"{path}: not DCP metadata (it holds a {type(metadata).__name__}).")
        storage_meta = getattr(metadata, "storage_meta", None)
        if storage_meta is None:  # as FileSystemReader does
            storage_meta = metadata.storage_meta = StorageMeta()
        storage_meta.load_id = self.load_id
        return metadata


class _SafeReader(_SafeMetadata, FileSystemReader):
    """A local checkpoint's reader."""


class _SafeFsspecReader(_SafeMetadata, FsspecReader):
    """An object store's (s3://...) checkpoint reader, through fsspec as DCP reads URLs."""


def _reader(path: Any, metadata: Metadata | None = None) -> FileSystemReader:
    path = location(path)
    return (_SafeFsspecReader if isinstance(path, UrlPath) else _SafeReader)(str(path), metadata)


class _SafePlanner(DefaultLoadPlanner):
    """DCP's DefaultLoadPlanner, but a checkpoint's non-tensor values (numbers, strings, dicts of
    them) are loaded with torch.load(weights_only=True) rather than weights_only=False."""

    def __init__(self, path: Any) -> None:
        super().__init__()
        self.path = location(path)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            assert self.metadata is not None  # set up before any item is loaded
            file = self.path / self.metadata.storage_data[read_item.storage_index].relative_path
            raise CheckpointError(
                f"{file}: refused to load {fqn!r}: {weights_only_refusal(error)}; a checkpoint's "
                "values are loaded as plain data only (the file may have been tampered with)."
            ) from error
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def weights_only_refusal(error: Exception) -> str:
    """The line of torch.load(weights_only=True)'s long message that says what it refused."""
    text = str(error)
    found = re.search(
        r"WeightsUnpickler error:\s*(Unsupported [^\n]*?)(?: was not an allowed global.*)?$", text, re.MULTILINE
    ) or re.search(r"^Trying to load (unsupported GLOBAL \S+) whose module", text, re.MULTILINE)
    return found.group(1) if found else text.splitlines()[0]


def read_dcp_metadata(path: Any) -> Metadata:
    """The DCP metadata of the checkpoint at `path` (a local path or URL); CheckpointError if it
    names anything else."""
    return _reader(path).read_metadata()


def load_state(
    path: Any,
    state: dict[str, Any],
    group: dist.ProcessGroup | None = None,
    no_dist: bool = False,
    metadata: Metadata | None = None,
) -> None:
    """dcp.load of the checkpoint at `path` into `state`, unpickling nothing but data: every
    checkpoint is loaded through here. CheckpointError naming the file that holds anything else.
    `metadata`: the checkpoint's, where the caller has read it already (read_dcp_metadata)."""
    # Read before DCP does: inside dcp.load a refused .metadata is taken for a missing one,
    # retried as a rank's own, and reported as an AssertionError.
    if metadata is None:
        metadata = read_dcp_metadata(path)
    try:
        dcp.load(
            state,
            storage_reader=_reader(path, metadata),
            planner=_SafePlanner(path),
            process_group=group,
            no_dist=no_dist,
        )
    except dcp.CheckpointException as error:  # DCP wraps what each rank raised
        refused = [cause for cause, _ in error.failures.values() if isinstance(cause, CheckpointError)]
        if not refused:
            raise
        raise refused[0] from None
