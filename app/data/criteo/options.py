"""What a conversion is asked to do: the options, and the Criteo columns of the features config."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.config import ConfigError, FeaturesConfig

if TYPE_CHECKING:  # app.features imports torchrec: seconds and ~300 MB a conversion has no use for
    from app.features import FeatureSchema

DENSE_COLUMNS = 13
SPARSE_COLUMNS = 26
CATEGORICAL_MODES = ("hash", "vocab", "raw")


@dataclass
class ConvertOptions:
    categorical: str = "hash"  # "hash" | "vocab" | "raw" (int(hex, 16) itself: no table, no vocabulary)
    # vocab: values seen fewer times than this (over all inputs) get the rare id 0.
    min_frequency: int = 1
    # vocab: apply the vocabulary of an earlier conversion (its output directory or its
    # _vocabulary directory) instead of counting these inputs, e.g. the training days' for the
    # validation day, so that both splits give a value the same id.
    vocabulary: str | None = None
    log_dense: bool = True
    rows_per_file: int = 1_000_000
    # The loader deals whole row groups to ranks and shuffles rows within windows of
    # data.shuffle_window of them. 25,000 rows (as in the synthetic dataset) split a dataset
    # finely over ranks and keep a window small (a Criteo row group is ~7 MB decoded), and still
    # read fast: pyarrow reads them ~7% slower than 100,000-row groups, and decoding, most of the
    # loader's work, not measurably so. The cost is footer size, ~4.7 kB a row group, which every
    # rank reads at start (~1 s per 25,000 row groups). An input smaller than MIN_ROW_GROUPS row
    # groups is written in smaller ones (see parts.PartWriter).
    rows_per_row_group: int = 25_000
    # Bytes per streamed read, more than the longest line. Memory per worker is about 45 times
    # this plus MIN_ROW_GROUPS row groups: Arrow's reader reads blocks ahead (measured: ~40 in
    # flight) so that reading and decompressing overlap the conversion.
    block_size: int = 4 << 20
    workers: int = 1  # processes, one input file each at a time
    # Ids per row of each categorical column, in column order (26 values), as the MLPerf DLRMv2
    # reference's --multi_hot_sizes; None: the features config's hotness. A column of hotness h > 1
    # is written as list<int64>: its one-hot id, then h - 1 ids derived from it (multi_hot.py).
    multi_hot_sizes: tuple[int, ...] | None = None
    # Seed of the derived ids: the same seed gives every row with the same id the same bag.
    multi_hot_seed: int = 0

    def validate(self) -> None:
        if self.categorical not in CATEGORICAL_MODES:
            raise ConfigError(
                f"categorical={self.categorical!r} is not allowed; choose one of {', '.join(CATEGORICAL_MODES)}."
            )
        for key in ("min_frequency", "rows_per_file", "rows_per_row_group", "workers"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}.")
        if self.block_size < 4096:
            raise ConfigError(f"block_size must be >= 4096 bytes (more than the longest line), got {self.block_size}.")
        if self.vocabulary and self.categorical != "vocab":
            raise ConfigError("vocabulary is only used with categorical='vocab'.")
        if self.multi_hot_sizes is not None:
            sizes = list(self.multi_hot_sizes)
            if len(sizes) != SPARSE_COLUMNS or any(not isinstance(h, int) or h < 1 for h in sizes):
                raise ConfigError(
                    f"multi_hot_sizes (--multi-hot-sizes) must be {SPARSE_COLUMNS} integers >= 1, one per "
                    f"categorical column in order, got {len(sizes)} value(s): {sizes}."
                )


@dataclass(frozen=True)
class CriteoColumns:
    """The schema's column names in raw field order, and the table sizes: all a worker needs, as
    plain data (a FeatureSchema would make every worker process import torchrec)."""

    label: str
    dense: tuple[str, ...]
    sparse: tuple[str, ...]
    num_embeddings: tuple[int, ...]
    hotness: tuple[int, ...]  # ids per row of each sparse column: > 1 is multi-hot (multi_hot.py)

    @classmethod
    def from_schema(
        cls, schema: FeatureSchema | FeaturesConfig, multi_hot_sizes: Sequence[int] | None = None
    ) -> CriteoColumns:
        """The schema's columns; each sparse column's hotness is multi_hot_sizes' if given (checked
        by ConvertOptions.validate), else the features config's."""
        if len(schema.dense) != DENSE_COLUMNS or len(schema.sparse) != SPARSE_COLUMNS:
            raise ConfigError(
                f"the Criteo layout has {DENSE_COLUMNS} integer and {SPARSE_COLUMNS} categorical columns, but the "
                f"features config has {len(schema.dense)} dense and {len(schema.sparse)} sparse; use a Criteo "
                "features config (features=criteo_kaggle, criteo_1tb, criteo_small or criteo_demo)."
            )
        hotness = tuple(multi_hot_sizes) if multi_hot_sizes is not None else tuple(f.hotness for f in schema.sparse)
        return cls(
            label=schema.label,
            dense=tuple(schema.dense),
            sparse=tuple(f.name for f in schema.sparse),
            num_embeddings=tuple(f.num_embeddings for f in schema.sparse),
            hotness=hotness,
        )

    @property
    def names(self) -> tuple[str, ...]:
        return (self.label, *self.dense, *self.sparse)

    def field(self, name: str) -> int:
        """1-based position of a column in a raw line, for error messages."""
        return self.names.index(name) + 1
