"""CheckpointManager: sharded checkpoints with torch.distributed.checkpoint (DCP), published atomically.

Layout under the run's checkpoints/ directory:
    step_00000100/   DCP files of every rank + meta.json (train state, LR schedule, config, and
                     the size and CRC-32 of every file: the manifest)
    latest           the name of the newest complete checkpoint, replaced last
Checkpoints are ordered by the samples trained when each was written, then by step: a run resumed
on another number of ranks counts steps of another size, so its step_N can be below older ones.
A checkpoint is written under a hidden temporary name by all ranks, and only after every rank has
finished does rank 0 add meta.json and rename it into place. So a crash at any point leaves either
the previous checkpoints untouched or a new complete one: never a half-written step_* that looks
complete. The manifest catches what happens to a checkpoint afterwards (a truncated or damaged
file): such a checkpoint is skipped, with a warning, for the newest one that is intact. Every
rank verifies its share of the files, so the check reads a checkpoint once, in parallel.

An asynchronous save copies the state to memory, returns, and writes while training goes on; it is
published by the next call that needs it finished (the next save, or wait()), on every rank at the
same point of the run, since publishing takes a barrier. DCP stores each rank's shards separately,
which is what lets a sharded table be saved without gathering it anywhere, and loaded onto another
number of ranks or another sharding plan.

Loading unpickles nothing but data, so an untrusted checkpoint cannot run code: DCP's .metadata
file (a pickle, which DCP itself would load with plain pickle.load) is unpickled admitting only
the classes DCP's metadata is made of, and its non-tensor values (which DCP would load with
torch.load(weights_only=False)) with weights_only=True, like its tensors. A file that names
anything else is refused with a CheckpointError naming it.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import pickle
import re
import shutil
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PosixPath, PurePosixPath
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, StorageMeta, TensorProperties,
                                                   TensorStorageMetadata, _MEM_FORMAT_ENCODING)
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
META_FILE = "meta.json"
LATEST_FILE = "latest"
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for; the message says where and why."""


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _crc32s(paths: List[Path]) -> List[int]:
    # zlib releases the GIL on large buffers: one thread per file uses every core.
    with ThreadPoolExecutor(max_workers=max(1, min(len(paths), os.cpu_count() or 1))) as pool:
        return list(pool.map(_crc32, paths))


def manifest(directory: Path) -> Dict[str, List[int]]:
    """{file name: [size, crc32]} of every file of a checkpoint but meta.json."""
    files = [p for p in sorted(directory.iterdir()) if p.is_file() and p.name != META_FILE]
    return {p.name: [p.stat().st_size, crc] for p, crc in zip(files, _crc32s(files))}


def verify(path: Path, group: Optional[dist.ProcessGroup] = None) -> Optional[str]:
    """None if the checkpoint at `path` is complete and intact, else what is wrong with it.

    Collective where torch.distributed is initialized (every rank of `group` calls it with the
    same path, and gets the same answer): rank 0 checks meta.json and every file's size, and each
    rank reads and checks the CRC-32s of its share of the files, so that a checkpoint is read
    once, in parallel, rather than whole by one rank while the others wait."""
    rank, ranks = _position(group)
    problem, expected = None, {}
    if rank == 0:
        problem, expected = _check_layout(path)
    problem = broadcast_text(problem, group)
    if problem is not None:
        return problem
    expected = json.loads(broadcast_text(json.dumps(expected), group))
    share = sorted(expected)[rank::ranks]
    damaged = [name for name, crc in zip(share, _crc32s([path / name for name in share])) if crc != expected[name][1]]
    mine = f"{damaged[0]} is damaged (its CRC-32 differs from the one written)" if damaged else None
    return _first_problem(mine, group)


def _parse_meta(path: Path) -> Tuple[Optional[str], Dict[str, Any]]:
    """(what is wrong with meta.json, or None; its contents)."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError) as error:
        return f"{META_FILE} is missing or unreadable ({error})", {}
    if not isinstance(meta, dict):
        return f"{META_FILE} is not a JSON object", {}
    return None, meta


def _is_manifest_entry(entry: Any) -> bool:
    return isinstance(entry, list) and len(entry) == 2 and all(type(n) is int and n >= 0 for n in entry)


def _check_layout(path: Path) -> Tuple[Optional[str], Dict[str, List[int]]]:
    """(what is wrong with meta.json or the files' presence and sizes, or None; the manifest)."""
    problem, meta = _parse_meta(path)
    if problem is not None:
        return problem, {}
    expected = meta.get("files")
    if not expected:
        return f"{META_FILE} lists no files", {}
    if not isinstance(expected, dict) or not all(map(_is_manifest_entry, expected.values())):
        return f'{META_FILE} is damaged: its "files" is not an object of file name -> [size, CRC-32]', {}
    for name, (size, _) in expected.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing", {}
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written", {}
    return None, expected


def _position(group: Optional[dist.ProcessGroup]) -> Tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _first_problem(problem: Optional[str], group: Optional[dist.ProcessGroup]) -> Optional[str]:
    """The problem of the lowest rank that has one, on every rank; None if no rank has one."""
    rank, ranks = _position(group)
    if ranks == 1:
        return problem
    first = torch.tensor([rank if problem is not None else ranks], dtype=torch.int64)
    dist.all_reduce(first, op=dist.ReduceOp.MIN, group=group)
    if first.item() == ranks:
        return None
    return broadcast_text(problem, group, src=int(first.item()))


def read_meta(path: Path) -> Dict[str, Any]:
    """A checkpoint's meta.json; CheckpointError if it is unreadable or not a JSON object."""
    problem, meta = _parse_meta(Path(path))
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is not usable: {problem}.")
    return meta


# ---- loading without running anything a checkpoint names ----------------------------------------

# Everything a DCP .metadata pickle names: the classes of torch.distributed.checkpoint.metadata,
# FileSystemWriter's _StorageInfo, and the torch values and path types they hold. Calling any of
# them builds data and nothing else.
_METADATA_GLOBALS = {
    f"{value.__module__}.{value.__name__}": value
    for value in (Metadata, StorageMeta, MetadataIndex, TensorStorageMetadata, BytesStorageMetadata,
                  ChunkStorageMetadata, TensorProperties, _MEM_FORMAT_ENCODING, _StorageInfo, torch.Size,
                  torch.serialization._get_layout, OrderedDict, PosixPath, PurePosixPath)
}
_METADATA_GLOBALS.update({f"torch.{name}": value for name, value in vars(torch).items()
                          if isinstance(value, (torch.dtype, torch.layout, torch.memory_format))})


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, stream: Any, path: Path) -> None:
        super().__init__(stream)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        found = _METADATA_GLOBALS.get(f"{module}.{name}")
        if found is None:
            raise CheckpointError(f"{self.path}: refused to load: it names {module}.{name}, which a checkpoint "
                                  "never contains (the file may have been tampered with).")
        return found


class _SafeReader(FileSystemReader):
    """DCP's FileSystemReader, but .metadata is unpickled with _METADATA_GLOBALS only."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream, Path(path)).load()
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not DCP metadata (it holds a {type(metadata).__name__}).")
        if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """DCP's DefaultLoadPlanner, but a checkpoint's non-tensor values (numbers, strings, dicts of
    them) are loaded with torch.load(weights_only=True) rather than weights_only=False."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            file = self.path / self.metadata.storage_data[read_item.storage_index].relative_path
            raise CheckpointError(f"{file}: refused to load {fqn!r}: {weights_only_refusal(error)}; a checkpoint's "
                                  "values are loaded as plain data only (the file may have been tampered with).")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def weights_only_refusal(error: Exception) -> str:
    """The line of torch.load(weights_only=True)'s long message that says what it refused."""
    text = str(error)
    found = (re.search(r"WeightsUnpickler error:\s*(Unsupported [^\n]*?)(?: was not an allowed global.*)?$", text,
                       re.MULTILINE)
             or re.search(r"^Trying to load (unsupported GLOBAL \S+) whose module", text, re.MULTILINE))
    return found.group(1) if found else text.splitlines()[0]


def read_dcp_metadata(path: Path) -> Metadata:
    """The DCP metadata of the checkpoint at `path`; CheckpointError if it names anything else."""
    return _SafeReader(str(path)).read_metadata()


def load_state(path: Path, state: Dict[str, Any], group: Optional[dist.ProcessGroup] = None,
               no_dist: bool = False) -> None:
    """dcp.load of the checkpoint at `path` into `state`, unpickling nothing but data: every
    checkpoint is loaded through here. CheckpointError naming the file that holds anything else."""
    # Read once before DCP does: inside dcp.load a refused .metadata is taken for a missing one,
    # retried as a rank's own, and reported as an AssertionError.
    read_dcp_metadata(path)
    try:
        dcp.load(state, storage_reader=_SafeReader(str(path)), planner=_SafePlanner(Path(path)),
                 process_group=group, no_dist=no_dist)
    except dcp.CheckpointException as error:  # DCP wraps what each rank raised
        refused = [cause for cause, _ in error.failures.values() if isinstance(cause, CheckpointError)]
        if not refused:
            raise
        raise refused[0] from None


def _copy(value: Any) -> Any:
    """A copy of a state dict that training can no longer change: what an asynchronous save
    writes. (DCP's own staging copies plain tensors but refuses the ShardedTensors torchrec's
    sharded tables and their optimizer states are.)"""
    if isinstance(value, ShardedTensor):
        shards = [Shard(shard.tensor.detach().clone(), shard.metadata) for shard in value.local_shards()]
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            shards, value.metadata(), process_group=value._process_group)
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(item) for item in value)
    return copy.deepcopy(value)


class _AlreadyCopied:
    """DCP's staging step for a state that _copy already made safe to write in the background."""

    should_synchronize_after_execute = False

    def stage(self, state_dict: Dict[str, Any]) -> Dict[str, Any]:
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def _barrier(group: Optional[dist.ProcessGroup]) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


class CheckpointManager:
    def __init__(self, directory: Path, keep_last: int, rank: int,
                 process_group: Optional[dist.ProcessGroup] = None, io_threads: int = 4) -> None:
        """`process_group` carries the checkpoint's own coordination (a gloo group, so that an
        asynchronous save's background thread never shares a group with training)."""
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.rank = rank
        self.group = process_group
        self.io_threads = io_threads
        self._pending: Optional[tuple] = None  # (future, step, staging, final, meta) of an async save

    def _published(self) -> List[Path]:
        """Published checkpoints (renamed into place, with meta.json), oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if _STEP_DIR.match(p.name) and (p / META_FILE).is_file()]
        return sorted(found, key=lambda p: (_samples(p), p.name))

    def latest(self) -> Optional[Path]:
        """The newest published checkpoint (not verified; see newest_valid)."""
        published = self._published()
        return published[-1] if published else None

    def newest_valid(self) -> Optional[Path]:
        """Collective (see verify()): the newest checkpoint whose files match its manifest; each
        newer one that does not is reported with a warning and skipped. None when there are no
        checkpoints at all; a CheckpointError when there are some but none is intact."""
        listed = json.dumps([p.name for p in self._published()]) if self.rank == 0 else None
        published = [self.directory / name for name in json.loads(broadcast_text(listed, self.group))]
        for path in reversed(published):
            problem = verify(path, self.group)
            if problem is None:
                return path
            log.warning("checkpoint %s is not usable: %s; trying the previous one", path, problem)
        if published:
            raise CheckpointError(
                f"no intact checkpoint in {self.directory}: all {len(published)} failed verification (see the "
                "warnings above). Remove them to start over, or point checkpoint.load_from at another run."
            )
        return None

    # ---- saving -------------------------------------------------------------------------------

    def save(self, step: int, state: Dict[str, Any], meta: Dict[str, Any], asynchronous: bool = False,
             samples: int = 0) -> Path:
        """Collective: every rank calls it with its own shards in `state`; `meta` (JSON-able, the
        same on all ranks) is written by rank 0, with `samples` (trained so far: what orders
        checkpoints). Asynchronous: returns once `state` is copied; the checkpoint appears when the
        next save() or wait() publishes it."""
        meta = {**meta, "samples": samples}
        self.wait()
        final = self.directory / f"step_{step:08d}"
        staging = self.directory / f".step_{step:08d}.tmp"
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)  # left by a run that died while saving
        _barrier(self.group)
        if asynchronous:
            future = dcp.async_save(_copy(state), storage_writer=self._writer(staging), process_group=self.group,
                                    async_stager=_AlreadyCopied())
            self._pending = (future, step, staging, final, meta)
            return final
        dcp.save(state, storage_writer=self._writer(staging), process_group=self.group)
        self._publish(step, staging, final, meta)
        return final

    def _writer(self, staging: Path) -> FileSystemWriter:
        # Several writer threads: one thread leaves most of a disk's bandwidth unused (measured by
        # scripts/benchmark.py checkpoint). Files are fsynced before the checkpoint is published.
        return FileSystemWriter(str(staging), thread_count=self.io_threads, sync_files=True)

    def wait(self) -> Optional[Path]:
        """Collective: finish and publish the pending asynchronous save, if any."""
        if self._pending is None:
            return None
        future, step, staging, final, meta = self._pending
        self._pending = None
        future.result()  # a plain Future: our stager stages synchronously (see _AlreadyCopied)
        self._publish(step, staging, final, meta)
        return final

    def _publish(self, step: int, staging: Path, final: Path, meta: Dict[str, Any]) -> None:
        _barrier(self.group)  # every rank's files are written
        if self.rank == 0:
            record = {"step": step, **meta, "files": manifest(staging)}
            _write_atomically(staging / META_FILE, json.dumps(record, indent=2))
            if final.exists():  # the same step saved again (a resumed run that had nothing left to do)
                shutil.rmtree(final)
            os.replace(staging, final)
            _write_atomically(self.directory / LATEST_FILE, final.name)
            self._prune()
        _barrier(self.group)

    def _prune(self) -> None:
        for old in self._published()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            log.info("removed old checkpoint %s (checkpoint.keep_last=%d)", old.name, self.keep_last)

    # ---- loading ------------------------------------------------------------------------------

    def load(self, path: Path, state: Dict[str, Any]) -> Dict[str, Any]:
        """Collective: fills `state` (a structure like the one save() got, with this rank's
        tensors, or a part of it) in place from `path`, resharding as needed; returns the meta."""
        meta = read_meta(path)
        load_state(path, state, self.group)
        return meta


def _samples(path: Path) -> float:
    """The samples trained when the checkpoint at `path` was written (0 if its meta.json predates
    the count). A damaged meta.json counts as newest, so that resuming tries it first and reports
    why it is not usable."""
    try:
        samples = json.loads((path / META_FILE).read_text()).get("samples", 0)
    except (OSError, ValueError, AttributeError):
        return math.inf
    return samples if type(samples) is int else math.inf


def broadcast_text(text: Optional[str], group: Optional[dist.ProcessGroup] = None, src: int = 0) -> Optional[str]:
    """Rank `src`'s text (or None) on every rank (ranks of `group`), as bytes in tensors: no
    pickled objects travel."""
    if not dist.is_initialized():
        return text
    data = (text or "").encode()
    length = torch.tensor([-1 if text is None else len(data)], dtype=torch.int64)
    dist.broadcast(length, group=group, group_src=src)
    if length.item() < 0:
        return None
    buffer = torch.tensor(list(data), dtype=torch.uint8) if dist.get_rank(group) == src else \
        torch.zeros(int(length.item()), dtype=torch.uint8)
    dist.broadcast(buffer, group=group, group_src=src)
    return bytes(buffer.tolist()).decode()


def find_checkpoint(path: Path, group: Optional[dist.ProcessGroup] = None) -> Path:
    """The newest intact checkpoint that `path` names: a step_N directory itself, or a run
    directory or its checkpoints/ directory. CheckpointError when there is none. Collective,
    like verify(): rank 0 decides what `path` is, so every rank takes the same branch."""
    path = Path(path)
    rank, _ = _position(group)
    kind = None
    if rank == 0:
        if _STEP_DIR.match(path.name):
            kind = "step" if path.is_dir() else f"checkpoint {path} is not usable: no such directory."
        elif (path / "checkpoints").is_dir():
            kind = "run"
        elif path.is_dir():
            kind = "checkpoints"
        else:
            kind = f"{path}: no such directory; expected a run directory, its checkpoints/ or a step_N."
    kind = broadcast_text(kind, group)
    if kind == "step":
        problem = verify(path, group)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} is not usable: {problem}.")
        return path
    if kind not in ("run", "checkpoints"):
        raise CheckpointError(kind)
    directory = path / "checkpoints" if kind == "run" else path
    found = CheckpointManager(directory, keep_last=1, rank=rank, process_group=group).newest_valid()
    if found is None:
        raise CheckpointError(f"{path}: no checkpoint there (no step_N directory with {META_FILE} in {directory}).")
    return found


# What the model's shapes depend on: a checkpoint whose values differ cannot be loaded into it.
_MODEL_SHAPE_KEYS = {
    "features": ("label", "dense", "embedding_dim", "pooling"),
    "model": ("arch", "dense_arch_layer_sizes", "over_arch_layer_sizes", "dcn_num_layers", "dcn_low_rank_dim"),
}


def model_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """How the model a checkpoint's config describes differs from the current config's, one
    line per config key (both as dataclasses.asdict(Config)); empty when the model fits."""
    lines = []

    def compare(key: str, old: Any, new: Any) -> None:
        if old != new:
            lines.append(f"{key}: {old!r} in the checkpoint, {new!r} now")

    for group, keys in _MODEL_SHAPE_KEYS.items():
        for key in keys:
            compare(f"{group}.{key}", saved[group].get(key), current[group].get(key))
    old_tables = {f["name"]: f for f in saved["features"]["sparse"]}
    new_tables = {f["name"]: f for f in current["features"]["sparse"]}
    for name in sorted(old_tables.keys() - new_tables.keys()):
        lines.append(f"features.sparse: {name!r} is in the checkpoint, not in the config")
    for name in sorted(new_tables.keys() - old_tables.keys()):
        lines.append(f"features.sparse: {name!r} is in the config, not in the checkpoint")
    for name in sorted(old_tables.keys() & new_tables.keys()):
        compare(f"features.sparse[{name}].num_embeddings", old_tables[name].get("num_embeddings"),
                new_tables[name].get("num_embeddings"))
    return lines
