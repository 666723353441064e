"""Sharding: planner constraints from config, the collective plan, the DMP wrap, the plan report.

TorchRec's planner chooses, for every table, how to split it across ranks (whole tables, column
slices, row slices, or replicas) and which kernel runs it, by estimated cost within each rank's
memory. This module turns the sharding config into the planner's inputs and reports what it chose
(plan.txt for people, plan.json for tools).

TorchRec's sharder offers row_wise and table_row_wise only on CUDA. They work on CPU over gloo
(tests/integration/test_sharding_equivalence.py proves them against an unsharded model), and a
table larger than one worker's memory needs them, so our sharder allows them on CPU too.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import PlannerError
from torchrec.distributed.types import ShardingPlan, ShardingType

from app.config import CUDA_ONLY_KERNELS, ConfigError, ShardingConfig
from app.features import FeatureSchema, table_name

TABLES_PATH = "model.sparse_arch.embedding_bag_collection"
_GB = 1024**3
_CPU_EXTRA_TYPES = (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)


class _CPUCapableSharder(EmbeddingBagCollectionSharder):
    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = super().sharding_types(compute_device_type)
        return types + [t for t in _CPU_EXTRA_TYPES if t not in types]


def sharders() -> list:
    return [_CPUCapableSharder()]


def parameter_constraints(config: ShardingConfig, schema: FeatureSchema, device_type: str) -> Dict[str, ParameterConstraints]:
    """Per table: the global allowed types/kernels, narrowed by sharding.tables.<feature>."""
    constraints: Dict[str, ParameterConstraints] = {}
    for feature in schema.sparse_names:
        override = config.tables.get(feature)
        types = (override.sharding_types if override and override.sharding_types else config.sharding_types)
        kernels = (override.compute_kernels if override and override.compute_kernels else config.compute_kernels)
        key = f"sharding.tables.{feature}" if override and override.compute_kernels else "sharding"
        cuda_only = [k for k in kernels if k in CUDA_ONLY_KERNELS]
        if cuda_only and device_type != "cuda":
            raise ConfigError(
                f"{key}.compute_kernels: {', '.join(cuda_only)} needs CUDA (device memory backed by "
                f"host memory or SSD), but this job runs on {device_type}; use fused or dense."
            )
        if types or kernels:
            constraints[table_name(feature)] = ParameterConstraints(
                sharding_types=list(types) or None, compute_kernels=list(kernels) or None
            )
    return constraints


def _topology(config: ShardingConfig, device: torch.device, world_size: int, local_world_size: int) -> Topology:
    caps = {}
    if config.hbm_cap_gb is not None:
        caps["hbm_cap"] = int(config.hbm_cap_gb * _GB)
    if config.ddr_cap_gb is not None:
        caps["ddr_cap"] = int(config.ddr_cap_gb * _GB)
    return Topology(world_size=world_size, compute_device=device.type, local_world_size=local_world_size, **caps)


def _planner(config: ShardingConfig, schema: FeatureSchema, device: torch.device, batch_size: int,
             world_size: int, local_world_size: int) -> EmbeddingShardingPlanner:
    return EmbeddingShardingPlanner(
        topology=_topology(config, device, world_size, local_world_size),
        batch_size=batch_size,
        storage_reservation=FixedPercentageStorageReservation(config.storage_reserve_percentage),
        constraints=parameter_constraints(config, schema, device.type),
    )


def plan_sharding(model: nn.Module, config: ShardingConfig, schema: FeatureSchema, device: torch.device,
                  batch_size: int, world_size: int, local_world_size: int, process_group) -> ShardingPlan:
    """Collective: every rank calls it and gets rank 0's plan."""
    planner = _planner(config, schema, device, batch_size, world_size, local_world_size)
    try:
        return planner.collective_plan(model, sharders(), process_group)
    except PlannerError as error:
        caps = f"hbm_cap_gb={config.hbm_cap_gb}, ddr_cap_gb={config.ddr_cap_gb}"
        raise ConfigError(
            f"the sharding planner found no plan for {world_size} rank(s) on {device.type} ({caps}, "
            f"storage_reserve_percentage={config.storage_reserve_percentage}) within the sharding "
            f"constraints. Planner said: {error}"
        ) from error


def shard_model(model: nn.Module, plan: ShardingPlan, device: torch.device) -> DistributedModelParallel:
    return DistributedModelParallel(model, device=device, plan=plan, sharders=sharders())


def plan_report(plan: ShardingPlan, schema: FeatureSchema, world_size: int) -> dict:
    """What the planner decided, as plain data: per table and per rank."""
    features = {table_name(f.name): f for f in schema.sparse}
    tables: Dict[str, dict] = {}
    rank_bytes: Dict[int, int] = defaultdict(int)
    rank_tables: Dict[int, List[str]] = defaultdict(list)
    for name, sharding in sorted(plan.plan.get(TABLES_PATH, {}).items()):
        feature = features[name]
        full = [feature.num_embeddings, schema.embedding_dim]
        if sharding.sharding_spec is not None:
            shards = [
                {"rank": s.placement.rank(), "offsets": list(s.shard_offsets), "sizes": list(s.shard_sizes)}
                for s in sharding.sharding_spec.shards
            ]
        else:  # data_parallel: a full replica on every rank
            shards = [{"rank": r, "offsets": [0, 0], "sizes": full} for r in range(world_size)]
        for shard in shards:
            rank_bytes[shard["rank"]] += shard["sizes"][0] * shard["sizes"][1] * 4
            rank_tables[shard["rank"]].append(name)
        tables[name] = {
            "feature": feature.name,
            "num_embeddings": feature.num_embeddings,
            "embedding_dim": schema.embedding_dim,
            "sharding_type": sharding.sharding_type,
            "compute_kernel": sharding.compute_kernel,
            "ranks": sorted({s["rank"] for s in shards}),
            "shards": shards,
        }
    ranks = {
        str(r): {"tables": sorted(set(rank_tables[r])), "embedding_bytes": rank_bytes[r]} for r in range(world_size)
    }
    sizes = [rank_bytes[r] for r in range(world_size)]
    mean = sum(sizes) / world_size
    return {
        "world_size": world_size,
        "tables": tables,
        "ranks": ranks,
        "imbalance": (max(sizes) / mean) if mean else 1.0,  # max over mean of per-rank table bytes
    }


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def write_plan_report(report: dict, run_dir: Path) -> str:
    """Writes plan.json and plan.txt into run_dir; returns the text."""
    lines = [f"sharding plan for {report['world_size']} rank(s)", ""]
    lines.append(f"{'table':<14}{'rows':>12}{'dim':>5}  {'sharding':<18}{'kernel':<8}ranks (shard rows x cols)")
    for name, table in report["tables"].items():
        shards = ", ".join(f"{s['rank']}:{s['sizes'][0]}x{s['sizes'][1]}" for s in table["shards"])
        lines.append(
            f"{name:<14}{table['num_embeddings']:>12}{table['embedding_dim']:>5}  "
            f"{table['sharding_type']:<18}{table['compute_kernel']:<8}{shards}"
        )
    lines += ["", "per rank (fp32 table weights)"]
    for rank, info in report["ranks"].items():
        lines.append(f"  rank {rank}: {_mb(info['embedding_bytes']):>12} in {len(info['tables'])} table(s)")
    lines.append(f"  imbalance (max / mean): {report['imbalance']:.3f}")
    text = "\n".join(lines) + "\n"
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plan.json").write_text(json.dumps(report, indent=2))
    (run_dir / "plan.txt").write_text(text)
    return text
