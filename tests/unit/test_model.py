"""The model builder: tables on the meta device, both heads, forward through a one-rank DMP."""

from __future__ import annotations

import pytest
import torch
from torchrec.distributed import DistributedModelParallel
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from app.config import FeaturesConfig, ModelConfig, SparseFeature
from app.features import FeatureSchema, table_name
from app.model import build_model, embedding_tables

SCHEMA = FeatureSchema.from_config(
    FeaturesConfig(
        dense=["d0", "d1", "d2"],
        sparse=[SparseFeature("a", 50), SparseFeature("b", 20, hotness=3)],
        embedding_dim=8,
    )
)


def batch(size: int) -> Batch:
    lengths = torch.tensor([1] * size + [2] * size)
    return Batch(
        dense_features=torch.rand(size, 3),
        sparse_features=KeyedJaggedTensor.from_lengths_sync(
            keys=["a", "b"], values=torch.randint(0, 20, (int(lengths.sum()),)), lengths=lengths
        ),
        labels=torch.randint(0, 2, (size,)).float(),
    )


def test_tables_are_built_on_meta_from_the_feature_schema():
    model = build_model(ModelConfig(dense_arch_layer_sizes=[16, 8]), SCHEMA, torch.device("cpu"))
    tables = embedding_tables(model)
    assert [c.name for c in tables.embedding_bag_configs()] == [table_name("a"), table_name("b")]
    assert [c.num_embeddings for c in tables.embedding_bag_configs()] == [50, 20]
    assert all(p.is_meta for p in tables.parameters())
    assert not any(p.is_meta for n, p in model.named_parameters() if "embedding_bag_collection" not in n)


@pytest.mark.parametrize("arch", ["dlrm", "dcn"])
def test_forward_gives_one_logit_per_row(arch, single_process_group):
    config = ModelConfig(arch=arch, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1], dcn_low_rank_dim=4)
    model = DistributedModelParallel(build_model(config, SCHEMA, torch.device("cpu")), device=torch.device("cpu"))
    loss, (loss_detached, logits, labels) = model(batch(5))
    assert logits.shape == (5,) and labels.shape == (5,)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(loss_detached.item())
    loss.backward()
