"""The row group plan: every row group dealt to one rank per epoch, the windows, and lengths that
every rank can run in every epoch (training) or that cover every rank's rows (evaluation)."""

from __future__ import annotations

import pytest

from app.data.parquet import EvaluationBatches
from app.data.row_groups import RowGroup, RowGroupPlan, read_row_groups
from tests.unit.data.conftest import SCHEMA


def plan_of(sizes, world_size, **kwargs):
    return RowGroupPlan(tuple(RowGroup("f", i, rows, i) for i, rows in enumerate(sizes)), world_size, **kwargs)


SIZES = (25, 25, 25, 25, 25, 25, 25, 5, 20, 40, 3, 60)


def test_read_row_groups_skips_empty_ones_and_numbers_the_rest(uneven_files):
    groups = read_row_groups(uneven_files)
    assert [g.rows for g in groups] == [25] * 7 + [5, 20]
    assert [g.position for g in groups] == list(range(9))
    assert [(g.file, g.index) for g in groups[:3]] == [(uneven_files[0], 0), (uneven_files[0], 1), (uneven_files[1], 0)]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_every_epoch_deals_every_row_group_to_exactly_one_rank(shuffle, world_size):
    plan = plan_of(SIZES, world_size, shuffle=shuffle, seed=7)
    for epoch in range(6):
        dealt = [g.position for rank in range(world_size) for g in plan.assignment(epoch, rank)]
        assert sorted(dealt) == list(range(len(SIZES)))
    orders = {tuple(g.position for g in plan.assignment(epoch, 0)) for epoch in range(6)}
    assert (len(orders) > 1) == shuffle


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("batch_size", [4, 16, 37])
def test_the_training_length_is_one_that_every_rank_fills_in_every_epoch(shuffle, world_size, batch_size):
    for seed in range(5):
        plan = plan_of(SIZES, world_size, shuffle=shuffle, seed=seed)
        length = plan.training_batches(batch_size)  # (0 when some epoch leaves a rank short: refused)
        for epoch in range(20):
            assert min(rows // batch_size for rows in plan.rows_per_rank(epoch)) >= length
        if not shuffle:  # the shortest rank's full batches, exactly
            assert length == min(rows // batch_size for rows in plan.rows_per_rank(0))


def test_the_evaluation_length_is_the_longest_ranks_count():
    plan = plan_of(SIZES, 3)
    assert plan.rows_per_rank(0) == [25 + 25 + 25 + 40, 25 + 25 + 5 + 3, 25 + 25 + 20 + 60]
    assert plan.evaluation_batches(16) == -(-130 // 16)


def test_windows_hold_shuffle_window_row_groups_with_a_seed_each_and_one_without_shuffle():
    shuffled = plan_of(SIZES, 2, shuffle=True, seed=4, shuffle_window=4).windows(epoch=3, rank=1)
    assert [len(groups) for groups, _ in shuffled] == [4, 2]
    assert [g for groups, _ in shuffled for g in groups] == plan_of(SIZES, 2, shuffle=True, seed=4).assignment(3, 1)
    assert [seed for _, seed in shuffled] == [[4, 3, groups[0].position] for groups, _ in shuffled]
    plain = plan_of(SIZES, 2, shuffle_window=4).windows(epoch=3, rank=1)
    assert [(len(groups), seed) for groups, seed in plain] == [(1, None)] * 6


@pytest.mark.parametrize("prefetch", [0, 2])
def test_evaluation_covers_every_row_once_across_ranks_and_marks_the_padding(uneven_files, prefetch):
    # 3 ranks get row groups [25 25 25] (75 rows), [25 25 5] (55), [25 25 20] (70): 11, 8 and 10
    # batches of 7, the last partly full; all run the longest rank's 11.
    ranks = [EvaluationBatches(uneven_files, SCHEMA, 7, rank, 3, prefetch_windows=prefetch) for rank in range(3)]
    assert [len(r) for r in ranks] == [11] * 3
    valid_rows = []
    for r, real in zip(ranks, (75, 55, 70)):
        items = list(r)
        assert len(items) == 11 and all(item.batch.labels.numel() == 7 for item in items)
        valid = [item.valid for item in items]
        assert valid == [7] * (real // 7) + ([real % 7] if real % 7 else []) + [0] * (11 - -(-real // 7))
        valid_rows += [int(v) for item in items for v in item.batch.dense_features[: item.valid, 0].tolist()]
        padding = [v for item in items for v in item.batch.labels[item.valid :].tolist()]
        assert padding == [0.0] * (11 * 7 - real)
    assert sorted(valid_rows) == list(range(200))
