"""DLRM: every pairwise dot product of the dense vector and the pooled embeddings
(app/models/interaction.py). Dot products need one width: a table of another width than the
dense vector's (features.sparse[i].embedding_dim) is projected to it by a learned linear map of
its own, a dense (data-parallel) layer, under `projections.<feature>`."""

from __future__ import annotations

import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from app.models.head import Head
from app.models.interaction import DotInteraction


class DotHead(Head):
    def __init__(
        self,
        tables: EmbeddingBagCollection,
        dense_in_features: int,
        dense_arch_layer_sizes: list[int],
        over_arch_layer_sizes: list[int],
        device: torch.device,
    ) -> None:
        super().__init__(tables, dense_in_features, dense_arch_layer_sizes, device)
        width = dense_arch_layer_sizes[-1]
        count = len(self.widths)
        self.inter_arch = DotInteraction(count).to(device)
        self.set_over_arch(width + (count + 1) * count // 2, over_arch_layer_sizes, device)
        self.project_to(width, device)

    def embeddings(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.stacked(pooled)
