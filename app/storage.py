"""Where a run's files go: one narrow interface (write, read, list, publish, delete) and one atomic
file helper, so that nothing half-written ever carries a final name.

`LocalStorage` keeps files on a local or mounted file system; `ObjectStorage` keeps them in an
object store (s3://, gs://, hdfs://) through fsspec. The checkpointer does all its file work
through a storage, by names relative to its root; `storage_at` picks one for a path or a URL.
Local paths keep their atomic renames; an object store has none, so there a checkpoint is written
in place and published by writing its manifest last (see ObjectStorage.staging_name).
"""

from __future__ import annotations

import builtins
import contextlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from app.errors import UserError


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
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


def write_atomically(path: str | Path, data: bytes | str) -> None:
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

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def path(self, name: str = "") -> Path:
        """Where `name` lives: what DCP's file readers and writers are given."""
        return self.root / name if name else self.root

    def staging_name(self, final: str) -> str:
        """The hidden name a checkpoint is written under, renamed to `final` once complete."""
        return f".{final}.tmp"

    def check_writable(self, probe_name: str) -> None:
        """OSError (naming the reason) unless a file can be created here; creates the root."""
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / probe_name
        probe.write_bytes(b"")
        probe.unlink()

    def write(self, name: str, data: bytes | str) -> None:
        """Replace the file `name` with `data` at once (fsynced; never seen half-written)."""
        self.path(name).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path(name), data)

    def read(self, name: str) -> bytes:
        return self.path(name).read_bytes()

    def open(self, name: str) -> BinaryIO:
        return open(self.path(name), "rb")

    def list(self, name: str = "") -> builtins.list[str]:
        """The entries of directory `name`, sorted; empty when it does not exist."""
        directory = self.path(name)
        return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []

    def is_dir(self, name: str) -> bool:
        return self.path(name).is_dir()

    def files(self, name: str) -> dict[str, int]:
        """{file name: size in bytes} of the files directly in directory `name`."""
        directory = self.path(name)
        return (
            {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()} if directory.is_dir() else {}
        )

    def publish(self, staging: str, final: str) -> None:
        """Give the complete directory `staging` the name `final`, replacing one already there."""
        if self.path(final).exists():
            shutil.rmtree(self.path(final))
        os.replace(self.path(staging), self.path(final))

    def delete(self, name: str) -> None:
        """Remove file or directory `name` (and all below it), if it exists."""
        _remove(self.path(name))


# ---- object stores ------------------------------------------------------------------------------
# Through fsspec (s3fs for s3://, gcsfs for gs://, pyarrow's HDFS for hdfs://): DCP writes and
# reads checkpoints only through fsspec, so data and checkpoints share one client, one set of
# options and one way of finding credentials (for S3 botocore's: AWS_ENDPOINT_URL,
# AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, ~/.aws).


class StorageError(UserError):
    """A URL that cannot be used (unknown scheme, its filesystem not installed, no bucket, no
    credentials); the message names the config key or argument it came from."""


def is_url(location: str | PathLike) -> bool:
    """Whether `location` names an object store (scheme://...). file:// URLs are local paths."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def local_path(location: str | Path) -> Path:
    """A local location as a Path (a file:// URL without its scheme)."""
    text = str(location)
    return Path(text[len("file://") :]) if text.startswith("file://") else Path(text)


class UrlPath:
    """An object-store location with the few Path operations the checkpoint code uses (`/`,
    .name, .parent, str): pathlib would turn "s3://b/k" into "s3:/b/k"."""

    def __init__(self, url: str) -> None:
        self.url = str(url).rstrip("/")

    def __truediv__(self, name: str) -> UrlPath:
        return UrlPath(f"{self.url}/{name}")

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> UrlPath:
        return UrlPath(self.url.rsplit("/", 1)[0])

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"UrlPath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UrlPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)


PathLike = Path | UrlPath


def location(text: str | Path | UrlPath) -> PathLike:
    """A user's path or URL as a Path (local, file:// included) or a UrlPath (object store)."""
    if isinstance(text, (Path, UrlPath)):
        return text
    return UrlPath(text) if is_url(text) else local_path(text)


def filesystem(url: str, options: dict[str, Any] | None = None, key: str = "the URL") -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for `url`; StorageError naming `key` when the scheme is
    unknown or its filesystem package is not installed."""
    import fsspec.core

    try:
        return fsspec.core.url_to_fs(url, **(options or {}))
    except (ImportError, ValueError) as error:
        scheme = url.split("://", 1)[0]
        raise StorageError(
            f"{key}={url!r}: cannot open {scheme}:// URLs ({' '.join(str(error).split())}); "
            "expected a local path or an s3://, gs://, hdfs:// or file:// URL whose filesystem "
            "package is installed (s3fs for s3://, gcsfs for gs://)."
        ) from error


def describe_failure(error: BaseException) -> str:
    """One line on why an object-store call failed (botocore's messages are long and nested)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"[:400]


META_FILE_NAME = "meta.json"  # a checkpoint's manifest, written last (app/checkpoint/store.py)


class ObjectStorage:
    """Objects under the URL `root`, with LocalStorage's methods. There is no rename: a checkpoint
    is written in place and published by its manifest, written last (see staging_name)."""

    def __init__(self, root: str | UrlPath, options: dict[str, Any] | None = None, key: str = "the URL") -> None:
        self.root = UrlPath(str(root))
        self.options = dict(options or {})
        self.fs, self._root_path = filesystem(self.root.url, self.options, key)
        self._root_path = self._root_path.rstrip("/")

    def __str__(self) -> str:
        return self.root.url

    def path(self, name: str = "") -> UrlPath:
        return self.root / name if name else self.root

    def _key(self, name: str = "") -> str:
        return f"{self._root_path}/{name}" if name else self._root_path

    def staging_name(self, final: str) -> str:
        """Where a checkpoint is written before it is published: in place, since publishing by
        rename would copy every object. Without its manifest it is incomplete (ignored on resume,
        removed by keep-last)."""
        return final

    def check_writable(self, probe_name: str) -> None:
        """OSError naming the reason (no bucket, no credentials, no permission) unless an object can
        be written here. The bucket is never created: a mistyped one must be an error."""
        try:
            self.fs.pipe_file(self._key(probe_name), b"")
            self.fs.rm_file(self._key(probe_name))
        except Exception as error:  # botocore's credential errors are not OSErrors
            raise OSError(describe_failure(error)) from error

    def write(self, name: str, data: bytes | str) -> None:
        """One PUT: readers see the old object or the new one, never a part."""
        self.fs.pipe_file(self._key(name), data.encode() if isinstance(data, str) else data)

    def read(self, name: str) -> bytes:
        return self.fs.cat_file(self._key(name))

    def open(self, name: str) -> BinaryIO:
        return self.fs.open(self._key(name), "rb")

    def _entries(self, name: str) -> builtins.list[dict[str, Any]]:
        key = self._key(name)
        self.fs.invalidate_cache(key)  # other processes write here: never trust a cached listing
        try:
            return self.fs.ls(key, detail=True)
        except FileNotFoundError:
            return []

    def list(self, name: str = "") -> builtins.list[str]:
        return sorted(entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in self._entries(name))

    def is_dir(self, name: str) -> bool:
        return bool(self._entries(name)) and self.fs.isdir(self._key(name))

    def files(self, name: str) -> dict[str, int]:
        return {
            entry["name"].rsplit("/", 1)[-1]: int(entry["size"])
            for entry in sorted(self._entries(name), key=lambda e: e["name"])
            if entry["type"] == "file"
        }

    def publish(self, staging: str, final: str) -> None:
        """Nothing to move where the checkpoint was written under its final name (see
        staging_name). A checkpoint written under another name, so as not to overwrite a published
        one of the same name, is copied over it: the old one is unpublished (its meta.json deleted
        first) and removed, the new one's objects copied with meta.json last."""
        if staging == final:
            return
        self.delete(f"{final}/{META_FILE_NAME}")
        self.delete(final)
        names = sorted(self.files(staging), key=lambda name: name == META_FILE_NAME)
        for name in names:
            self.fs.copy(self._key(f"{staging}/{name}"), self._key(f"{final}/{name}"))
        self.delete(staging)

    def delete(self, name: str) -> None:
        key = self._key(name)
        self.fs.invalidate_cache(key)
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(key, recursive=True)


Storage = LocalStorage | ObjectStorage


def storage_at(where: str | Path | UrlPath, options: dict[str, Any] | None = None, key: str = "the URL") -> Storage:
    """The storage rooted at a local path or an object-store URL. `key`: the config key or argument
    it came from, named by errors."""
    where = location(where)
    return ObjectStorage(where, options, key) if isinstance(where, UrlPath) else LocalStorage(where)
