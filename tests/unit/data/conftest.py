"""A small feature schema and a writer of real Parquet files for the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.config import FeaturesConfig, SparseFeature
from app.features import FeatureSchema

SCHEMA = FeatureSchema.from_config(
    FeaturesConfig(
        dense=["d0", "d1"],
        sparse=[SparseFeature("one", 10), SparseFeature("many", 7, hotness=3)],
        embedding_dim=8,
    )
)


def make_rows(start: int, count: int) -> dict[str, pa.Array]:
    """Rows whose d0 is their global index, so tests can tell exactly which rows they got."""
    index = np.arange(start, start + count)
    return {
        "label": pa.array((index % 2).astype(np.int64)),
        "d0": pa.array(index.astype(np.float64)),
        "d1": pa.array(np.ones(count, dtype=np.float32)),
        "one": pa.array(index % 10, type=pa.int64()),
        "many": pa.array([[int(i % 7)] * int(i % 3) for i in index], type=pa.list_(pa.int64())),
    }


def write(path: Path, columns: dict[str, pa.Array], row_group_size: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return str(path)


@pytest.fixture
def uneven_files(tmp_path) -> list[str]:
    """Three files of 50, 130 and 20 rows in row groups of 25: 200 rows in 9 row groups."""
    files, start = [], 0
    for i, rows in enumerate((50, 130, 20)):
        files.append(write(tmp_path / f"part-{i}.parquet", make_rows(start, rows), row_group_size=25))
        start += rows
    return files
