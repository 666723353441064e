"""One job per run at a time: a lock on the run directory, and a lease in an object store that
holds the run's checkpoints.

Two jobs on one run_name would write the same checkpoints, prune each other's and resume from a
mix. The first takes the run; the second stops at start-up with exit 2, naming the holder.

- Local (the run directory, and checkpoint.dir where it is another local directory): an
  exclusive flock(2) on `.rectrain.lock`, which holds the holder's host and pid. The kernel drops
  it when the process ends however it ends (SIGKILL, a lost node's reboot), so a crashed job never
  keeps its run locked.
- Object store (checkpoint.dir=s3://...): a lease object `.rectrain.lease` with the holder and a
  heartbeat, rewritten every LEASE_HEARTBEAT_S. A lease not renewed for LEASE_STALE_S is stale and
  taken over; one held by a process of this host that no longer exists is stale at once.

Only rank 0 takes them (the ranks of one job never lock each other out); every rank gets its
answer, so every rank of a refused job stops alike."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TextIO

from app.checkpoint.collective import broadcast_text
from app.config import ConfigError
from app.errors import UserError
from app.storage import ObjectStorage, Storage
from app.storage_failure import describe

log = logging.getLogger(__name__)

LOCK_FILE = ".rectrain.lock"
LEASE_FILE = ".rectrain.lease"
LEASE_HEARTBEAT_S = 15.0
LEASE_STALE_S = 90.0


class RunInUse(UserError):
    """Another job holds the run; the message names it."""


def _holder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}


def _describe_holder(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid')} on host {holder.get('host')}"


class _LocalLock:
    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_FILE
        self._file: TextIO | None = None

    def take(self) -> str | None:
        """None once held; else who holds it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            file = open(self.path, "a+")  # noqa: SIM115 (held open while the lock is)
        except OSError as error:
            raise ConfigError(
                f"cannot write to {self.path.parent} (from output_root and run_name, or "
                f"checkpoint.dir): {error.strerror or error}."
            ) from error
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            try:
                holder = _describe_holder(json.loads(file.read()))
            except ValueError:
                holder = "another process"
            file.close()
            return f"{self.path} is locked by {holder}"
        file.seek(0)
        file.truncate()
        file.write(json.dumps(_holder()))
        file.flush()
        self._file = file
        return None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # the flock goes with the descriptor; the file stays (others may open it)
            self._file = None


class _Lease:
    def __init__(self, storage: ObjectStorage) -> None:
        self.storage = storage
        self.path = storage.path(LEASE_FILE)
        self.record = {**_holder(), "id": uuid.uuid4().hex}
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def take(self) -> str | None:
        held = self._read()
        if held is not None and not self._stale(held):
            return (
                f"{self.path} is leased by {_describe_holder(held)} "
                f"(renewed {time.time() - held['heartbeat']:.0f} s ago; "
                f"a lease not renewed for {LEASE_STALE_S:.0f} s is taken over)"
            )
        if held is not None:
            log.warning("taking over the stale lease %s of %s", self.path, _describe_holder(held))
        self._write()
        time.sleep(1.0)  # an object store has no compare-and-swap: whoever wrote last, read back, holds it
        held = self._read()
        if held is None or held.get("id") != self.record["id"]:
            return f"{self.path} was taken at the same time by {_describe_holder(held or {})}"
        self._heartbeat = threading.Thread(target=self._renew, name="run-lease", daemon=True)
        self._heartbeat.start()
        return None

    def _read(self) -> dict[str, Any] | None:
        try:
            held = json.loads(self.storage.read(LEASE_FILE))
        except FileNotFoundError:
            return None
        except ValueError:
            return {"heartbeat": 0.0}  # damaged: stale
        readable = isinstance(held, dict) and isinstance(held.get("heartbeat"), (int, float))
        return held if readable else {"heartbeat": 0.0}

    def _stale(self, held: dict[str, Any]) -> bool:
        if time.time() - held["heartbeat"] > LEASE_STALE_S:
            return True
        if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
            try:
                os.kill(held["pid"], 0)
            except ProcessLookupError:
                return True  # its holder died on this host
            except PermissionError:
                pass
        return False

    def _write(self) -> None:
        self.storage.write(LEASE_FILE, json.dumps({**self.record, "heartbeat": time.time()}))

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_HEARTBEAT_S):
            try:
                self._write()
            except Exception as error:  # the store may be down for a while: the save will say so
                log.warning("could not renew the lease %s: %s", self.path, describe(error))

    def release(self) -> None:
        if self._heartbeat is None:
            return
        self._stop.set()
        self._heartbeat.join()
        self._heartbeat = None
        try:
            held = self._read()
            if held is not None and held.get("id") == self.record["id"]:
                self.storage.delete(LEASE_FILE)
        except Exception as error:
            log.warning("could not remove the lease %s: %s", self.path, describe(error))


def _locks(run_dir: Path, checkpoints: Storage | None) -> list:
    """The run directory's lock; with `checkpoints`, instead, theirs where they are elsewhere."""
    if checkpoints is None:
        return [_LocalLock(run_dir)]
    if isinstance(checkpoints, ObjectStorage):
        return [_Lease(checkpoints)]
    if Path(os.path.abspath(checkpoints.root)).is_relative_to(os.path.abspath(run_dir)):
        return []  # the run directory's lock covers them
    return [_LocalLock(checkpoints.root)]


@contextmanager
def run_locked(run_dir: Path, checkpoints: Storage | None, rank: int, group: Any = None) -> Iterator[None]:
    """Collective: the block runs while this job holds the run directory (`checkpoints` None) or
    the run's checkpoints (where they are not in it); RunInUse on every rank when another job does."""
    with ExitStack() as held:
        refusal = None
        if rank == 0:
            for lock in _locks(run_dir, checkpoints):
                refusal = lock.take()
                if refusal is not None:
                    break
                held.callback(lock.release)
        refusal = broadcast_text(refusal, group)
        if refusal is not None:
            raise RunInUse(
                f"the run is in use by another job: {refusal}. Wait for it to end, or choose another "
                "run_name (or checkpoint.dir)."
            )
        yield
