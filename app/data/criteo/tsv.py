"""Reading Criteo TSV: a file as a stream of column blocks, errors that name file, line and column,
and categorical hex strings as integers.

A raw line is `label, 13 integers, 26 categoricals`, tab-separated; any field but the label may be
empty, integers may be negative, categoricals are hex strings such as 68fd1e64.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as csv

from app.data import DataError
from app.data.criteo.options import CriteoColumns


def read_blocks(
    path: str, columns: CriteoColumns, block_size: int, only: Sequence[str] | None = None
) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(line number of its first row, the block's rows) for each block of the file, in order; of
    the columns named in `only` if given. Empty lines are kept as rows (of nulls, refused for their
    label) so rows and lines agree."""
    types = {columns.label: pa.int64(), **{n: pa.int64() for n in columns.dense}}
    types.update({name: pa.string() for name in columns.sparse})
    read_options = csv.ReadOptions(column_names=list(columns.names), block_size=block_size)
    parse_options = csv.ParseOptions(delimiter="\t", quote_char=False, ignore_empty_lines=False)
    convert_options = csv.ConvertOptions(
        column_types=types,
        include_columns=list(only) if only else None,
        null_values=[""],  # only an empty field is missing: "NA", "null" ... would be bad values
        strings_can_be_null=True,
    )
    line = 1
    try:
        with pa.input_stream(path, compression="detect") as stream:
            for batch in csv.open_csv(stream, read_options, parse_options, convert_options):
                yield line, batch
                line += batch.num_rows
    except pa.ArrowInvalid as error:  # a malformed line: re-read the block's lines to name it
        raise _locate(path, line, columns, block_size, error) from error
    except OSError as error:  # a damaged compressed stream, an unreadable file
        raise DataError(f"{path}: cannot be read at or after line {line} ({error}).") from error


def _locate(path: str, first_line: int, columns: CriteoColumns, block_size: int, error: Exception) -> DataError:
    """The error for a block Arrow refused: its raw lines from first_line on, checked field by field.
    (The lines before it are read again: Arrow can only skip rows within the first block.)"""
    read_options = csv.ReadOptions(column_names=["line"], block_size=block_size)
    # One string per line: no delimiter or quote that a Criteo line holds.
    parse_options = csv.ParseOptions(delimiter="\x1f", quote_char=False, ignore_empty_lines=False)
    convert_options = csv.ConvertOptions(column_types={"line": pa.string()}, null_values=[], strings_can_be_null=False)
    line = 1  # of the batch's first row
    try:
        with pa.input_stream(path, compression="detect") as stream:
            for batch in csv.open_csv(stream, read_options, parse_options, convert_options):
                skip = max(first_line - line, 0)
                if skip < batch.num_rows:
                    problem = _first_problem(batch.column(0).slice(skip), columns)
                    if problem is not None:
                        row, message = problem
                        return DataError(f"{path}, line {line + skip + row}{message}")
                line += batch.num_rows
    except (pa.ArrowInvalid, OSError):
        pass
    return DataError(f"{path}, line {first_line} or a later one: {error}")


def _first_problem(lines: pa.Array, columns: CriteoColumns) -> tuple[int, str] | None:
    """(row, what is wrong) for the first line with a wrong field count, a label other than 0/1, or
    a non-integer in an integer column; None if every line fits."""
    width = len(columns.names)
    fields = pc.split_pattern(lines, "\t")
    counts = pc.list_value_length(fields).to_numpy()
    wrong_count = np.flatnonzero(counts != width)
    checked = int(wrong_count[0]) if len(wrong_count) else len(lines)
    values = pc.list_flatten(fields.slice(0, checked))  # `width` fields per line from here on
    bad = np.zeros((checked, 1 + len(columns.dense)), dtype=bool)
    label = values.take(pa.array(np.arange(checked) * width))
    bad[:, 0] = ~pc.is_in(label, value_set=pa.array(["0", "1"])).to_numpy(zero_copy_only=False)
    for i in range(len(columns.dense)):
        column = values.take(pa.array(np.arange(checked) * width + 1 + i))
        integer = pc.or_(pc.match_substring_regex(column, r"^-?[0-9]+$"), pc.equal(column, ""))
        bad[:, 1 + i] = ~integer.to_numpy(zero_copy_only=False)
    if bad.any():
        row, column = divmod(int(np.argmax(bad)), bad.shape[1])
        name = columns.names[column]
        value = values[row * width + column].as_py()
        expected = "expected 0 or 1" if column == 0 else "expected an integer or an empty field"
        return row, f", column {name!r} (field {column + 1}): {value!r}; {expected}."
    if checked < len(lines):
        return checked, (
            f": {counts[checked]} tab-separated field(s); expected {width} (a label, {len(columns.dense)} integer "
            f"and {len(columns.sparse)} categorical columns)."
        )
    return None


_HEX_DIGIT = np.full(256, 255, dtype=np.uint8)  # 255: not a hex digit
_HEX_DIGIT[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX_DIGIT[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX_DIGIT[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def _parse_hex(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 value of each string, mask of those that are not 1-16 hex digits); no nulls.
    Vectorised: left-pad to 8 or 16 digits, look each byte up, pack digit pairs into bytes and
    read those as one big-endian integer. (A block of a 1TB day holds about as many distinct
    values as rows: int(s, 16) per value would dominate the run time.)"""
    if len(strings) == 0:
        return np.zeros(0, np.uint64), np.zeros(0, bool)
    lengths = pc.binary_length(strings).to_numpy()
    bad = (lengths < 1) | (lengths > 16) | ~pc.string_is_ascii(strings).to_numpy(zero_copy_only=False)
    if bad.any():  # so that every string pads to exactly `width` bytes
        strings = pc.if_else(pa.array(bad), pa.scalar("0"), strings)
    width = 8 if lengths[~bad].max(initial=0) <= 8 else 16  # Criteo's values: 8 digits
    padded = pc.utf8_lpad(strings, width=width, padding="0")
    start = np.frombuffer(padded.buffers()[1], np.int32, count=1, offset=4 * padded.offset)[0]
    data = np.frombuffer(padded.buffers()[2], np.uint8, count=width * len(padded), offset=start)
    digits = _HEX_DIGIT[data.reshape(-1, width)]
    bad |= (digits == 255).any(axis=1)
    packed = (digits[:, 0::2] << 4) | digits[:, 1::2]  # (n, width / 2) bytes, most significant first
    return packed.view(f">u{width // 2}").ravel().astype(np.uint64), bad


def distinct_values(
    column: pa.Array, name: str, path: str, first_line: int, columns: CriteoColumns
) -> tuple[np.ndarray, pa.Array]:
    """(value of each distinct string in the block's column, each row's index into them, null
    where the field is empty): later steps work on the few distinct values, then `take`."""
    encoded = column.dictionary_encode()
    values, bad = _parse_hex(encoded.dictionary)
    if bad.any():
        rows = pc.is_in(encoded.indices, value_set=pa.array(np.flatnonzero(bad), encoded.indices.type))
        row = int(np.argmax(pc.fill_null(rows, False).to_numpy(zero_copy_only=False)))
        raise DataError(
            f"{path}, line {first_line + row}, column {name!r} (field {columns.field(name)}): "
            f"{column[row].as_py()!r}; expected a hexadecimal string of 1 to 16 digits or an empty field."
        )
    return values, encoded.indices
