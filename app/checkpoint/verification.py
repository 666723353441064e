"""A checkpoint's manifest (meta.json's size and CRC-32 of every file) and its verification: a
truncated or damaged file is found before anything is loaded from it."""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch.distributed as dist

from app import progress
from app.checkpoint.collective import broadcast_text, first_problem, position
from app.checkpoint.safe_load import CheckpointError
from app.storage import META_FILE_NAME, Storage, location, storage_at

META_FILE = META_FILE_NAME  # the manifest: what publishes a checkpoint
_CHUNK = 8 << 20


def _crc32(storage: Storage, name: str, bar: Any | None = None) -> int:
    crc = 0
    with storage.open(name) as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            if bar is not None:
                bar.update(len(chunk))
    return crc


def _crc32s(storage: Storage, names: list[str], bar: Any | None = None) -> list[int]:
    # zlib releases the GIL on large buffers: one thread per file uses every core.
    with ThreadPoolExecutor(max_workers=max(1, min(len(names), os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda name: _crc32(storage, name, bar), names))


def manifest(storage: Storage, directory: str, written: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """{file name: [size, crc32]} of every file of checkpoint `directory` but meta.json. `written`:
    the [size, crc32] its writers computed as they wrote; the files it does not cover, or whose
    size it does not match, are read back."""
    sizes = {name: size for name, size in storage.files(directory).items() if name != META_FILE}
    known = {name: entry for name, entry in (written or {}).items() if sizes.get(name) == entry[0]}
    unknown = [name for name in sizes if name not in known]
    crcs = dict(zip(unknown, _crc32s(storage, [f"{directory}/{name}" for name in unknown])))
    return {name: known[name] if name in known else [size, crcs[name]] for name, size in sizes.items()}


def verify(path: Any, group: dist.ProcessGroup | None = None, storage: Storage | None = None) -> str | None:
    """None if the checkpoint at `path` (a name in `storage`, or a local path or URL) is complete and
    intact, else what is wrong with it.

    Collective where torch.distributed is initialized (every rank of `group` calls it with the
    same path, and gets the same answer): rank 0 checks meta.json and every file's size, and each
    rank reads and checks the CRC-32s of its share of the files, so that a checkpoint is read
    once, in parallel, rather than whole by one rank while the others wait."""
    if storage is None:
        storage, path = storage_at(location(path).parent), location(path).name
    name = str(path)
    rank, ranks = position(group)
    problem: str | None = None
    expected: dict[str, list[int]] = {}  # file name: [size, crc32]
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
    return first_problem(mine, group)


def parse_meta(storage: Storage, name: str) -> tuple[str | None, dict[str, Any]]:
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


def _check_layout(storage: Storage, name: str) -> tuple[str | None, dict[str, list[int]]]:
    """(what is wrong with meta.json or the files' presence and sizes, or None; the manifest)."""
    problem, meta = parse_meta(storage, name)
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


def read_meta(path: Any) -> dict[str, Any]:
    """The meta.json of the checkpoint at `path` (a local path or URL); CheckpointError if
    unreadable or not an object."""
    path = location(path)
    problem, meta = parse_meta(storage_at(path.parent), path.name)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is not usable: {problem}.")
    return meta
