"""A split's Parquet files: found (resolve_files), checked from their footers (check_files) and
their first row group (check_first_row_group) before training starts, and one row group read and
decoded (read_row_group), as the readers in app/data/parquet.py read every row group."""

from __future__ import annotations

import glob
import os
from typing import Callable, Dict, List, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from app.data import DataError
from app.data.batch import InputPolicy, Rows, decode
from app.features import FeatureSchema


def resolve_files(path: str) -> List[str]:
    """A directory (every *.parquet below it), one file, or a glob -> sorted file list."""
    if os.path.isdir(path):
        files = glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True)
    elif os.path.isfile(path):
        files = [path]
    else:
        files = [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
    if not files:
        raise DataError(f"no Parquet files at {path!r}: expected a directory of .parquet files, a file, or a glob.")
    return sorted(files)


def _is_number(arrow_type: pa.DataType) -> bool:
    return pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type) or pa.types.is_boolean(arrow_type)


def _is_id_column(arrow_type: pa.DataType) -> bool:
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        arrow_type = arrow_type.value_type
    return pa.types.is_integer(arrow_type)


def _expected_kind(schema: FeatureSchema, name: str) -> str:
    return "a number type" if name in (schema.label, *schema.dense) else \
        "int64 (one id per row) or list<int64> (multi-hot)"


def check_files(files: Sequence[str], schema: FeatureSchema) -> None:
    """Check columns, types and row counts from the footers alone (cheap), before training starts:
    a missing column, a column of the wrong type, a file with no rows, or files that disagree on a
    column's type. Each error names the file and the column."""
    if not files:
        raise DataError("no Parquet files to read.")
    first_types: Dict[str, pa.DataType] = {}
    for path in files:
        try:
            metadata = pq.read_metadata(path)
            arrow_schema = metadata.schema.to_arrow_schema()
        except Exception as error:  # pyarrow raises several types for a damaged file
            raise DataError(f"{path}: not a readable Parquet file ({error}).") from error
        present = set(arrow_schema.names)
        missing = [c for c in schema.columns if c not in present]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; the features config expects {schema.columns}.")
        for name in schema.columns:
            arrow_type = arrow_schema.field(name).type
            fits = _is_number(arrow_type) if name in (schema.label, *schema.dense) else _is_id_column(arrow_type)
            if not fits:
                raise DataError(f"{path}: column {name!r} has type {arrow_type}; expected {_expected_kind(schema, name)}.")
            if name not in first_types:
                first_types[name] = arrow_type
            elif arrow_type != first_types[name]:
                raise DataError(
                    f"{path}: column {name!r} has type {arrow_type}, but {files[0]} has {first_types[name]}; "
                    "every file of a split must have the same schema."
                )
        if metadata.num_rows == 0:
            raise DataError(f"{path}: the file holds no rows; remove it or write rows into it.")


# What pyarrow raises for a row group whose pages it cannot read: OSError for most damage (a page
# header that does not deserialize, compressed data that does not decompress, bad levels) and
# ArrowInvalid for some (a page that decompresses to the wrong size).
_READ_ERRORS = (OSError, pa.ArrowException)


def read_row_group(path: str, index: int, schema: FeatureSchema, policy: InputPolicy,
                   open_file: Callable[[str], pq.ParquetFile] = pq.ParquetFile) -> Rows:
    """Row group `index` of `path`, read and decoded; a damaged page is a DataError naming the row
    group, as a bad value is. One thread: the reader already runs beside training, which needs the
    other cores. `open_file` may hand out files kept open (the readers keep a few)."""
    source = f"{path} row group {index}"
    try:
        table = open_file(path).read_row_group(index, columns=schema.columns, use_threads=False)
    except _READ_ERRORS as error:
        raise DataError(
            f"{source}: cannot be read ({' '.join(str(error).split())}); the file is damaged: write it "
            "again, or remove it from the split."
        ) from error
    return decode(table, schema, source, policy)


def check_first_row_group(files: Sequence[str], schema: FeatureSchema, policy: InputPolicy = InputPolicy()) -> None:
    """Read and decode a split's first row group as the loader will, before the first step: values
    the loader would refuse there (or a page it cannot read) stop the job now, not at the first
    evaluation after training. One row group on one thread, so it is cheap; the others are checked
    as they are read. Call it after check_files, which has checked the footers."""
    for path in files:
        metadata = pq.read_metadata(path)
        for index in range(metadata.num_row_groups):
            if metadata.row_group(index).num_rows:
                read_row_group(path, index, schema, policy)
                return
