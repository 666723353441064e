"""Arrow -> Batch: exact tensors for single- and multi-hot columns, and each input error."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from app.data import DataError
from app.data.batch import table_to_batch
from tests.unit.data.conftest import SCHEMA, make_rows, write


def test_parquet_round_trip_gives_exact_tensors(tmp_path):
    columns = make_rows(0, 4)
    columns["one"] = pa.array([3, None, 9, 0], type=pa.int64())
    columns["many"] = pa.array([[1, 2], [], None, [6, 6, 0]], type=pa.list_(pa.int64()))
    path = write(tmp_path / "x.parquet", columns, row_group_size=4)
    batch = table_to_batch(pq.read_table(path), SCHEMA, source=path)
    assert torch.equal(batch.dense_features, torch.tensor([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [3.0, 1.0]]))
    assert torch.equal(batch.labels, torch.tensor([0.0, 1.0, 0.0, 1.0]))
    sparse = batch.sparse_features
    assert sparse.keys() == ["one", "many"]
    assert sparse.lengths().tolist() == [1, 0, 1, 1, 2, 0, 0, 3]
    assert sparse.values().tolist() == [3, 9, 0, 1, 2, 6, 6, 0]
    assert sparse.to_dict()["many"].to_dense()[3].tolist() == [6, 6, 0]


@pytest.mark.parametrize(
    "column,values,expected",
    [
        ("one", pa.array([1, 10, 2, 3], type=pa.int64()), "row 1: column 'one' has id 10; expected ids in \\[0, 10\\)"),
        ("one", pa.array([1, 2, None, -1], type=pa.int64()), "row 3: column 'one' has id -1"),
        ("many", pa.array([[1], [], [2, 7], [2]], type=pa.list_(pa.int64())), "row 2: column 'many' has id 7"),
        ("d1", pa.array([1.0, float("nan"), 1.0, 1.0]), "row 1: column 'd1' has nan; expected a finite number"),
        ("d1", pa.array([1.0, 1.0, float("inf"), 1.0]), "row 2: column 'd1' has inf"),
        ("d0", pa.array([1.0, None, 1.0, 1.0]), "row 1: column 'd0' has None"),
        ("label", pa.array([0, 1, 2, 0]), "row 2: column 'label' has label 2.0; expected 0 or 1"),
        ("label", pa.array([0, None, 1, 0]), "row 1: column 'label' has label null"),
    ],
)
def test_bad_values_name_the_file_and_column(tmp_path, column, values, expected):
    columns = make_rows(0, 4)
    columns[column] = values
    path = write(tmp_path / "bad.parquet", columns, row_group_size=4)
    with pytest.raises(DataError, match=expected) as error:
        table_to_batch(pq.read_table(path), SCHEMA, source=f"{path} row group 0")
    assert "bad.parquet row group 0, row" in str(error.value)


def test_int32_ids_and_float_labels_are_accepted():
    columns = make_rows(0, 3)
    columns["one"] = pa.array(np.array([1, 2, 3], dtype=np.int32))
    columns["label"] = pa.array([1.0, 0.0, 1.0])
    batch = table_to_batch(pa.table(columns), SCHEMA)
    assert batch.sparse_features.values().dtype == torch.int64
    assert batch.labels.tolist() == [1.0, 0.0, 1.0]
