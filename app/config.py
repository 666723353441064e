"""Typed configuration schema: one dataclass per Hydra config group.

Hydra merges the YAML files in configs/ onto these dataclasses (app/hydra_edge.py registers them),
so an unknown key or a value of the wrong type fails at start-up with the key's name.
`Config.validate()` (run once, at the edge) rejects values that are well-typed but impossible, with a
sentence saying what is allowed. Nothing here imports Hydra, OmegaConf or the rest of `app` (but
the error base class), and nothing below the entrypoints sees an OmegaConf object: they receive
these plain dataclasses.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from app.errors import UserError

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
SPARSE_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam")
DENSE_OPTIMIZERS = ("sgd", "adagrad", "adam")
LR_DECAYS = ("none", "linear", "cosine")
MODEL_ARCHS = ("dlrm", "dcn")
POOLINGS = ("sum", "mean")
PIPELINES = ("sparse_dist", "base")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "gloo", "nccl")


# Precisions of the embedding all-to-alls torchrec's codecs offer. fbgemm has no CPU kernel for
# fp8, so fp8 needs CUDA; the others run over gloo and NCCL.
COMM_PRECISIONS = ("fp32", "fp16", "bf16", "int8", "mx4", "fp8")
CUDA_ONLY_COMM_PRECISIONS = ("fp8",)


class ConfigError(UserError, ValueError):
    """A configuration value that is well-typed but cannot work; the message names the key."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _require_choice(key: str, value: str, allowed: tuple) -> None:
    _require(value in allowed, f"{key}={value!r} is not allowed; choose one of {', '.join(allowed)}.")


@dataclass
class SparseFeature:
    name: str = ""
    num_embeddings: int = 0
    # Ids per row: 1 is a single-hot int64 column; >1 is a list<int64> column (multi-hot) whose
    # rows hold up to this many ids (used by the synthetic generator; the loader takes any length).
    hotness: int = 1


@dataclass
class FeaturesConfig:
    label: str = "label"
    dense: List[str] = field(default_factory=list)
    sparse: List[SparseFeature] = field(default_factory=list)
    # One width for every table: DLRM's dot interaction and DCN's stacking both need it.
    embedding_dim: int = 16
    pooling: str = "sum"

    def validate(self) -> None:
        _require(len(self.sparse) > 0, "features.sparse must list at least one sparse feature.")
        _require(
            self.embedding_dim > 0 and self.embedding_dim % 4 == 0,
            f"features.embedding_dim={self.embedding_dim} is not valid: FBGEMM's embedding kernels "
            "need a positive multiple of 4.",
        )
        _require_choice("features.pooling", self.pooling, POOLINGS)
        names = [self.label, *self.dense, *(f.name for f in self.sparse)]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        _require(not duplicates, f"features: column names must be unique; repeated: {duplicates}.")
        for i, feature in enumerate(self.sparse):
            key = f"features.sparse[{i}]"
            _require(bool(feature.name), f"{key}.name must be a non-empty column name.")
            _require(
                feature.num_embeddings > 0,
                f"{key}.num_embeddings must be > 0 (rows of the {feature.name!r} table), "
                f"got {feature.num_embeddings}.",
            )
            _require(feature.hotness >= 1, f"{key}.hotness must be >= 1, got {feature.hotness}.")


@dataclass
class ModelConfig:
    arch: str = "dlrm"
    # The dense arch maps the dense features to one embedding-sized vector, so its last size must
    # equal features.embedding_dim; the over arch ends in one logit.
    dense_arch_layer_sizes: List[int] = field(default_factory=lambda: [64, 16])
    over_arch_layer_sizes: List[int] = field(default_factory=lambda: [64, 32, 1])
    dcn_num_layers: int = 3
    dcn_low_rank_dim: int = 32

    def validate(self) -> None:
        _require_choice("model.arch", self.arch, MODEL_ARCHS)
        for key in ("dense_arch_layer_sizes", "over_arch_layer_sizes"):
            sizes = getattr(self, key)
            _require(
                len(sizes) > 0 and all(s > 0 for s in sizes),
                f"model.{key} must be a non-empty list of positive sizes, got {list(sizes)}.",
            )
        _require(
            len(self.over_arch_layer_sizes) >= 2 and self.over_arch_layer_sizes[-1] == 1,
            "model.over_arch_layer_sizes must have at least two layers and end in 1 (one logit), "
            f"got {list(self.over_arch_layer_sizes)}.",
        )
        _require(self.dcn_num_layers > 0, f"model.dcn_num_layers must be > 0, got {self.dcn_num_layers}.")
        _require(
            self.dcn_low_rank_dim > 0, f"model.dcn_low_rank_dim must be > 0, got {self.dcn_low_rank_dim}."
        )


@dataclass
class SyntheticConfig:
    """The embedded default dataset, generated on first use (see app/data/synthetic.py)."""

    root: str = "data/synthetic"
    train_rows: int = 1_000_000
    val_rows: int = 100_000
    test_rows: int = 0  # a held-out split beside train and val (0: none)
    rows_per_file: int = 250_000
    rows_per_row_group: int = 25_000
    seed: int = 1234
    # Exponent of the power law ids are drawn from: larger is more skewed.
    zipf_exponent: float = 1.1

    def validate(self) -> None:
        for key in ("train_rows", "val_rows", "rows_per_file", "rows_per_row_group"):
            _require(getattr(self, key) > 0, f"data.synthetic.{key} must be > 0, got {getattr(self, key)}.")
        _require(self.test_rows >= 0, f"data.synthetic.test_rows must be >= 0, got {self.test_rows}.")
        _require(self.zipf_exponent > 0, f"data.synthetic.zipf_exponent must be > 0, got {self.zipf_exponent}.")


@dataclass
class DataConfig:
    # "synthetic": generate (once) and use the planted dataset under data.synthetic.root;
    # "parquet": read train_path / val_path (a directory of .parquet files, one file, or a glob).
    source: str = "synthetic"
    train_path: str = ""
    val_path: str = ""
    batch_size: int = 512  # per rank
    eval_batch_size: int = 2048  # per rank
    # Training order changes every epoch (by seed and epoch): row groups are shuffled, and rows are
    # mixed within windows of shuffle_window consecutive row groups (the shuffle buffer: memory
    # and mixing both grow with it).
    shuffle: bool = True
    shuffle_window: int = 4
    seed: int = 0
    # Shuffle windows read and decoded ahead of training by a worker process (0: read in the
    # training process itself, between steps).
    prefetch_windows: int = 2
    # Values that cannot be trained on as they are: "error" stops with the file, row group, row and
    # column; "hash" maps an id outside [0, num_embeddings) to id mod num_embeddings (and drops a
    # null id inside a multi-hot list: there is nothing to hash); "fill"
    # replaces NaN, inf and null dense values with dense_fill_value. Bad labels always stop.
    invalid_ids: str = "error"
    invalid_dense: str = "error"
    dense_fill_value: float = 0.0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def validate(self) -> None:
        _require_choice("data.source", self.source, ("synthetic", "parquet"))
        if self.source == "parquet":
            _require(bool(self.train_path), "data.train_path must be set when data.source=parquet.")
            _require(bool(self.val_path), "data.val_path must be set when data.source=parquet.")
        _require(self.batch_size > 0, f"data.batch_size must be > 0, got {self.batch_size}.")
        _require(self.eval_batch_size > 0, f"data.eval_batch_size must be > 0, got {self.eval_batch_size}.")
        _require(self.prefetch_windows >= 0, f"data.prefetch_windows must be >= 0, got {self.prefetch_windows}.")
        _require(self.shuffle_window > 0, f"data.shuffle_window must be > 0 row groups, got {self.shuffle_window}.")
        _require_choice("data.invalid_ids", self.invalid_ids, ("error", "hash"))
        _require_choice("data.invalid_dense", self.invalid_dense, ("error", "fill"))


@dataclass
class TableConstraint:
    """Planner constraints for the tables of sharding.tables.<key>: a feature name, or a pattern
    such as "cat_*" (fnmatch) for several; a feature's own name wins over any pattern."""

    sharding_types: List[str] = field(default_factory=list)
    compute_kernels: List[str] = field(default_factory=list)
    # Smallest column slice (column_wise / table_column_wise), in embedding dims.
    min_partition: Optional[int] = None
    # fused_uvm_caching: share of the table's rows cached in device memory.
    cache_load_factor: Optional[float] = None


@dataclass
class ShardingConfig:
    # Allowed sharding types / kernels for every table (empty: let the planner choose among all
    # that the device supports); sharding.tables.<feature> narrows them per table.
    sharding_types: List[str] = field(default_factory=list)
    compute_kernels: List[str] = field(default_factory=list)
    tables: Dict[str, TableConstraint] = field(default_factory=dict)
    # Memory per rank the planner may fill (GB); None uses torchrec's topology defaults.
    hbm_cap_gb: Optional[float] = None
    ddr_cap_gb: Optional[float] = None
    # Bandwidths the planner's cost model assumes, in GB/s (null: torchrec's defaults).
    hbm_bw_gbps: Optional[float] = None
    ddr_bw_gbps: Optional[float] = None
    intra_host_bw_gbps: Optional[float] = None
    inter_host_bw_gbps: Optional[float] = None
    # How the planner searches. proposer: "default" (torchrec's greedy and uniform proposers),
    # "greedy" or "uniform" (one sharding type for every table). partitioner: "greedy" (places
    # shards by cost) or "memory_balanced" (the most even memory within 2% of the best cost).
    proposer: str = "default"
    partitioner: str = "greedy"
    # Share of each rank's memory held back for the dense part, activations and buffers.
    storage_reserve_percentage: float = 0.15
    # Precision of the embedding all-to-alls (pooled embeddings forward, their gradients
    # backward): fp16 or bf16 halve the bytes sent, int8 (per-row scale) and fp8 (CUDA only)
    # quarter them, mx4 (4-bit blocks with a shared exponent) sends an eighth, each at a growing
    # cost in accuracy.
    comm_forward_precision: str = "fp32"
    comm_backward_precision: str = "fp32"
    # What the plan balances across ranks. "cost": the planner's estimate of step time (its own
    # choice; a large table may sit whole on one rank). "memory": in addition, a table larger than
    # half of one rank's share of all table bytes, and not constrained in sharding.tables, is
    # split by rows over all ranks, so that every rank holds about the same bytes.
    balance: str = "cost"

    def validate(self) -> None:
        self._check_lists("sharding", self.sharding_types, self.compute_kernels)
        _require_choice("sharding.comm_forward_precision", self.comm_forward_precision, COMM_PRECISIONS)
        _require_choice("sharding.comm_backward_precision", self.comm_backward_precision, COMM_PRECISIONS)
        _require_choice("sharding.balance", self.balance, ("cost", "memory"))
        for table, constraint in self.tables.items():
            self._check_lists(f"sharding.tables.{table}", constraint.sharding_types, constraint.compute_kernels)
            _require(constraint.min_partition is None or constraint.min_partition > 0,
                     f"sharding.tables.{table}.min_partition must be > 0, got {constraint.min_partition}.")
            _require(constraint.cache_load_factor is None or 0 < constraint.cache_load_factor <= 1,
                     f"sharding.tables.{table}.cache_load_factor must be in (0, 1], got {constraint.cache_load_factor}.")
        for key in ("hbm_cap_gb", "ddr_cap_gb", "hbm_bw_gbps", "ddr_bw_gbps", "intra_host_bw_gbps", "inter_host_bw_gbps"):
            value = getattr(self, key)
            _require(value is None or value > 0, f"sharding.{key} must be > 0 or null, got {value}.")
        _require_choice("sharding.proposer", self.proposer, ("default", "greedy", "uniform"))
        _require_choice("sharding.partitioner", self.partitioner, ("greedy", "memory_balanced"))
        _require(
            0.0 <= self.storage_reserve_percentage < 1.0,
            "sharding.storage_reserve_percentage must be in [0, 1), "
            f"got {self.storage_reserve_percentage}.",
        )

    @staticmethod
    def _check_lists(prefix: str, sharding_types: List[str], compute_kernels: List[str]) -> None:
        for value in sharding_types:
            _require_choice(f"{prefix}.sharding_types", value, SHARDING_TYPES)
        for value in compute_kernels:
            _require_choice(f"{prefix}.compute_kernels", value, COMPUTE_KERNELS)


@dataclass
class OptimConfig:
    # `lr` drives both optimizers unless sparse_lr is set, so `optim.lr=...` sweeps the whole model.
    lr: float = 0.01
    sparse_lr: Optional[float] = None
    dense: str = "adagrad"
    sparse: str = "rowwise_adagrad"
    eps: float = 1e-8
    weight_decay: float = 0.0  # L2 on the dense layers; tables get none (see app/optim.py)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    # Schedule (a multiplier on both learning rates): linear warmup from 0, then constant until
    # decay_start_step, then decay over decay_steps (0: until the last step) to min_lr_ratio.
    warmup_steps: int = 0
    decay: str = "none"
    decay_start_step: int = 0
    decay_steps: int = 0
    min_lr_ratio: float = 0.0

    def validate(self) -> None:
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}.")
        _require(
            self.sparse_lr is None or self.sparse_lr > 0,
            f"optim.sparse_lr must be > 0 or null (use optim.lr), got {self.sparse_lr}.",
        )
        _require_choice("optim.dense", self.dense, DENSE_OPTIMIZERS)
        _require_choice("optim.sparse", self.sparse, SPARSE_OPTIMIZERS)
        _require(self.eps > 0, f"optim.eps must be > 0, got {self.eps}.")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}.")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}.",
        )
        _require_choice("optim.decay", self.decay, LR_DECAYS)
        for key in ("warmup_steps", "decay_start_step", "decay_steps"):
            _require(getattr(self, key) >= 0, f"optim.{key} must be >= 0, got {getattr(self, key)}.")
        _require(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")

    @property
    def effective_sparse_lr(self) -> float:
        return self.lr if self.sparse_lr is None else self.sparse_lr


@dataclass
class CheckpointConfig:
    every_n_steps: int = 100  # 0: only at the end
    keep_last: int = 2
    # Resume from the newest intact checkpoint of this run when there is one.
    resume: bool = True
    # Write checkpoints in the background while training goes on (the state is copied first).
    async_save: bool = False
    # Start a run that has no checkpoint of its own from another run's: a run directory, its
    # checkpoints/ directory or one step_N directory. load_mode "all" continues that run's step,
    # optimizer state, LR schedule and data position; "model" takes its weights only.
    load_from: Optional[str] = None
    load_mode: str = "all"

    def validate(self) -> None:
        _require(self.every_n_steps >= 0, f"checkpoint.every_n_steps must be >= 0, got {self.every_n_steps}.")
        _require(self.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {self.keep_last}.")
        _require_choice("checkpoint.load_mode", self.load_mode, ("all", "model"))


@dataclass
class TrainerConfig:
    epochs: int = 1
    max_steps: Optional[int] = None  # stop early after this many steps in total
    eval_every_n_steps: int = 0  # 0: evaluate only at the end
    eval_max_batches: Optional[int] = None  # per rank; None: the whole validation split
    log_every_n_steps: int = 20
    pipeline: str = "sparse_dist"
    # 0: the dense part's gradients are all-reduced every step (synchronous data parallel).
    # k > 0: each rank steps its dense part on its own gradients, and the ranks average their
    # dense parameters every k steps (and before every evaluation and checkpoint): k-step model
    # averaging, 1/k of the dense all-reduces. Embedding tables stay sharded and exact.
    dense_average_every: int = 0

    def validate(self) -> None:
        _require(self.epochs >= 1, f"trainer.epochs must be >= 1, got {self.epochs}.")
        _require(self.dense_average_every >= 0,
                 f"trainer.dense_average_every must be >= 0 steps, got {self.dense_average_every}.")
        _require(
            self.max_steps is None or self.max_steps >= 1,
            f"trainer.max_steps must be >= 1 or null, got {self.max_steps}.",
        )
        _require(
            self.eval_every_n_steps >= 0, f"trainer.eval_every_n_steps must be >= 0, got {self.eval_every_n_steps}."
        )
        _require(
            self.eval_max_batches is None or self.eval_max_batches >= 1,
            f"trainer.eval_max_batches must be >= 1 or null, got {self.eval_max_batches}.",
        )
        _require(self.log_every_n_steps >= 1, f"trainer.log_every_n_steps must be >= 1, got {self.log_every_n_steps}.")
        _require_choice("trainer.pipeline", self.pipeline, PIPELINES)


@dataclass
class LoggingConfig:
    progress_bar: bool = True
    tensorboard: bool = True
    level: str = "INFO"

    def validate(self) -> None:
        _require_choice("logging.level", self.level, ("DEBUG", "INFO", "WARNING", "ERROR"))


@dataclass
class DistributedConfig:
    # >1 and not already under torchrun: train.py starts this many local workers itself (so a
    # Hydra sweep point, or a plain `python -m app.train`, can use several processes).
    nproc_per_node: int = 1
    device: str = "auto"
    backend: str = "auto"
    timeout_s: int = 1800
    # CPU threads of each worker's math (torch intra-op, fbgemm's CPU kernels). 0: as launched
    # (torchrun: OMP_NUM_THREADS, 1 unless set; a plain process: torch's default, every core).
    # More threads pay off only where cores are left over: on 2 cores, 2 threads for one worker
    # trained slower than 1 (its loader process needs a core too).
    threads_per_worker: int = 0

    def validate(self) -> None:
        _require(self.threads_per_worker >= 0,
                 f"distributed.threads_per_worker must be >= 0 (0: automatic), got {self.threads_per_worker}.")
        _require(self.nproc_per_node >= 1, f"distributed.nproc_per_node must be >= 1, got {self.nproc_per_node}.")
        _require_choice("distributed.device", self.device, DEVICES)
        _require_choice("distributed.backend", self.backend, BACKENDS)
        _require(self.timeout_s > 0, f"distributed.timeout_s must be > 0, got {self.timeout_s}.")


@dataclass
class Config:
    run_name: str = "default"
    seed: int = 0
    output_root: str = "outputs"
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self) -> "Config":
        """Check every group, then the rules that span groups; returns self for chaining."""
        for group in GROUP_SCHEMAS:
            getattr(self, group).validate()
        self.data.synthetic.validate()
        _require(
            bool(self.run_name) and "/" not in self.run_name and self.run_name not in (".", ".."),
            f"run_name={self.run_name!r} must be a non-empty name without '/'.",
        )
        _require(
            self.model.dense_arch_layer_sizes[-1] == self.features.embedding_dim,
            f"model.dense_arch_layer_sizes must end in features.embedding_dim={self.features.embedding_dim} "
            f"(the dense vector joins the embeddings), got {list(self.model.dense_arch_layer_sizes)}.",
        )
        _require(len(self.features.dense) > 0, "features.dense must list at least one dense column.")
        feature_names = {f.name for f in self.features.sparse}
        unknown = sorted(k for k in self.sharding.tables if not fnmatch.filter(feature_names, k))
        _require(
            not unknown,
            f"sharding.tables names unknown features {unknown} (no sparse feature matches); the sparse "
            f"features are {sorted(feature_names)}.",
        )
        return self


# Groups whose YAML files in configs/ are typed by these schemas.
GROUP_SCHEMAS = {
    "features": FeaturesConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "sharding": ShardingConfig,
    "optim": OptimConfig,
    "checkpoint": CheckpointConfig,
    "trainer": TrainerConfig,
    "logging": LoggingConfig,
    "distributed": DistributedConfig,
}


def table_constraint(tables: Dict[str, TableConstraint], feature: str) -> Optional[TableConstraint]:
    """sharding.tables' entry for a feature: its own name, else the first pattern that matches."""
    if feature in tables:
        return tables[feature]
    return next((c for key, c in tables.items() if fnmatch.fnmatchcase(feature, key)), None)
