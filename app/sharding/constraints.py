"""The planner's constraints from config: per table the allowed sharding types and kernels
(sharding.*, narrowed by sharding.tables.<feature>), managed-collision and sequence tables, and
row-wise for the tables too large to place whole."""

from __future__ import annotations

from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import ParameterConstraints
from torchrec.distributed.types import CacheParams, ShardingType

from app.config import CUDA_ONLY_KERNELS, ConfigError, ShardingConfig, table_constraint
from app.features import FeatureSchema, table_name


def parameter_constraints(
    config: ShardingConfig, schema: FeatureSchema, device_type: str, world_size: int = 1
) -> dict[str, ParameterConstraints]:
    """Per table: the global allowed types/kernels, narrowed by sharding.tables.<feature>; with
    sharding.balance=memory, row-wise for the tables too large to place whole."""
    constraints: dict[str, ParameterConstraints] = {}
    for feature in schema.sparse_names:
        override = table_constraint(config.tables, feature)
        types = override.sharding_types if override and override.sharding_types else config.sharding_types
        kernels = override.compute_kernels if override and override.compute_kernels else config.compute_kernels
        key = f"sharding.tables.{feature}" if override and override.compute_kernels else "sharding"
        cuda_only = [k for k in kernels if k in CUDA_ONLY_KERNELS]
        if cuda_only and device_type != "cuda":
            raise ConfigError(
                f"{key}.compute_kernels: {', '.join(cuda_only)} needs CUDA (device memory backed by "
                f"host memory or SSD), but this job runs on {device_type}; use fused or dense."
            )
        if not types and config.balance == "memory" and feature in _oversized(schema, world_size):
            types = [ShardingType.ROW_WISE.value]
        extra = {}
        if override and override.min_partition is not None:
            extra["min_partition"] = override.min_partition
        if override and override.cache_load_factor is not None:
            extra["cache_params"] = CacheParams(load_factor=override.cache_load_factor)
        if schema_feature(schema, feature).id_mapping == "managed_collision":
            types, kernels = _managed_collision_constraint(types, kernels, device_type, key)
        if types or kernels or extra:
            constraints[table_name(feature)] = ParameterConstraints(
                sharding_types=list(types) or None, compute_kernels=list(kernels) or None, **extra
            )
    return constraints


def schema_feature(schema: FeatureSchema, name: str):
    return next(f for f in schema.sparse if f.name == name)


def _managed_collision_constraint(
    types: list[str], kernels: list[str], device_type: str, key: str
) -> tuple[list[str], list[str]]:
    """A managed-collision table: row_wise (Config.validate has refused configs that exclude it),
    and on CPU the fused kernel, the only one that runs there."""
    if device_type != "cuda":
        if kernels and EmbeddingComputeKernel.FUSED.value not in kernels:
            raise ConfigError(
                f"{key}.compute_kernels={list(kernels)}: a managed-collision table on CPU runs only "
                "with the fused kernel; add fused."
            )
        kernels = [EmbeddingComputeKernel.FUSED.value]
    return [ShardingType.ROW_WISE.value], kernels


# Types the histories' tables may take: EmbeddingCollectionSharder's, on CPU as on CUDA (proved
# against the unsharded model by tests/integration/test_sequence_sharding.py), but data_parallel:
# a replicated table would be stepped by the dense optimizer (app/optim.py splits by TABLES_PATH).
SEQUENCE_SHARDING_TYPES = (ShardingType.TABLE_WISE.value, ShardingType.COLUMN_WISE.value, ShardingType.ROW_WISE.value)


def sequence_constraints(config: ShardingConfig, schema: FeatureSchema) -> dict[str, ParameterConstraints]:
    """The histories' tables: sharding.sharding_types (all when empty) narrowed to the types an
    EmbeddingCollection is sharded by here, and sharding.compute_kernels."""
    constraints: dict[str, ParameterConstraints] = {}
    allowed = [t for t in (config.sharding_types or SEQUENCE_SHARDING_TYPES) if t in SEQUENCE_SHARDING_TYPES]
    for feature in schema.sequence_names:
        if not allowed:
            raise ConfigError(
                f"sharding.sharding_types={list(config.sharding_types)} leaves the sequence feature {feature!r} "
                f"(features.sequence) no type: its table (an EmbeddingCollection) is sharded "
                f"{', '.join(SEQUENCE_SHARDING_TYPES)}; allow one of them."
            )
        constraints[table_name(feature)] = ParameterConstraints(
            sharding_types=list(allowed), compute_kernels=list(config.compute_kernels) or None
        )
    return constraints


def _oversized(schema: FeatureSchema, world_size: int) -> list[str]:
    """Features whose table holds more than half of one rank's share of all table bytes: placed
    whole, such a table alone would unbalance memory."""
    share = sum(f.num_embeddings for f in schema.sparse) / world_size
    return [f.name for f in schema.sparse if world_size > 1 and f.num_embeddings > share / 2]
