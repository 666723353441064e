"""The model builder: tables on the meta device, both heads, forward through a one-rank DMP."""

from __future__ import annotations

import pytest
import torch
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from app.config import FeaturesConfig, ModelConfig, SparseFeature
from app.features import FeatureSchema, table_name
from app.models import build_model, embedding_tables

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


@pytest.mark.parametrize("arch", ["dlrm", "dcn", "deepfm"])
def test_forward_gives_one_logit_per_row(arch, single_process_group):
    config = ModelConfig(arch=arch, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1], dcn_low_rank_dim=4)
    model = DistributedModelParallel(build_model(config, SCHEMA, torch.device("cpu")), device=torch.device("cpu"))
    loss, (loss_detached, logits, labels) = model(batch(5))
    assert logits.shape == (5,) and labels.shape == (5,)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(loss_detached.item())
    loss.backward()


MIXED = FeatureSchema.from_config(
    FeaturesConfig(
        dense=["d0", "d1", "d2"],
        sparse=[
            SparseFeature("a", 50, embedding_dim=16),
            SparseFeature("b", 20, hotness=3),
            SparseFeature("c", 30, embedding_dim=4),
        ],
        embedding_dim=8,
    )
)


def mixed_batch(size: int) -> Batch:
    lengths = torch.tensor([1] * size + [3] * size + [1] * size)
    return Batch(
        dense_features=torch.rand(size, 3),
        sparse_features=KeyedJaggedTensor.from_lengths_sync(
            keys=["a", "b", "c"], values=torch.randint(0, 20, (int(lengths.sum()),)), lengths=lengths
        ),
        labels=torch.randint(0, 2, (size,)).float(),
    )


@pytest.mark.parametrize("arch", ["dlrm", "dcn", "deepfm"])
def test_tables_of_several_widths(arch, single_process_group):
    config = ModelConfig(
        arch=arch,
        dense_arch_layer_sizes=[16, 8],
        over_arch_layer_sizes=[16, 1],
        dcn_low_rank_dim=4,
        deep_fm_dimension=12,
    )
    model = build_model(config, MIXED, torch.device("cpu"))
    assert [c.embedding_dim for c in embedding_tables(model).embedding_bag_configs()] == [16, 8, 4]
    head = model.model
    if arch in ("dlrm", "deepfm"):
        # Projected to the dense vector's width where they differ, and only there.
        assert {name: tuple(p.weight.shape) for name, p in head.projections.items()} == {"a": (8, 16), "c": (8, 4)}
        over_in = 8 + 4 * 3 // 2 if arch == "dlrm" else 8 + 12 + 1  # dense, deep layer, FM term
        assert next(head.over_arch.parameters()).shape[1] == over_in
    else:
        assert "projections" not in dict(head.named_children())
        assert head.inter_arch.crossnet.W_kernels[0].shape[0] == 8 + 16 + 8 + 4  # side by side
        assert next(head.over_arch.parameters()).shape[1] == 36
    sharded = DistributedModelParallel(model, device=torch.device("cpu"))
    loss, (_, logits, _) = sharded(mixed_batch(6))
    assert logits.shape == (6,) and torch.isfinite(loss)
    loss.backward()
    if arch != "dcn":
        assert all(p.grad is not None for p in sharded.module.model.projections.parameters())


@pytest.mark.parametrize("arch", ["dlrm", "dcn"])
def test_one_width_is_torchrecs_model_exactly(arch):
    """Same module names, so a model of one width keeps torchrec DLRM's and DLRM_DCN's state dict (and
    so loads their checkpoints), and the same values from the same weights."""
    from torchrec.models.dlrm import DLRM, DLRM_DCN
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    config = ModelConfig(arch=arch, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1], dcn_low_rank_dim=4)
    ours = build_model(config, SCHEMA, torch.device("cpu"), tables_device=torch.device("cpu")).model
    tables = EmbeddingBagCollection(tables=SCHEMA.embedding_bag_configs(), device=torch.device("cpu"))
    common = dict(
        embedding_bag_collection=tables,
        dense_in_features=3,
        dense_arch_layer_sizes=[16, 8],
        over_arch_layer_sizes=[16, 1],
    )
    theirs = DLRM_DCN(**common, dcn_num_layers=3, dcn_low_rank_dim=4) if arch == "dcn" else DLRM(**common)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    features = batch(7)
    with torch.no_grad():
        expected = theirs(features.dense_features, features.sparse_features)
        got = ours(features.dense_features, features.sparse_features)
    torch.testing.assert_close(got, expected)


def test_deepfm_sums_the_dot_products_of_every_pair_of_feature_vectors():
    from app.models.deepfm import pairwise_dot_sum

    features = torch.randn(5, 4, 3, dtype=torch.float64)
    pairs = sum((features[:, i] * features[:, j]).sum(dim=1) for i in range(4) for j in range(i + 1, 4))
    torch.testing.assert_close(pairwise_dot_sum(features), pairs.unsqueeze(1))
