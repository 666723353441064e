"""The model: an EmbeddingBagCollection built on the meta device under a DLRM or DLRM-DCN head.

The embedding tables are created on the meta device so that no rank ever materialises a full
table: DistributedModelParallel allocates only each rank's shards. The dense layers are small and
are built on the target device directly.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from app.config import ModelConfig
from app.features import FeatureSchema

# Where the tables are in a model from build_model; sharding keeps the path (its plan is keyed by it).
TABLES_PATH = "model.sparse_arch.embedding_bag_collection"


def build_model(config: ModelConfig, schema: FeatureSchema, device: torch.device,
                tables_device: torch.device = torch.device("meta")) -> DLRMTrain:
    """DLRMTrain: forward(batch) -> (loss, (loss, logits, labels)), what the train pipeline expects.
    `tables_device` other than meta builds full tables there: one unsharded process (app/export.py)."""
    tables = EmbeddingBagCollection(
        tables=schema.embedding_bag_configs(), device=tables_device
    )
    common = dict(
        embedding_bag_collection=tables,
        dense_in_features=len(schema.dense),
        dense_arch_layer_sizes=list(config.dense_arch_layer_sizes),
        over_arch_layer_sizes=list(config.over_arch_layer_sizes),
        dense_device=device,
    )
    if config.arch == "dcn":
        head: nn.Module = DLRM_DCN(
            **common, dcn_num_layers=config.dcn_num_layers, dcn_low_rank_dim=config.dcn_low_rank_dim
        )
    else:
        head = DLRM(**common)
    return DLRMTrain(head)


def embedding_tables(model: nn.Module) -> EmbeddingBagCollection:
    """The (unsharded) EmbeddingBagCollection inside a model from build_model."""
    return model.get_submodule(TABLES_PATH)
