"""What every architecture shares: the embedding tables (a torchrec SparseArch over an
EmbeddingBagCollection built on the meta device), the dense arch, an interaction and the over arch,
under torchrec's DLRM module names (sparse_arch, dense_arch, inter_arch, over_arch), so that a
model's state dict, and so its checkpoints, are those of torchrec's DLRM and DLRM_DCN.

The forward differs from torchrec's on the hot path: the pooled embeddings are taken as they come
when the tables return them in feature order (torchrec's SparseArch splits them per feature and
concatenates them again, a copy of the whole B x F x D block each way); and the dense part is
computed under autocast when the precision asks for it (app/precision.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torchrec.models.dlrm import DenseArch, OverArch, SparseArch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from app.precision import TableGradients

if TYPE_CHECKING:
    from app.models.sequence import SequenceArch


@torch.fx.wrap  # one call in the train pipeline's trace of the model: it branches on the keys
def pooled_in_feature_order(pooled: KeyedTensor, names: list[str]) -> torch.Tensor:
    """B x (sum of the tables' widths): the pooled embeddings in the order of `names`."""
    if pooled.keys() == names:
        return pooled.values()
    by_name = pooled.to_dict()  # a sharded collection returns its features grouped by sharding type
    return torch.cat([by_name[name] for name in names], dim=1)


class Head(nn.Module):
    """forward(dense B x dense_in, sparse KJT) -> B x 1 logits. Subclasses set inter_arch and say,
    in `embeddings`, how the pooled B x (sum of widths) block enters it."""

    inter_arch: nn.Module  # set by each subclass

    def __init__(
        self,
        tables: EmbeddingBagCollection,
        dense_in_features: int,
        dense_arch_layer_sizes: list[int],
        device: torch.device,
    ) -> None:
        super().__init__()
        self.sparse_arch = SparseArch(tables)
        self.dense_arch = DenseArch(dense_in_features, dense_arch_layer_sizes, device)
        self.widths = [config.embedding_dim for config in tables.embedding_bag_configs()]
        self.autocast_dtype: torch.dtype | None = None
        self.device_type = device.type
        self.table_gradients = TableGradients(None)
        self.sequence_arch: SequenceArch | None = None  # features.sequence: add_sequence

    def set_over_arch(self, in_features: int, layer_sizes: list[int], device: torch.device) -> None:
        self.over_in_features = in_features  # what a multi-task over arch takes in its place (multitask.py)
        self.over_arch = OverArch(in_features, layer_sizes, device)
        self._over_arch_args = (in_features, layer_sizes, device)

    def add_sequence(self, sequence_arch: SequenceArch) -> None:
        """Sequence features (app/models/sequence.py): their attention-pooled vectors join the over
        arch's input after the interaction's output, so the over arch is made again that much wider."""
        self.sequence_arch = sequence_arch
        in_features, layer_sizes, device = self._over_arch_args
        self.set_over_arch(in_features + sequence_arch.width, layer_sizes, device)

    def project_to(self, width: int, device: torch.device) -> None:
        """Makes `stacked` bring every table to `width`: a table of another width through a learned
        linear map of its own (a dense, data-parallel layer, under `projections.<feature>`)."""
        self._width = width
        self._projected = [w != width for w in self.widths]
        if any(self._projected):
            # Only where needed, so that a model of one width keeps torchrec DLRM's state dict.
            self.projections = nn.ModuleDict(
                {
                    name: nn.Linear(w, width, bias=False, device=device)
                    for name, w, projected in zip(self.sparse_arch.sparse_feature_names, self.widths, self._projected)
                    if projected
                }
            )

    def stacked(self, pooled: torch.Tensor) -> torch.Tensor:
        """B x F x width (see project_to) from the flat B x (sum of widths) pooled embeddings."""
        if not any(self._projected):
            return pooled.view(pooled.shape[0], len(self.widths), self._width)
        vectors, start = [], 0
        for name, width, projected in zip(self.sparse_arch.sparse_feature_names, self.widths, self._projected):
            part = pooled[:, start : start + width]  # slices, not torch.split: the pipeline traces this with fx
            vectors.append(self.projections[name](part) if projected else part)
            start += width
        return torch.stack(vectors, dim=1)

    def embeddings(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled

    def forward(
        self,
        dense_features: torch.Tensor,
        sparse_features: KeyedJaggedTensor,
        sequence_features: KeyedJaggedTensor | None = None,
    ) -> torch.Tensor:
        pooled = self.sparse_arch.embedding_bag_collection(sparse_features)
        pooled = self.table_gradients(pooled_in_feature_order(pooled, self.sparse_arch.sparse_feature_names))
        if self.sequence_arch is not None:
            histories = self.sequence_arch.embed(sequence_features, self.table_gradients)
        with torch.autocast(
            self.device_type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
        ):
            embedded_dense = self.dense_arch(dense_features)
            interactions = self.inter_arch(embedded_dense, self.embeddings(pooled))
            if self.sequence_arch is not None:
                interactions = torch.cat((interactions, self.sequence_arch.attend(histories)), dim=1)
            logits = self.over_arch(interactions)
        return logits.float()
