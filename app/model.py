"""The model: an EmbeddingBagCollection built on the meta device under a DLRM or DLRM-DCN head.

The embedding tables are created on the meta device so that no rank ever materialises a full
table: DistributedModelParallel allocates only each rank's shards. The dense layers are small and
are built on the target device directly.

The heads are torchrec's DLRM and DLRM_DCN (same modules, same state dict) with three changes on
the hot path: the dot interaction's backward (app/interaction.py); the pooled embeddings taken as
they come when the tables return them in feature order (torchrec's SparseArch splits them per
feature and concatenates them again, a copy of the whole B x F x D block each way); and the dense
part computed under autocast when the precision asks for it (app/precision.py).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from app.config import ModelConfig
from app.features import FeatureSchema
from app.interaction import DotInteraction
from app.precision import TableGradients

# Where the tables are in a model from build_model; sharding keeps the path (its plan is keyed by it).
TABLES_PATH = "model.sparse_arch.embedding_bag_collection"


@torch.fx.wrap  # one call in the train pipeline's trace of the model: it branches on the keys
def _in_feature_order(pooled: KeyedTensor, names: List[str]) -> torch.Tensor:
    """B x F x D pooled embeddings in the order of `names`."""
    if pooled.keys() == names:
        values = pooled.values()
    else:  # a sharded collection returns its features grouped by sharding type
        by_name = pooled.to_dict()
        values = torch.cat([by_name[name] for name in names], dim=1)
    return values.view(values.shape[0], len(names), -1)


class _Head(DLRM):
    """DLRM's forward with the changes in the module docstring (set by build_model)."""

    autocast_dtype: Optional[torch.dtype] = None
    device_type: str = "cpu"
    table_gradients: TableGradients = TableGradients(None)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.sparse_arch.embedding_bag_collection(sparse_features)
        embedded_sparse = self.table_gradients(_in_feature_order(pooled, self.sparse_arch.sparse_feature_names))
        with torch.autocast(self.device_type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            embedded_dense = self.dense_arch(dense_features)
            interactions = self.inter_arch(dense_features=embedded_dense, sparse_features=embedded_sparse)
            logits = self.over_arch(interactions)
        return logits.float()


class _DCNHead(_Head, DLRM_DCN):
    pass


def build_model(config: ModelConfig, schema: FeatureSchema, device: torch.device,
                tables_device: torch.device = torch.device("meta"),
                autocast_dtype: Optional[torch.dtype] = None,
                table_gradients: Optional[TableGradients] = None) -> DLRMTrain:
    """DLRMTrain: forward(batch) -> (loss, (loss, logits, labels)), what the train pipeline expects.
    `tables_device` other than meta builds full tables there: one unsharded process (app/export.py).
    `autocast_dtype` (bf16, fp16) is the dense part's compute precision; `table_gradients` unscales
    the tables' gradients under a loss scale."""
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
        head: _Head = _DCNHead(
            **common, dcn_num_layers=config.dcn_num_layers, dcn_low_rank_dim=config.dcn_low_rank_dim
        )
    else:
        head = _Head(**common)
        head.inter_arch = DotInteraction(len(schema.sparse)).to(device)
    head.autocast_dtype, head.device_type = autocast_dtype, device.type
    if table_gradients is not None:
        head.table_gradients = table_gradients
    return DLRMTrain(head)


def embedding_tables(model: nn.Module) -> EmbeddingBagCollection:
    """The (unsharded) EmbeddingBagCollection inside a model from build_model."""
    return model.get_submodule(TABLES_PATH)
