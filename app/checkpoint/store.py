"""CheckpointStore: a run's published checkpoints, written with torch.distributed.checkpoint (DCP).

Layout under the run's checkpoints/ directory:
    step_00000100/   DCP files of every rank + meta.json (train state, config, and the size and
                     CRC-32 of every file: the manifest)
    latest           the name of the newest complete checkpoint, replaced last
    best             JSON naming the checkpoint with the best validation metric so far and that
                     metric ({"checkpoint": "step_00000080", "step", "samples", "metric", "value"}):
                     a pointer, published after the step directory it names, which keep-last
                     never prunes. Keeping the best costs no copy of any table.
Checkpoints are ordered by the samples trained when each was written, then by step: a run resumed
on another number of ranks counts steps of another size, so its step_N can be below older ones.
A checkpoint is written under a hidden temporary name by all ranks, and only after every rank has
finished does rank 0 add meta.json and publish it under its name. So a crash at any point leaves
either the previous checkpoints untouched or a new complete one: never a half-written step_* that
looks complete. An object store (a URL: s3://...) has no rename: there a checkpoint is written
under its own name and published by its meta.json, written last; a step_* without one is a save
that never finished, ignored on resume and removed by the next prune. The manifest catches what happens to a checkpoint afterwards (a truncated or
damaged file): such a checkpoint is skipped, with a warning, for the newest one that is intact.
Every rank verifies its share of the files, so the check reads a checkpoint once, in parallel.

An asynchronous save copies the state to host memory (pinned where the process uses CUDA, so that
tables on the GPU, UVM ones included, never take a second copy of device memory), returns, and
writes while training goes on; it is published by the next call that needs it finished (the next
save, or wait()), on every rank at the same point of the run, since publishing takes a barrier.
DCP stores each rank's shards separately, which is what lets a sharded table be saved without
gathering it anywhere, and loaded onto another number of ranks or another sharding plan. Each rank's files are written by
app/checkpoint/writers.py, listed and published through a storage (app/storage.py), and loaded
through app/checkpoint/safe_load.py, which unpickles nothing but data.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import BlockingAsyncStager

from app import progress
from app.checkpoint.safe_load import CheckpointError, load_state
from app.checkpoint.writers import FileWriter, HostCopyStager, ObjectWriter, SavePlanner
from app.storage import META_FILE_NAME, LocalStorage, ObjectStorage, Storage, location, storage_at

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
META_FILE = META_FILE_NAME  # the manifest: what publishes a checkpoint
LATEST_FILE = "latest"
BEST_FILE = "best"
_CHUNK = 8 << 20


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def _crc32(storage: Storage, name: str, bar: Optional[Any] = None) -> int:
    crc = 0
    with storage.open(name) as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            if bar is not None:
                bar.update(len(chunk))
    return crc


def _crc32s(storage: Storage, names: List[str], bar: Optional[Any] = None) -> List[int]:
    # zlib releases the GIL on large buffers: one thread per file uses every core.
    with ThreadPoolExecutor(max_workers=max(1, min(len(names), os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda name: _crc32(storage, name, bar), names))


def manifest(storage: Storage, directory: str, written: Optional[Dict[str, List[int]]] = None) -> Dict[str, List[int]]:
    """{file name: [size, crc32]} of every file of checkpoint `directory` but meta.json. `written`:
    the [size, crc32] its writers computed as they wrote; the files it does not cover, or whose
    size it does not match, are read back."""
    sizes = {name: size for name, size in storage.files(directory).items() if name != META_FILE}
    known = {name: entry for name, entry in (written or {}).items() if sizes.get(name) == entry[0]}
    unknown = [name for name in sizes if name not in known]
    crcs = dict(zip(unknown, _crc32s(storage, [f"{directory}/{name}" for name in unknown])))
    return {name: known[name] if name in known else [size, crcs[name]] for name, size in sizes.items()}


def verify(path: Any, group: Optional[dist.ProcessGroup] = None, storage: Optional[Storage] = None) -> Optional[str]:
    """None if the checkpoint at `path` (a name in `storage`, or a local path or URL) is complete and
    intact, else what is wrong with it.

    Collective where torch.distributed is initialized (every rank of `group` calls it with the
    same path, and gets the same answer): rank 0 checks meta.json and every file's size, and each
    rank reads and checks the CRC-32s of its share of the files, so that a checkpoint is read
    once, in parallel, rather than whole by one rank while the others wait."""
    if storage is None:
        storage, path = storage_at(location(path).parent), location(path).name
    name = str(path)
    rank, ranks = _position(group)
    problem, expected = None, {}
    if rank == 0:
        problem, expected = _check_layout(storage, name)
    problem = broadcast_text(problem, group)
    if problem is not None:
        return problem
    expected = json.loads(broadcast_text(json.dumps(expected), group))
    share = sorted(expected)[rank::ranks]
    with progress.bar(sum(expected[file][0] for file in share), f"verifying {name}", "B", leave=False) as bar:
        crcs = _crc32s(storage, [f"{name}/{file}" for file in share], bar)
    damaged = [file for file, crc in zip(share, crcs) if crc != expected[file][1]]
    mine = f"{damaged[0]} is damaged (its CRC-32 differs from the one written)" if damaged else None
    return _first_problem(mine, group)


def _parse_meta(storage: Storage, name: str) -> Tuple[Optional[str], Dict[str, Any]]:
    """(what is wrong with checkpoint `name`'s meta.json, or None; its contents)."""
    try:
        meta = json.loads(storage.read(f"{name}/{META_FILE}"))
    except (OSError, ValueError) as error:
        return f"{META_FILE} is missing or unreadable ({error})", {}
    if not isinstance(meta, dict):
        return f"{META_FILE} is not a JSON object", {}
    return None, meta


def _is_manifest_entry(entry: Any) -> bool:
    return isinstance(entry, list) and len(entry) == 2 and all(type(n) is int and n >= 0 for n in entry)


def _check_layout(storage: Storage, name: str) -> Tuple[Optional[str], Dict[str, List[int]]]:
    """(what is wrong with meta.json or the files' presence and sizes, or None; the manifest)."""
    problem, meta = _parse_meta(storage, name)
    if problem is not None:
        return problem, {}
    expected = meta.get("files")
    if not expected:
        return f"{META_FILE} lists no files", {}
    if not isinstance(expected, dict) or not all(map(_is_manifest_entry, expected.values())):
        return f'{META_FILE} is damaged: its "files" is not an object of file name -> [size, CRC-32]', {}
    present = storage.files(name)
    for file, (size, _) in expected.items():
        if file not in present:
            return f"{file} is missing", {}
        if present[file] != size:
            return f"{file} has {present[file]} bytes, {size} were written", {}
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


def read_meta(path: Any) -> Dict[str, Any]:
    """The meta.json of the checkpoint at `path` (a local path or URL); CheckpointError if
    unreadable or not an object."""
    path = location(path)
    problem, meta = _parse_meta(storage_at(path.parent), path.name)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is not usable: {problem}.")
    return meta


def _barrier(group: Optional[dist.ProcessGroup]) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


class CheckpointStore:
    def __init__(self, storage: Union[Storage, str, Path], keep_last: int, rank: int,
                 process_group: Optional[dist.ProcessGroup] = None, io_threads: int = 4) -> None:
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
        self._pending: Optional[tuple] = None  # (future, step, staging, final, meta, checksums, best) of an async save
        self._pinned_stager: Optional[BlockingAsyncStager] = None
        self._removal: Optional[threading.Thread] = None  # deleting pruned checkpoints (rank 0)
        self._removal_error: Optional[BaseException] = None

    def _published(self) -> List[str]:
        """Names of the published checkpoints (with meta.json), oldest first. Reads each meta.json
        once, for its samples."""
        self._finish_removal()  # a checkpoint half deleted would look published, and damaged
        found = [name for name in self.storage.list() if _STEP_DIR.match(name)
                 and META_FILE in self.storage.files(name)]
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

    def latest(self) -> Optional[Path]:
        """The newest published checkpoint (not verified; see newest_valid)."""
        published = self._published()
        return self.storage.path(published[-1]) if published else None

    def newest_valid(self) -> Optional[Path]:
        """Collective (see verify()): the newest checkpoint whose files match its manifest; each
        newer one that does not is reported with a warning and skipped. None when there are no
        checkpoints at all; a CheckpointError when there are some but none is intact."""
        listed = json.dumps(self._published()) if self.rank == 0 else None
        published = json.loads(broadcast_text(listed, self.group))
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

    def save(self, step: int, state: Dict[str, Any], meta: Dict[str, Any], asynchronous: bool = False,
             samples: int = 0, best: Optional[Dict[str, Any]] = None) -> Path:
        """Collective: every rank calls it with its own shards in `state`; `meta` (JSON-able, the
        same on all ranks) is written by rank 0, with `samples` (trained so far: what orders
        checkpoints). Asynchronous: returns once `state` is copied; the checkpoint appears when the
        next save() or wait() publishes it. `best` (the metric and its value): the checkpoint
        becomes the best one once it is published (see mark_best)."""
        meta = {**meta, "samples": samples}
        self._publish_pending()
        final = step_name(step)
        staging = self.storage.staging_name(final)
        if staging == final and self._published_here(final):
            # Written in place, this save would destroy a published checkpoint of the same name (a
            # run resumed on fewer ranks counts steps of another size) before it is complete.
            staging = f".{final}.tmp"
        if self.rank == 0:
            # Left by a run that died while saving; in an object store, where staging is the final
            # name, also the same step saved before (a resumed run that had nothing left to do).
            self.storage.delete(staging)
        _barrier(self.group)
        writer = self._writer(staging)
        if asynchronous:
            future = dcp.async_save(state, storage_writer=writer, planner=SavePlanner(),
                                    process_group=self.group,
                                    async_stager=self._stager())
            self._pending = (future, step, staging, final, meta, writer.checksums, best)
            return self.storage.path(final)
        dcp.save(state, storage_writer=writer, planner=SavePlanner(), process_group=self.group)
        self._publish(step, staging, final, meta, writer.checksums, best)
        return self.storage.path(final)

    def _published_here(self, name: str) -> bool:
        """Collective: whether checkpoint `name` is published, as rank 0 finds it."""
        found = str(META_FILE in self.storage.files(name)) if self.rank == 0 else None
        return broadcast_text(found, self.group) == "True"

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

    def _writer(self, staging: str) -> Union[FileWriter, ObjectWriter]:
        # Several writer threads: one thread leaves most of a disk's bandwidth unused (measured by
        # scripts/benchmark.py checkpoint). Files are fsynced before the checkpoint is published;
        # an object is durable once its upload completes.
        if isinstance(self.storage, ObjectStorage):
            return ObjectWriter(str(self.storage.path(staging)), thread_count=self.io_threads, **self.storage.options)
        return FileWriter(str(self.storage.path(staging)), thread_count=self.io_threads)

    def wait(self) -> Optional[Path]:
        """Collective: finish what goes on in the background: the pending asynchronous save, if
        any, written and published (its path returned), and the deletion of pruned checkpoints."""
        path = self._publish_pending()
        self._finish_removal()
        return path

    def _publish_pending(self) -> Optional[Path]:
        self._finish_removal()
        if self._pending is None:
            return None
        future, step, staging, final, meta, checksums, best = self._pending
        self._pending = None
        future.result()  # a plain Future: the state was staged synchronously (see _stager)
        self._publish(step, staging, final, meta, checksums, best)
        return self.storage.path(final)

    def _publish(self, step: int, staging: str, final: str, meta: Dict[str, Any],
                 checksums: Dict[str, List[int]], best: Optional[Dict[str, Any]] = None) -> None:
        # Every rank's files are written once every rank has sent what its writers computed.
        written = gather_texts(json.dumps(checksums), self.group)
        if self.rank == 0:
            checksums = {name: entry for text in written for name, entry in json.loads(text).items()}
            record = {"step": step, **meta, "files": manifest(self.storage, staging, checksums)}
            self.storage.write(f"{staging}/{META_FILE}", json.dumps(record, indent=2))
            # Replaces the same step saved before (a resumed run that had nothing left to do).
            self.storage.publish(staging, final)
            self.storage.write(LATEST_FILE, final)
            if best is not None:
                self._write_best(final, step, meta.get("samples", 0), best)
            self._prune()
        _barrier(self.group)

    def mark_best(self, step: int, best: Dict[str, Any]) -> None:
        """Collective: make the checkpoint of `step` (saved by this run, published or being written
        in the background) the best one; `best`: {"metric", "value"}. The pointer is replaced in
        one write after the checkpoint it names is published, and the previous best, no longer
        exempt, is pruned if keep-last would have pruned it."""
        if self._pending is not None and self._pending[1] == step:
            self._pending = (*self._pending[:6], best)  # published with it
            return
        self._finish_removal()
        if self.rank == 0:
            name = step_name(step)
            if META_FILE not in self.storage.files(name):
                raise CheckpointError(f"checkpoint {self.storage.path(name)} is not published: it cannot be the best.")
            samples = json.loads(self.storage.read(f"{name}/{META_FILE}")).get("samples", 0)
            self._write_best(name, step, samples, best)
            self._prune()
        _barrier(self.group)

    def _write_best(self, name: str, step: int, samples: int, best: Dict[str, Any]) -> None:
        record = {"checkpoint": name, "step": step, "samples": samples, **best}
        self.storage.write(BEST_FILE, json.dumps(record))
        log.info("best checkpoint: %s (validation %s %.6f)", name, best.get("metric"), best.get("value", math.nan))

    def best_record(self) -> Optional[Dict[str, Any]]:
        """Collective where distributed: rank 0's reading of the best pointer, on every rank: the
        record, or None when there is none or what it names is not published (with a warning)."""
        text = None
        if self.rank == 0:
            record = self._read_best()
            text = None if record is None else json.dumps(record)
        text = broadcast_text(text, self.group)
        return None if text is None else json.loads(text)

    def _read_best(self) -> Optional[Dict[str, Any]]:
        self._finish_removal()
        try:
            record = json.loads(self.storage.read(BEST_FILE))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            log.warning("%s is not readable (%s): no best checkpoint", self.storage.path(BEST_FILE), error)
            return None
        name = record.get("checkpoint") if isinstance(record, dict) else None
        if not isinstance(name, str) or not _STEP_DIR.match(name) or META_FILE not in self.storage.files(name):
            log.warning("%s names no published checkpoint (%r): no best checkpoint", self.storage.path(BEST_FILE), name)
            return None
        return record

    def _prune(self) -> None:
        """Decides which checkpoints go (beyond keep-last, but never the best; and saves that died
        before publishing), and deletes them in the background: deleting gigabytes (with discard,
        or object by object from a bucket) takes a good part of a save's time, and training need
        not wait for it. Whatever lists or reads the checkpoints next waits for it first."""
        best = self._read_best()
        keep = {best["checkpoint"]} if best is not None else set()
        old = [name for name in self._published()[: -self.keep_last] if name not in keep]
        # A step directory without meta.json is a save that died before publishing (in an object
        # store, where saves are written in place); no save is under way while this runs.
        incomplete = [name for name in self.storage.list()
                      if _STEP_DIR.match(name) and META_FILE not in self.storage.files(name)]
        if old or incomplete:
            self._removal = threading.Thread(target=self._remove, args=(old, incomplete), name="checkpoint-prune")
            self._removal.start()

    def _remove(self, old: List[str], incomplete: List[str]) -> None:
        try:
            for name in old:
                self.storage.delete(name)
                log.info("removed old checkpoint %s (checkpoint.keep_last=%d)", name, self.keep_last)
            for name in incomplete:
                self.storage.delete(name)
                log.info("removed incomplete checkpoint %s (no %s: its save did not finish)", name, META_FILE)
        except BaseException as error:  # raised where the store is next used (see _finish_removal)
            self._removal_error = error

    def _finish_removal(self) -> None:
        """Waits for the checkpoints being deleted, and raises what went wrong deleting them."""
        if self._removal is not None:
            self._removal.join()
            self._removal = None
        error, self._removal_error = self._removal_error, None
        if error is not None:
            raise error

    # ---- loading ------------------------------------------------------------------------------

    def load(self, path: Path, state: Dict[str, Any], metadata: Any = None) -> Dict[str, Any]:
        """Collective: fills `state` (a structure like the one save() got, with this rank's
        tensors, or a part of it) in place from `path`, resharding as needed; returns the meta.
        `metadata`: the checkpoint's DCP metadata, where the caller has read it already."""
        meta = read_meta(path)
        load_state(path, state, self.group, metadata=metadata)
        return meta


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


def gather_texts(text: str, group: Optional[dist.ProcessGroup] = None) -> List[str]:
    """Every rank's text, in rank order, on every rank of `group` (as bytes in tensors: no pickled
    objects travel)."""
    if not dist.is_initialized():
        return [text]
    ranks = dist.get_world_size(group)
    data = text.encode()
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(ranks)]
    dist.all_gather(lengths, torch.tensor([len(data)], dtype=torch.int64), group=group)
    longest = max(int(length.item()) for length in lengths)
    mine = torch.zeros(longest, dtype=torch.uint8)
    mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else mine[:0]
    buffers = [torch.zeros(longest, dtype=torch.uint8) for _ in range(ranks)]
    dist.all_gather(buffers, mine, group=group)
    return [buffer[:int(length.item())].numpy().tobytes().decode() for buffer, length in zip(buffers, lengths)]


def find_checkpoint(path: Any, group: Optional[dist.ProcessGroup] = None, prefer: str = "latest") -> Any:
    """The intact checkpoint that `path` (a local path or URL) names: a step_N directory itself, a
    checkpoints/best pointer, or a run directory or its checkpoints/ directory: there, with
    `prefer` "best", the one checkpoints/best names where it is intact, else (and with "latest")
    the newest intact one. CheckpointError when there is none. Collective, like verify(): rank 0
    decides what `path` is, so every rank takes the same branch."""
    path = location(path)
    rank, _ = _position(group)
    kind = None
    if rank == 0:
        parent = storage_at(path.parent)
        if _STEP_DIR.match(path.name):
            kind = "step" if parent.is_dir(path.name) else f"checkpoint {path} is not usable: no such directory."
        elif path.name == BEST_FILE and BEST_FILE in parent.files(""):
            kind = "best"
        elif parent.is_dir(f"{path.name}/checkpoints"):
            kind = "run"
        elif parent.is_dir(path.name):
            kind = "checkpoints"
        else:
            kind = f"{path}: no such directory; expected a run directory, its checkpoints/ or a step_N."
    kind = broadcast_text(kind, group)
    if kind == "step":
        problem = verify(path, group)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} is not usable: {problem}.")
        return path
    if kind not in ("run", "checkpoints", "best"):
        raise CheckpointError(kind)
    directory = {"run": path / "checkpoints", "checkpoints": path, "best": path.parent}[kind]
    store = CheckpointStore(directory, keep_last=1, rank=rank, process_group=group)
    if kind == "best" or prefer == "best":
        record = store.best_record()
        best = store.storage.path(record["checkpoint"]) if record is not None else None
        problem = verify(record["checkpoint"], group, store.storage) if record is not None else \
            f"{directory / BEST_FILE} names no checkpoint"
        if problem is None:
            return best
        if kind == "best":
            raise CheckpointError(f"{path}: the best checkpoint is not usable: {problem}.")
        if record is not None:
            log.warning("the best checkpoint %s is not usable: %s; taking the newest intact one", best, problem)
    found = store.newest_valid()
    if found is None:
        raise CheckpointError(f"{path}: no checkpoint there (no step_N directory with {META_FILE} in {directory}).")
    return found
