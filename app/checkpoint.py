"""CheckpointManager: sharded checkpoints with torch.distributed.checkpoint (DCP), published atomically.

Layout under the run's checkpoints/ directory:
    step_00000100/   DCP files of every rank + meta.json (train state, LR schedule, config)
    latest           the name of the newest complete checkpoint, replaced last
A checkpoint is written under a hidden temporary name by all ranks, and only after every rank has
finished does rank 0 add meta.json and rename it into place. So a crash at any point leaves either
the previous checkpoints untouched or a new complete one: never a half-written step_* that looks
complete. DCP stores each rank's shards separately, which is what lets a sharded table be saved
without gathering it anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{8})$")
META_FILE = "meta.json"
LATEST_FILE = "latest"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    def __init__(self, directory: Path, keep_last: int, rank: int) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.rank = rank

    def _complete(self) -> List[Path]:
        """Published checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [
            p for p in self.directory.iterdir()
            if _STEP_DIR.match(p.name) and (p / META_FILE).is_file()
        ]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint: the `latest` pointer when it names one, else the
        newest published step directory (the pointer is replaced after the rename, so a crash in
        between leaves it one behind)."""
        complete = self._complete()
        pointer = self.directory / LATEST_FILE
        if pointer.is_file():
            named = self.directory / pointer.read_text().strip()
            if named in complete and named == complete[-1]:
                return named
        return complete[-1] if complete else None

    def save(self, step: int, state: Dict[str, Any], meta: Dict[str, Any]) -> Path:
        """Collective: every rank calls it with its own shards in `state`; `meta` (JSON-able, the
        same on all ranks) is written by rank 0."""
        final = self.directory / f"step_{step:08d}"
        staging = self.directory / f".step_{step:08d}.tmp"
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)  # left by a run that died while saving
        _barrier()
        dcp.save(state, checkpoint_id=str(staging))
        if self.rank == 0:
            _write_atomically(staging / META_FILE, json.dumps({"step": step, **meta}, indent=2))
            if final.exists():  # the same step saved again (a resumed run that had nothing left to do)
                shutil.rmtree(final)
            os.replace(staging, final)
            _write_atomically(self.directory / LATEST_FILE, final.name)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        for old in self._complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            log.info("removed old checkpoint %s (checkpoint.keep_last=%d)", old.name, self.keep_last)

    def load(self, path: Path, state: Dict[str, Any]) -> Dict[str, Any]:
        """Collective: fills `state` (the same structure save() got, with this rank's tensors) in
        place from `path`, resharding as needed; returns the checkpoint's meta."""
        meta = json.loads((path / META_FILE).read_text())
        dcp.load(state, checkpoint_id=str(path))
        return meta
