"""The reference trainers' training steps, rebuilt from their public configuration, so that
scripts/benchmark.py measures rectrain against them in the same run on the same batches.

- `dlrm_s_pytorch`: facebookresearch/dlrm's plain-PyTorch trainer: one nn.EmbeddingBag(sparse=True)
  per table, Linear+ReLU MLPs ending in a sigmoid, the dot interaction as a batched product and a
  gather of its lower triangle, BCELoss, and one torch.optim.SGD over everything (sparse gradients
  for the tables).
- `torchrec_dlrm`: facebookresearch/dlrm's TorchRec trainer (torchrec_dlrm/dlrm_main.py):
  torchrec's DLRM or DLRM_DCN under DLRMTrain, the table optimizer applied in backward, a default
  plan over get_default_sharders(), DistributedModelParallel, a KeyedOptimizerWrapper SGD for the
  dense part and TrainPipelineSparseDist.

Both are written here from that description (no code of theirs is copied); they use the shape
and learning rate of `config` and plain SGD, as the reference benchmark does.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torchrec.datasets.utils import Batch

from app.config import Config


class _PlainDLRM(nn.Module):
    rows: torch.Tensor  # buffers: the interaction's lower triangle
    cols: torch.Tensor

    def __init__(self, config: Config) -> None:
        super().__init__()
        dim = config.features.embedding_dim
        self.tables = nn.ModuleList(
            nn.EmbeddingBag(f.num_embeddings, dim, mode="sum", sparse=True) for f in config.features.sparse
        )
        bottom = [len(config.features.dense), *config.model.dense_arch_layer_sizes]
        tables = len(config.features.sparse) + 1
        top = [dim + tables * (tables - 1) // 2, *config.model.over_arch_layer_sizes]
        self.bottom = self._mlp(bottom, sigmoid=False)
        self.top = self._mlp(top, sigmoid=True)
        rows, cols = torch.tril_indices(tables, tables, offset=-1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    @staticmethod
    def _mlp(sizes: Sequence[int], sigmoid: bool) -> nn.Sequential:
        layers: list[nn.Module] = []
        for i, (n, m) in enumerate(itertools.pairwise(sizes)):
            layers += [nn.Linear(n, m), nn.Sigmoid() if sigmoid and i == len(sizes) - 2 else nn.ReLU()]
        return nn.Sequential(*layers)

    def forward(self, dense: torch.Tensor, sparse: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        x = self.bottom(dense)
        pooled = [table(ids, offsets) for table, (ids, offsets) in zip(self.tables, sparse)]
        features = torch.cat([x, *pooled], dim=1).view(x.shape[0], -1, x.shape[1])
        products = torch.bmm(features, features.transpose(1, 2))
        return self.top(torch.cat([x, products[:, self.rows, self.cols]], dim=1)).squeeze(1)


def dlrm_s_pytorch(config: Config, batches: Sequence[Batch]) -> Callable[[int], None]:
    """A function training `steps` steps over `batches` (cycled) the plain-PyTorch way."""
    model = _PlainDLRM(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.optim.lr)
    loss_fn = nn.BCELoss()
    inputs = []
    for batch in batches:  # the reference reader's format: per table, ids and offsets
        sparse = batch.sparse_features
        per_table = [(jt.values(), jt.offsets()[:-1]) for jt in (sparse[name] for name in sparse.keys())]  # noqa: SIM118 (a KeyedJaggedTensor)
        inputs.append((batch.dense_features, per_table, batch.labels.float()))
    cycle = itertools.cycle(inputs)

    def train(steps: int) -> None:
        for dense, sparse, labels in itertools.islice(cycle, steps):
            optimizer.zero_grad()
            loss = loss_fn(model(dense, sparse), labels)
            loss.backward()
            optimizer.step()

    return train


def torchrec_dlrm(config: Config, batches: Sequence[Batch], device: torch.device) -> Callable[[int], None]:
    """A function training `steps` steps over `batches` (cycled) the TorchRec-reference way; needs
    the default process group."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed import DistributedModelParallel, TrainPipelineSparseDist
    from torchrec.distributed.model_parallel import get_default_sharders
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    features, model_config = config.features, config.model
    tables = [
        EmbeddingBagConfig(
            name=f"t_{f.name}",
            embedding_dim=features.embedding_dim,
            num_embeddings=f.num_embeddings,
            feature_names=[f.name],
        )
        for f in features.sparse
    ]
    common = dict(
        embedding_bag_collection=EmbeddingBagCollection(tables=tables, device=torch.device("meta")),
        dense_in_features=len(features.dense),
        dense_arch_layer_sizes=list(model_config.dense_arch_layer_sizes),
        over_arch_layer_sizes=list(model_config.over_arch_layer_sizes),
        dense_device=device,
    )
    if model_config.arch == "dcn":
        head = DLRM_DCN(
            **common, dcn_num_layers=model_config.dcn_num_layers, dcn_low_rank_dim=model_config.dcn_low_rank_dim
        )
    else:
        head = DLRM(**common)
    train_model = DLRMTrain(head)
    apply_optimizer_in_backward(torch.optim.SGD, train_model.model.sparse_arch.parameters(), {"lr": config.optim.lr})
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=dist.get_world_size(), compute_device=device.type))
    plan = planner.collective_plan(train_model, get_default_sharders(), dist.GroupMember.WORLD)
    model = DistributedModelParallel(module=train_model, device=device, plan=plan)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(model.named_parameters())),
        lambda params: torch.optim.SGD(params, lr=config.optim.lr),
    )
    optimizer = CombinedOptimizer([model.fused_optimizer, dense])
    pipeline = TrainPipelineSparseDist(model, optimizer, device)
    cycle = itertools.cycle(batches)

    def train(steps: int) -> None:
        for _ in range(steps):
            pipeline.progress(cycle)

    return train


def samples_per_s(train: Callable[[int], None], batch_size: int, steps: int, warmup: int) -> float:
    train(warmup)
    start = time.perf_counter()
    train(steps)
    return steps * batch_size / (time.perf_counter() - start)
