"""DeepFM (Guo et al., 2017): a factorization machine's second-order term beside a deep network,
over the dense vector and the pooled embeddings, both fed to the over arch with the dense vector.

The deep part is torchrec's DeepFM module (a layer over the concatenated vectors, of any widths).
The factorization machine is the paper's: the dot product of every pair of feature vectors,
0.5 * sum_d((sum_i v_id)^2 - sum_i v_id^2), so all of one width (tables of another width are
projected to the dense vector's, as DLRM's are). torchrec's FactorizationMachine takes the
flattened concatenation instead, pairing every element with every other one, a vector's own
elements and elements of different dimensions included; it is not used.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.deepfm import DeepFM
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from app.models.head import Head


def pairwise_dot_sum(features: torch.Tensor) -> torch.Tensor:
    """B x N x D -> B x 1: the sum over pairs i < j of <v_i, v_j>, in O(N D)."""
    square_of_sum = features.sum(dim=1).square()
    sum_of_squares = features.square().sum(dim=1)
    return 0.5 * (square_of_sum - sum_of_squares).sum(dim=1, keepdim=True)


class FMInteraction(nn.Module):
    """forward(dense B x D, (stacked B x F x D, flat B x (sum of widths))) -> B x (D + deep + 1)."""

    def __init__(self, in_features: int, deep_dimension: int, device: torch.device) -> None:
        super().__init__()
        self.deep_fm = DeepFM(
            dense_module=nn.Sequential(nn.Linear(in_features, deep_dimension, device=device), nn.ReLU())
        )

    def forward(self, dense_features: torch.Tensor, sparse_features) -> torch.Tensor:
        stacked, flat = sparse_features
        deep = self.deep_fm([dense_features, flat])
        fm = pairwise_dot_sum(torch.cat((dense_features.unsqueeze(1), stacked), dim=1))
        return torch.cat((dense_features, deep, fm), dim=1)


class DeepFMHead(Head):
    def __init__(
        self,
        tables: EmbeddingBagCollection,
        dense_in_features: int,
        dense_arch_layer_sizes: list[int],
        over_arch_layer_sizes: list[int],
        deep_fm_dimension: int,
        device: torch.device,
    ) -> None:
        super().__init__(tables, dense_in_features, dense_arch_layer_sizes, device)
        width = dense_arch_layer_sizes[-1]
        self.inter_arch = FMInteraction(width + sum(self.widths), deep_fm_dimension, device)
        self.set_over_arch(width + deep_fm_dimension + 1, over_arch_layer_sizes, device)
        self.project_to(width, device)

    def embeddings(self, pooled: torch.Tensor):
        return self.stacked(pooled), pooled
