"""A torchrec Batch with one more field: the sequence features' KeyedJaggedTensor (features.sequence).

TrainPipelineSparseDist copies a batch to the device with to(), keeps it alive on its streams with
record_stream() and traces the model with fx to find the sharded modules fed from batch
attributes: `sequence_features` feeds the EmbeddingCollection directly, so the pipeline starts
its input distribution ahead of the step, as it does the tables'. A model without sequence
features gets plain Batches.

Its own module, apart from app/data/batch.py: it imports torchrec, which the Parquet reader
processes (importing batch.py to decode rows) must not pay for at start.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass
class SequenceBatch(Batch):
    sequence_features: KeyedJaggedTensor

    def to(self, device: torch.device, non_blocking: bool = False) -> SequenceBatch:
        moved = super().to(device, non_blocking)
        return SequenceBatch(
            moved.dense_features,
            moved.sparse_features,
            moved.labels,
            self.sequence_features.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        super().record_stream(stream)
        self.sequence_features.record_stream(stream)

    def pin_memory(self) -> SequenceBatch:
        pinned = super().pin_memory()
        return SequenceBatch(
            pinned.dense_features, pinned.sparse_features, pinned.labels, self.sequence_features.pin_memory()
        )


def with_sequences(batch: Batch, features: list[tuple[str, np.ndarray, np.ndarray]]) -> SequenceBatch:
    """`batch` with a sequence KJT of (key, lengths per row, ids) `features`."""
    lengths = np.concatenate([lengths for _, lengths, _ in features])
    values = np.concatenate([ids for _, _, ids in features])
    sequence = KeyedJaggedTensor.from_lengths_sync(
        keys=[key for key, _, _ in features], values=torch.from_numpy(values), lengths=torch.from_numpy(lengths)
    )
    return SequenceBatch(batch.dense_features, batch.sparse_features, batch.labels, sequence)
