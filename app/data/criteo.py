"""Criteo click logs (Kaggle train.txt, 1TB day_N; plain or .gz) -> the Parquet files training reads.

A raw line is `label, 13 integers, 26 categoricals`, tab-separated; any field but the label may be
empty, integers may be negative, categoricals are hex strings such as 68fd1e64. They become the
features config's columns in that order: the label as int8 (0/1); the dense columns as float32,
log(1 + max(x, 0)) by default as the DLRM reference feeds them (the model takes dense values as they
are), an empty field as 0; the sparse columns as int64 ids, an empty field as null (the loader reads
it as an empty bag). A categorical value's id comes from one of:
  - hash:  int(value, 16) % num_embeddings; needs nothing but the line itself;
  - vocab: its rank by count over all the inputs (1 = the most frequent, ties by value); 0, the rare
    id, for values seen fewer than min_frequency times and for values the vocabulary lacks.

Memory is bounded whatever the input size: a file is streamed in blocks of block_size bytes and
every step works on a block's columns at once (Arrow compute, numpy; Python touches no row or value).
Only the vocabulary grows with the data (vocab mode): counting holds 16 bytes per distinct value of a
feature, and the lookup 24 bytes per kept value, memory-mapped so the workers share it.

The output directory (the loader globs **/*.parquet, so only finished data parts end in .parquet):
  <stem>-NNNNN.parquet          the parts of one input (stem: its name less .gz/.txt)
  _done/<stem>.json             written once that input's parts are in place; a re-run skips it
  _vocabulary/<feature>.arrow   vocab mode: Arrow IPC (value = int(hex, 16), id, count), and
                                vocabulary.json (what it was counted from, sizes)
  _conversion.json              what the directory holds: settings, rows per input, total rows
  .tmp/                         work in progress (parts as *.parquet.tmp, value counts)
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as csv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from app.config import ConfigError, FeaturesConfig
from app.data import DataError

if TYPE_CHECKING:  # app.features imports torchrec: seconds and ~300 MB a conversion has no use for
    from app.features import FeatureSchema

log = logging.getLogger(__name__)

DENSE_COLUMNS = 13
SPARSE_COLUMNS = 26
CATEGORICAL_MODES = ("hash", "vocab")

DONE_DIR = "_done"
VOCABULARY_DIR = "_vocabulary"
VOCABULARY_META = "vocabulary.json"
SUMMARY_FILE = "_conversion.json"
WORK_DIR = ".tmp"
TMP_SUFFIX = ".tmp"
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".lz4", ".zst")
TEXT_SUFFIXES = (".txt", ".tsv", ".csv")
# Every input is written in at least this many row groups (unless it has fewer rows): the loader
# deals whole row groups to ranks, so a small conversion in one or two row groups could not be
# trained on one node's 8 GPUs, or even on 2 ranks.
MIN_ROW_GROUPS = 8


@dataclass
class ConvertOptions:
    categorical: str = "hash"  # "hash" | "vocab"
    # vocab: values seen fewer times than this (over all inputs) get the rare id 0.
    min_frequency: int = 1
    # vocab: apply the vocabulary of an earlier conversion (its output directory or its
    # _vocabulary directory) instead of counting these inputs, e.g. the training days' for the
    # validation day, so that both splits give a value the same id.
    vocabulary: Optional[str] = None
    log_dense: bool = True
    rows_per_file: int = 1_000_000
    # The loader deals whole row groups to ranks and shuffles rows within windows of
    # data.shuffle_window of them. 25,000 rows (as in the synthetic dataset) split a dataset
    # finely over ranks and keep a window small (a Criteo row group is ~7 MB decoded), and still
    # read fast: pyarrow reads them ~7% slower than 100,000-row groups, and decoding, most of the
    # loader's work, not measurably so. The cost is footer size, ~4.7 kB a row group, which every
    # rank reads at start (~1 s per 25,000 row groups). An input smaller than MIN_ROW_GROUPS row
    # groups is written in smaller ones (see _PartWriter).
    rows_per_row_group: int = 25_000
    # Bytes per streamed read, more than the longest line. Memory per worker is about 45 times
    # this plus MIN_ROW_GROUPS row groups: Arrow's reader reads blocks ahead (measured: ~40 in
    # flight) so that reading and decompressing overlap the conversion.
    block_size: int = 4 << 20
    workers: int = 1  # processes, one input file each at a time

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


@dataclass(frozen=True)
class _Layout:
    """The schema's column names in raw field order, and the table sizes: all a worker needs, as
    plain data (a FeatureSchema would make every worker process import torchrec)."""

    label: str
    dense: Tuple[str, ...]
    sparse: Tuple[str, ...]
    num_embeddings: Tuple[int, ...]

    @classmethod
    def from_schema(cls, schema: "FeatureSchema | FeaturesConfig") -> "_Layout":
        if len(schema.dense) != DENSE_COLUMNS or len(schema.sparse) != SPARSE_COLUMNS:
            raise ConfigError(
                f"the Criteo layout has {DENSE_COLUMNS} integer and {SPARSE_COLUMNS} categorical columns, but the "
                f"features config has {len(schema.dense)} dense and {len(schema.sparse)} sparse; use a Criteo "
                "features config (features=criteo_kaggle, criteo_1tb or criteo_small)."
            )
        for i, feature in enumerate(schema.sparse):
            if feature.hotness != 1:
                raise ConfigError(
                    f"features.sparse[{i}] ({feature.name!r}) has hotness {feature.hotness}; Criteo categoricals "
                    "hold one value per row: set hotness 1."
                )
        return cls(
            label=schema.label,
            dense=tuple(schema.dense),
            sparse=tuple(f.name for f in schema.sparse),
            num_embeddings=tuple(f.num_embeddings for f in schema.sparse),
        )

    @property
    def columns(self) -> Tuple[str, ...]:
        return (self.label, *self.dense, *self.sparse)

    def field(self, name: str) -> int:
        """1-based position of a column in a raw line, for error messages."""
        return self.columns.index(name) + 1


def input_stem(path: str) -> str:
    """The name parts of an input are named after: day_0.gz -> day_0, train.txt -> train."""
    name = os.path.basename(path)
    for suffixes in (COMPRESSION_SUFFIXES, TEXT_SUFFIXES):
        stem, suffix = os.path.splitext(name)
        if suffix in suffixes and stem:
            name = stem
    return name


# ---- the whole conversion ----------------------------------------------------------------------

def convert(inputs: Sequence[str], out_dir: str, schema: "FeatureSchema | FeaturesConfig",
            options: ConvertOptions) -> dict:
    """Convert every input not yet done into out_dir; returns (and writes to _conversion.json) a
    summary of all the directory holds. `options.workers` processes convert inputs in parallel;
    the output does not depend on their number. Only the schema's label, dense and sparse are
    read, so the FeaturesConfig it is built from will do (and spares loading torchrec)."""
    options.validate()
    layout = _Layout.from_schema(schema)
    inputs = [str(p) for p in inputs]
    if not inputs:
        raise ConfigError("no input files given.")
    for path in inputs:
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such input file; expected a Criteo TSV file (plain or .gz).")
    stems = [input_stem(p) for p in inputs]
    repeated = sorted({s for s in stems if stems.count(s) > 1})
    if repeated:
        raise ConfigError(f"inputs {repeated} appear twice (by name less .gz/.txt): their parts would collide.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    given_vocabulary = _given_vocabulary(options.vocabulary) if options.vocabulary else None
    built_from = None
    if options.categorical == "vocab":
        built_from = (
            _read_json(given_vocabulary / VOCABULARY_META)["built_from"]
            if given_vocabulary
            else {"inputs": sorted(stems), "min_frequency": options.min_frequency}
        )
    settings = _settings(layout, options, built_from)
    finished = _check_finished(out, settings)
    todo = [(path, stem) for path, stem in zip(inputs, stems) if stem not in finished]

    vocabulary_dir = given_vocabulary
    if options.categorical == "vocab" and vocabulary_dir is None:
        vocabulary_dir = out / VOCABULARY_DIR
        if todo:
            vocabulary_dir = _ensure_vocabulary(out, inputs, stems, layout, options, built_from)
    if todo and vocabulary_dir is not None:
        _check_vocabulary_fits(vocabulary_dir, layout)

    jobs = [_Job(path, stem, str(out), layout, options, str(vocabulary_dir) if vocabulary_dir else None, settings)
            for path, stem in todo]
    _map(_convert_input, jobs, options.workers, "converted")

    markers = _markers(out)
    vocabulary = _read_json(vocabulary_dir / VOCABULARY_META) if vocabulary_dir else None
    summary = {
        "out_dir": str(out),
        "rows": sum(m["rows"] for m in markers.values()),
        "inputs": {stem: {k: m[k] for k in ("input", "rows", "parts")} for stem, m in sorted(markers.items())},
        "converted": [stem for _, stem in todo],
        "skipped": [stem for stem in stems if stem in finished],
        "settings": settings,
        "options": asdict(options),
        "vocabulary": vocabulary["sizes"] if vocabulary else None,
    }
    _write_json(out / SUMMARY_FILE, summary)
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    return summary


def _settings(layout: _Layout, options: ConvertOptions, built_from: Optional[dict]) -> dict:
    """What the output depends on: inputs converted under other settings cannot share a directory."""
    settings = {
        "columns": list(layout.columns),
        "categorical": options.categorical,
        "log_dense": options.log_dense,
        "rows_per_file": options.rows_per_file,
        "rows_per_row_group": options.rows_per_row_group,
    }
    if options.categorical == "hash":
        settings["num_embeddings"] = list(layout.num_embeddings)
    else:
        settings["vocabulary"] = built_from
    return json.loads(json.dumps(settings))  # as it reads back from a marker


def _markers(out: Path) -> Dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / DONE_DIR).glob("*.json"))}


def _check_finished(out: Path, settings: dict) -> Dict[str, dict]:
    """The finished inputs (by stem); refuses a directory whose inputs were converted differently."""
    markers = _markers(out)
    for stem, marker in markers.items():
        if marker["settings"] != settings:
            differ = sorted(k for k in settings.keys() | marker["settings"].keys()
                            if settings.get(k) != marker["settings"].get(k))
            changes = "; ".join(f"{k}: {marker['settings'].get(k)} there, {settings.get(k)} now" for k in differ)
            raise ConfigError(
                f"{out}: input {stem!r} was converted with other settings ({changes}); convert into another "
                "directory, or delete this one to start over."
            )
    return markers


@dataclass(frozen=True)
class _Job:
    path: str
    stem: str
    out_dir: str
    layout: _Layout
    options: ConvertOptions
    vocabulary_dir: Optional[str]
    settings: dict


def _map(function: Callable, jobs: list, workers: int, done: str) -> list:
    """function(job) for each job in `workers` processes (in this one for 1), results in job order."""
    if workers <= 1 or len(jobs) <= 1:
        results = []
        for job in jobs:
            results.append(function(job))
            log.info("%s %s", done, job.path)
        return results
    # spawn, not fork: a fork would copy this process's threads (Arrow's pools, torch's) mid-state.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context)
    try:
        futures = {pool.submit(function, job): job for job in jobs}
        for future in as_completed(futures):
            future.result()  # the first failure stops the run; `finally` cancels jobs not started
            log.info("%s %s", done, futures[future].path)
        return [future.result() for future in futures]
    finally:
        pool.shutdown(cancel_futures=True)


# ---- reading ------------------------------------------------------------------------------------

def _blocks(path: str, layout: _Layout, block_size: int,
            columns: Optional[Sequence[str]] = None) -> Iterator[Tuple[int, pa.RecordBatch]]:
    """(line number of its first row, the block's rows) for each block of the file, in order.
    Empty lines are kept as rows (of nulls, refused for their label) so rows and lines agree."""
    types = {layout.label: pa.int64(), **{n: pa.int64() for n in layout.dense}}
    types.update({name: pa.string() for name in layout.sparse})
    read_options = csv.ReadOptions(column_names=list(layout.columns), block_size=block_size)
    parse_options = csv.ParseOptions(delimiter="\t", quote_char=False, ignore_empty_lines=False)
    convert_options = csv.ConvertOptions(
        column_types=types,
        include_columns=list(columns) if columns else None,
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
        raise _locate(path, line, layout, block_size, error) from error
    except OSError as error:  # a damaged compressed stream, an unreadable file
        raise DataError(f"{path}: cannot be read at or after line {line} ({error}).") from error


def _locate(path: str, first_line: int, layout: _Layout, block_size: int, error: Exception) -> DataError:
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
                    problem = _first_problem(batch.column(0).slice(skip), layout)
                    if problem is not None:
                        row, message = problem
                        return DataError(f"{path}, line {line + skip + row}{message}")
                line += batch.num_rows
    except (pa.ArrowInvalid, OSError):
        pass
    return DataError(f"{path}, line {first_line} or a later one: {error}")


def _first_problem(lines: pa.Array, layout: _Layout) -> Optional[Tuple[int, str]]:
    """(row, what is wrong) for the first line with a wrong field count, a label other than 0/1, or
    a non-integer in an integer column; None if every line fits."""
    width = len(layout.columns)
    fields = pc.split_pattern(lines, "\t")
    counts = pc.list_value_length(fields).to_numpy()
    wrong_count = np.flatnonzero(counts != width)
    checked = int(wrong_count[0]) if len(wrong_count) else len(lines)
    values = pc.list_flatten(fields.slice(0, checked))  # `width` fields per line from here on
    bad = np.zeros((checked, 1 + len(layout.dense)), dtype=bool)
    label = values.take(pa.array(np.arange(checked) * width))
    bad[:, 0] = ~pc.is_in(label, value_set=pa.array(["0", "1"])).to_numpy(zero_copy_only=False)
    for i in range(len(layout.dense)):
        column = values.take(pa.array(np.arange(checked) * width + 1 + i))
        integer = pc.or_(pc.match_substring_regex(column, r"^-?[0-9]+$"), pc.equal(column, ""))
        bad[:, 1 + i] = ~integer.to_numpy(zero_copy_only=False)
    if bad.any():
        row, column = divmod(int(np.argmax(bad)), bad.shape[1])
        name = layout.columns[column]
        value = values[row * width + column].as_py()
        expected = "expected 0 or 1" if column == 0 else "expected an integer or an empty field"
        return row, f", column {name!r} (field {column + 1}): {value!r}; {expected}."
    if checked < len(lines):
        return checked, (
            f": {counts[checked]} tab-separated field(s); expected {width} (a label, {len(layout.dense)} integer "
            f"and {len(layout.sparse)} categorical columns)."
        )
    return None


# ---- categorical values --------------------------------------------------------------------------

_HEX_DIGIT = np.full(256, 255, dtype=np.uint8)  # 255: not a hex digit
_HEX_DIGIT[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX_DIGIT[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX_DIGIT[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def _parse_hex(strings: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
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


def _distinct_values(column: pa.Array, name: str, path: str, first_line: int,
                     layout: _Layout) -> Tuple[np.ndarray, pa.Array]:
    """(value of each distinct string in the block's column, each row's index into them, null
    where the field is empty): later steps work on the few distinct values, then `take`."""
    encoded = column.dictionary_encode()
    values, bad = _parse_hex(encoded.dictionary)
    if bad.any():
        rows = pc.is_in(encoded.indices, value_set=pa.array(np.flatnonzero(bad), encoded.indices.type))
        row = int(np.argmax(pc.fill_null(rows, False).to_numpy(zero_copy_only=False)))
        raise DataError(
            f"{path}, line {first_line + row}, column {name!r} (field {layout.field(name)}): "
            f"{column[row].as_py()!r}; expected a hexadecimal string of 1 to 16 digits or an empty field."
        )
    return values, encoded.indices


class _Vocabulary:
    """One feature's value -> id map: values sorted for a binary search, memory-mapped so the
    worker processes share one copy."""

    def __init__(self, path: Path) -> None:
        table = ipc.open_file(pa.memory_map(str(path))).read_all()
        self.values, self.ids = (self._mapped(table.column(name)) for name in ("value", "id"))

    @staticmethod
    def _mapped(column: pa.ChunkedArray) -> np.ndarray:
        """Zero-copy over the mapped file when in one chunk (as written); combining would copy."""
        return (column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()).to_numpy()

    def lookup(self, values: np.ndarray) -> np.ndarray:
        if len(self.values) == 0:
            return np.zeros(len(values), np.int64)
        position = np.minimum(np.searchsorted(self.values, values), len(self.values) - 1)
        return np.where(self.values[position] == values, self.ids[position], 0)


class _Counts:
    """One feature's value counts over a stream of blocks. Pending blocks are merged once they
    outnumber the merged values, so merging costs time in proportion to the data."""

    def __init__(self) -> None:
        self._tables = [pa.table({"value": pa.array([], pa.uint64()), "count": pa.array([], pa.int64())})]
        self._merged_rows = 0
        self._pending_rows = 0

    def add(self, values: np.ndarray, counts: np.ndarray) -> None:
        self._tables.append(pa.table({"value": values, "count": counts.astype(np.int64)}))
        self._pending_rows += len(values)
        if self._pending_rows > max(self._merged_rows, 1 << 16):
            self._merge()

    def _merge(self) -> None:
        merged = pa.concat_tables(self._tables).group_by("value").aggregate([("count", "sum")])
        self._tables = [pa.table({"value": merged["value"], "count": merged["count_sum"]})]
        self._merged_rows, self._pending_rows = merged.num_rows, 0

    def result(self) -> pa.RecordBatch:
        self._merge()
        table = self._tables[0]
        return pa.RecordBatch.from_arrays([table["value"].combine_chunks(), table["count"].combine_chunks()],
                                          names=["value", "count"])


@dataclass(frozen=True)
class _CountJob:
    path: str
    counts_file: str
    layout: _Layout
    block_size: int


def _count_input(job: _CountJob) -> str:
    """Value counts of every categorical column of one input, as an Arrow IPC file holding one
    record batch per feature (so merging reads one feature at a time)."""
    if os.path.isfile(job.counts_file):  # counted by an interrupted run
        return job.counts_file
    layout = job.layout
    counts = [_Counts() for _ in layout.sparse]
    for first_line, batch in _blocks(job.path, layout, job.block_size, columns=layout.sparse):
        for name, counter in zip(layout.sparse, counts):
            values, indices = _distinct_values(batch.column(name), name, job.path, first_line, layout)
            counter.add(values, np.bincount(indices.drop_null().to_numpy(), minlength=len(values)))
    schema = pa.schema([("value", pa.uint64()), ("count", pa.int64())])
    partial = job.counts_file + TMP_SUFFIX
    with pa.OSFile(partial, "wb") as sink, ipc.new_file(sink, schema) as writer:
        for counter in counts:
            writer.write_batch(counter.result())
    os.replace(partial, job.counts_file)
    return job.counts_file


def _ensure_vocabulary(out: Path, inputs: List[str], stems: List[str], layout: _Layout,
                       options: ConvertOptions, built_from: dict) -> Path:
    """out/_vocabulary, counted over all inputs unless a run with the same inputs and min_frequency
    left it there."""
    target = out / VOCABULARY_DIR
    meta = _read_json(target / VOCABULARY_META)
    if meta is not None and meta["built_from"] == built_from:
        return target
    counts_dir = out / WORK_DIR / "counts"
    counts_dir.mkdir(parents=True, exist_ok=True)
    jobs = [_CountJob(path, str(counts_dir / f"{stem}.arrow"), layout, options.block_size)
            for path, stem in zip(inputs, stems)]
    files = _map(_count_input, jobs, options.workers, "counted")
    staging = out / WORK_DIR / VOCABULARY_DIR
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    sizes = {}
    for index, name in enumerate(layout.sparse):
        vocabulary = _vocabulary_table(files, index, options.min_frequency)
        with pa.OSFile(str(staging / f"{name}.arrow"), "wb") as sink, ipc.new_file(sink, vocabulary.schema) as writer:
            writer.write_table(vocabulary)
        sizes[name] = vocabulary.num_rows
    _write_json(staging / VOCABULARY_META, {"built_from": built_from, "sizes": sizes})
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


def _vocabulary_table(count_files: List[str], index: int, min_frequency: int) -> pa.Table:
    """Feature `index`'s kept values with their ids (1.. by descending count, ties by value),
    sorted by value for lookup."""
    batches = [ipc.open_file(pa.memory_map(f)).get_batch(index) for f in count_files]
    counts = pa.Table.from_batches(batches).group_by("value").aggregate([("count", "sum")])
    kept = counts.filter(pc.greater_equal(counts["count_sum"], min_frequency))
    order = pc.sort_indices(kept, sort_keys=[("count_sum", "descending"), ("value", "ascending")]).to_numpy()
    ids = np.empty(len(order), np.int64)
    ids[order] = np.arange(1, len(order) + 1)
    table = pa.table({"value": kept["value"], "id": ids, "count": kept["count_sum"]})
    return table.sort_by("value").combine_chunks()


def _given_vocabulary(path: str) -> Path:
    for candidate in (Path(path), Path(path) / VOCABULARY_DIR):
        if (candidate / VOCABULARY_META).is_file():
            return candidate
    raise ConfigError(f"vocabulary={path!r}: no {VOCABULARY_META} there or in its {VOCABULARY_DIR}/; "
                      "give the output directory of a vocab-mode conversion.")


def _check_vocabulary_fits(directory: Path, layout: _Layout) -> None:
    """Every table must hold its feature's vocabulary and the rare id 0; names all that do not."""
    meta = _read_json(directory / VOCABULARY_META)
    missing = [name for name in layout.sparse if name not in meta["sizes"]]
    if missing:
        raise ConfigError(f"the vocabulary in {directory} lacks features {missing}; it has {sorted(meta['sizes'])}.")
    too_small = [
        f"{name!r} needs {meta['sizes'][name] + 1} (num_embeddings is {num_embeddings})"
        for name, num_embeddings in zip(layout.sparse, layout.num_embeddings)
        if meta["sizes"][name] + 1 > num_embeddings
    ]
    if too_small:
        raise ConfigError(
            f"the vocabulary does not fit the embedding tables: {'; '.join(too_small)}. A feature needs one row "
            f"per value with a count >= min_frequency={meta['built_from']['min_frequency']}, plus the rare id 0: "
            "raise min_frequency, or set those features' num_embeddings to at least that in the features config."
        )


# ---- writing ------------------------------------------------------------------------------------

def _output_schema(layout: _Layout) -> pa.Schema:
    return pa.schema(
        [(layout.label, pa.int8())]
        + [(name, pa.float32()) for name in layout.dense]
        + [(name, pa.int64()) for name in layout.sparse]
    )


def _convert_block(batch: pa.RecordBatch, first_line: int, job: _Job,
                   vocabularies: Optional[List[_Vocabulary]]) -> pa.Table:
    """One block's rows in the output schema (hash ids when no vocabularies are given)."""
    layout, path = job.layout, job.path
    raw_label = batch.column(layout.label)
    label = pc.fill_null(raw_label, -1).to_numpy()
    bad = (label != 0) & (label != 1)
    if bad.any():
        row = int(np.argmax(bad))
        shown = repr(str(label[row])) if raw_label[row].is_valid else "an empty field"
        raise DataError(
            f"{path}, line {first_line + row}, column {layout.label!r} (field 1): {shown}; expected 0 or 1."
        )
    columns = [pa.array(label.astype(np.int8))]
    for name in layout.dense:
        values = pc.fill_null(batch.column(name), 0).to_numpy()
        if job.options.log_dense:
            columns.append(pa.array(np.log1p(np.maximum(values, 0)).astype(np.float32)))
        else:
            columns.append(pa.array(values.astype(np.float32)))
    for index, (name, num_embeddings) in enumerate(zip(layout.sparse, layout.num_embeddings)):
        values, rows = _distinct_values(batch.column(name), name, path, first_line, layout)
        if vocabularies is None:
            ids = (values % np.uint64(num_embeddings)).astype(np.int64)
        else:
            ids = vocabularies[index].lookup(values)
        columns.append(pa.array(ids, pa.int64()).take(rows))  # null rows stay null
    return pa.Table.from_arrays(columns, schema=_output_schema(layout))


class _PartWriter:
    """Parquet parts of rows_per_file rows in row groups of rows_per_row_group rows (the last of
    each shorter), written under temporary names: <stem>-NNNNN.parquet.tmp. An input of fewer
    than MIN_ROW_GROUPS row groups is written in MIN_ROW_GROUPS smaller ones instead, of equal
    size: its first rows are held until they fill that many row groups, or the input ends."""

    def __init__(self, directory: Path, stem: str, schema: pa.Schema, rows_per_file: int,
                 rows_per_row_group: int) -> None:
        self.directory, self.stem, self.schema = directory, stem, schema
        self.rows_per_file, self.rows_per_row_group = rows_per_file, rows_per_row_group
        self.parts: List[str] = []
        self._pending: List[pa.Table] = []
        self._pending_rows = 0
        self._writer: Optional[pq.ParquetWriter] = None
        self._rows_in_file = 0
        self._holding = True  # while the input may still be small

    def __enter__(self) -> "_PartWriter":
        return self

    def __exit__(self, *exc) -> None:
        if self._writer is not None:
            self._writer.close()

    def _group_rows(self) -> int:
        return min(self.rows_per_row_group, self.rows_per_file - self._rows_in_file)

    def write(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._holding and self._pending_rows < MIN_ROW_GROUPS * self.rows_per_row_group:
            return
        self._holding = False
        while self._pending_rows >= self._group_rows():
            self._write_group(self._group_rows())

    def close(self) -> List[str]:
        """Writes what is left; returns the part names (without the temporary suffix)."""
        if self._holding:  # the whole input: MIN_ROW_GROUPS row groups, equal but for a row
            rows = self._pending_rows
            for i in range(MIN_ROW_GROUPS):
                group = rows * (i + 1) // MIN_ROW_GROUPS - rows * i // MIN_ROW_GROUPS
                while group:  # split where a part ends
                    written = min(group, self.rows_per_file - self._rows_in_file)
                    self._write_group(written)
                    group -= written
        if self._pending_rows:
            self._write_group(self._pending_rows)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.parts

    def _write_group(self, rows: int) -> None:
        pending = pa.concat_tables(self._pending)
        group, rest = pending.slice(0, rows), pending.slice(rows)
        if self._writer is None:
            self.parts.append(f"{self.stem}-{len(self.parts):05d}.parquet")
            self._writer = pq.ParquetWriter(str(self.directory / (self.parts[-1] + TMP_SUFFIX)), self.schema)
        self._writer.write_table(group, row_group_size=rows)
        self._rows_in_file += rows
        if self._rows_in_file == self.rows_per_file:
            self._writer.close()
            self._writer, self._rows_in_file = None, 0
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows -= rows


def _remove_leftovers(out: Path, stem: str) -> None:
    """What an interrupted conversion of this input left: its work directory, parts published
    before its marker was written."""
    shutil.rmtree(out / WORK_DIR / stem, ignore_errors=True)
    part = re.compile(re.escape(stem) + r"-\d{5,}\.parquet")
    for name in os.listdir(out):
        if part.fullmatch(name):
            os.remove(out / name)


def _convert_input(job: _Job) -> dict:
    """One input's parts, written aside, moved into place, then its marker: a crash at any point
    leaves no marker, and the next run redoes the input."""
    out = Path(job.out_dir)
    _remove_leftovers(out, job.stem)
    work = out / WORK_DIR / job.stem
    work.mkdir(parents=True)
    vocabularies = None
    if job.vocabulary_dir is not None:
        vocabularies = [_Vocabulary(Path(job.vocabulary_dir) / f"{name}.arrow") for name in job.layout.sparse]
    rows = 0
    options = job.options
    schema = _output_schema(job.layout)
    with _PartWriter(work, job.stem, schema, options.rows_per_file, options.rows_per_row_group) as writer:
        for first_line, batch in _blocks(job.path, job.layout, options.block_size):
            writer.write(_convert_block(batch, first_line, job, vocabularies))
            rows += batch.num_rows
        parts = writer.close()
    for part in parts:
        os.replace(work / (part + TMP_SUFFIX), out / part)
    marker = {"input": os.path.abspath(job.path), "rows": rows, "parts": parts, "settings": job.settings}
    _write_json(out / DONE_DIR / f"{job.stem}.json", marker)
    shutil.rmtree(work, ignore_errors=True)
    return marker


def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, data: dict) -> None:
    """Whole or not at all: written aside, then renamed over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + TMP_SUFFIX)
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)
