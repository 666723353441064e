"""A split's Parquet files: found (resolve_files), checked from their footers (check_files) and
their first row group (check_first_row_group) before training starts, and one row group read and
decoded (read_row_group), as the readers in app/data/parquet.py read every row group.

A split is local (path, glob, file:// URL) or in an object store (s3://, gs://, hdfs://: read
through fsspec, with data.storage_options); `storage_options` below are those options."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from app.data import DataError
from app.data.batch import InputPolicy, Rows, decode
from app.features import FeatureSchema
from app.storage import describe_failure, filesystem, is_url, local_path

StorageOptions = dict[str, Any] | None


def open_parquet(path: str, storage_options: StorageOptions = None) -> pq.ParquetFile:
    """A local file memory-mapped; an object-store file through fsspec, with each row group's
    column chunks fetched together (pre_buffer: a few large ranged reads, not one per page)."""
    if is_url(path):
        fs, key = filesystem(path, storage_options)
        return pq.ParquetFile(fs.open(key, "rb"), pre_buffer=True)
    return pq.ParquetFile(local_path(path), memory_map=True)


def read_metadata(path: str, storage_options: StorageOptions = None) -> pq.FileMetaData:
    """A Parquet file's footer: row groups, rows, schema (for an object store, a ranged read or two)."""
    if is_url(path):
        fs, key = filesystem(path, storage_options)
        with fs.open(key, "rb") as f:
            return pq.read_metadata(f)
    return pq.read_metadata(local_path(path))


def resolve_files(path: str, storage_options: StorageOptions = None, key: str = "the data path") -> list[str]:
    """A directory (every *.parquet below it), one file, or a glob -> sorted file list; local, or
    an object-store URL (the files then are URLs too). `key`: the config key, named by errors."""
    if is_url(path):
        return _resolve_urls(path, storage_options, key)
    path = str(local_path(path))
    if os.path.isdir(path):
        files = glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True)
    elif os.path.isfile(path):
        files = [path]
    else:
        files = [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
    if not files:
        raise DataError(
            f"{key}: no Parquet files at {path!r}: expected a directory of .parquet files, a file, or a glob."
        )
    return sorted(files)


def _resolve_urls(url: str, storage_options: StorageOptions, key: str) -> list[str]:
    fs, root = filesystem(url, storage_options, key)
    root = root.rstrip("/")
    try:
        if fs.isdir(root):
            found = [name for name in fs.find(root) if name.endswith(".parquet")]
        else:
            found = [name for name, info in fs.glob(root, detail=True).items() if info["type"] == "file"]
    except Exception as error:  # no credentials, no permission: botocore's errors are not OSErrors
        raise DataError(
            f"{key}={url!r}: cannot list it ({describe_failure(error)}); check the bucket, the "
            "credentials and the endpoint (AWS_* variables, ~/.aws, data.storage_options)."
        ) from error
    if not found:
        raise DataError(
            f"{key}: no Parquet files at {url!r} (does the bucket exist?): expected a prefix holding "
            ".parquet files, a file, or a glob."
        )
    return sorted(fs.unstrip_protocol(name) for name in found)


def _is_number(arrow_type: pa.DataType) -> bool:
    return pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type) or pa.types.is_boolean(arrow_type)


def _is_id_column(arrow_type: pa.DataType) -> bool:
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        arrow_type = arrow_type.value_type
    return pa.types.is_integer(arrow_type)


def _expected_kind(schema: FeatureSchema, name: str) -> str:
    return (
        "a number type"
        if name in (*schema.tasks, *schema.dense)
        else "int64 (one id per row) or list<int64> (multi-hot)"
    )


def check_files(files: Sequence[str], schema: FeatureSchema, storage_options: StorageOptions = None) -> None:
    """Check columns, types and row counts from the footers alone (cheap), before training starts:
    a missing column, a column of the wrong type, a file with no rows, or files that disagree on a
    column's type. Each error names the file and the column."""
    if not files:
        raise DataError("no Parquet files to read.")
    first_types: dict[str, pa.DataType] = {}
    for path in files:
        try:
            metadata = read_metadata(path, storage_options)
            arrow_schema = metadata.schema.to_arrow_schema()
        except Exception as error:  # pyarrow raises several types for a damaged file
            raise DataError(f"{path}: not a readable Parquet file ({error}).") from error
        present = set(arrow_schema.names)
        missing = [c for c in schema.columns if c not in present]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; the features config expects {schema.columns}.")
        for name in schema.columns:
            arrow_type = arrow_schema.field(name).type
            fits = _is_number(arrow_type) if name in (*schema.tasks, *schema.dense) else _is_id_column(arrow_type)
            if not fits:
                raise DataError(
                    f"{path}: column {name!r} has type {arrow_type}; expected {_expected_kind(schema, name)}."
                )
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


def read_row_group(
    path: str,
    index: int,
    schema: FeatureSchema,
    policy: InputPolicy,
    open_file: Callable[[str], pq.ParquetFile] = open_parquet,
) -> Rows:
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


def check_first_row_group(
    files: Sequence[str],
    schema: FeatureSchema,
    policy: InputPolicy = InputPolicy(),
    storage_options: StorageOptions = None,
) -> None:
    """Read and decode a split's first row group as the loader will, before the first step: values
    the loader would refuse there (or a page it cannot read) stop the job now, not at the first
    evaluation after training. One row group on one thread, so it is cheap; the others are checked
    as they are read. Call it after check_files, which has checked the footers."""
    for path in files:
        parquet = open_parquet(path, storage_options)
        for index in range(parquet.metadata.num_row_groups):
            if parquet.metadata.row_group(index).num_rows:
                read_row_group(path, index, schema, policy, lambda _: parquet)  # noqa: B023 (called at once)
                return
