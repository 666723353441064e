"""The data groups: the dataset's columns (features), where rows come from and how they are
batched (data), and the embedded synthetic dataset (data.synthetic)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from app.config.fields import _require, _require_choice, doc, doc_factory

POOLINGS = ("sum", "mean")


def check_location(key: str, value: str) -> None:
    """A local path, or a URL whose scheme has an fsspec filesystem installed: a ConfigError naming
    `key` now, rather than one deep in the job after seconds of set-up. (Credentials and buckets
    can only be checked by using them: the job does, before its first step.)"""
    if "://" not in value or value.startswith("file://"):
        return
    import fsspec  # a light import; the config stays free of app imports

    scheme = value.split("://", 1)[0]
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as error:
        _require(
            False,
            f"{key}={value!r}: {scheme}:// needs a filesystem package that is not installed "
            f"({' '.join(str(error).split())}).",
        )
    except ValueError:
        _require(
            False,
            f"{key}={value!r}: unknown URL scheme {scheme!r}; expected a local path or an "
            "s3://, gs://, hdfs:// or file:// URL.",
        )


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


ID_DISTRIBUTIONS = ("power_law", "uniform")


@dataclass
class SyntheticConfig:
    """The embedded default dataset, generated on first use (see app/data/synthetic.py)."""

    root: str = doc(
        "data/synthetic",
        "Directory of the generated datasets: each lies under a fingerprint of "
        "the features and the settings below, generated once and found again.",
    )
    train_rows: int = doc(1_000_000, "Rows of the training split.")
    val_rows: int = doc(100_000, "Rows of the validation split.")
    test_rows: int = doc(0, "Rows of a held-out test split beside train and val (0: none).")
    rows_per_file: int = doc(250_000, "Rows per generated Parquet file.")
    rows_per_row_group: int = doc(25_000, "Rows per Parquet row group (the unit the loader shuffles and reads).")
    seed: int = doc(1234, "Seed of the generator: the planted truth and the rows.")
    id_distribution: str = doc(
        "power_law",
        "How ids are drawn: power_law (a few ids are very frequent, as in real "
        "categorical features; see zipf_exponent) or uniform (every id equally "
        "likely, as in the reference trainers' random benchmark data).",
    )
    zipf_exponent: float = doc(1.1, "Exponent of the power law ids are drawn from: larger is more skewed.")
    id_bits: int = doc(
        0,
        "0: ids are table rows, in [0, num_embeddings). k in 1..62: each row's id is written as a "
        "raw id spread over [0, 2**k) (a bijection per feature, so ids stay distinct and the planted "
        "truth is the same), as raw ids arrive where there is no vocabulary: train on them hashed "
        "(data.invalid_ids=hash: id mod rows, with collisions).",
    )
    sequence_signal: float = doc(
        3.0,
        "With features.sequence: the planted logit of a row whose candidate (the "
        "target's id) is among the history's most recent max_length ids, against "
        "one whose is not (half the rows have it planted there): a signal only the "
        "sequence carries. Unused (and not in the fingerprint) without sequences.",
    )

    def validate(self) -> None:
        for key in ("train_rows", "val_rows", "rows_per_file", "rows_per_row_group"):
            _require(getattr(self, key) > 0, f"data.synthetic.{key} must be > 0, got {getattr(self, key)}.")
        _require(self.test_rows >= 0, f"data.synthetic.test_rows must be >= 0, got {self.test_rows}.")
        _require_choice("data.synthetic.id_distribution", self.id_distribution, ID_DISTRIBUTIONS)
        _require(self.zipf_exponent > 0, f"data.synthetic.zipf_exponent must be > 0, got {self.zipf_exponent}.")
        _require(
            0 <= self.id_bits <= 62, f"data.synthetic.id_bits must be 0 (table rows) or 1..62, got {self.id_bits}."
        )


@dataclass
class DataConfig:
    source: str = doc(
        "synthetic",
        "synthetic: generate (once) and use the planted dataset under "
        "data.synthetic.root; parquet: read data.train_path and data.val_path.",
    )
    train_path: str = doc(
        "",
        "Training data for data.source=parquet: a directory of .parquet files, one file, "
        "or a glob; local, or an object-store URL (s3://bucket/prefix/, gs://, hdfs://, "
        "file://).",
    )
    val_path: str = doc(
        "",
        "Validation data for data.source=parquet: a directory of .parquet files, one file, "
        "or a glob; local or a URL, as data.train_path.",
    )
    test_path: Optional[str] = doc(
        None,
        "Test data, evaluated once at the end with the best checkpoint's model "
        "(metrics kind test): a directory of .parquet files, one file, or a glob; "
        "local or a URL, as data.train_path. null: none, but with "
        "data.source=synthetic its generated test split when "
        "data.synthetic.test_rows > 0.",
    )
    storage_options: Dict[str, Any] = doc(
        {},
        "Options of the object store that data URLs are read from, passed "
        "to its fsspec filesystem (s3fs for s3://: endpoint_url, key, "
        "secret, anon, client_kwargs...); they override what the "
        "environment says (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, ~/.aws).",
    )
    batch_size: int = doc(512, "Training rows per step on each rank.")
    eval_batch_size: int = doc(2048, "Evaluation rows per batch on each rank.")
    shuffle: bool = doc(
        True,
        "Change the training order every epoch (by data.seed and the epoch): row groups are "
        "shuffled, and rows are mixed within windows of data.shuffle_window consecutive row "
        "groups.",
    )
    shuffle_window: int = doc(
        4,
        "Consecutive row groups whose rows are mixed together: the shuffle buffer "
        "(memory and mixing both grow with it).",
    )
    seed: int = doc(0, "Seed of the training order (with the epoch).")
    prefetch_windows: int = doc(
        2,
        "Shuffle windows read and decoded ahead of training by each reader process "
        "(0: read in the training process itself, between steps).",
    )
    num_workers: int = doc(
        1,
        "Reader processes per worker (rank), >= 1. The rank's windows are dealt to them "
        "round-robin (reader k of N reads windows k, k+N, ...) and taken back in turn, so the "
        "batches, and their order, are identical for any number of readers (and a checkpoint "
        "resumes on any number). Each reader holds data.prefetch_windows windows ahead: the "
        "memory of windows read ahead grows with num_workers x prefetch_windows. Each reader "
        "is a process decoding on a core: more help only where training waits for windows (see "
        "the data benchmark); the run warns when a node's readers (num_workers x its workers) "
        "outnumber the CPU cores available to it. With data.prefetch_windows=0 there is no "
        "reader process, and a value above 1 is refused.",
    )
    invalid_ids: str = doc(
        "error",
        "A sparse id that cannot be trained on as it is: error stops with the file, row "
        "group, row and column; hash maps an id outside [0, num_embeddings) to id mod "
        "num_embeddings (and drops a null id inside a multi-hot list: there is nothing "
        "to hash). Bad labels always stop.",
    )
    invalid_dense: str = doc(
        "error",
        "A NaN, inf or null dense value: error stops with the file, row group, row "
        "and column; fill replaces it with data.dense_fill_value.",
    )
    dense_fill_value: float = doc(0.0, "The value data.invalid_dense=fill puts in place of a bad dense value.")
    synthetic: SyntheticConfig = doc_factory(SyntheticConfig, "The generated dataset of data.source=synthetic.")

    def validate(self) -> None:
        _require_choice("data.source", self.source, ("synthetic", "parquet"))
        if self.source == "parquet":
            _require(bool(self.train_path), "data.train_path must be set when data.source=parquet.")
            _require(bool(self.val_path), "data.val_path must be set when data.source=parquet.")
            for key in ("train_path", "val_path"):
                check_location(f"data.{key}", getattr(self, key))
        _require(self.batch_size > 0, f"data.batch_size must be > 0, got {self.batch_size}.")
        _require(self.eval_batch_size > 0, f"data.eval_batch_size must be > 0, got {self.eval_batch_size}.")
        _require(self.prefetch_windows >= 0, f"data.prefetch_windows must be >= 0, got {self.prefetch_windows}.")
        _require(self.num_workers >= 1, f"data.num_workers must be >= 1 reader process, got {self.num_workers}.")
        _require(
            self.num_workers == 1 or self.prefetch_windows > 0,
            f"data.num_workers={self.num_workers} needs data.prefetch_windows >= 1: with "
            "data.prefetch_windows=0 the training process reads the windows itself, in no reader process.",
        )
        _require(self.shuffle_window > 0, f"data.shuffle_window must be > 0 row groups, got {self.shuffle_window}.")
        _require_choice("data.invalid_ids", self.invalid_ids, ("error", "hash"))
        _require_choice("data.invalid_dense", self.invalid_dense, ("error", "fill"))
