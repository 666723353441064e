"""Typed configuration schema: one dataclass per Hydra config group, `Config` of them all.

The groups live by theme in features.py (features), data.py (data), training.py (model, optim,
checkpoint, trainer, logging) and parallel.py (sharding, distributed); fields.py has what they are
built from.

Hydra merges the YAML files in configs/ onto these dataclasses (app/hydra_edge.py registers them),
so an unknown key or a value of the wrong type fails at start-up with the key's name.
`Config.validate()` (run once, at the edge) rejects values that are well-typed but impossible, with a
sentence saying what is allowed. Nothing here imports Hydra, OmegaConf or the rest of `app` (but
the error base class), and nothing below the entrypoints sees an OmegaConf object: they receive
these plain dataclasses.

The dataclasses are the one source of defaults: a group option in configs/ holds only what it
changes. Every field documents itself (`doc`); `python -m app.train --help` lists every key with its
type, default and that text (`field_docs`, rendered by app/hydra_edge.py).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import typing
from dataclasses import dataclass
from typing import Dict, Iterator

from app.config.data import DataConfig, SyntheticConfig
from app.config.features import (
    ID_MAPPINGS,
    POOLINGS,
    FeaturesConfig,
    ManagedCollisionConfig,
    SequenceFeature,
    SparseFeature,
    TaskLabel,
)
from app.config.fields import ConfigError, FieldDoc, _require, doc, doc_factory, require_finite
from app.config.fields import field_docs as _field_docs
from app.config.parallel import (
    BACKENDS,
    COMM_PRECISIONS,
    COMPUTE_KERNELS,
    CUDA_ONLY_COMM_PRECISIONS,
    CUDA_ONLY_KERNELS,
    DEVICES,
    SHARDING_TYPES,
    DistributedConfig,
    ShardingConfig,
    TableConstraint,
    table_constraint,
)
from app.config.training import (
    DENSE_OPTIMIZERS,
    EARLY_STOPPING_METRICS,
    HIGHER_IS_BETTER,
    LR_DECAYS,
    MODEL_ARCHS,
    MULTI_TASK_ARCHS,
    PIPELINES,
    SPARSE_OPTIMIZERS,
    CheckpointConfig,
    EarlyStoppingConfig,
    LoggingConfig,
    MlflowConfig,
    ModelConfig,
    OptimConfig,
    TrainerConfig,
)

# The package's interface: the groups' dataclasses, their allowed values, and the checks and docs built on them.
__all__ = [
    "BACKENDS",
    "COMM_PRECISIONS",
    "COMPUTE_KERNELS",
    "CUDA_ONLY_COMM_PRECISIONS",
    "CUDA_ONLY_KERNELS",
    "DENSE_OPTIMIZERS",
    "DEVICES",
    "EARLY_STOPPING_METRICS",
    "GROUP_SCHEMAS",
    "HIGHER_IS_BETTER",
    "ID_MAPPINGS",
    "LR_DECAYS",
    "MODEL_ARCHS",
    "MULTI_TASK_ARCHS",
    "PIPELINES",
    "POOLINGS",
    "SHARDING_TYPES",
    "SPARSE_OPTIMIZERS",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "EarlyStoppingConfig",
    "FeaturesConfig",
    "FieldDoc",
    "LoggingConfig",
    "ManagedCollisionConfig",
    "MlflowConfig",
    "ModelConfig",
    "OptimConfig",
    "SequenceFeature",
    "ShardingConfig",
    "SparseFeature",
    "SyntheticConfig",
    "TableConstraint",
    "TaskLabel",
    "TrainerConfig",
    "check_run_location",
    "field_docs",
    "table_constraint",
]


@dataclass
class Config:
    run_name: str = doc(
        "default",
        "The run directory is <output_root>/<run_name>; running again with the same name "
        "resumes it. A name, without '/'.",
    )
    seed: int = doc(0, "Seed of torch's generator: the model's initial weights.")
    output_root: str = doc("outputs", "Directory the run directories are made in.")
    features: FeaturesConfig = doc_factory(
        FeaturesConfig,
        "The dataset's columns: label, dense columns, sparse features with their table sizes, embedding width.",
    )
    model: ModelConfig = doc_factory(ModelConfig, "The network: DLRM's dense and over arches and its interaction.")
    data: DataConfig = doc_factory(DataConfig, "Where the data comes from and how it is batched and shuffled.")
    sharding: ShardingConfig = doc_factory(
        ShardingConfig, "How the planner shards the embedding tables over the ranks."
    )
    optim: OptimConfig = doc_factory(OptimConfig, "Optimizers, learning rates and their schedule.")
    checkpoint: CheckpointConfig = doc_factory(
        CheckpointConfig, "When checkpoints are saved, how many are kept, and what a run starts from."
    )
    trainer: TrainerConfig = doc_factory(
        TrainerConfig, "Epochs, steps, evaluation and logging cadence, the train pipeline."
    )
    logging: LoggingConfig = doc_factory(LoggingConfig, "Console, log files, TensorBoard and MLflow.")
    distributed: DistributedConfig = doc_factory(
        DistributedConfig, "Workers, device, process group backend and CPU threads."
    )

    def validate(self) -> Config:
        """Check every group, then the rules that span groups; returns self for chaining."""
        require_finite(self)
        for group in GROUP_SCHEMAS:
            getattr(self, group).validate()
        self.data.synthetic.validate()
        check_run_location(self.output_root, self.run_name)
        _require(
            self.model.dense_arch_layer_sizes[-1] == self.features.embedding_dim,
            f"model.dense_arch_layer_sizes must end in features.embedding_dim={self.features.embedding_dim} "
            f"(the dense vector joins the embeddings), got {list(self.model.dense_arch_layer_sizes)}.",
        )
        _require(len(self.features.dense) > 0, "features.dense must list at least one dense column.")
        too_large = [f.name for f in self.features.sparse if f.num_embeddings > 2**self.data.synthetic.id_bits]
        _require(
            self.data.synthetic.id_bits == 0 or not too_large,
            f"data.synthetic.id_bits={self.data.synthetic.id_bits}: 2**{self.data.synthetic.id_bits} raw ids cannot "
            f"hold the rows of {too_large} distinctly; use more bits (or 0: ids are table rows).",
        )
        self._check_managed_collision_sharding()
        feature_names = {f.name for f in self.features.sparse}
        unknown = sorted(k for k in self.sharding.tables if not fnmatch.filter(feature_names, k))
        _require(
            not unknown,
            f"sharding.tables names unknown features {unknown} (no sparse feature matches); the sparse "
            f"features are {sorted(feature_names)}.",
        )
        _require(
            not (self.features.sequence and self.data.synthetic.id_bits),
            f"data.synthetic.id_bits={self.data.synthetic.id_bits} with features.sequence: the generator writes "
            "histories as table rows only; use data.synthetic.id_bits=0.",
        )
        self._validate_tasks()
        return self

    def _validate_tasks(self) -> None:
        task = self.trainer.early_stopping.task
        tasks = self.features.tasks()
        _require(
            task is None or (len(tasks) > 1 and task in tasks),
            f"trainer.early_stopping.task={task!r} is not a task: "
            + (
                f"the tasks (features.labels) are {tasks}."
                if len(tasks) > 1
                else "it names one of features.labels in multi-task training; with one task leave it null."
            ),
        )

    def primary_task(self) -> str:
        """The task whose metrics are the unprefixed ones and decide: trainer.early_stopping.task,
        else the first."""
        return self.trainer.early_stopping.task or self.features.tasks()[0]

    def _check_managed_collision_sharding(self) -> None:
        """TorchRec shards a managed-collision table row-wise only (its sharder offers no other
        type: each shard manages the ids of its own block of the hash space)."""
        for i, feature in enumerate(self.features.sparse):
            if feature.id_mapping != "managed_collision":
                continue
            override = table_constraint(self.sharding.tables, feature.name)
            key, types = (
                (f"sharding.tables.{feature.name}.sharding_types", override.sharding_types)
                if override and override.sharding_types
                else ("sharding.sharding_types", self.sharding.sharding_types)
            )
            _require(
                not types or "row_wise" in types,
                f"features.sparse[{i}].id_mapping=managed_collision ({feature.name!r}) shards only row_wise, "
                f"but {key}={list(types)} excludes it; add row_wise there (or use another id_mapping).",
            )


def check_run_location(output_root: str, run_name: str) -> None:
    """ConfigError unless <output_root>/<run_name> is a run directory of its own: run_name one path
    component (not '..', which would name another run's directory), output_root a local path."""
    _require(
        bool(run_name) and "/" not in run_name and run_name not in (".", "..") and "\0" not in run_name,
        f"run_name={run_name!r} must be a non-empty name without '/' (and not '.' or '..').",
    )
    _require(
        "://" not in output_root and "\0" not in output_root,
        f"output_root={output_root!r}: must be a local directory (Hydra writes the run's config, logs, "
        "metrics and TensorBoard files there); put checkpoints in an object store with checkpoint.dir=<URL>.",
    )


def _group_schemas() -> Dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])}


# Groups whose YAML files in configs/ are typed by these schemas: Config's dataclass-typed fields.
GROUP_SCHEMAS = _group_schemas()


def field_docs(schema: type = Config, prefix: str = "") -> Iterator[FieldDoc]:
    """Every key of `schema` (the whole Config by default) with its type, default and help text."""
    return _field_docs(schema, prefix)
