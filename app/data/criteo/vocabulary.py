"""Vocab mode: every categorical value's id is its rank by count over all the inputs (1 = the most
frequent, ties by value); 0, the rare id, for values seen fewer than min_frequency times and for
values the vocabulary lacks.

Counting holds 16 bytes per distinct value of a feature, and the lookup 24 bytes per kept value,
memory-mapped so the workers share it. A vocabulary directory holds <feature>.arrow (Arrow IPC:
value = int(hex, 16), id, count) and vocabulary.json (what it was counted from, sizes).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from app.config import ConfigError
from app.data.criteo.options import ConvertOptions, CriteoColumns
from app.data.criteo.output_dir import VOCABULARY_DIR, VOCABULARY_META, WORK_DIR, read_json, write_json
from app.data.criteo.processes import map_in_processes
from app.data.criteo.tsv import distinct_values, read_blocks
from app.storage import atomic_output


class Vocabulary:
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


def load_vocabularies(directory: Path, columns: CriteoColumns) -> list[Vocabulary]:
    """The sparse columns' vocabularies, in column order."""
    return [Vocabulary(directory / f"{name}.arrow") for name in columns.sparse]


class _ValueCounts:
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
        return pa.RecordBatch.from_arrays(
            [table["value"].combine_chunks(), table["count"].combine_chunks()], names=["value", "count"]
        )


@dataclass(frozen=True)
class CountJob:
    path: str
    counts_file: str
    columns: CriteoColumns
    block_size: int


def count_input(job: CountJob) -> str:
    """Value counts of every categorical column of one input, as an Arrow IPC file holding one
    record batch per feature (so merging reads one feature at a time)."""
    if Path(job.counts_file).is_file():  # counted by an interrupted run
        return job.counts_file
    columns = job.columns
    counts = [_ValueCounts() for _ in columns.sparse]
    for first_line, batch in read_blocks(job.path, columns, job.block_size, only=columns.sparse):
        for name, counter in zip(columns.sparse, counts):
            values, indices = distinct_values(batch.column(name), name, job.path, first_line, columns)
            counter.add(values, np.bincount(indices.drop_null().to_numpy(), minlength=len(values)))
    schema = pa.schema([("value", pa.uint64()), ("count", pa.int64())])
    with (
        atomic_output(job.counts_file) as partial,
        pa.OSFile(str(partial), "wb") as sink,
        ipc.new_file(sink, schema) as writer,
    ):
        for counter in counts:
            writer.write_batch(counter.result())
    return job.counts_file


def ensure_vocabulary(
    out: Path, inputs: list[str], stems: list[str], columns: CriteoColumns, options: ConvertOptions, built_from: dict
) -> Path:
    """out/_vocabulary, counted over all inputs unless a run with the same inputs and min_frequency
    left it there."""
    target = out / VOCABULARY_DIR
    meta = read_json(target / VOCABULARY_META)
    if meta is not None and meta["built_from"] == built_from:
        return target
    counts_dir = out / WORK_DIR / "counts"
    counts_dir.mkdir(parents=True, exist_ok=True)
    jobs = [
        CountJob(path, str(counts_dir / f"{stem}.arrow"), columns, options.block_size)
        for path, stem in zip(inputs, stems)
    ]
    files = map_in_processes(count_input, jobs, options.workers, "counted")
    with atomic_output(target) as staging:
        staging.mkdir()
        sizes = {}
        for index, name in enumerate(columns.sparse):
            vocabulary = _vocabulary_table(files, index, options.min_frequency)
            with (
                pa.OSFile(str(staging / f"{name}.arrow"), "wb") as sink,
                ipc.new_file(sink, vocabulary.schema) as writer,
            ):
                writer.write_table(vocabulary)
            sizes[name] = vocabulary.num_rows
        write_json(staging / VOCABULARY_META, {"built_from": built_from, "sizes": sizes})
        shutil.rmtree(target, ignore_errors=True)  # a rename cannot replace a directory that has files
    return target


def _vocabulary_table(count_files: list[str], index: int, min_frequency: int) -> pa.Table:
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


def given_vocabulary(path: str) -> Path:
    """The vocabulary directory of an earlier conversion, given as its output directory or itself."""
    for candidate in (Path(path), Path(path) / VOCABULARY_DIR):
        if (candidate / VOCABULARY_META).is_file():
            return candidate
    raise ConfigError(
        f"vocabulary={path!r}: no {VOCABULARY_META} there or in its {VOCABULARY_DIR}/; "
        "give the output directory of a vocab-mode conversion."
    )


def check_vocabulary_fits(directory: Path, columns: CriteoColumns) -> None:
    """Every table must hold its feature's vocabulary and the rare id 0; names all that do not."""
    meta = read_json(directory / VOCABULARY_META)
    assert meta is not None, f"{directory} holds no {VOCABULARY_META}"  # found there by given_vocabulary
    missing = [name for name in columns.sparse if name not in meta["sizes"]]
    if missing:
        raise ConfigError(f"the vocabulary in {directory} lacks features {missing}; it has {sorted(meta['sizes'])}.")
    too_small = [
        f"{name!r} needs {meta['sizes'][name] + 1} (num_embeddings is {num_embeddings})"
        for name, num_embeddings in zip(columns.sparse, columns.num_embeddings)
        if meta["sizes"][name] + 1 > num_embeddings
    ]
    if too_small:
        raise ConfigError(
            f"the vocabulary does not fit the embedding tables: {'; '.join(too_small)}. A feature needs one row "
            f"per value with a count >= min_frequency={meta['built_from']['min_frequency']}, plus the rare id 0: "
            "raise min_frequency, or set those features' num_embeddings to at least that in the features config."
        )
