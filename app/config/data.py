"""The data groups: where rows come from and how they are batched (data), the embedded synthetic
dataset (data.synthetic), and the check of a data or checkpoint location."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from app.config.fields import _require, _require_choice, doc, doc_factory


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
