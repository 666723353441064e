"""The features group: the dataset's columns (features), their embedding tables, sequence
features and task labels, each entry's dataclass with its checks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

from app.config.fields import _require, _require_choice, doc, doc_factory

POOLINGS = ("sum", "mean")


@dataclass
class SparseFeature:
    """One entry of features.sparse: an id column and its embedding table."""

    name: str = doc("", "Column of the ids in the data; sharding.tables.<name> constrains its table.")
    num_embeddings: int = doc(
        0, "Rows of the feature's embedding table: ids lie in [0, num_embeddings) (see data.invalid_ids)."
    )
    hotness: int = doc(
        1,
        "Ids per row: 1 is a single-hot int64 column; >1 is a list<int64> column (multi-hot) "
        "whose rows hold up to this many ids (used by the synthetic generator, and by the Criteo "
        "converter, which makes each one-hot id a bag of this many; the loader takes any length).",
    )
    data_type: Optional[str] = doc(
        None, "Precision of this feature's table weights: fp32 or fp16 (null: features.data_type)."
    )
    embedding_dim: Optional[int] = doc(
        None,
        "Width of this feature's table, a positive multiple of 4 (null: "
        "features.embedding_dim). model.arch=dlrm and deepfm project a table of "
        "another width to features.embedding_dim (a learned linear map per "
        "table) for their dot products; dcn takes the tables side by side.",
    )
    id_mapping: str = doc(
        "direct",
        "How this column's ids become rows of its table. direct: the ids are the rows, in "
        "[0, num_embeddings) (data.invalid_ids says what happens to others). modulo: any "
        "int64 id, row = id mod num_embeddings (floored, so negative ids too), always: "
        "raw ids hashed into the table, with collisions (data.invalid_ids=hash for this "
        "column: a null id inside a list is dropped). managed_collision: any int64 id, "
        "given a row of its own by TorchRec's managed-collision module (zero-collision "
        "hashing) while the table has room, rows of ids unseen longest (lru) or least "
        "often (lfu) reassigned to new ids once it is full, and ids without a row share "
        "one reserved row per shard (see features.managed_collision; sharded row_wise "
        "only).",
    )


ID_MAPPINGS = ("direct", "modulo", "managed_collision")
EVICTION_POLICIES = ("lru", "lfu")


@dataclass
class ManagedCollisionConfig:
    """The managed-collision modules of the features whose id_mapping is managed_collision."""

    eviction_policy: str = doc(
        "lru",
        "Which ids lose their rows to new ids once a table is full: lru (the ids seen "
        "longest ago) or lfu (the ids seen least often).",
    )
    input_hash_size: int = doc(
        2**40,
        "Ids are first mixed by a fixed 63-bit bijection (so that ids of any range, "
        "sequential ones included, spread evenly over the row-wise shards) and taken "
        "mod this: the raw id space the modules manage. Two ids share a row only if "
        "they are equal mod this after mixing; 2**40 makes that negligible for up to "
        "millions of live ids. At least the largest managed table's rows.",
    )

    def validate(self, largest_table: int) -> None:
        _require_choice("features.managed_collision.eviction_policy", self.eviction_policy, EVICTION_POLICIES)
        _require(
            largest_table <= self.input_hash_size <= 2**62,
            f"features.managed_collision.input_hash_size={self.input_hash_size} must lie in "
            f"[{largest_table}, 2**62] (at least the rows of the largest managed_collision table).",
        )


TABLE_DATA_TYPES = ("fp32", "fp16")


@dataclass
class TaskLabel:
    """One entry of features.labels: a task's label column and its weight in the training loss."""

    name: str = doc(
        "",
        "Column of the task's label (0 or 1); the task's name in metrics (<name>/auc in "
        "metrics.jsonl, eval/<name>/auc in TensorBoard) and in predictions (prediction_<name>).",
    )
    weight: float = doc(
        1.0,
        "Weight of the task's mean binary cross-entropy in the training loss (a weighted sum over the tasks), >= 0.",
    )


@dataclass
class SequenceFeature:
    """One entry of features.sequence: a list column of ids (a user's history, oldest first), kept
    unpooled, and the sparse feature whose id (the candidate) attends over it (DIN)."""

    name: str = doc(
        "",
        "Column of the history: a list<int64> column, oldest id first (an int64 column is a "
        "history of one); a null or empty list is an empty history.",
    )
    num_embeddings: int = doc(
        0,
        "Rows of the history's table: ids lie in [0, num_embeddings) (see "
        "data.invalid_ids). The target's ids index this table too, so it has at least as "
        "many rows as the target's.",
    )
    max_length: int = doc(
        20,
        "Ids kept per row: the most recent max_length (the end of the list); older ones are "
        "dropped when rows are read.",
    )
    target: str = doc(
        "",
        "The sparse feature (features.sparse[i].name) that is the candidate: its id is looked up "
        "in this history's table (shared by both, as in DIN) and queries the history.",
    )
    embedding_dim: Optional[int] = doc(
        None,
        "Width of the history's table (null: features.embedding_dim). Every "
        "sequence table has the same width (torchrec's EmbeddingCollection).",
    )


@dataclass
class FeaturesConfig:
    """A dataset's columns. dense and sparse have no default: a features option (features=NAME)
    names a dataset's columns and table sizes."""

    label: str = doc("label", "Column of the click label (0 or 1).")
    dense: List[str] = doc([], "Dense (float) feature columns, in the order the dense arch reads them; at least one.")
    sparse: List[SparseFeature] = doc(
        [], "Sparse (id) features, one embedding table each: a list of {name, num_embeddings, hotness}; at least one."
    )
    embedding_dim: int = doc(
        16,
        "Width of the embedding tables, a positive multiple of 4 (FBGEMM's kernels), and of "
        "the dense arch's output; sparse[i].embedding_dim gives a table another width.",
    )
    pooling: str = doc("sum", "How a multi-hot feature's embeddings are combined within a row: sum or mean.")
    data_type: str = doc(
        "fp32",
        "Precision of the tables' weights: fp32, or fp16 (half the memory of every table, "
        "in the planner's estimates, in checkpoints and in exported models). An fp16 "
        "table's optimizer state stays fp32: FBGEMM's for a sharded table (it writes the "
        "rows back with stochastic rounding), and a replicated (data_parallel) table's torch "
        "optimizer steps an fp32 copy of the weights, rounded back to fp16. Part of the "
        "model: a checkpoint of other data types is refused. sparse[i].data_type sets it "
        "per table.",
    )
    managed_collision: ManagedCollisionConfig = doc_factory(
        ManagedCollisionConfig, "Options of the tables of features with id_mapping=managed_collision."
    )
    sequence: List[SequenceFeature] = doc(
        [],
        "Sequence features (unpooled histories, each with its own table in an "
        "EmbeddingCollection, fp32): a list of {name, num_embeddings, "
        "max_length, target, embedding_dim}; the target's id attends over the "
        "history (DIN) and the result joins the over arch's input. [] : none.",
    )
    labels: List[TaskLabel] = doc(
        [],
        "Multi-task training: two or more label columns, a list of {name, weight}, "
        "one tower per task over a shared bottom (model.multi_task); "
        "features.label is then not read. Empty: one task, features.label.",
    )

    def tasks(self) -> List[str]:
        """The label columns the model predicts, the first the primary task: features.labels' names,
        or features.label alone."""
        return [task.name for task in self.labels] if self.labels else [self.label]

    def validate(self) -> None:
        self._validate_labels()
        _require(len(self.sparse) > 0, "features.sparse must list at least one sparse feature.")
        _require(
            self.embedding_dim > 0 and self.embedding_dim % 4 == 0,
            f"features.embedding_dim={self.embedding_dim} is not valid: FBGEMM's embedding kernels "
            "need a positive multiple of 4.",
        )
        _require_choice("features.pooling", self.pooling, POOLINGS)
        _require_choice("features.data_type", self.data_type, TABLE_DATA_TYPES)
        names = [*self.tasks(), *self.dense, *(f.name for f in self.sparse)]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        _require(not duplicates, f"features: column names must be unique; repeated: {duplicates}.")
        for i, feature in enumerate(self.sparse):
            key = f"features.sparse[{i}]"
            _require(bool(feature.name), f"{key}.name must be a non-empty column name.")
            _require(
                feature.num_embeddings > 0,
                f"{key}.num_embeddings must be > 0 (rows of the {feature.name!r} table), got {feature.num_embeddings}.",
            )
            _require(feature.hotness >= 1, f"{key}.hotness must be >= 1, got {feature.hotness}.")
            if feature.embedding_dim is not None:
                _require(
                    feature.embedding_dim > 0 and feature.embedding_dim % 4 == 0,
                    f"{key}.embedding_dim={feature.embedding_dim} is not valid: FBGEMM's embedding kernels "
                    "need a positive multiple of 4 (null: features.embedding_dim).",
                )
            if feature.data_type is not None:
                _require_choice(f"{key}.data_type", feature.data_type, TABLE_DATA_TYPES)
            _require_choice(f"{key}.id_mapping", feature.id_mapping, ID_MAPPINGS)
            _require(
                feature.id_mapping != "managed_collision" or feature.num_embeddings >= 2,
                f"{key}.num_embeddings must be >= 2 with id_mapping=managed_collision (each shard reserves "
                f"its last row for ids without a row of their own), got {feature.num_embeddings}.",
            )
        managed = [f.num_embeddings for f in self.sparse if f.id_mapping == "managed_collision"]
        if managed:
            self.managed_collision.validate(max(managed))
        self.validate_sequence()

    def validate_sequence(self) -> None:
        """features.sequence: columns of their own, a sparse target each, tables of one width."""
        sparse = {f.name: f for f in self.sparse}
        taken = {self.label, *self.dense, *sparse}
        widths = set()
        for i, feature in enumerate(self.sequence):
            key = f"features.sequence[{i}]"
            _require(bool(feature.name), f"{key}.name must be a non-empty column name.")
            _require(
                feature.name not in taken,
                f"{key}.name={feature.name!r} is already a column of the features "
                "config (label, dense, sparse or another sequence); column names "
                "must be unique.",
            )
            taken.add(feature.name)
            _require(
                feature.num_embeddings > 0,
                f"{key}.num_embeddings must be > 0 (rows of the {feature.name!r} table), got {feature.num_embeddings}.",
            )
            _require(
                feature.max_length >= 1, f"{key}.max_length must be >= 1 (ids kept per row), got {feature.max_length}."
            )
            _require(
                feature.target in sparse,
                f"{key}.target={feature.target!r} is not a sparse feature; it names "
                f"the candidate, one of features.sparse: {sorted(sparse)}.",
            )
            target = sparse[feature.target]
            _require(
                target.id_mapping != "managed_collision",
                f"{key}.target={feature.target!r} has id_mapping=managed_collision: its raw ids cannot index the "
                "history's table; give the target direct (or modulo) ids.",
            )
            _require(
                target.num_embeddings <= feature.num_embeddings,
                f"{key}.num_embeddings={feature.num_embeddings} is smaller than its target "
                f"{feature.target!r}'s ({target.num_embeddings}): the candidate's ids index the history's "
                "table, so it needs at least as many rows.",
            )
            width = feature.embedding_dim or self.embedding_dim
            _require(
                width > 0 and width % 4 == 0,
                f"{key}.embedding_dim={width} is not valid: FBGEMM's embedding kernels need a positive multiple of 4.",
            )
            widths.add(width)
        _require(
            len(widths) <= 1,
            f"features.sequence: every sequence table must have the same width "
            f"(torchrec's EmbeddingCollection), got {sorted(widths)}.",
        )

    def _validate_labels(self) -> None:
        if not self.labels:
            return
        _require(
            len(self.labels) >= 2,
            "features.labels must list at least two tasks (multi-task training), got "
            f"{len(self.labels)}; for one label column set features.label instead.",
        )
        for i, task in enumerate(self.labels):
            _require(bool(task.name), f"features.labels[{i}].name must be a non-empty column name.")
            _require(
                task.weight >= 0 and math.isfinite(task.weight),
                f"features.labels[{i}].weight must be a finite number >= 0, got {task.weight}.",
            )
            _require(
                "/" not in task.name,
                f"features.labels[{i}].name={task.name!r}: no '/' (metric names are <task>/<metric>).",
            )
        _require(
            any(task.weight > 0 for task in self.labels),
            "features.labels: at least one task needs a weight > 0, or nothing is trained.",
        )
