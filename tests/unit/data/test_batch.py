"""Arrow -> Batch: exact tensors for single- and multi-hot columns, and each input error."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from app.data import DataError
from app.data.batch import InputPolicy, table_to_batch
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


def test_policy_hashes_out_of_range_ids_into_the_table():
    columns = make_rows(0, 4)
    columns["one"] = pa.array([3, -1, 10, 25], type=pa.int64())
    columns["many"] = pa.array([[7, 1], [], None, [-8]], type=pa.list_(pa.int64()))
    batch = table_to_batch(pa.table(columns), SCHEMA, policy=InputPolicy(invalid_ids="hash"))
    sparse = batch.sparse_features.to_dict()
    assert sparse["one"].values().tolist() == [3, 9, 0, 5]  # mod 10
    assert sparse["many"].lengths().tolist() == [2, 0, 0, 1]
    assert sparse["many"].values().tolist() == [0, 1, 6]  # mod 7


def test_policy_fills_non_finite_dense_values():
    columns = make_rows(0, 4)
    columns["d1"] = pa.array([1.0, float("nan"), None, float("-inf")])
    batch = table_to_batch(pa.table(columns), SCHEMA, policy=InputPolicy(invalid_dense="fill", dense_fill_value=-1.0))
    assert batch.dense_features[:, 1].tolist() == [1.0, -1.0, -1.0, -1.0]
    with pytest.raises(DataError, match="has nan; expected a finite number"):
        table_to_batch(pa.table(columns), SCHEMA, policy=InputPolicy(invalid_ids="hash"))


def test_labels_are_never_repaired():
    columns = make_rows(0, 2)
    columns["label"] = pa.array([0, 3])
    with pytest.raises(DataError, match=r"row 1: column 'label' has label 3\.0"):
        table_to_batch(pa.table(columns), SCHEMA, policy=InputPolicy("hash", "fill"))


def test_a_null_id_inside_a_list_is_an_error_naming_the_row(tmp_path):
    columns = make_rows(0, 4)
    columns["many"] = pa.array([[1], None, [1, None, 2], [3]], type=pa.list_(pa.int64()))
    path = write(tmp_path / "holes.parquet", columns, row_group_size=4)
    with pytest.raises(
        DataError,
        match=r"holes\.parquet row group 0, row 2: column 'many' has a null id inside its "
        r"list; expected ids in \[0, 7\) .*data\.invalid_ids=hash to drop",
    ):
        table_to_batch(pq.read_table(path), SCHEMA, source=f"{path} row group 0")


def test_hash_policy_drops_null_ids_from_their_bags_and_still_hashes_large_ids():
    columns = make_rows(0, 4)
    # A large id: the nulls must not turn the column into floats on the way (2**62 + 3 is not one).
    columns["many"] = pa.array([[1, None, 2], None, [None], [2**62 + 3, 5]], type=pa.list_(pa.int64()))
    batch = table_to_batch(pa.table(columns), SCHEMA, policy=InputPolicy(invalid_ids="hash"))
    many = batch.sparse_features.to_dict()["many"]
    assert many.lengths().tolist() == [2, 0, 0, 2]
    assert many.offsets().tolist() == [0, 2, 2, 2, 4]
    assert many.values().tolist() == [1, 2, (2**62 + 3) % 7, 5]
