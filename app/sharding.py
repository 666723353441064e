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
import logging
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from fbgemm_gpu.quantize_comm import QuantizedCommCodec as FbgemmQuantizedCommCodec
from fbgemm_gpu.split_embedding_configs import SparseType
from torchrec.distributed.fbgemm_qcomm_codec import CommType, QCommsConfig, get_qcomm_codecs
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.partitioners import MemoryBalancedPartitioner
from torchrec.distributed.planner.proposers import GreedyProposer, UniformProposer
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import (HardwareConfig, KernelConfig, PlannerError, ShardingOption, Stats,
                                                TopologyFactory, TrainerConfig)
from torchrec.distributed.types import CacheParams, CommOp, QuantizedCommCodecs, ShardingPlan, ShardingType

from app.config import CUDA_ONLY_COMM_PRECISIONS, CUDA_ONLY_KERNELS, ConfigError, ShardingConfig, table_constraint
from app.features import FeatureSchema, table_name
from app.model import TABLES_PATH

log = logging.getLogger("app.sharding")
_GB = 1024**3
# Encodings with per-row or per-block scales: a reduce-scatter cannot sum them while encoded.
_SCALED_PRECISIONS = ("int8", "fp8", "mx4")
_CPU_EXTRA_TYPES = (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)


class _CPUCapableSharder(EmbeddingBagCollectionSharder):
    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = super().sharding_types(compute_device_type)
        return types + [t for t in _CPU_EXTRA_TYPES if t not in types]


def sharders(config: ShardingConfig, device: torch.device, batch_size: int) -> list:
    """The sharders the planner and DistributedModelParallel use, with quantized communication
    codecs when the config asks for a precision below fp32 (`batch_size`: per rank)."""
    return [_CPUCapableSharder(qcomm_codecs_registry=_qcomm_codecs(config, device, batch_size))]


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
        if types or kernels or extra:
            constraints[table_name(feature)] = ParameterConstraints(
                sharding_types=list(types) or None, compute_kernels=list(kernels) or None, **extra
            )
    return constraints


def _oversized(schema: FeatureSchema, world_size: int) -> List[str]:
    """Features whose table holds more than half of one rank's share of all table bytes: placed
    whole, such a table alone would unbalance memory."""
    share = sum(f.num_embeddings for f in schema.sparse) / world_size
    return [f.name for f in schema.sparse if world_size > 1 and f.num_embeddings > share / 2]


def _topology(config: ShardingConfig, device: torch.device, world_size: int, local_world_size: int) -> Topology:
    gb = lambda value: None if value is None else int(value * _GB)  # noqa: E731
    per_ms = lambda gbps: None if gbps is None else gbps * _GB / 1000  # noqa: E731  torchrec's unit
    return TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=world_size, local_world_size=local_world_size,
                                     hbm_cap_bytes=gb(config.hbm_cap_gb), ddr_cap_bytes=gb(config.ddr_cap_gb)),
        hardware_config=HardwareConfig(hbm_mem_bw=per_ms(config.hbm_bw_gbps), ddr_mem_bw=per_ms(config.ddr_bw_gbps),
                                       intra_host_bw=per_ms(config.intra_host_bw_gbps),
                                       inter_host_bw=per_ms(config.inter_host_bw_gbps)),
        # use_hardware_based_bandwidth: take the bandwidths above, torchrec's defaults where None.
        kernel_config=KernelConfig(compute_device=device.type, use_hardware_based_bandwidth=True),
    )


def _search(config: ShardingConfig) -> dict:
    """The planner's proposer and partitioner as configured (torchrec's defaults otherwise)."""
    search = {}
    if config.proposer == "greedy":
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


def _planner(config: ShardingConfig, schema: FeatureSchema, device_type: str, batch_size: int,
             world_size: int, local_world_size: int, chosen: _Chosen) -> EmbeddingShardingPlanner:
    return EmbeddingShardingPlanner(
        topology=_topology(config, torch.device(device_type), world_size, local_world_size),
        batch_size=batch_size,
        storage_reservation=FixedPercentageStorageReservation(config.storage_reserve_percentage),
        constraints=parameter_constraints(config, schema, device_type, world_size),
        stats=[chosen],
        **_search(config),
    )


def _no_plan(config: ShardingConfig, world_size: int, device_type: str, error: Exception) -> ConfigError:
    caps = f"hbm_cap_gb={config.hbm_cap_gb}, ddr_cap_gb={config.ddr_cap_gb}"
    return ConfigError(
        f"the sharding planner found no plan for {world_size} rank(s) on {device_type} ({caps}, "
        f"storage_reserve_percentage={config.storage_reserve_percentage}) within the sharding "
        f"constraints. Planner said: {error}"
    )


def plan_sharding(model: nn.Module, config: ShardingConfig, schema: FeatureSchema, device: torch.device,
                  batch_size: int, world_size: int, local_world_size: int,
                  process_group) -> Tuple[ShardingPlan, List[ShardingOption]]:
    """Collective: every rank calls it and gets rank 0's plan; the chosen options (for the
    report) only on rank 0, where the planner ran."""
    chosen = _Chosen()
    planner = _planner(config, schema, device.type, batch_size, world_size, local_world_size, chosen)
    try:
        return planner.collective_plan(model, sharders(config, device, batch_size), process_group), chosen.options
    except PlannerError as error:
        raise _no_plan(config, world_size, device.type, error) from error


def plan_offline(model: nn.Module, config: ShardingConfig, schema: FeatureSchema, device_type: str,
                 batch_size: int, world_size: int, local_world_size: int) -> Tuple[ShardingPlan, List[ShardingOption]]:
    """The plan for a world size, computed here without any process group (a dry run)."""
    chosen = _Chosen()
    planner = _planner(config, schema, device_type, batch_size, world_size, local_world_size, chosen)
    try:
        return planner.plan(model, sharders(config, torch.device(device_type), batch_size)), chosen.options
    except PlannerError as error:
        raise _no_plan(config, world_size, device_type, error) from error


class _LocalGradients(DefaultDataParallelWrapper):
    """DDP over the dense part, as by default, but with gradients kept local (no all-reduce): for
    k-step model averaging, where the ranks average parameters instead (app/trainer.py). DDP
    still broadcasts rank 0's initial parameters, so every rank starts from the same ones. Tables
    the planner replicates (data_parallel) sit in DDPs of their own inside TorchRec's sharded
    collection, which the dense DDP does not reach: they keep their gradients local too, and are
    averaged with the dense part."""

    def wrap(self, dmp: DistributedModelParallel, env, device: torch.device) -> None:
        super().wrap(dmp, env, device)
        for ddp in _data_parallel_modules(dmp):
            ddp.register_comm_hook(None, _keep_local)


def _data_parallel_modules(dmp: DistributedModelParallel) -> List[DistributedDataParallel]:
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
                batch_size: int, local_dense_gradients: bool = False) -> DistributedModelParallel:
    """`batch_size`: per rank (it scales fp16 gradients in communication)."""
    wrapper = _LocalGradients() if local_dense_gradients else None
    with warnings.catch_warnings():
        # torchrec's own DDP wrap passes DDP's deprecated broadcast_buffers; nothing for us to change.
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        return DistributedModelParallel(model, device=device, plan=plan, sharders=sharders(config, device, batch_size),
                                        data_parallel_wrapper=wrapper)


def plan_report(plan: ShardingPlan, schema: FeatureSchema, world_size: int,
                options: Optional[List[ShardingOption]] = None) -> dict:
    """What the planner decided, as plain data: per table, and per rank its tables' bytes and,
    from the chosen `options`, its planned HBM and DDR use and the planner's cost estimate."""
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
        report["cost_imbalance"] = _imbalance([ranks[str(r)].get("cost", 0.0) for r in range(world_size)])
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
              "the planner's cost estimate (compute + communication)"]
    for rank, info in report["ranks"].items():
        line = f"  rank {rank}: {_mb(info['embedding_bytes']):>12} in {len(info['tables'])} table(s)"
        if "cost" in info:
            line += (f"; HBM {_mb(info['hbm_bytes'])}, DDR {_mb(info['ddr_bytes'])}; cost {info['cost']:.4g} "
                     f"(compute {info['compute_cost']:.4g}, comms {info['comms_cost']:.4g})")
        lines.append(line)
    lines.append(f"  imbalance (max / mean): table bytes {report['imbalance']:.3f}"
                 + (f", planned memory {report['planned_memory_imbalance']:.3f}, cost {report['cost_imbalance']:.3f}"
                    if "cost_imbalance" in report else ""))
    return "\n".join(lines) + "\n"


def write_plan_report(report: dict, run_dir: Path) -> str:
    """Writes plan.json and plan.txt into run_dir; returns the text."""
    text = format_plan_report(report)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plan.json").write_text(json.dumps(report, indent=2))
    (run_dir / "plan.txt").write_text(text)
    return text
