"""The rank-aware readers on real files: equal batch counts, disjoint shards, padding, shuffling,
exact resume, prefetching (in a process from the fork server), the row group plan, and the file checks."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.data import DataError
from app.data.batch import InputPolicy
from app.data.files import check_files, check_first_row_group, resolve_files
from app.data.parquet import EvaluationBatches, TrainingBatches
from tests.unit.data.conftest import SCHEMA, make_rows, write


def row_ids(batches):
    """The global row index of every row yielded (d0 holds it)."""
    return [int(v) for b in batches for v in b.dense_features[:, 0].tolist()]


def reader(files, rank=0, world_size=1, **kwargs):
    kwargs.setdefault("prefetch_windows", 0)
    return TrainingBatches(files, SCHEMA, kwargs.pop("batch_size", 16), rank, world_size, **kwargs)


def evaluation(files, rank=0, world_size=1, **kwargs):
    kwargs.setdefault("prefetch_windows", 0)
    return EvaluationBatches(files, SCHEMA, kwargs.pop("batch_size", 16), rank, world_size, **kwargs)


def test_ranks_get_equal_batch_counts_and_disjoint_rows(uneven_files):
    ranks = [reader(uneven_files, rank=r, world_size=2) for r in range(2)]
    # Row groups [25, 25 | 25 x 5, 5 | 20] alternate between ranks: 120 rows and 80 rows.
    assert len(ranks[0]) == len(ranks[1]) == 80 // 16
    seen = [row_ids(r) for r in ranks]
    assert [len(s) for s in seen] == [len(ranks[0]) * 16] * 2
    assert not set(seen[0]) & set(seen[1])


def test_a_shuffled_epoch_has_the_same_length_every_epoch_on_every_rank(uneven_files):
    # Unequal row groups dealt anew each epoch: the shortest share changes (4 to 6 batches here),
    # but the trainer plans one epoch length, and every epoch must fill it on every rank.
    lengths = set()
    for epoch in range(8):
        for rank in range(2):
            r = reader(uneven_files, rank=rank, world_size=2, shuffle=True, seed=3)
            r.set_epoch(epoch)
            lengths.add(len(r))
            assert len(list(r)) == len(r)
    assert lengths == {(5 + 20 + 25 + 25) // 16}  # the 4 smallest of the 9 row groups


def test_eval_mode_pads_and_covers_every_row_once(uneven_files):
    ranks = [evaluation(uneven_files, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == -(-120 // 16)
    valid = []
    for r in ranks:
        items = list(r)
        assert len(items) == len(r)
        assert all(item.batch.labels.numel() == 16 for item in items)
        valid += [int(v) for item in items for v in item.batch.dense_features[: item.valid, 0].tolist()]
    assert sorted(valid) == list(range(200))


def test_more_ranks_than_row_groups_is_a_clear_error(tmp_path):
    files = [write(tmp_path / "one.parquet", make_rows(0, 40), row_group_size=40)]
    with pytest.raises(DataError, match="1 row group\\(s\\) in 1 file\\(s\\) give the 2 ranks \\[40, 0\\] rows"):
        reader(files, rank=0, world_size=2)
    assert len(evaluation(files, rank=1, world_size=2)) == 3  # eval pads the empty rank


def test_shuffle_is_seeded_and_changes_per_epoch(uneven_files):
    def epoch_rows(epoch, seed=3):
        r = reader(uneven_files, shuffle=True, seed=seed, batch_size=8)  # 8 divides 200: no rows dropped
        r.set_epoch(epoch)
        return row_ids(r)

    first = epoch_rows(0)
    assert first == epoch_rows(0)
    assert first != epoch_rows(1) and sorted(first) == sorted(epoch_rows(1))
    assert first != epoch_rows(0, seed=4)
    assert first != row_ids(reader(uneven_files, batch_size=8))


def test_shuffle_window_mixes_rows_across_row_groups_and_keeps_them_whole(uneven_files):
    def first_batch(window):
        return next(iter(reader(uneven_files, shuffle=True, seed=5, batch_size=40, shuffle_window=window)))

    for window, most_groups in ((1, 2), (4, 4)):
        batch = first_batch(window)
        rows = [int(v) for v in batch.dense_features[:, 0].tolist()]
        # Row groups hold 25 rows each (20 in the last file): a row's group is its index // 25.
        groups = {r // 25 for r in rows}
        assert len(groups) <= most_groups and (window == 1 or len(groups) > 2)
        # Shuffling moves whole rows: every row keeps its own label and multi-hot ids.
        assert batch.labels.tolist() == [float(r % 2) for r in rows]
        many = batch.sparse_features["many"]
        assert many.lengths().tolist() == [r % 3 for r in rows]
        assert many.values().tolist() == [r % 7 for r in rows for _ in range(r % 3)]


@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("stop_after", [1, 2, 4])
def test_resume_yields_exactly_the_remaining_batches(uneven_files, stop_after, world_size, window):
    def make(rank):
        return reader(
            uneven_files, rank=rank, world_size=world_size, shuffle=True, seed=1, batch_size=12, shuffle_window=window
        )

    for rank in range(world_size):
        uninterrupted = make(rank)
        uninterrupted.set_epoch(2)
        expected = row_ids(uninterrupted)

        first = make(rank)
        first.set_epoch(2)
        head = row_ids(itertools.islice(iter(first), stop_after))
        state = first.state_dict()
        assert state == {"epoch": 2, "batches_done": stop_after}

        resumed = make(rank)
        resumed.load_state_dict(state)
        assert head + row_ids(resumed) == expected


def test_prefetch_gives_the_same_batches(uneven_files):
    plain = row_ids(reader(uneven_files, shuffle=True))
    assert row_ids(reader(uneven_files, shuffle=True, prefetch_windows=2)) == plain


def test_stopping_early_stops_the_reader_process(uneven_files):
    before = set(multiprocessing.active_children())  # (none, unless an earlier test left one)
    batches = iter(reader(uneven_files, prefetch_windows=1))
    next(batches)
    assert len(set(multiprocessing.active_children()) - before) == 1
    batches.close()
    assert set(multiprocessing.active_children()) - before == set()


def test_errors_while_reading_reach_the_consumer(tmp_path):
    columns = make_rows(0, 64)
    columns["one"] = pa.array([11] * 64, type=pa.int64())
    files = [write(tmp_path / "bad.parquet", columns, row_group_size=32)]
    with pytest.raises(DataError, match=r"bad\.parquet row group 0, row 0: column 'one' has id 11"):
        list(reader(files, prefetch_windows=2))


def damage_page(path, row_group, column, fill):
    """Overwrites the header of a column chunk's first data page; the footer stays intact."""
    chunk = pq.read_metadata(path).row_group(row_group).column(column)
    with open(path, "r+b") as f:
        f.seek(chunk.data_page_offset)
        f.write(fill * 8)


@pytest.mark.parametrize("fill", [b"\xff", b"\x00"])  # two ways a page header fails to deserialize
@pytest.mark.parametrize("prefetch", [0, 2])  # read here, and in the reader process
def test_a_damaged_page_is_a_data_error_naming_file_and_row_group(tmp_path, prefetch, fill):
    path = write(tmp_path / "damaged.parquet", make_rows(0, 96), row_group_size=32)
    damage_page(path, row_group=1, column=SCHEMA.columns.index("one"), fill=fill)
    check_files([path], SCHEMA)  # the footer is intact
    with pytest.raises(DataError, match=r"damaged\.parquet row group 1: cannot be read \(.+\); the file is damaged"):
        list(reader([path], prefetch_windows=prefetch))


def with_bad_id(path, row):
    columns = make_rows(0, 64)
    columns["one"] = pa.array([12 if r == row else 3 for r in range(64)], type=pa.int64())
    return write(path, columns, row_group_size=32)


def test_check_first_row_group_raises_what_the_loader_would(tmp_path, uneven_files):
    bad = with_bad_id(tmp_path / "val" / "a.parquet", row=16)
    with pytest.raises(DataError, match=r"a\.parquet row group 0, row 16: column 'one' has id 12") as loaded:
        list(reader([bad, *uneven_files]))
    with pytest.raises(DataError) as checked:
        check_first_row_group([bad, *uneven_files], SCHEMA)
    assert str(checked.value) == str(loaded.value)
    check_first_row_group([bad], SCHEMA, InputPolicy(invalid_ids="hash"))  # the loader's policy applies


def test_check_first_row_group_reads_one_row_group_only(tmp_path):
    # A bad value in a later row group is found when the loader reads it: the check stays cheap.
    late = with_bad_id(tmp_path / "late.parquet", row=40)
    check_first_row_group([late], SCHEMA)
    with pytest.raises(DataError, match=r"late\.parquet row group 1, row 8"):
        list(reader([late]))


def test_check_first_row_group_reads_the_first_row_group_with_rows(tmp_path):
    columns = pa.table(make_rows(0, 32))
    path = str(tmp_path / "late.parquet")
    with pq.ParquetWriter(path, columns.schema) as writer:
        writer.write_table(columns.slice(0, 0))  # an empty row group first
        writer.write_table(columns)
    damage_page(path, row_group=1, column=0, fill=b"\xff")
    with pytest.raises(DataError, match=r"late\.parquet row group 1: cannot be read"):
        check_first_row_group([path], SCHEMA)


def test_resolve_files(tmp_path, uneven_files):
    assert resolve_files(str(tmp_path)) == sorted(uneven_files)
    assert resolve_files(uneven_files[0]) == [uneven_files[0]]
    assert resolve_files(str(tmp_path / "part-[01].parquet")) == sorted(uneven_files)[:2]
    with pytest.raises(DataError, match=r"no Parquet files at '.*nowhere'"):
        resolve_files(str(tmp_path / "nowhere"))


def test_check_files_refuses_files_whose_schemas_differ(tmp_path, uneven_files):
    columns = make_rows(0, 4)
    columns["one"] = pa.array(columns["one"].to_numpy().astype("int32"))
    odd = write(tmp_path / "odd.parquet", columns, row_group_size=4)
    with pytest.raises(DataError, match=r"odd\.parquet: column 'one' has type int32, but .*part-0\.parquet has int64"):
        check_files([*uneven_files, odd], SCHEMA)


def test_check_files_missing_column(tmp_path):
    columns = make_rows(0, 4)
    del columns["many"]
    path = write(tmp_path / "nomany.parquet", columns, row_group_size=4)
    with pytest.raises(DataError, match=r"nomany\.parquet: missing column\(s\) \['many'\]"):
        check_files([path], SCHEMA)


@pytest.mark.parametrize(
    "column,values,expected",
    [
        ("one", pa.array(["a", "b"]), "column 'one' has type string; expected int64"),
        ("many", pa.array([[0.5], [1.5]]), "column 'many' has type list<element: double>; expected int64"),
        ("d0", pa.array(["x", "y"]), "column 'd0' has type string; expected a number"),
    ],
)
def test_check_files_wrong_types(tmp_path, column, values, expected):
    columns = make_rows(0, 2)
    columns[column] = values
    path = write(tmp_path / "typed.parquet", columns, row_group_size=2)
    with pytest.raises(DataError, match=f"typed.parquet: {expected}"):
        check_files([path], SCHEMA)


def test_check_files_empty_and_unreadable(tmp_path, uneven_files):
    empty = write(tmp_path / "empty.parquet", {k: v.slice(0, 0) for k, v in make_rows(0, 1).items()}, 1)
    with pytest.raises(DataError, match=r"empty\.parquet: the file holds no rows"):
        check_files([*uneven_files, empty], SCHEMA)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"junk\.parquet: not a readable Parquet file"):
        check_files([str(junk)], SCHEMA)


# ---- the reader process, from the fork server ---------------------------------------------------


def parent_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def is_running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("evaluate", [False, True])
def test_the_reader_process_comes_from_the_fork_server_and_reads_the_same(uneven_files, evaluate):
    def rows(prefetch):
        if evaluate:
            items = list(evaluation(uneven_files, batch_size=24, prefetch_windows=prefetch))
            return [int(v) for item in items for v in item.batch.dense_features[: item.valid, 0].tolist()]
        return row_ids(reader(uneven_files, shuffle=True, seed=2, batch_size=24, prefetch_windows=prefetch))

    before = set(multiprocessing.active_children())
    batches = iter(reader(uneven_files, prefetch_windows=2))
    next(batches)
    (process,) = set(multiprocessing.active_children()) - before
    # Not a fork of this process (whose threads' locks a fork would copy): a fork of the server.
    assert isinstance(process, multiprocessing.context.ForkServerProcess)
    assert parent_of(process.pid) != os.getpid()
    batches.close()
    assert rows(2) == rows(0)


@pytest.mark.parametrize("num_workers", [1, 2])
def test_the_reader_processes_and_their_server_ignore_stop_signals(uneven_files, num_workers):
    # A launcher's SIGTERM (or a terminal's Ctrl-C) reaches the whole process group: every reader
    # and the fork server too. They keep going; the training process decides when to stop.
    expected = row_ids(reader(uneven_files, batch_size=8))
    before = set(multiprocessing.active_children())
    batches = iter(reader(uneven_files, batch_size=8, prefetch_windows=1, num_workers=num_workers))
    head = row_ids([next(batches)])
    readers = [process.pid for process in set(multiprocessing.active_children()) - before]
    assert len(readers) == num_workers
    (server,) = {parent_of(pid) for pid in readers}
    for pid in (*readers, server):
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
    time.sleep(0.5)
    assert head + row_ids(batches) == expected
    assert is_running(server)
