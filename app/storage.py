"""Where a run's files go: one narrow interface (write, read, list, publish, delete) and one atomic
file helper, so that nothing half-written ever carries a final name.

`LocalStorage` keeps files on a local or mounted file system. The checkpointer does all its file
work through such a storage, by names relative to its root, so that an object-store backend is a
second implementation of these few methods, not a rewrite of the checkpointer.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Dict, Iterator, List, Union


@contextmanager
def atomic_output(path: Union[str, Path]) -> Iterator[Path]:
    """A temporary name beside `path` (a file or a directory) to write to. When the block completes,
    a file is fsynced and the name replaces `path` in one rename; when it fails, whatever was written
    is removed. Readers therefore see the old `path` or the complete new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    _remove(tmp)  # left by a process that died while writing
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb+") as written:
                os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def write_atomically(path: Union[str, Path], data: Union[bytes, str]) -> None:
    """Write `data` to `path` so that `path` never holds a part of it (see atomic_output)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class LocalStorage:
    """Files under `root`, named by paths relative to it ("step_00000100/meta.json")."""

    def __init__(self, root: Union[str, Path]) -> None:
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def path(self, name: str = "") -> Path:
        """Where `name` lives: what DCP's file readers and writers are given."""
        return self.root / name if name else self.root

    def check_writable(self, probe_name: str) -> None:
        """OSError (naming the reason) unless a file can be created here; creates the root."""
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / probe_name
        probe.write_bytes(b"")
        probe.unlink()

    def write(self, name: str, data: Union[bytes, str]) -> None:
        """Replace the file `name` with `data` at once (fsynced; never seen half-written)."""
        self.path(name).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path(name), data)

    def read(self, name: str) -> bytes:
        return self.path(name).read_bytes()

    def open(self, name: str) -> BinaryIO:
        return open(self.path(name), "rb")

    def list(self, name: str = "") -> List[str]:
        """The entries of directory `name`, sorted; empty when it does not exist."""
        directory = self.path(name)
        return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []

    def is_dir(self, name: str) -> bool:
        return self.path(name).is_dir()

    def files(self, name: str) -> Dict[str, int]:
        """{file name: size in bytes} of the files directly in directory `name`."""
        directory = self.path(name)
        return {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()} \
            if directory.is_dir() else {}

    def publish(self, staging: str, final: str) -> None:
        """Give the complete directory `staging` the name `final`, replacing one already there."""
        if self.path(final).exists():
            shutil.rmtree(self.path(final))
        os.replace(self.path(staging), self.path(final))

    def delete(self, name: str) -> None:
        """Remove file or directory `name` (and all below it), if it exists."""
        _remove(self.path(name))
