"""The plan: torchrec's planner with our constraints, topology and search, run collectively by
training (plan_sharding) or offline for any world size (plan_offline, a dry run)."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import HardwareConfig, PlannerError, ShardingOption
from torchrec.distributed.types import ShardingPlan

from app.config import ConfigError, ShardingConfig
from app.features import FeatureSchema
from app.sharding.constraints import parameter_constraints, sequence_constraints
from app.sharding.memory import _measured_memory, _memory_text, _topology
from app.sharding.proposer import _Chosen, _search
from app.sharding.sharders import sharders

log = logging.getLogger("app.sharding")  # the name its lines have always carried in the logs


def _planner(
    config: ShardingConfig, schema: FeatureSchema, topology: Topology, batch_size: int, chosen: _Chosen
) -> EmbeddingShardingPlanner:
    constraints = parameter_constraints(config, schema, topology.compute_device, topology.world_size)
    constraints.update(sequence_constraints(config, schema))
    return EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        storage_reservation=FixedPercentageStorageReservation(config.storage_reserve_percentage),
        constraints=constraints,
        stats=[chosen],
        **_search(config, constraints, topology.world_size),
    )


def _no_plan(config: ShardingConfig, topology: Topology, measured: HardwareConfig, error: Exception) -> ConfigError:
    return ConfigError(
        f"the sharding planner found no plan for {topology.world_size} rank(s) on {topology.compute_device} "
        f"(memory per rank: {_memory_text(config, topology, measured)}; storage_reserve_percentage="
        f"{config.storage_reserve_percentage}) within the sharding constraints. Planner said: {error}"
    )


def plan_sharding(
    model: nn.Module,
    config: ShardingConfig,
    schema: FeatureSchema,
    device: torch.device,
    batch_size: int,
    world_size: int,
    local_world_size: int,
    process_group,
) -> tuple[ShardingPlan, list[ShardingOption]]:
    """Collective: every rank calls it and gets rank 0's plan; the chosen options (for the
    report) only on rank 0, where the planner ran. Memory caps left null are this machine's."""
    chosen = _Chosen()
    measured = _measured_memory(device, local_world_size)
    topology = _topology(config, device, world_size, local_world_size, measured)
    log.info("Planner memory per rank: %s", _memory_text(config, topology, measured))
    planner = _planner(config, schema, topology, batch_size, chosen)
    try:
        return planner.collective_plan(model, sharders(config, device, batch_size), process_group), chosen.options
    except PlannerError as error:
        raise _no_plan(config, topology, measured, error) from error


def plan_offline(
    model: nn.Module,
    config: ShardingConfig,
    schema: FeatureSchema,
    device_type: str,
    batch_size: int,
    world_size: int,
    local_world_size: int,
) -> tuple[ShardingPlan, list[ShardingOption]]:
    """The plan for a world size, computed here without any process group (a dry run). It
    measures nothing: memory caps left null are torchrec's defaults (offline_memory_note)."""
    chosen = _Chosen()
    nothing_measured = HardwareConfig()
    topology = _topology(config, torch.device(device_type), world_size, local_world_size, nothing_measured)
    planner = _planner(config, schema, topology, batch_size, chosen)
    try:
        return planner.plan(model, sharders(config, torch.device(device_type), batch_size)), chosen.options
    except PlannerError as error:
        raise _no_plan(config, topology, nothing_measured, error) from error
