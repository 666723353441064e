"""DLRM-DCN (DCNv2): a low-rank cross network over the dense vector and the pooled embeddings laid
side by side, as torchrec's DLRM_DCN does, of any widths (the cross network takes their
concatenation, D + the sum of the tables' widths)."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from app.models.head import Head


class CrossInteraction(nn.Module):
    """torchrec's InteractionDCNArch (the same `crossnet` parameters, the same values) over the
    dense vector and the flat B x (sum of widths) embeddings rather than a B x F x D block."""

    def __init__(self, crossnet: nn.Module) -> None:
        super().__init__()
        self.crossnet = crossnet

    def forward(self, dense_features: torch.Tensor, sparse_features: torch.Tensor) -> torch.Tensor:
        return self.crossnet(torch.cat((dense_features, sparse_features), dim=1))


class CrossHead(Head):
    def __init__(
        self,
        tables: EmbeddingBagCollection,
        dense_in_features: int,
        dense_arch_layer_sizes: list[int],
        over_arch_layer_sizes: list[int],
        dcn_num_layers: int,
        dcn_low_rank_dim: int,
        device: torch.device,
    ) -> None:
        super().__init__(tables, dense_in_features, dense_arch_layer_sizes, device)
        width = dense_arch_layer_sizes[-1] + sum(self.widths)
        self.inter_arch = CrossInteraction(LowRankCrossNet(width, dcn_num_layers, dcn_low_rank_dim)).to(device)
        self.set_over_arch(width, over_arch_layer_sizes, device)
