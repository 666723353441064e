"""Pruning a run's checkpoints: which go (those beyond checkpoint.keep_last, never the one the best
pointer names, and saves that died before publishing), deleted in a background thread. Deleting
gigabytes (with discard, or object by object from a bucket) takes a good part of a save's time,
and training need not wait for it; whatever lists or reads the checkpoints next waits for it first
(finish). Used by the CheckpointStore (store.py) on rank 0, after each publication."""

from __future__ import annotations

import logging
import threading

from app.checkpoint import best as best_pointer
from app.checkpoint.names import is_step_name
from app.checkpoint.verification import META_FILE
from app.storage import Storage

log = logging.getLogger(__name__)


class Pruner:
    def __init__(self, storage: Storage, keep_last: int) -> None:
        self.storage = storage
        self.keep_last = keep_last
        self._removal: threading.Thread | None = None  # deleting pruned checkpoints
        self._removal_error: BaseException | None = None

    def start(self, published: list[str]) -> None:
        """Decides which of the `published` checkpoints (oldest first) and which unpublished saves
        go, and starts deleting them in the background."""
        # Whatever the pointer names is kept, even where it does not hold together (see best.py).
        keep = {best_pointer.named(self.storage)}
        old = [name for name in published[: -self.keep_last] if name not in keep]
        # A step directory without meta.json is a save that died before publishing (in an object
        # store, where saves are written in place); no save is under way while this runs.
        incomplete = [
            name for name in self.storage.list() if is_step_name(name) and META_FILE not in self.storage.files(name)
        ]
        if old or incomplete:
            self._removal = threading.Thread(target=self._remove, args=(old, incomplete), name="checkpoint-prune")
            self._removal.start()

    def _remove(self, old: list[str], incomplete: list[str]) -> None:
        try:
            for name in old:
                self.storage.delete(name)
                log.info("removed old checkpoint %s (checkpoint.keep_last=%d)", name, self.keep_last)
            for name in incomplete:
                self.storage.delete(name)
                log.info("removed incomplete checkpoint %s (no %s: its save did not finish)", name, META_FILE)
        except BaseException as error:  # raised where the store is next used (see finish)
            self._removal_error = error

    def finish(self) -> None:
        """Waits for the checkpoints being deleted, and raises what went wrong deleting them."""
        if self._removal is not None:
            self._removal.join()
            self._removal = None
        error, self._removal_error = self._removal_error, None
        if error is not None:
            raise error
