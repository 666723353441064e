"""Multi-task heads: several label columns (features.labels) predicted from one model.

Every architecture's interaction output (DLRM's dot products, DCN's cross network, DeepFM's
factorization machine and deep layer) is the shared bottom; what differs from a single task is
only the over arch, replaced by one of these, which returns B x T logits (one per task):

- TaskTowers (model.multi_task=shared_bottom): the over arch's hidden layers (all of
  model.over_arch_layer_sizes but its final 1), shared, then one tower per task
  (model.tower_layer_sizes, then one logit).
- MixtureOfExperts (model.multi_task=mmoe; Ma et al., KDD 2018): model.num_experts experts, each
  such a stack of hidden layers over the interaction, mixed for each task by a softmax gate of its
  own over the interaction, then that task's tower.

MultiTaskTrain replaces torchrec's DLRMTrain when there are several tasks: the loss is the weighted
sum of each task's mean binary cross-entropy (features.labels[i].weight), and it returns what the
train pipeline and the evaluation read, (loss, (loss, logits B x T, labels B x T)). Towers are kept
in a ModuleList by task order (task names may hold characters a module name cannot).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.mlp import MLP

from app.models.head import Head


def _tower(in_features: int, layer_sizes: Sequence[int], device: torch.device) -> nn.Module:
    """Hidden layers (ReLU) then one logit: a task's tower."""
    if not layer_sizes:
        return nn.Linear(in_features, 1, device=device)
    return nn.Sequential(
        MLP(in_features, list(layer_sizes), bias=True, activation="relu", device=device),
        nn.Linear(layer_sizes[-1], 1, device=device),
    )


def _hidden(in_features: int, layer_sizes: Sequence[int], device: torch.device) -> nn.Module:
    return MLP(in_features, list(layer_sizes), bias=True, activation="relu", device=device)


class TaskTowers(nn.Module):
    """Shared bottom: forward(B x in) -> B x T logits."""

    def __init__(
        self,
        in_features: int,
        hidden_sizes: Sequence[int],
        tower_sizes: Sequence[int],
        tasks: int,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.bottom = _hidden(in_features, hidden_sizes, device)
        self.towers = nn.ModuleList(_tower(hidden_sizes[-1], tower_sizes, device) for _ in range(tasks))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        shared = self.bottom(features)
        return torch.cat([tower(shared) for tower in self.towers], dim=1)


class MixtureOfExperts(nn.Module):
    """MMoE: forward(B x in) -> B x T logits."""

    def __init__(
        self,
        in_features: int,
        hidden_sizes: Sequence[int],
        tower_sizes: Sequence[int],
        tasks: int,
        num_experts: int,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.experts = nn.ModuleList(_hidden(in_features, hidden_sizes, device) for _ in range(num_experts))
        self.gates = nn.ModuleList(nn.Linear(in_features, num_experts, device=device) for _ in range(tasks))
        self.towers = nn.ModuleList(_tower(hidden_sizes[-1], tower_sizes, device) for _ in range(tasks))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        experts = torch.stack([expert(features) for expert in self.experts], dim=1)  # B x E x H
        logits: list[torch.Tensor] = []
        for gate, tower in zip(self.gates, self.towers):
            weights = F.softmax(gate(features), dim=1).unsqueeze(2)  # B x E x 1
            logits.append(tower((weights * experts).sum(dim=1)))
        return torch.cat(logits, dim=1)


def make_multi_task(
    head: Head,
    kind: str,
    over_arch_layer_sizes: Sequence[int],
    tower_sizes: Sequence[int],
    tasks: int,
    num_experts: int,
    device: torch.device,
) -> None:
    """Replace `head`'s over arch (built for one logit over `head.over_in_features`) by the
    multi-task one of `kind`: its output becomes B x T logits."""
    hidden = list(over_arch_layer_sizes[:-1])
    if kind == "mmoe":
        head.over_arch = MixtureOfExperts(head.over_in_features, hidden, tower_sizes, tasks, num_experts, device)
    else:
        head.over_arch = TaskTowers(head.over_in_features, hidden, tower_sizes, tasks, device)


class MultiTaskTrain(nn.Module):
    """DLRMTrain's contract for several tasks: forward(batch with B x T labels) ->
    (loss, (loss, logits B x T, labels B x T)), the loss the weighted sum of the tasks' mean BCE."""

    def __init__(self, head: Head, weights: Sequence[float], sequence: bool = False) -> None:
        """`sequence`: the batches are SequenceBatches, whose histories go to the head too."""
        super().__init__()
        self.model = head  # the same attribute as DLRMTrain's: the state dict's names stay model.*
        # Plain floats, not a buffer: DDP would broadcast a buffer every step.
        self.weights = [float(w) for w in weights]
        self.sequence = sequence

    def forward(self, batch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self.sequence:  # (a constant: the train pipeline's fx trace takes one branch)
            logits = self.model(batch.dense_features, batch.sparse_features, batch.sequence_features)
        else:
            logits = self.model(batch.dense_features, batch.sparse_features)
        labels = batch.labels.float()
        loss = logits.new_zeros(())
        for task, weight in enumerate(self.weights):
            if weight > 0:
                loss = loss + weight * F.binary_cross_entropy_with_logits(logits[:, task], labels[:, task])
        return loss, (loss.detach(), logits.detach(), batch.labels.detach())
