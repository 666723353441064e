"""The models, one module per architecture over what they share (head.py): the embedding tables
built on the meta device, so that no rank ever materialises a full table (DistributedModelParallel
allocates only each rank's shards), and small dense layers built on the target device directly.

- dlrm.py: DLRM, the dot interaction (interaction.py: its hand-written backward); tables of
  another width than the dense vector's are projected to it.
- dcn.py: DLRM-DCN (DCNv2), a low-rank cross network over the concatenation, of any widths.
- deepfm.py: DeepFM, a factorization machine beside a deep layer; tables projected as DLRM's.
- multitask.py: several tasks (features.labels): towers or MMoE in place of any of their over arches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec.models.dlrm import DLRMTrain
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from app.config import ManagedCollisionConfig, ModelConfig
from app.features import FeatureSchema
from app.models.dcn import CrossHead
from app.models.deepfm import DeepFMHead
from app.models.dlrm import DotHead
from app.models.head import Head
from app.models.managed_collision import build_tables
from app.models.multitask import MultiTaskTrain, make_multi_task
from app.models.sequence import SEQUENCE_TABLES_PATH, SequenceArch, SequenceDLRMTrain
from app.precision import TableGradients

# Where the tables are in a model from build_model; sharding keeps the path (its plan is keyed by it).
TABLES_PATH = "model.sparse_arch.embedding_bag_collection"


def build_model(
    config: ModelConfig,
    schema: FeatureSchema,
    device: torch.device,
    tables_device: torch.device = torch.device("meta"),
    autocast_dtype: torch.dtype | None = None,
    table_gradients: TableGradients | None = None,
    managed_collision: ManagedCollisionConfig | None = None,
    mc_buckets: int = 1,
    task_weights: Sequence[float] | None = None,
) -> DLRMTrain | MultiTaskTrain:
    """DLRMTrain: forward(batch) -> (loss, (loss, logits, labels)), what the train pipeline expects;
    with several tasks (schema.labels) MultiTaskTrain, the same with B x T logits and labels, its
    loss weighted by `task_weights` (default: 1 each; scoring does not need them).
    `tables_device` other than meta builds full tables there: one unsharded process (app/export.py).
    `autocast_dtype` (bf16, fp16) is the dense part's compute precision; `table_gradients` is the cut
    between the tables and the dense part that a loss scale needs (app/precision.py). Features with
    id_mapping=managed_collision get `managed_collision`'s modules, for `mc_buckets` row-wise shards
    (app/models/managed_collision.py)."""
    tables = _sparse_tables(schema, tables_device, managed_collision, mc_buckets)
    head = _architecture_head(config, schema, tables, device)
    head.autocast_dtype = autocast_dtype
    if table_gradients is not None:
        head.table_gradients = table_gradients
    if schema.sequence:
        head.add_sequence(SequenceArch(schema, config.sequence_attention_layer_sizes, device, tables_device))
    tasks = len(schema.tasks)
    if tasks > 1:  # after add_sequence: the towers take the over arch's input with the histories'
        make_multi_task(
            head,
            config.multi_task,
            config.over_arch_layer_sizes,
            config.tower_layer_sizes,
            tasks,
            config.num_experts,
            device,
        )
        return MultiTaskTrain(
            head, [1.0] * tasks if task_weights is None else task_weights, sequence=bool(schema.sequence)
        )
    if schema.sequence:
        return SequenceDLRMTrain(head)
    return DLRMTrain(head)


def _sparse_tables(
    schema: FeatureSchema,
    tables_device: torch.device,
    managed_collision: ManagedCollisionConfig | None,
    mc_buckets: int,
) -> nn.Module:
    """The sparse features' EmbeddingBagCollection; with managed-collision features, the
    TablesWithManagedCollision that holds them all (app/models/managed_collision.py)."""
    managed = [f.name for f in schema.sparse if f.id_mapping == "managed_collision"]
    if not managed:
        return EmbeddingBagCollection(tables=schema.embedding_bag_configs(), device=tables_device)
    return build_tables(
        schema.embedding_bag_configs(),
        managed,
        managed_collision or ManagedCollisionConfig(),
        tables_device,
        mc_buckets,
    )


def _architecture_head(config: ModelConfig, schema: FeatureSchema, tables: nn.Module, device: torch.device) -> Head:
    """model.arch's head over `tables`: dcn's cross network, deepfm's factorization machine, or
    dlrm's dot interaction."""
    dense = (tables, len(schema.dense), list(config.dense_arch_layer_sizes))
    if config.arch == "dcn":
        return CrossHead(
            *dense, list(config.over_arch_layer_sizes), config.dcn_num_layers, config.dcn_low_rank_dim, device
        )
    if config.arch == "deepfm":
        return DeepFMHead(*dense, list(config.over_arch_layer_sizes), config.deep_fm_dimension, device)
    return DotHead(*dense, list(config.over_arch_layer_sizes), device)


def embedding_tables(model: nn.Module) -> EmbeddingBagCollection:
    """The (unsharded) EmbeddingBagCollection inside a model from build_model (with managed-collision
    features, the TablesWithManagedCollision that holds them all)."""
    return model.get_submodule(TABLES_PATH)


def sequence_tables(model: nn.Module) -> nn.Module | None:
    """The histories' EmbeddingCollection inside a model from build_model (None: no features.sequence)."""
    try:
        return model.get_submodule(SEQUENCE_TABLES_PATH)
    except AttributeError:
        return None
