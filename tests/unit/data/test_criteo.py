"""Criteo TSV -> Parquet on small files written here: exact ids (hash and vocabulary), the dense
transform, nulls for empty fields, part and row group sizes, workers, resume, and errors that name
file, line and column. The output must pass the loader's checks and load as batches."""

from __future__ import annotations

import gzip
import math
import os
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from app.config import ConfigError, FeaturesConfig, SparseFeature
from app.data import DataError
from app.data.batch import InputPolicy
from app.data.criteo import ConvertOptions, convert, input_stem
from app.data.files import check_files, resolve_files
from app.data.parquet import TrainingBatches
from app.features import FeatureSchema

DENSE = [f"int_{i}" for i in range(13)]
SPARSE = [f"cat_{j}" for j in range(26)]
SIZES = [7 + 3 * j for j in range(26)]  # small, and different per table: hash ids must use their own
SCHEMA = FeatureSchema.from_config(
    FeaturesConfig(dense=DENSE, sparse=[SparseFeature(n, s) for n, s in zip(SPARSE, SIZES)], embedding_dim=8)
)
# Six values per column, drawn with a skew so that counts (and vocabulary ids) differ.
_POOL_RNG = random.Random(0)
POOL = [[f"{_POOL_RNG.getrandbits(32):08x}" for _ in range(6)] for _ in SPARSE]
# Several blocks per file: a line is about 300 bytes.
SMALL = dict(block_size=4096, rows_per_file=100, rows_per_row_group=30)


def criteo_rows(count: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        ints = ["" if rng.random() < 0.2 else str(rng.randint(-5, 3000)) for _ in DENSE]
        cats = ["" if rng.random() < 0.15 else pool[min(int(rng.expovariate(0.8)), 5)] for pool in POOL]
        rows.append([str(rng.randint(0, 1)), *ints, *cats])
    return rows


def write_tsv(path: Path, rows: list[list[str]]) -> str:
    text = "".join("\t".join(row) + "\n" for row in rows).encode()
    if path.name.endswith(".gz"):
        text = gzip.compress(text)
    path.write_bytes(text)
    return str(path)


def read_output(out: Path) -> dict[str, list]:
    return pa.concat_tables(pq.read_table(f) for f in resolve_files(str(out))).to_pydict()


def vocabulary(rows: list[list[str]], j: int, min_frequency: int) -> dict[str, int]:
    """The ids the converter must give feature j's values: 1.. by descending count, ties by value."""
    counts = Counter(row[14 + j] for row in rows if row[14 + j])
    kept = sorted((v for v, c in counts.items() if c >= min_frequency), key=lambda v: (-counts[v], int(v, 16)))
    return {value: i + 1 for i, value in enumerate(kept)}


def expected(rows: list[list[str]], log_dense: bool = True, vocabularies: list[dict] | None = None) -> dict[str, list]:
    """The output columns for these raw rows, computed the plain way (hash ids without vocabularies)."""
    columns: dict[str, list] = {"label": [int(row[0]) for row in rows]}
    for i, name in enumerate(DENSE):
        raw = [int(row[1 + i]) if row[1 + i] else 0 for row in rows]
        columns[name] = [math.log1p(max(x, 0)) for x in raw] if log_dense else raw
    for j, name in enumerate(SPARSE):
        values = [row[14 + j] for row in rows]
        if vocabularies is None:
            columns[name] = [int(v, 16) % SIZES[j] if v else None for v in values]
        else:
            columns[name] = [vocabularies[j].get(v, 0) if v else None for v in values]
    return columns


def assert_output(out: Path, want: dict[str, list]) -> None:
    got = read_output(out)
    assert list(got) == ["label", *DENSE, *SPARSE]
    assert got["label"] == want["label"]
    for name in DENSE:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, err_msg=name)
    for name in SPARSE:
        assert got[name] == want[name], name


@pytest.fixture
def two_inputs(tmp_path):
    """A plain and a gzipped file: (paths, rows of each)."""
    rows = [criteo_rows(130, seed=1), criteo_rows(90, seed=2)]
    paths = [write_tsv(tmp_path / "day_0", rows[0]), write_tsv(tmp_path / "day_1.gz", rows[1])]
    return paths, rows


def test_hash_ids_log_dense_and_nulls(tmp_path, two_inputs):
    paths, rows = two_inputs
    rows[0][3][14 + 4] = ""  # an empty categorical is a null id
    write_tsv(Path(paths[0]), rows[0])
    summary = convert(paths, str(tmp_path / "out"), SCHEMA, ConvertOptions(**SMALL))
    assert_output(tmp_path / "out", expected(rows[0] + rows[1]))
    assert read_output(tmp_path / "out")["cat_4"][3] is None
    assert summary["rows"] == 220 and summary["converted"] == ["day_0", "day_1"]
    schema = pq.read_schema(resolve_files(str(tmp_path / "out"))[0])
    assert [schema.field(n).type for n in ("label", "int_0", "cat_0")] == [pa.int8(), pa.float32(), pa.int64()]


def test_raw_dense_keeps_negative_values(tmp_path):
    rows = criteo_rows(40, seed=3)
    rows[0][1:4] = ["-4", "", "2500"]
    convert([write_tsv(tmp_path / "a.txt", rows)], str(tmp_path / "out"), SCHEMA, ConvertOptions(log_dense=False))
    got = read_output(tmp_path / "out")
    assert [got["int_0"][0], got["int_1"][0], got["int_2"][0]] == [-4.0, 0.0, 2500.0]
    assert_output(tmp_path / "out", expected(rows, log_dense=False))


def test_vocabulary_ids_by_count_with_a_rare_id(tmp_path, two_inputs):
    paths, rows = two_inputs
    # cat_0 over both files: aa x4, bb x3, cc x3, dd x1 (and no other value); min_frequency 2.
    for row in rows[0] + rows[1]:
        row[14] = ""
    for k, value in enumerate(["000000aa"] * 4 + ["000000cc"] * 3 + ["000000bb"] * 3 + ["000000dd"]):
        rows[k % 2][k // 2][14] = value
    paths = [write_tsv(Path(p), r) for p, r in zip(paths, rows)]
    options = ConvertOptions(categorical="vocab", min_frequency=2, **SMALL)
    summary = convert(paths, str(tmp_path / "out"), SCHEMA, options)

    ids = read_output(tmp_path / "out")["cat_0"]
    by_value = {row[14]: i for row, i in zip(rows[0] + rows[1], ids) if row[14]}
    assert by_value == {"000000aa": 1, "000000bb": 2, "000000cc": 3, "000000dd": 0}  # bb < cc: ties by value
    all_rows = rows[0] + rows[1]
    vocabularies = [vocabulary(all_rows, j, 2) for j in range(26)]
    assert_output(tmp_path / "out", expected(all_rows, vocabularies=vocabularies))
    assert summary["vocabulary"]["cat_0"] == 3
    # The vocabulary files are not data: the loader's glob sees the parts only.
    assert [os.path.basename(f) for f in resolve_files(str(tmp_path / "out"))] == [
        "day_0-00000.parquet",
        "day_0-00001.parquet",
        "day_1-00000.parquet",
    ]
    saved = ipc.open_file(pa.memory_map(str(tmp_path / "out" / "_vocabulary" / "cat_0.arrow"))).read_all()
    assert saved.sort_by("id").to_pydict() == {"value": [0xAA, 0xBB, 0xCC], "id": [1, 2, 3], "count": [4, 3, 3]}


def test_a_given_vocabulary_gives_another_split_the_same_ids(tmp_path):
    train_rows, val_rows = criteo_rows(120, seed=30), criteo_rows(40, seed=31)
    val_rows[0][14] = "0badc0de"  # never seen in training: the rare id
    train = write_tsv(tmp_path / "day_0", train_rows)
    val = write_tsv(tmp_path / "day_1", val_rows)
    convert([train], str(tmp_path / "train"), SCHEMA, ConvertOptions(categorical="vocab", min_frequency=2))
    given = ConvertOptions(categorical="vocab", vocabulary=str(tmp_path / "train"))
    convert([val], str(tmp_path / "val"), SCHEMA, given)
    assert_output(tmp_path / "val", expected(val_rows, vocabularies=[vocabulary(train_rows, j, 2) for j in range(26)]))
    assert read_output(tmp_path / "val")["cat_0"][0] == 0
    assert not (tmp_path / "val" / "_vocabulary").exists()


def test_parts_and_row_groups(tmp_path):
    path = write_tsv(tmp_path / "train.txt.gz", criteo_rows(250, seed=4))
    assert input_stem(path) == "train"
    summary = convert([path], str(tmp_path / "out"), SCHEMA, ConvertOptions(**SMALL))
    files = resolve_files(str(tmp_path / "out"))
    assert (
        [os.path.basename(f) for f in files]
        == summary["inputs"]["train"]["parts"]
        == ["train-00000.parquet", "train-00001.parquet", "train-00002.parquet"]
    )
    groups = [
        [pq.read_metadata(f).row_group(i).num_rows for i in range(pq.read_metadata(f).num_row_groups)] for f in files
    ]
    assert groups == [[30, 30, 30, 10], [30, 30, 30, 10], [30, 20]]


def row_groups(out: Path) -> list[list[int]]:
    """Rows per row group, per file."""
    metadata = [pq.read_metadata(f) for f in resolve_files(str(out))]
    return [[m.row_group(i).num_rows for i in range(m.num_row_groups)] for m in metadata]


def test_a_small_input_is_written_in_row_groups_that_ranks_can_split(tmp_path):
    path = write_tsv(tmp_path / "day_0.gz", criteo_rows(3000, seed=11))
    convert([path], str(tmp_path / "out"), SCHEMA, ConvertOptions())
    files = resolve_files(str(tmp_path / "out"))
    for rank in range(2):
        assert len(TrainingBatches(files, SCHEMA, 256, rank, world_size=2, shuffle=True, prefetch_windows=0)) > 0
    assert row_groups(tmp_path / "out") == [[375] * 8]


@pytest.mark.parametrize(
    "rows, groups",
    [
        (240, [[30, 30, 30, 10], [30, 30, 30, 10], [30, 10]]),  # 8 x 30 rows or more: groups of 30
        (239, [[29, 30, 30, 11], [19, 30, 30, 21], [9, 30]]),  # fewer: 8 groups (split where a part ends)
        (60, [[7, 8, 7, 8, 7, 8, 7, 8]]),
        (5, [[1, 1, 1, 1, 1]]),
    ],
)
def test_row_groups_of_an_input_smaller_than_eight_row_groups(tmp_path, rows, groups):
    convert(
        [write_tsv(tmp_path / "day_0", criteo_rows(rows, seed=12))],
        str(tmp_path / "out"),
        SCHEMA,
        ConvertOptions(**SMALL),
    )
    assert row_groups(tmp_path / "out") == groups
    assert_output(tmp_path / "out", expected(criteo_rows(rows, seed=12)))


def test_raw_ids_are_the_values_themselves_and_train_hashed_by_the_loader(tmp_path, two_inputs):
    paths, rows = two_inputs
    rows[0][5][14 + 2] = "7fffffffffffffff"  # the largest value an int64 id holds
    write_tsv(Path(paths[0]), rows[0])
    convert(paths, str(tmp_path / "out"), SCHEMA, ConvertOptions(categorical="raw", **SMALL))
    got = read_output(tmp_path / "out")
    for j, name in enumerate(SPARSE):
        assert got[name] == [int(row[14 + j], 16) if row[14 + j] else None for row in rows[0] + rows[1]], name
    assert got["cat_2"][5] == 2**63 - 1
    # Ids beyond the tables: trained hashed (id mod rows), as --categorical hash would have written them.
    files = resolve_files(str(tmp_path / "out"))
    with pytest.raises(DataError, match="column 'cat_0' has id"):
        next(iter(TrainingBatches(files, SCHEMA, batch_size=20, rank=0, world_size=1, prefetch_windows=0)))
    hashed = TrainingBatches(
        files, SCHEMA, batch_size=220, rank=0, world_size=1, prefetch_windows=0, policy=InputPolicy(invalid_ids="hash")
    )
    batch = next(iter(hashed))
    want = expected(rows[0] + rows[1])
    for name in ("cat_0", "cat_25"):
        assert batch.sparse_features[name].values().tolist() == [v for v in want[name] if v is not None], name


def test_raw_ids_refuse_what_no_int64_holds_and_multi_hot_columns(tmp_path):
    rows = criteo_rows(60, seed=9)
    rows[41][14 + 7] = "8000000000000000"
    path = write_tsv(tmp_path / "day_0", rows)
    with pytest.raises(
        DataError,
        match=f"^{re.escape(path)}, line 42, column 'cat_7' \\(field 22\\): '8000000000000000' is 2\\*\\*63 or more",
    ):
        convert([path], str(tmp_path / "out"), SCHEMA, ConvertOptions(categorical="raw", **SMALL))
    with pytest.raises(
        ConfigError, match="categorical='raw' keeps each value as its id, but \\['cat_0'\\] are multi-hot"
    ):
        convert(
            [path],
            str(tmp_path / "out2"),
            SCHEMA,
            ConvertOptions(categorical="raw", multi_hot_sizes=(3,) + (1,) * 25, **SMALL),
        )


def test_output_loads_for_training(tmp_path, two_inputs):
    paths, rows = two_inputs
    convert(paths, str(tmp_path / "out"), SCHEMA, ConvertOptions(**SMALL))
    files = resolve_files(str(tmp_path / "out"))
    check_files(files, SCHEMA)
    batches = list(TrainingBatches(files, SCHEMA, batch_size=20, rank=0, world_size=1, prefetch_windows=0))
    assert len(batches) == 220 // 20
    lengths = np.concatenate([b.sparse_features["cat_3"].lengths().numpy() for b in batches])
    assert lengths.tolist() == [1 if row[14 + 3] else 0 for row in rows[0] + rows[1]]  # empty field: empty bag


def test_workers_give_the_same_output(tmp_path):
    paths = [write_tsv(tmp_path / f"day_{i}.gz", criteo_rows(60 + 20 * i, seed=10 + i)) for i in range(3)]
    options = dict(categorical="vocab", min_frequency=2, **SMALL)
    one = convert(paths, str(tmp_path / "one"), SCHEMA, ConvertOptions(workers=1, **options))
    two = convert(paths, str(tmp_path / "two"), SCHEMA, ConvertOptions(workers=2, **options))
    assert one["inputs"] == two["inputs"] and one["vocabulary"] == two["vocabulary"]
    for name in [p for entry in one["inputs"].values() for p in entry["parts"]]:
        assert pq.read_table(tmp_path / "one" / name).equals(pq.read_table(tmp_path / "two" / name)), name
    for name in SPARSE:
        assert (tmp_path / "one" / "_vocabulary" / f"{name}.arrow").read_bytes() == (
            tmp_path / "two" / "_vocabulary" / f"{name}.arrow"
        ).read_bytes()


def test_resume_skips_finished_inputs_and_redoes_an_interrupted_one(tmp_path):
    rows = [criteo_rows(120, seed=20), criteo_rows(80, seed=21)]
    good = write_tsv(tmp_path / "day_0", rows[0])
    broken = [list(r) for r in rows[1]]
    broken[50] = broken[50][:20]
    second = write_tsv(tmp_path / "day_1", broken)
    out = tmp_path / "out"
    with pytest.raises(DataError, match="line 51"):
        convert([good, second], str(out), SCHEMA, ConvertOptions(**SMALL))
    # day_0 was finished before day_1 failed; day_1 published nothing.
    assert [os.path.basename(f) for f in resolve_files(str(out))] == ["day_0-00000.parquet", "day_0-00001.parquet"]
    finished = {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in resolve_files(str(out))}
    # What a crash could leave: a part moved into place before the marker, a part being written.
    (out / "day_1-00007.parquet").write_bytes(b"partial")
    (out / ".tmp" / "day_1").mkdir(parents=True, exist_ok=True)
    (out / ".tmp" / "day_1" / "day_1-00000.parquet.tmp").write_bytes(b"partial")
    (out / ".day_1-00009.parquet.tmp").write_bytes(b"partial")

    write_tsv(tmp_path / "day_1", rows[1])
    summary = convert([good, second], str(out), SCHEMA, ConvertOptions(**SMALL))
    assert summary["skipped"] == ["day_0"] and summary["converted"] == ["day_1"]
    assert {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in finished} == finished
    assert not (out / "day_1-00007.parquet").exists() and not (out / ".tmp").exists()
    assert not (out / ".day_1-00009.parquet.tmp").exists()
    assert [os.path.basename(f) for f in resolve_files(str(out))] == [
        "day_0-00000.parquet",
        "day_0-00001.parquet",
        "day_1-00000.parquet",
    ]
    assert_output(out, expected(rows[0] + rows[1]))
    assert summary["rows"] == 200


def test_a_directory_of_other_settings_is_refused(tmp_path):
    path = write_tsv(tmp_path / "day_0", criteo_rows(20, seed=5))
    convert([path], str(tmp_path / "out"), SCHEMA, ConvertOptions(**SMALL))
    with pytest.raises(ConfigError, match="'day_0' was converted with other settings \\(rows_per_file: 100 there, 50"):
        convert([path], str(tmp_path / "out"), SCHEMA, ConvertOptions(**{**SMALL, "rows_per_file": 50}))


def _with(rows: list[list[str]], line: int, field: int, value: str) -> list[list[str]]:
    rows = [list(r) for r in rows]
    rows[line - 1][field - 1] = value
    return rows


@pytest.mark.parametrize(
    "categorical, edit, message",
    [
        ("hash", lambda r: [*r[:76], r[76][:39], *r[77:]], "line 77: 39 tab-separated field\\(s\\); expected 40"),
        ("hash", lambda r: _with(r, 90, 5, "12x"), "line 90, column 'int_3' \\(field 5\\): '12x'; expected an integer"),
        ("hash", lambda r: _with(r, 3, 1, "2"), "line 3, column 'label' \\(field 1\\): '2'; expected 0 or 1"),
        ("hash", lambda r: _with(r, 64, 1, ""), "line 64, column 'label' \\(field 1\\): an empty field; expected 0"),
        ("hash", lambda r: _with(r, 120, 1, "yes"), "line 120, column 'label' \\(field 1\\): 'yes'; expected 0 or 1"),
        ("hash", lambda r: _with(r, 45, 19, "ab-cd"), "line 45, column 'cat_4' \\(field 19\\): 'ab-cd'; expected a h"),
        ("vocab", lambda r: _with(r, 45, 19, "ab-cd"), "line 45, column 'cat_4' \\(field 19\\): 'ab-cd'; expected a h"),
        ("vocab", lambda r: [*r[:33], r[33] + ["extra"], *r[34:]], "line 34: 41 tab-separated field\\(s\\)"),
    ],
    ids=["field-count", "integer", "label", "empty-label", "label-text", "hex", "hex-vocab", "field-count-vocab"],
)
def test_bad_lines_are_named_by_file_line_and_column(tmp_path, categorical, edit, message):
    path = write_tsv(tmp_path / "day_3.gz", edit(criteo_rows(150, seed=6)))
    with pytest.raises(DataError, match=f"^{re.escape(path)}, {message}"):
        convert([path], str(tmp_path / "out"), SCHEMA, ConvertOptions(categorical=categorical, **SMALL))
    assert not resolve_files_or_none(tmp_path / "out")


def resolve_files_or_none(out: Path) -> list[str] | None:
    try:
        return resolve_files(str(out))
    except DataError:
        return None


def test_a_vocabulary_larger_than_its_table_is_refused(tmp_path):
    rows = criteo_rows(100, seed=7)
    for k, row in enumerate(rows):
        row[14 + 2] = f"{k % 14:08x}"  # 14 values (2 of them 8 times, the others 7); cat_2's table has 13 rows
    path = write_tsv(tmp_path / "day_0", rows)
    with pytest.raises(ConfigError, match=r"'cat_2' needs 15 \(num_embeddings is 13\).*raise min_frequency"):
        convert([path], str(tmp_path / "out"), SCHEMA, ConvertOptions(categorical="vocab"))
    summary = convert([path], str(tmp_path / "out"), SCHEMA, ConvertOptions(categorical="vocab", min_frequency=8))
    assert summary["vocabulary"]["cat_2"] == 2


def test_a_missing_input_is_named(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}/day_9.gz: no such input file"):
        convert([str(tmp_path / "day_9.gz")], str(tmp_path / "out"), SCHEMA, ConvertOptions())


def test_a_schema_that_is_not_criteo_is_refused(tmp_path):
    path = write_tsv(tmp_path / "day_0", criteo_rows(5, seed=8))
    narrow = FeatureSchema.from_config(FeaturesConfig(dense=DENSE[:2], sparse=[SparseFeature(n, 10) for n in SPARSE]))
    with pytest.raises(ConfigError, match=r"13 integer and 26 categorical columns.*2 dense and 26 sparse"):
        convert([path], str(tmp_path / "out"), narrow, ConvertOptions())


HOTNESS = [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1]  # MLPerf DLRMv2's


def test_multi_hot_bags_are_the_one_hot_id_and_ids_derived_from_it_by_seed(tmp_path, two_inputs):
    paths, rows = two_inputs
    multi_hot = FeatureSchema.from_config(
        FeaturesConfig(dense=DENSE, sparse=[SparseFeature(n, s, hotness=h) for n, s, h in zip(SPARSE, SIZES, HOTNESS)])
    )
    summary = convert(paths, str(tmp_path / "a"), multi_hot, ConvertOptions(**SMALL))
    assert summary["settings"]["multi_hot"] == {"hotness": HOTNESS, "seed": 0, "num_embeddings": SIZES}
    files = resolve_files(str(tmp_path / "a"))
    check_files(files, multi_hot)
    got, one_hot = read_output(tmp_path / "a"), expected(rows[0] + rows[1])
    bags_of: dict[tuple, list] = {}
    for j, (name, hotness) in enumerate(zip(SPARSE, HOTNESS)):
        column = pq.read_schema(files[0]).field(name).type
        assert str(column) == ("int64" if hotness == 1 else "list<element: int64>"), name
        for bag, one in zip(got[name], one_hot[name]):
            if one is None:  # an empty field: a null, read as an empty bag
                assert bag is None, name
            elif hotness == 1:
                assert bag == one, name
            else:
                assert len(bag) == hotness and bag[0] == one and all(0 <= i < SIZES[j] for i in bag), name
                assert bags_of.setdefault((j, one), bag) == bag, name  # the same id, the same bag
    wide = [b for b in got["cat_20"] if b is not None]
    assert len({i for b in wide for i in b[1:]}) == SIZES[20]  # uniform draws: every row of a 67-row table
    # Deterministic by seed: the same seed gives the same files, another seed other derived ids.
    convert(paths, str(tmp_path / "b"), multi_hot, ConvertOptions(**SMALL))
    other = convert(paths, str(tmp_path / "c"), multi_hot, ConvertOptions(multi_hot_seed=1, **SMALL))
    assert other["settings"]["multi_hot"]["seed"] == 1
    for part in summary["inputs"]["day_0"]["parts"]:
        assert pq.read_table(tmp_path / "a" / part).equals(pq.read_table(tmp_path / "b" / part))
    reseeded = read_output(tmp_path / "c")
    assert [b and b[0] for b in reseeded["cat_20"]] == [b and b[0] for b in got["cat_20"]]
    assert reseeded["cat_20"] != got["cat_20"]
    # Loads for training: a bag of `hotness` ids per row.
    batch = next(
        iter(TrainingBatches(files, multi_hot, batch_size=20, rank=0, world_size=1, shuffle=False, prefetch_windows=0))
    )
    lengths = batch.sparse_features["cat_20"].lengths().numpy()
    assert set(lengths.tolist()) <= {0, 100} and (lengths == 100).any()
    # multi_hot_sizes overrides the features config; a directory of other sizes is refused.
    sizes = ConvertOptions(multi_hot_sizes=tuple([1] * 25 + [4]), **SMALL)
    assert convert(paths, str(tmp_path / "d"), multi_hot, sizes)["settings"]["multi_hot"]["hotness"] == [1] * 25 + [4]
    assert all(len(b) == 4 for b in read_output(tmp_path / "d")["cat_25"] if b is not None)
    with pytest.raises(ConfigError, match="converted with other settings \\(multi_hot: "):
        convert(paths, str(tmp_path / "a"), multi_hot, sizes)


@pytest.mark.parametrize("sizes", [(3, 2, 1), tuple([1] * 27), tuple([0] * 26)])
def test_a_multi_hot_size_list_of_the_wrong_length_or_range_is_refused(tmp_path, sizes):
    path = write_tsv(tmp_path / "day_0", criteo_rows(5, seed=8))
    with pytest.raises(ConfigError, match="multi_hot_sizes \\(--multi-hot-sizes\\) must be 26 integers >= 1"):
        convert([path], str(tmp_path / "out"), SCHEMA, ConvertOptions(multi_hot_sizes=sizes))
    assert not (tmp_path / "out").exists()


def test_the_script_converts_and_exits_2_on_bad_input(tmp_path, capsys):
    from scripts.convert_criteo import main

    path = write_tsv(tmp_path / "day_0.gz", criteo_rows(30, seed=9))
    assert main(["--out", str(tmp_path / "out"), path, "features=criteo_small", "--rows-per-file", "20"]) == 0
    assert "day_0: 30 rows in 2 part(s), converted" in capsys.readouterr().out
    assert main(["--out", str(tmp_path / "out"), str(tmp_path / "nope.gz")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}/nope.gz: no such input file")
    for sizes, message in [("3,2,1", "got 3 value(s): [3, 2, 1]"), ("3,x", "comma-separated integers, got '3,x'")]:
        assert main(["--out", str(tmp_path / "mh"), path, "--multi-hot-sizes", sizes]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "--multi-hot-sizes" in err and message in err, err
    assert (
        main(
            [
                "--out",
                str(tmp_path / "mh"),
                path,
                "features=criteo_small",
                "--multi-hot-sizes",
                ",".join(map(str, HOTNESS)),
                "--multi-hot-seed",
                "3",
            ]
        )
        == 0
    )
    assert next(len(b) for b in read_output(tmp_path / "mh")["cat_21"] if b is not None) == 27


def test_the_script_takes_any_features_config_and_names_a_bad_override(tmp_path, capsys):
    from scripts.convert_criteo import main

    path = write_tsv(tmp_path / "day_0", criteo_rows(10, seed=13))
    # Only the features group is checked: the default model does not fit criteo_1tb's embeddings.
    assert main(["--out", str(tmp_path / "out"), path, "features=criteo_1tb"]) == 0
    assert main(["--out", str(tmp_path / "bad"), path, "features.embeding_dim=8"]) == 2
    assert "Did you mean 'features.embedding_dim'?" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "bad"), path, "features=nope"]) == 2
    assert capsys.readouterr().err.startswith("error: In 'train': Could not find 'features/nope'")
