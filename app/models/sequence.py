"""Sequence features with DIN-style target attention (Zhou et al., 2018, Deep Interest Network).

Each history (features.sequence[i]) has one table in a torchrec EmbeddingCollection, built on the
meta device and sharded by DistributedModelParallel as the pooled tables are. The candidate (the
history's target, a sparse feature) is looked up in that same table, under its own key of the
sequence KJT (app/features.py target_key): one embedding of an item whether it was clicked before
or is the candidate now, so "the candidate is in the history" is an equality of vectors the
attention can see. (The candidate keeps its own pooled table in the interaction as well.)

The attention unit is DIN's: an MLP over [q, k, q - k, q * k] (q the candidate's vector, k a
history position's) gives each position a weight; positions past the row's length are masked to
weight 0; the output is the weighted sum of the history's vectors, with no softmax, as in DIN
(the weights are not normalised, so the sum also carries how much of the history matches). An
empty history gives zeros. One vector per history joins the over arch's input, beside the
interaction's output, for every architecture (app/models/head.py add_sequence).
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.models.dlrm import DLRMTrain
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from app.features import FeatureSchema, target_key
from app.precision import TableGradients

# Where the histories' tables are in a model from build_model (sharding keys its plan by it).
SEQUENCE_TABLES_PATH = "model.sequence_arch.embedding_collection"


class TargetAttention(nn.Module):
    """forward(query B x D, keys B x L x D, lengths B) -> B x D: DIN's attention pooling."""

    def __init__(self, width: int, layer_sizes: list[int], device: torch.device) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size = 4 * width
        for hidden in layer_sizes:
            layers += [nn.Linear(size, hidden, device=device), nn.ReLU()]
            size = hidden
        layers.append(nn.Linear(size, 1, device=device))
        self.mlp = nn.Sequential(*layers)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        q = query.unsqueeze(1).expand_as(keys)
        weights = self.mlp(torch.cat((q, keys, q - keys, q * keys), dim=2)).squeeze(2)  # B x L
        positions = torch.arange(keys.shape[1], device=keys.device)
        weights = weights * (positions.unsqueeze(0) < lengths.unsqueeze(1)).to(weights.dtype)
        return (weights.unsqueeze(2) * keys).sum(dim=1)


@torch.fx.wrap  # one call in the train pipeline's trace: it reads a dict of JaggedTensors
def padded_histories(embedded: dict[str, JaggedTensor], names: list[str], max_lengths: list[int]) -> list[torch.Tensor]:
    """Per history, flat (so that the traced caller indexes it): candidate B x D, history
    B x max_length x D zero-padded, lengths B. A row's candidate is the mean of its target ids'
    vectors (one id: that vector; none: zeros)."""
    out = []
    for name, max_length in zip(names, max_lengths):
        history, target = embedded[name], embedded[target_key(name)]
        padded = torch.ops.fbgemm.jagged_to_padded_dense(history.values(), [history.offsets()], [max_length], 0.0)
        target_lengths = target.lengths()
        rows = torch.repeat_interleave(
            torch.arange(target_lengths.numel(), device=target_lengths.device),
            target_lengths,
            output_size=target.values().shape[0],
        )
        summed = target.values().new_zeros(target_lengths.numel(), target.values().shape[1])
        summed = summed.index_add(0, rows, target.values())
        query = summed / target_lengths.clamp(min=1).unsqueeze(1).to(summed.dtype)
        out += [query, padded, history.lengths()]
    return out


class SequenceArch(nn.Module):
    """The histories' tables and one attention unit per history; `width` is what it adds to the
    over arch's input. embed() runs the tables (outside autocast), attend() the attention."""

    def __init__(
        self, schema: FeatureSchema, attention_layer_sizes: list[int], device: torch.device, tables_device: torch.device
    ) -> None:
        super().__init__()
        self.embedding_collection = EmbeddingCollection(tables=schema.embedding_configs(), device=tables_device)
        self.names = schema.sequence_names
        self.max_lengths = [f.max_length for f in schema.sequence]
        self.attention = nn.ModuleDict(
            {
                f.name: TargetAttention(schema.sequence_dim(f), list(attention_layer_sizes), device)
                for f in schema.sequence
            }
        )
        self.width = sum(schema.sequence_dim(f) for f in schema.sequence)

    def embed(self, features: KeyedJaggedTensor, table_gradients: TableGradients) -> list[torch.Tensor]:
        """Flat [candidate, history, lengths] per history (see padded_histories); the vectors pass
        through `table_gradients`, as the pooled embeddings do (the cut a loss scale needs)."""
        flat = padded_histories(self.embedding_collection(features), self.names, self.max_lengths)
        # Indexed, not unpacked: under the train pipeline's fx trace `flat` is one proxy.
        out = []
        for i in range(len(self.names)):
            out += [table_gradients(flat[3 * i]), table_gradients(flat[3 * i + 1]), flat[3 * i + 2]]
        return out

    def attend(self, histories: list[torch.Tensor]) -> torch.Tensor:
        """B x width: each history's attention-pooled vector, side by side."""
        pooled = [
            self.attention[name](histories[3 * i], histories[3 * i + 1], histories[3 * i + 2])
            for i, name in enumerate(self.names)
        ]
        return torch.cat(pooled, dim=1)


class SequenceDLRMTrain(DLRMTrain):
    """DLRMTrain over a SequenceBatch (app/data/sequence_batch.py): the histories' KJT goes to the
    model beside the sparse features. The same module names, so the same state dict prefix."""

    def forward(self, batch):
        logits = self.model(batch.dense_features, batch.sparse_features, batch.sequence_features).squeeze(-1)
        loss = self.loss_fn(logits, batch.labels.float())
        return loss, (loss.detach(), logits.detach(), batch.labels.detach())
