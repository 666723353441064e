"""Storage that fails under a running job (a full disk, a file-size limit, a read-only remount, an
object store that stops answering): recognised wherever it surfaces, and said in one line that
names the path and the cause, instead of the tracebacks of every thread that met it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from app.errors import UserError

# The object-store clients' errors (botocore's connection and credential errors) are no OSErrors.
_CLIENT_MODULES = ("botocore", "aiobotocore", "s3fs", "fsspec", "aiohttp", "gcsfs", "urllib3")


class StorageFailure(UserError):
    """Writing to storage failed under the job; the message names the path and the cause."""


def is_storage_error(error: BaseException) -> bool:
    return isinstance(error, OSError) or type(error).__module__.split(".")[0] in _CLIENT_MODULES


def storage_cause(error: BaseException) -> BaseException | None:
    """The storage error behind `error` (itself, one it was raised from, or one of the ranks'
    failures a DCP CheckpointException gathers), or None when it is something else."""
    seen = set()
    todo: list[BaseException | None] = [error]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, StorageFailure):
            return current
        if is_storage_error(current):
            return current
        failures = getattr(current, "failures", None)  # torch.distributed.checkpoint.CheckpointException
        if isinstance(failures, dict):
            todo += [failure[0] if isinstance(failure, tuple) else failure for failure in failures.values()]
        todo += [current.__cause__, current.__context__]
    return None


def describe(error: BaseException) -> str:
    """A storage error in one line: its errno text and file where it has them."""
    if isinstance(error, OSError) and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        return f"[Errno {error.errno}] {error.strerror}{where}"
    return f"{type(error).__name__}: {' '.join(str(error).split())}"[:400]


@contextmanager
def said_in_one_line(what: str) -> Iterator[None]:
    """A storage error in the block becomes a StorageFailure: "<what>: <cause>"."""
    try:
        yield
    except StorageFailure:
        raise
    except Exception as error:
        cause = storage_cause(error)
        if cause is None:
            raise
        raise StorageFailure(f"{what}: {describe(cause)}.") from error
