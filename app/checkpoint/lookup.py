"""find_checkpoint: the checkpoint a user's path names (a step_N, checkpoints/best, a run
directory or its checkpoints/), for resume's checkpoint.load_from and for export."""

from __future__ import annotations

import logging
from typing import Any

import torch.distributed as dist

from app.checkpoint.collective import broadcast_text, position
from app.checkpoint.safe_load import CheckpointError
from app.checkpoint.store import BEST_FILE, CheckpointStore, is_step_name
from app.checkpoint.verification import META_FILE, verify
from app.storage import location, storage_at

log = logging.getLogger(__name__)


def find_checkpoint(path: Any, group: dist.ProcessGroup | None = None, prefer: str = "latest") -> Any:
    """The intact checkpoint that `path` (a local path or URL) names: a step_N directory itself, a
    checkpoints/best pointer, or a run directory or its checkpoints/ directory: there, with
    `prefer` "best", the one checkpoints/best names where it is intact, else (and with "latest")
    the newest intact one. CheckpointError when there is none. Collective, like verify(): rank 0
    decides what `path` is, so every rank takes the same branch."""
    path = location(path)
    rank, _ = position(group)
    kind = None
    if rank == 0:
        parent = storage_at(path.parent)
        if is_step_name(path.name):
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
        problem = (
            verify(record["checkpoint"], group, store.storage)
            if record is not None
            else f"{directory / BEST_FILE} names no checkpoint"
        )
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
