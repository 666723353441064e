"""Sharding: planner constraints from config, the collective plan, the DMP wrap, the plan report.

TorchRec's planner chooses, for every table, how to split it across ranks (whole tables, column
slices, row slices, or replicas) and which kernel runs it, by estimated cost within each rank's
memory. This module turns the sharding config into the planner's inputs and reports what it chose
(plan.txt for people, plan.json for tools).

By default (sharding.proposer=best) the planner also considers tables split into narrower column
slices than torchrec enumerates (_ColumnSplitProposer): torchrec offers one column-wise split per
table, 128 columns a shard, so a table at most 128 wide stays whole and a plan can keep no more
ranks busy than there are tables. torchrec's cost model, which rates a plan by its slowest rank,
still picks among all proposals.

TorchRec's sharder offers row_wise and table_row_wise only on CUDA. They work on CPU over gloo
(tests/integration/test_sharding_equivalence.py proves them against an unsharded model), and a
table larger than one worker's memory needs them, so our sharder allows them on CPU too.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.mc_embeddingbag import ManagedCollisionEmbeddingBagCollectionSharder
from fbgemm_gpu.quantize_comm import QuantizedCommCodec as FbgemmQuantizedCommCodec
from fbgemm_gpu.split_embedding_configs import SparseType
from torchrec.distributed.fbgemm_qcomm_codec import CommType, QCommsConfig, get_qcomm_codecs
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.constants import DDR_CAP, HBM_CAP
from torchrec.distributed.planner.partitioners import MemoryBalancedPartitioner
from torchrec.distributed.planner.proposers import GreedyProposer, GridSearchProposer, UniformProposer
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import (Enumerator, HardwareConfig, KernelConfig, PlannerError, Proposer,
                                                Shard, ShardingOption, Stats, TopologyFactory, TrainerConfig)
from torchrec.distributed.sharding_plan import calculate_shard_sizes_and_offsets
from torchrec.distributed.types import CacheParams, CommOp, QuantizedCommCodecs, ShardingPlan, ShardingType

from app.config import CUDA_ONLY_COMM_PRECISIONS, CUDA_ONLY_KERNELS, ConfigError, ShardingConfig, table_constraint
from app.config import SparseFeature
from app.features import FeatureSchema, table_name
from app.models import TABLES_PATH
from app.models.sequence import SEQUENCE_TABLES_PATH

log = logging.getLogger("app.sharding")
_GB = 1024**3
# Encodings with per-row or per-block scales: a reduce-scatter cannot sum them while encoded.
_SCALED_PRECISIONS = ("int8", "fp8", "mx4")
_CPU_EXTRA_TYPES = (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)


class _CPUCapableSharder(EmbeddingBagCollectionSharder):
    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = super().sharding_types(compute_device_type)
        return types + [t for t in _CPU_EXTRA_TYPES if t not in types]


class _CPUCapableMCSharder(ManagedCollisionEmbeddingBagCollectionSharder):
    """TorchRec's sharder of managed-collision tables (row_wise only), made to work on CPU: its
    types are those its EBC sharder and its MC sharder share, so it needs our CPU-capable EBC
    sharder to offer row_wise at all; its kernels are a fixed list whatever the device, of which
    only fused runs on CPU; and it defaults its device to CUDA where DMP passes none."""

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        if compute_device_type == "cuda":
            return super().compute_kernels(sharding_type, compute_device_type)
        return [EmbeddingComputeKernel.FUSED.value]

    def shard(self, module, params, env, device=None, module_fqn=None):
        return super().shard(module, params, env, device or torch.device("cpu"), module_fqn)


def sharders(config: ShardingConfig, device: torch.device, batch_size: int,
             sparse_clip_value: Optional[float] = None) -> list:
    """The sharders the planner and DistributedModelParallel use, with quantized communication
    codecs when the config asks for a precision below fp32 (`batch_size`: per rank), and FBGEMM's
    element-wise gradient clipping in the fused table optimizers when `sparse_clip_value` is set."""
    fused_params = None if sparse_clip_value is None else {"gradient_clipping": True,
                                                           "max_gradient": float(sparse_clip_value)}
    codecs = _qcomm_codecs(config, device, batch_size)
    tables = _CPUCapableSharder(qcomm_codecs_registry=codecs, fused_params=fused_params)
    # The managed-collision sharder is only used where the model has such tables.
    return [tables, _CPUCapableMCSharder(ebc_sharder=_CPUCapableSharder(qcomm_codecs_registry=codecs,
                                                                        fused_params=fused_params),
                                         qcomm_codecs_registry=codecs),
            # The histories' tables (features.sequence); torchrec offers its types on CPU too.
            EmbeddingCollectionSharder(qcomm_codecs_registry=codecs, fused_params=fused_params)]


class _ScaledFP16Codec(FbgemmQuantizedCommCodec):
    """fp16 gradients sent as `scale` x their value, and divided by it after decoding, in fp32.
    The loss is a mean over the rank's batch, so the gradients of pooled embeddings shrink as
    1/batch: measured on experiment=tiny's model, at 8192 rows a rank 22% of them flush to zero in
    fp16 and the rest are subnormal (17% L1 error); scaled by the batch size the error is 1.8e-4
    at any batch, with values far below fp16's maximum. (FBGEMM's own loss_scale divides the fp16
    values before decoding them, where the small ones underflow again.)"""

    def __init__(self, scale: float) -> None:
        super().__init__(comm_precision=SparseType.FP16, is_fwd=False)
        self.scale = float(scale)

    def encode(self, input_tensor: torch.Tensor, ctx=None) -> torch.Tensor:
        return super().encode(input_tensor * self.scale, ctx)

    def decode(self, input_tensor: torch.Tensor, ctx=None) -> torch.Tensor:
        return super().decode(input_tensor, ctx) / self.scale


def _qcomm_codecs(config: ShardingConfig, device: torch.device,
                  batch_size: int) -> Optional[Dict[str, QuantizedCommCodecs]]:
    """One codec pair per embedding collective. torchrec's get_qcomm_codecs_registry turns bf16
    into fp16 whenever the device is a CPU, an assumption older than gloo's bf16 all-to-all (torch
    2.13 sends bf16 over gloo; tests/integration/test_qcomms.py trains with it), so we build the
    registry here and keep only its reduce-scatter rule."""
    forward, backward = config.comm_forward_precision, config.comm_backward_precision
    if (forward, backward) == ("fp32", "fp32"):
        return None
    for key, precision in (("comm_forward_precision", forward), ("comm_backward_precision", backward)):
        if precision in CUDA_ONLY_COMM_PRECISIONS and device.type != "cuda":
            raise ConfigError(f"sharding.{key}={precision} needs CUDA (fbgemm has no CPU {precision} "
                              f"kernel), but this job runs on {device.type}; use fp16, bf16, int8 or mx4.")
    registry = {}
    for op in (CommOp.POOLED_EMBEDDINGS_ALL_TO_ALL, CommOp.POOLED_EMBEDDINGS_REDUCE_SCATTER,
               CommOp.SEQUENCE_EMBEDDINGS_ALL_TO_ALL):
        op_forward, op_backward = forward, backward
        if op == CommOp.POOLED_EMBEDDINGS_REDUCE_SCATTER:
            # torchrec's own fallbacks for fp8 and mx4, which int8 needs as well.
            op_forward = "fp16" if forward in _SCALED_PRECISIONS else forward
            op_backward = "bf16" if backward in _SCALED_PRECISIONS else backward
            if (op_forward, op_backward) != (forward, backward):
                log.info("Reduce-scatters (row_wise and table_row_wise tables) send %s forward and %s "
                         "backward: %s/%s values cannot be summed while encoded.",
                         op_forward, op_backward, forward, backward)
        qcomms = QCommsConfig(forward_precision=CommType(op_forward), backward_precision=CommType(op_backward))
        registry[op.name] = get_qcomm_codecs(qcomms)
        if op_backward == "fp16":
            registry[op.name].backward = _ScaledFP16Codec(scale=batch_size)
    return registry


def parameter_constraints(config: ShardingConfig, schema: FeatureSchema, device_type: str,
                          world_size: int = 1) -> Dict[str, ParameterConstraints]:
    """Per table: the global allowed types/kernels, narrowed by sharding.tables.<feature>; with
    sharding.balance=memory, row-wise for the tables too large to place whole."""
    constraints: Dict[str, ParameterConstraints] = {}
    for feature in schema.sparse_names:
        override = table_constraint(config.tables, feature)
        types = (override.sharding_types if override and override.sharding_types else config.sharding_types)
        kernels = (override.compute_kernels if override and override.compute_kernels else config.compute_kernels)
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


def _managed_collision_constraint(types: List[str], kernels: List[str], device_type: str,
                                  key: str) -> Tuple[List[str], List[str]]:
    """A managed-collision table: row_wise (Config.validate has refused configs that exclude it),
    and on CPU the fused kernel, the only one that runs there."""
    if device_type != "cuda":
        if kernels and EmbeddingComputeKernel.FUSED.value not in kernels:
            raise ConfigError(f"{key}.compute_kernels={list(kernels)}: a managed-collision table on CPU runs only "
                              "with the fused kernel; add fused.")
        kernels = [EmbeddingComputeKernel.FUSED.value]
    return [ShardingType.ROW_WISE.value], kernels


def _table_plans(plan: ShardingPlan) -> Dict[str, object]:
    """Every table's ParameterSharding: the plain collection's at TABLES_PATH, or, with
    managed-collision tables, those of both collections below it."""
    found: Dict[str, object] = {}
    for path, module_plan in plan.plan.items():
        if path == TABLES_PATH or path.startswith(TABLES_PATH + "."):
            found.update(module_plan)
    return found


# Types the histories' tables may take: EmbeddingCollectionSharder's, on CPU as on CUDA (proved
# against the unsharded model by tests/integration/test_sequence_sharding.py), but data_parallel:
# a replicated table would be stepped by the dense optimizer (app/optim.py splits by TABLES_PATH).
SEQUENCE_SHARDING_TYPES = (ShardingType.TABLE_WISE.value, ShardingType.COLUMN_WISE.value, ShardingType.ROW_WISE.value)


def sequence_constraints(config: ShardingConfig, schema: FeatureSchema) -> Dict[str, ParameterConstraints]:
    """The histories' tables: sharding.sharding_types (all when empty) narrowed to the types an
    EmbeddingCollection is sharded by here, and sharding.compute_kernels."""
    constraints: Dict[str, ParameterConstraints] = {}
    allowed = [t for t in (config.sharding_types or SEQUENCE_SHARDING_TYPES) if t in SEQUENCE_SHARDING_TYPES]
    for feature in schema.sequence_names:
        if not allowed:
            raise ConfigError(
                f"sharding.sharding_types={list(config.sharding_types)} leaves the sequence feature {feature!r} "
                f"(features.sequence) no type: its table (an EmbeddingCollection) is sharded "
                f"{', '.join(SEQUENCE_SHARDING_TYPES)}; allow one of them."
            )
        constraints[table_name(feature)] = ParameterConstraints(
            sharding_types=list(allowed), compute_kernels=list(config.compute_kernels) or None)
    return constraints


def _oversized(schema: FeatureSchema, world_size: int) -> List[str]:
    """Features whose table holds more than half of one rank's share of all table bytes: placed
    whole, such a table alone would unbalance memory."""
    share = sum(f.num_embeddings for f in schema.sparse) / world_size
    return [f.name for f in schema.sparse if world_size > 1 and f.num_embeddings > share / 2]


def _topology(config: ShardingConfig, device: torch.device, world_size: int, local_world_size: int,
              measured: HardwareConfig) -> Topology:
    """`measured`: this machine's memory per rank (empty for a dry run). torchrec's TopologyFactory
    resolves each cap from the config first, then `measured`, then torchrec's defaults."""
    gb = lambda value: None if value is None else int(value * _GB)  # noqa: E731
    per_ms = lambda gbps: None if gbps is None else gbps * _GB / 1000  # noqa: E731  torchrec's unit
    return TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=world_size, local_world_size=local_world_size,
                                     hbm_cap_bytes=gb(config.hbm_cap_gb), ddr_cap_bytes=gb(config.ddr_cap_gb)),
        hardware_config=HardwareConfig(hbm_cap_bytes=measured.hbm_cap_bytes, ddr_cap_bytes=measured.ddr_cap_bytes,
                                       hbm_mem_bw=per_ms(config.hbm_bw_gbps), ddr_mem_bw=per_ms(config.ddr_bw_gbps),
                                       intra_host_bw=per_ms(config.intra_host_bw_gbps),
                                       inter_host_bw=per_ms(config.inter_host_bw_gbps)),
        # use_hardware_based_bandwidth: take the bandwidths above, torchrec's defaults where None.
        kernel_config=KernelConfig(compute_device=device.type, use_hardware_based_bandwidth=True),
    )


def _measured_memory(device: torch.device, local_world_size: int) -> HardwareConfig:
    """This machine's memory per rank, for the caps sharding.hbm_cap_gb / ddr_cap_gb leave null
    (torchrec's defaults, 32 GiB HBM and 128 GiB DDR, fit no machine in particular): on CUDA the
    device's memory, and the host's memory shared by the workers of this node."""
    hbm = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    return HardwareConfig(hbm_cap_bytes=hbm, ddr_cap_bytes=_host_memory_bytes() // max(local_world_size, 1))


def _host_memory_bytes() -> int:
    """Physical memory, or the container's limit where that is lower (cgroup v2, then v1; an
    unlimited cgroup reads "max" or a number larger than the memory)."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
        break
    return total


def offline_memory_note(config: ShardingConfig, device_type: str) -> Optional[str]:
    """What a dry run assumes for the memory caps the config leaves null (None: it sets them)."""
    caps = [("HBM", "hbm_cap_gb", HBM_CAP)] if device_type == "cuda" else []
    unset = [f"{kind} {default / _GB:g} GiB" for kind, key, default in caps + [("DDR", "ddr_cap_gb", DDR_CAP)]
             if getattr(config, key) is None]
    if not unset:
        return None
    return (f"memory per rank: torchrec's default ({', '.join(unset)}) where sharding.hbm_cap_gb / ddr_cap_gb "
            "are null. A dry run does not measure the machines it plans for (training does: the device's "
            "memory, and the host's shared by its workers): set them for yours.")


def _memory_text(config: ShardingConfig, topology: Topology, measured: HardwareConfig) -> str:
    """Each memory cap the planner fills, per rank, and where it comes from."""
    storage = topology.devices[0].storage
    caps = [("DDR", storage.ddr, "ddr_cap_gb", measured.ddr_cap_bytes,
             f"the host's memory / {topology.local_world_size} worker(s)")]
    if topology.compute_device == "cuda":
        caps.insert(0, ("HBM", storage.hbm, "hbm_cap_gb", measured.hbm_cap_bytes, "the device's memory"))
    parts = []
    for kind, value, key, detected, source in caps:
        origin = f"sharding.{key}" if getattr(config, key) is not None else source if detected else "torchrec's default"
        parts.append(f"{kind} {value / _GB:.3g} GiB ({origin})")
    return ", ".join(parts)


class _ColumnSplitProposer(Proposer):
    """Proposes plans with tables split into column slices down to 4 columns wide (torchrec's
    enumerator splits at 128 columns only): with about as many slices as ranks every rank gets
    work, and a slice costs less than its whole table.

    Each table has a chain of options: its column splits from the finest (no more slices than
    ranks, none narrower than its min_partition constraint) to the coarsest, then its option of
    least total cost, of two kinds: any (a small table's replicas, often) and one not replicated
    (usually the whole table on one rank). Along each kind of chains, two walks, one table a step:
    from finest to whole, merging the most split table on the slowest rank, which frees ranks
    until about one slice per rank is left; then from whole to finest, splitting the table with
    the costliest shard on the slowest rank. A walk ends where the slowest rank has no table left
    to move, or at a proposal that does not fit in memory. The planner rates every proposal by its
    slowest rank and keeps the first of the fastest: this proposer goes before torchrec's, so of
    plans rated alike the one with the most ranks busy wins.

    Only tables the constraints allow column_wise get splits; torchrec's proposers cover the
    other types."""

    _FINEST = 4

    def __init__(self, world_size: int, min_partitions: Dict[str, int]) -> None:
        self._world_size = world_size
        self._min_partitions = min_partitions  # by table name
        # each walk: its chains by table, its step along them (+1 coarser, -1 finer), where each table is
        self._walks: List[Tuple[Dict[str, List[ShardingOption]], int, Dict[str, int]]] = []

    def load(self, search_space: List[ShardingOption], enumerator: Optional[Enumerator] = None) -> None:
        by_table: Dict[str, List[ShardingOption]] = defaultdict(list)
        for option in search_space:
            by_table[option.fqn].append(option)
        cheapest = {fqn: min(options, key=lambda o: o.total_perf) for fqn, options in by_table.items()}
        unreplicated = {fqn: min([o for o in options if o.sharding_type != ShardingType.DATA_PARALLEL.value]
                                 or options, key=lambda o: o.total_perf) for fqn, options in by_table.items()}
        column_wise = {fqn: [o for o in options if o.sharding_type == ShardingType.COLUMN_WISE.value
                             and o.compute_kernel == unreplicated[fqn].compute_kernel]
                       for fqn, options in by_table.items()}
        splits = {fqn: [split for option in options for split in self._splits(option)]
                  for fqn, options in column_wise.items()}
        if enumerator is not None:
            enumerator.populate_estimates([split for table in splits.values() for split in table])
        self._walks = []
        for wholes in ([cheapest, unreplicated] if cheapest != unreplicated else [cheapest]):
            chains = {}
            for fqn, whole in wholes.items():
                by_count = {o.num_shards: o for o in column_wise[fqn] + splits[fqn]
                            if unreplicated[fqn].num_shards < o.num_shards <= self._world_size}
                chains[fqn] = [by_count[n] for n in sorted(by_count, reverse=True)] + [whole]
            self._walks += [(chains, +1, {fqn: 0 for fqn in chains}),
                            (chains, -1, {fqn: len(chain) - 1 for fqn, chain in chains.items()})]

    def _splits(self, option: ShardingOption) -> List[ShardingOption]:
        """A column-wise option at every other width torchrec's own splits take (a multiple of 4,
        as fbgemm's kernels need, dividing the table's width); their estimates still to be made."""
        made = []
        columns = option.tensor.shape[1]
        narrowest = self._min_partitions.get(option.name, 0)
        for width in range(self._FINEST, columns, self._FINEST):
            slices = columns // width
            if width < narrowest or columns % width or slices == option.num_shards or slices > self._world_size:
                continue
            sizes, offsets = calculate_shard_sizes_and_offsets(
                option.tensor, self._world_size, self._world_size, option.sharding_type, col_wise_shard_dim=width)
            split = copy.deepcopy(option)
            split.shards = [Shard(size=size, offset=offset) for size, offset in zip(sizes, offsets)]
            made.append(split)
        return made

    def propose(self) -> Optional[List[ShardingOption]]:
        if not self._walks:
            return None
        chains, _, positions = self._walks[0]
        return [chains[fqn][index] for fqn, index in positions.items()]

    def feedback(self, partitionable: bool, plan: Optional[List[ShardingOption]] = None,
                 perf_rating: Optional[float] = None, storage_constraint: Optional[Topology] = None) -> None:
        chains, step, positions = self._walks[0]
        table = self._next_table(chains, step, positions, plan) if partitionable and plan else None
        if table is None:
            self._walks.pop(0)
        else:
            positions[table] += step

    @staticmethod
    def _next_table(chains: Dict[str, List[ShardingOption]], step: int, positions: Dict[str, int],
                    plan: List[ShardingOption]) -> Optional[str]:
        load: Dict[int, float] = defaultdict(float)
        tables_on: Dict[int, set] = defaultdict(set)
        for option in plan:
            for shard in option.shards:
                if shard.rank is not None:  # None: a plan from the planner's cache, placed before
                    load[shard.rank] += shard.perf.total
                    tables_on[shard.rank].add(option.fqn)
        slowest = max(load, key=load.get) if load else None
        movable = [fqn for fqn, index in positions.items() if 0 <= index + step < len(chains[fqn])
                   and (slowest is None or fqn in tables_on[slowest])]
        if not movable:
            return None
        current = {fqn: chains[fqn][positions[fqn]] for fqn in movable}
        if step > 0:  # merge the most split table
            return max(movable, key=lambda fqn: (current[fqn].num_shards, fqn))
        # split the table with the costliest shard
        return max(movable, key=lambda fqn: (max(s.perf.total for s in current[fqn].shards),
                                             -current[fqn].num_shards, fqn))


def _search(config: ShardingConfig, constraints: Dict[str, ParameterConstraints], world_size: int) -> dict:
    """The planner's proposers and partitioner as configured (torchrec's defaults otherwise)."""
    search = {}
    if config.proposer == "best":
        min_partitions = {name: c.min_partition for name, c in constraints.items() if c.min_partition}
        # ours first, then torchrec's defaults (EmbeddingShardingPlanner's own list)
        search["proposer"] = [_ColumnSplitProposer(world_size, min_partitions), GridSearchProposer(),
                              GreedyProposer(), GreedyProposer(use_depth=False), UniformProposer()]
    elif config.proposer == "greedy":
        search["proposer"] = [GreedyProposer()]
    elif config.proposer == "uniform":
        search["proposer"] = [UniformProposer()]
    if config.partitioner == "memory_balanced":
        search["partitioner"] = MemoryBalancedPartitioner()
    return search


class _Chosen(Stats):
    """Keeps the planner's chosen sharding options: each shard's rank, storage (HBM, DDR) and
    estimated cost, which the ShardingPlan itself does not carry. (In place of the planner's
    default stats, which log the same as a long table.)"""

    def __init__(self) -> None:
        self.options: List[ShardingOption] = []

    def log(self, sharding_plan, topology, batch_size, storage_reservation, num_proposals, num_plans,
            run_time, best_plan, *args, **kwargs) -> None:
        self.options = list(best_plan)


def _planner(config: ShardingConfig, schema: FeatureSchema, topology: Topology, batch_size: int,
             chosen: _Chosen) -> EmbeddingShardingPlanner:
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


def plan_sharding(model: nn.Module, config: ShardingConfig, schema: FeatureSchema, device: torch.device,
                  batch_size: int, world_size: int, local_world_size: int,
                  process_group) -> Tuple[ShardingPlan, List[ShardingOption]]:
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


def plan_offline(model: nn.Module, config: ShardingConfig, schema: FeatureSchema, device_type: str,
                 batch_size: int, world_size: int, local_world_size: int) -> Tuple[ShardingPlan, List[ShardingOption]]:
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


class _LocalGradients(DefaultDataParallelWrapper):
    """DDP over the dense part, as by default, but with gradients kept local (no all-reduce): for
    k-step model averaging, where the ranks average parameters instead (app/trainer.py). DDP
    still broadcasts rank 0's initial parameters, so every rank starts from the same ones. Tables
    the planner replicates (data_parallel) sit in DDPs of their own inside TorchRec's sharded
    collection, which the dense DDP does not reach: they keep their gradients local too, and are
    averaged with the dense part."""

    def wrap(self, dmp: DistributedModelParallel, env, device: torch.device) -> None:
        super().wrap(dmp, env, device)
        for ddp in data_parallel_modules(dmp):
            ddp.register_comm_hook(None, _keep_local)


def data_parallel_modules(dmp: DistributedModelParallel) -> List[DistributedDataParallel]:
    """The dense part's DDP and the replicated tables' DDPs (held in a plain list, `_lookups`,
    of each sharded collection, so not among the model's submodules)."""
    found = [dmp._dmp_wrapped_module] if isinstance(dmp._dmp_wrapped_module, DistributedDataParallel) else []
    for module in dmp.modules():
        found += [lookup for lookup in getattr(module, "_lookups", []) if isinstance(lookup, DistributedDataParallel)]
    return found


def _keep_local(state, bucket):  # no annotations: DDP checks them, and this module's are strings
    """A DDP communication hook that communicates nothing: the bucket's local gradients."""
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def shard_model(model: nn.Module, plan: ShardingPlan, config: ShardingConfig, device: torch.device,
                batch_size: int, local_dense_gradients: bool = False,
                sparse_clip_value: Optional[float] = None) -> DistributedModelParallel:
    """`batch_size`: per rank (it scales fp16 gradients in communication); `sparse_clip_value`:
    optim.sparse_clip_value."""
    wrapper = _LocalGradients() if local_dense_gradients else None
    with warnings.catch_warnings():
        # torchrec's own DDP wrap passes DDP's deprecated broadcast_buffers; nothing for us to change.
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        return DistributedModelParallel(model, device=device, plan=plan,
                                        sharders=sharders(config, device, batch_size, sparse_clip_value),
                                        data_parallel_wrapper=wrapper)


def plan_report(plan: ShardingPlan, schema: FeatureSchema, world_size: int,
                options: Optional[List[ShardingOption]] = None) -> dict:
    """What the planner decided, as plain data: per table, and per rank its tables' bytes and,
    from the chosen `options`, its planned HBM and DDR use and the planner's cost estimate."""
    features = {table_name(f.name): f for f in schema.sparse}
    features.update({table_name(f.name): SparseFeature(f.name, f.num_embeddings, embedding_dim=schema.sequence_dim(f))
                     for f in schema.sequence})  # the histories' tables (fp32), reported alike
    tables: Dict[str, dict] = {}
    rank_bytes: Dict[int, int] = defaultdict(int)
    rank_tables: Dict[int, List[str]] = defaultdict(list)
    for name, sharding in sorted({**_table_plans(plan), **plan.plan.get(SEQUENCE_TABLES_PATH, {})}.items()):
        feature = features[name]
        full = [feature.num_embeddings, schema.table_dim(feature)]
        element_bytes = 2 if schema.table_data_type(feature) == "fp16" else 4
        if sharding.sharding_spec is not None:
            shards = [
                {"rank": s.placement.rank(), "offsets": list(s.shard_offsets), "sizes": list(s.shard_sizes)}
                for s in sharding.sharding_spec.shards
            ]
        else:  # data_parallel: a full replica on every rank
            shards = [{"rank": r, "offsets": [0, 0], "sizes": full} for r in range(world_size)]
        for shard in shards:
            rank_bytes[shard["rank"]] += shard["sizes"][0] * shard["sizes"][1] * element_bytes
            rank_tables[shard["rank"]].append(name)
        tables[name] = {
            "feature": feature.name,
            "num_embeddings": feature.num_embeddings,
            "embedding_dim": full[1],
            "sharding_type": sharding.sharding_type,
            "compute_kernel": sharding.compute_kernel,
            "ranks": sorted({s["rank"] for s in shards}),
            "shards": shards,
        }
    ranks = {
        str(r): {"tables": sorted(set(rank_tables[r])), "embedding_bytes": rank_bytes[r]} for r in range(world_size)
    }
    for option in options or []:
        for shard in option.shards:
            if shard.rank is None:
                continue
            info = ranks[str(shard.rank)]
            for key, value in (("hbm_bytes", shard.storage.hbm if shard.storage else 0),
                               ("ddr_bytes", shard.storage.ddr if shard.storage else 0),
                               ("cost", shard.perf.total if shard.perf else 0.0),
                               ("compute_cost", (shard.perf.fwd_compute + shard.perf.bwd_compute) if shard.perf else 0.0),
                               ("comms_cost", (shard.perf.fwd_comms + shard.perf.bwd_comms) if shard.perf else 0.0)):
                info[key] = info.get(key, 0) + value
    report = {"world_size": world_size, "tables": tables, "ranks": ranks,
              # max over mean of per-rank table bytes: how evenly memory is spread
              "imbalance": _imbalance([rank_bytes[r] for r in range(world_size)])}
    if options:
        report["planned_memory_imbalance"] = _imbalance(
            [ranks[str(r)].get("hbm_bytes", 0) + ranks[str(r)].get("ddr_bytes", 0) for r in range(world_size)])
        costs = [ranks[str(r)].get("cost", 0.0) for r in range(world_size)]
        # The planner's own rating of a plan (torchrec's NoopPerfModel): a step waits for its slowest rank.
        report["estimated_step_ms"] = max(costs)
        report["cost_imbalance"] = _imbalance(costs)
    return report


def _imbalance(values: List[float]) -> float:
    mean = sum(values) / len(values)
    return max(values) / mean if mean else 1.0


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def format_plan_report(report: dict) -> str:
    lines = [f"sharding plan for {report['world_size']} rank(s)", ""]
    lines.append(f"{'table':<14}{'rows':>12}{'dim':>5}  {'sharding':<18}{'kernel':<8}ranks (shard rows x cols)")
    for name, table in report["tables"].items():
        shards = ", ".join(f"{s['rank']}:{s['sizes'][0]}x{s['sizes'][1]}" for s in table["shards"])
        lines.append(
            f"{name:<14}{table['num_embeddings']:>12}{table['embedding_dim']:>5}  "
            f"{table['sharding_type']:<18}{table['compute_kernel']:<8}{shards}"
        )
    lines += ["", "per rank: fp32 table weights; planned HBM and DDR (weights, optimizer state, buffers); "
              "the planner's cost estimate in ms (compute + communication)"]
    for rank, info in report["ranks"].items():
        line = f"  rank {rank}: {_mb(info['embedding_bytes']):>12} in {len(info['tables'])} table(s)"
        if "cost" in info:
            line += (f"; HBM {_mb(info['hbm_bytes'])}, DDR {_mb(info['ddr_bytes'])}; cost {info['cost']:.4g} "
                     f"(compute {info['compute_cost']:.4g}, comms {info['comms_cost']:.4g})")
        lines.append(line)
    lines.append(f"  imbalance (max / mean): table bytes {report['imbalance']:.3f}"
                 + (f", planned memory {report['planned_memory_imbalance']:.3f}, cost {report['cost_imbalance']:.3f}"
                    if "cost_imbalance" in report else ""))
    if "estimated_step_ms" in report:
        lines.append(f"  estimated step time: {report['estimated_step_ms']:.4g} ms (the planner's estimate for the "
                     "embeddings: the slowest rank's cost)")
    return "\n".join(lines) + "\n"


def write_plan_report(report: dict, run_dir: Path) -> str:
    """Writes plan.json and plan.txt into run_dir; returns the text."""
    text = format_plan_report(report)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plan.json").write_text(json.dumps(report, indent=2))
    (run_dir / "plan.txt").write_text(text)
    return text
