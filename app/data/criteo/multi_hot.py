"""Multi-hot rows made from one-hot Criteo ids, as the MLPerf DLRMv2 reference makes them.

Criteo's categoricals hold one value per row. The reference (facebookresearch/dlrm, torchrec_dlrm:
multi_hot.py, materialised to files by scripts/materialize_synthetic_multihot_dataset.py) turns
feature j's id i into a bag of hotness[j] ids: i itself, then hotness[j] - 1 ids drawn uniformly
from [0, num_embeddings) once per (feature, id) (its `uniform` distribution), so that every row
with id i gets the same bag. It stores those draws as a (num_embeddings x hotness) lookup table per
feature, made with np.random.seed(0): 16 GB for one 40M-row table of hotness 100. Here each draw is
a hash of (seed, feature, position in the bag, id) instead: the same distribution, the same bag for
the same id on every run and every worker, and no table. The bags are not the reference's
bit for bit (its tables come from numpy's global generator, in feature order).
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_UInt64s = TypeVar("_UInt64s", np.ndarray, np.uint64)  # an array of them, or one


def _mix(x: _UInt64s) -> _UInt64s:
    """splitmix64's finaliser: a bijection of uint64 whose outputs look independent and uniform."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def multi_hot_bags(ids: np.ndarray, hotness: int, num_embeddings: int, feature: int, seed: int) -> np.ndarray:
    """(len(ids), hotness) int64: each id first, then hotness - 1 ids in [0, num_embeddings) that
    depend only on (seed, feature, position, id)."""
    ids = np.asarray(ids, dtype=np.int64)
    bags = np.empty((len(ids), hotness), dtype=np.int64)
    bags[:, 0] = ids
    if hotness > 1:
        with np.errstate(over="ignore"):
            key = _mix(np.uint64(seed) * np.uint64(0x100000001B3) + np.uint64(feature))
            positions = np.arange(1, hotness, dtype=np.uint64)
            salted = _mix(key ^ (positions * _GOLDEN))  # one key per position in the bag
            draws = _mix(ids.astype(np.uint64)[:, None] ^ salted[None, :])
        bags[:, 1:] = (draws % np.uint64(num_embeddings)).astype(np.int64)  # bias below 2**-38 at 40M rows
    return bags
