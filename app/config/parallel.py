"""The parallel groups: how the planner shards the tables over the ranks (sharding) and how the
workers and their process group are set up (distributed)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Dict, List, Optional

from app.config.fields import ConfigError, _require, _require_choice, doc

SHARDING_TYPES = (
    "data_parallel",
    "table_wise",
    "column_wise",
    "table_column_wise",
    "row_wise",
    "table_row_wise",
)
# Kernels by where their weights live; the ones after "fused" need CUDA (UVM, SSD-backed tables).
COMPUTE_KERNELS = ("dense", "fused", "fused_uvm", "fused_uvm_caching", "key_value")
CUDA_ONLY_KERNELS = ("fused_uvm", "fused_uvm_caching", "key_value")
# Known, so that asking for one says why it is refused rather than that it does not exist.
UNSUPPORTED_KERNELS = {
    "key_value": "its shards (FBGEMM's SSD tables, PartiallyMaterializedTensor) neither clone, so an asynchronous "
    "checkpoint fails, nor load in place, so a resumed run would silently restart these tables; it "
    "accepts optimizers FBGEMM's SSD tables refuse; and it keeps its store in a fresh temporary "
    "directory on every start. Use fused, or fused_uvm / fused_uvm_caching (CUDA) for tables larger "
    "than device memory.",
}
PROPOSERS = ("best", "default", "greedy", "uniform")
# Precisions of the embedding all-to-alls torchrec's codecs offer. fbgemm has no CPU kernel for
# fp8, so fp8 needs CUDA; the others run over gloo and NCCL.
COMM_PRECISIONS = ("fp32", "fp16", "bf16", "int8", "mx4", "fp8")
CUDA_ONLY_COMM_PRECISIONS = ("fp8",)
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "gloo", "nccl")


@dataclass
class TableConstraint:
    """Planner constraints for the tables of sharding.tables.<key>: a feature name, or a pattern
    such as "cat_*" (fnmatch) for several; a feature's own name wins over any pattern."""

    sharding_types: List[str] = doc(
        [], "Sharding types allowed for these tables, instead of sharding.sharding_types (empty: those)."
    )
    compute_kernels: List[str] = doc(
        [], "Compute kernels allowed for these tables, instead of sharding.compute_kernels (empty: those)."
    )
    min_partition: Optional[int] = doc(
        None, "Smallest column slice (column_wise / table_column_wise), in embedding dims (null: the planner's)."
    )
    cache_load_factor: Optional[float] = doc(
        None, "fused_uvm_caching: share of the table's rows cached in device memory, in (0, 1] (null: the planner's)."
    )


@dataclass
class ShardingConfig:
    sharding_types: List[str] = doc(
        [],
        f"Sharding types allowed for every table, of {', '.join(SHARDING_TYPES)} "
        "(empty: let the planner choose among all that the device supports); "
        "sharding.tables.<feature> can set others per table.",
    )
    compute_kernels: List[str] = doc(
        [],
        f"Compute kernels allowed for every table, of {', '.join(COMPUTE_KERNELS)} "
        f"({', '.join(CUDA_ONLY_KERNELS)} need CUDA: UVM, SSD-backed tables; "
        f"{', '.join(UNSUPPORTED_KERNELS)} is refused until its checkpoints "
        "round-trip; empty: let the planner choose); sharding.tables.<feature> can "
        "set others per table.",
    )
    tables: Dict[str, TableConstraint] = doc(
        {},
        "Per-table constraints, keyed by a feature name or a pattern such "
        'as "cat_*" (fnmatch); a feature\'s own name wins over any pattern.',
    )
    hbm_cap_gb: Optional[float] = doc(
        None,
        "Device (HBM) memory per rank the planner may fill, in GB (null: the "
        "CUDA device's memory; torchrec's default, 32, in a dry run).",
    )
    ddr_cap_gb: Optional[float] = doc(
        None,
        "Host (DDR) memory per rank the planner may fill, in GB (null: the "
        "host's memory, or its container's limit, divided by the workers on "
        "it; torchrec's default, 128, in a dry run).",
    )
    hbm_bw_gbps: Optional[float] = doc(
        None, "Device memory bandwidth the planner's cost model assumes, in GB/s (null: torchrec's default)."
    )
    ddr_bw_gbps: Optional[float] = doc(
        None, "Host memory bandwidth the planner's cost model assumes, in GB/s (null: torchrec's default)."
    )
    intra_host_bw_gbps: Optional[float] = doc(
        None,
        "Bandwidth between ranks of one host the planner's cost model assumes, in GB/s (null: torchrec's default).",
    )
    inter_host_bw_gbps: Optional[float] = doc(
        None, "Bandwidth between hosts the planner's cost model assumes, in GB/s (null: torchrec's default)."
    )
    proposer: str = doc(
        "best",
        "How the planner searches: best (torchrec's proposers, and tables split into "
        "column slices as narrow as 4 columns, one table at a time where the slowest rank "
        "is; the planner keeps the plan whose slowest rank it estimates fastest), default "
        "(torchrec's proposers only: grid search, greedy and uniform), greedy, or uniform "
        "(one sharding type for every table).",
    )
    partitioner: str = doc(
        "greedy",
        "How the planner places shards: greedy (by cost) or memory_balanced (the most "
        "even memory within 2% of the best cost).",
    )
    storage_reserve_percentage: float = doc(
        0.15, "Share of each rank's memory held back for the dense part, activations and buffers, in [0, 1)."
    )
    comm_forward_precision: str = doc(
        "fp32",
        "Precision of the forward embedding all-to-alls (pooled embeddings): "
        "fp16 or bf16 halve the bytes sent, int8 (per-row scale) and fp8 (CUDA "
        "only) quarter them, mx4 (4-bit blocks with a shared exponent) sends an "
        "eighth, each at a growing cost in accuracy.",
    )
    comm_backward_precision: str = doc(
        "fp32",
        "Precision of the backward embedding all-to-alls (the pooled "
        "embeddings' gradients): the choices of "
        "sharding.comm_forward_precision.",
    )
    balance: str = doc(
        "cost",
        "What the plan balances across ranks. cost: the planner's estimate of step time (its "
        "own choice; a large table may sit whole on one rank). memory: in addition, a table "
        "larger than half of one rank's share of all table bytes, and not constrained in "
        "sharding.tables, is split by rows over all ranks, so that every rank holds about "
        "the same bytes.",
    )

    def validate(self) -> None:
        self._check_lists("sharding", self.sharding_types, self.compute_kernels)
        _require_choice("sharding.comm_forward_precision", self.comm_forward_precision, COMM_PRECISIONS)
        _require_choice("sharding.comm_backward_precision", self.comm_backward_precision, COMM_PRECISIONS)
        _require_choice("sharding.balance", self.balance, ("cost", "memory"))
        for table, constraint in self.tables.items():
            self._check_lists(f"sharding.tables.{table}", constraint.sharding_types, constraint.compute_kernels)
            _require(
                constraint.min_partition is None or constraint.min_partition > 0,
                f"sharding.tables.{table}.min_partition must be > 0, got {constraint.min_partition}.",
            )
            _require(
                constraint.cache_load_factor is None or 0 < constraint.cache_load_factor <= 1,
                f"sharding.tables.{table}.cache_load_factor must be in (0, 1], got {constraint.cache_load_factor}.",
            )
        for key in (
            "hbm_cap_gb",
            "ddr_cap_gb",
            "hbm_bw_gbps",
            "ddr_bw_gbps",
            "intra_host_bw_gbps",
            "inter_host_bw_gbps",
        ):
            value = getattr(self, key)
            _require(value is None or value > 0, f"sharding.{key} must be > 0 or null, got {value}.")
        _require_choice("sharding.proposer", self.proposer, PROPOSERS)
        _require_choice("sharding.partitioner", self.partitioner, ("greedy", "memory_balanced"))
        _require(
            0.0 <= self.storage_reserve_percentage < 1.0,
            f"sharding.storage_reserve_percentage must be in [0, 1), got {self.storage_reserve_percentage}.",
        )

    @staticmethod
    def _check_lists(prefix: str, sharding_types: List[str], compute_kernels: List[str]) -> None:
        for value in sharding_types:
            _require_choice(f"{prefix}.sharding_types", value, SHARDING_TYPES)
        for value in compute_kernels:
            _require_choice(f"{prefix}.compute_kernels", value, COMPUTE_KERNELS)
            if value in UNSUPPORTED_KERNELS:
                raise ConfigError(
                    f"{prefix}.compute_kernels={value} is not supported yet: {UNSUPPORTED_KERNELS[value]}"
                )


@dataclass
class DistributedConfig:
    nproc_per_node: int = doc(
        1,
        "Workers per node that a plain process starts: >1 and not already under torchrun, "
        "train.py starts this many local workers itself "
        "(so a Hydra sweep point, or a plain `python -m app.train`, can use several "
        "processes).",
    )
    device: str = doc(
        "auto",
        "auto (CUDA when a device is visible, else CPU), cpu or cuda. On CUDA each worker "
        "uses cuda:<LOCAL_RANK>: at most one worker per visible device.",
    )
    backend: str = doc(
        "auto", "Process group backend: auto (nccl on CUDA, gloo on CPU), gloo (CPU only) or nccl (CUDA only)."
    )
    timeout_s: int = doc(1800, "Timeout of the process group's rendezvous and collectives, in seconds.")
    threads_per_worker: int = doc(
        0,
        "CPU threads of each worker's math (torch intra-op, fbgemm's CPU kernels). 0: as "
        "launched (torchrun: OMP_NUM_THREADS, 1 unless set; a plain process: torch's "
        "default, every core). More threads pay off only where cores are left over: on "
        "2 cores, 2 threads for one worker trained slower than 1 (its loader process "
        "needs a core too).",
    )

    def validate(self) -> None:
        _require(
            self.threads_per_worker >= 0,
            f"distributed.threads_per_worker must be >= 0 (0: automatic), got {self.threads_per_worker}.",
        )
        _require(self.nproc_per_node >= 1, f"distributed.nproc_per_node must be >= 1, got {self.nproc_per_node}.")
        _require_choice("distributed.device", self.device, DEVICES)
        _require_choice("distributed.backend", self.backend, BACKENDS)
        _require(self.timeout_s > 0, f"distributed.timeout_s must be > 0, got {self.timeout_s}.")


def table_constraint(tables: Dict[str, TableConstraint], feature: str) -> Optional[TableConstraint]:
    """sharding.tables' entry for a feature: its own name, else the first pattern that matches."""
    if feature in tables:
        return tables[feature]
    return next((c for key, c in tables.items() if fnmatch.fnmatchcase(feature, key)), None)
