"""Checkpoints: the Checkpointer's save and restore policy (checkpointer.py; whether a checkpoint
fits this run: compatibility.py) over the published checkpoints of a run (store.py: saving,
publishing; pruning.py: what goes beyond keep-last), their names (names.py), manifests
and verification (verification.py), the best pointer (best.py, squared with a resumed train state
by resumed_best.py), finding the one a user's path names (lookup.py), each rank's files written by
writers.py, loaded without running anything they name (safe_load.py), with each table's optimizer
state carried across sharding plans (optimizer_state.py)."""

from app.checkpoint.checkpointer import (
    MODEL_KEY,
    OPTIMIZER_KEY,
    Checkpointer,
    RunParts,
    RunShape,
    SavedCheckpoint,
    TrainState,
    model_differences,
    position_here,
)
from app.checkpoint.lookup import find_checkpoint
from app.checkpoint.safe_load import CheckpointError, load_state, read_dcp_metadata, weights_only_refusal
from app.checkpoint.store import BEST_FILE, LATEST_FILE, CheckpointStore
from app.checkpoint.verification import META_FILE, manifest, read_meta, verify

__all__ = [
    "BEST_FILE",
    "LATEST_FILE",
    "META_FILE",
    "MODEL_KEY",
    "OPTIMIZER_KEY",
    "CheckpointError",
    "CheckpointStore",
    "Checkpointer",
    "RunParts",
    "RunShape",
    "SavedCheckpoint",
    "TrainState",
    "find_checkpoint",
    "load_state",
    "manifest",
    "model_differences",
    "position_here",
    "read_dcp_metadata",
    "read_meta",
    "verify",
    "weights_only_refusal",
]
