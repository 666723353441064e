"""Several reader processes per rank (data.num_workers): windows dealt round-robin to them give the
same batches, in the same order, as one reader, for a shuffled epoch, a resume and an evaluation."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from app.config import DataConfig
from app.config.fields import ConfigError
from app.data import DataError
from app.data.parquet import EvaluationBatches, TrainingBatches
from tests.unit.data.conftest import SCHEMA
from tests.unit.data.test_parquet import with_bad_id

READERS = [1, 2, 3]

# More readers than this host's cores is what these tests do on purpose (torch warns of it).
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


def tensors(batch):
    """Everything a batch holds, to compare batches exactly."""
    sparse = batch.sparse_features
    return [batch.dense_features, batch.labels, sparse.values(), sparse.lengths()]


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        for x, y in zip(tensors(a), tensors(b)):
            assert torch.equal(x, y)


def training(files, num_workers, **kwargs):
    # Windows of one row group of 25 rows (20 and 5 for two of them) and batches of 12: batches
    # span windows, and a resume's skip ends inside a window.
    return TrainingBatches(
        files,
        SCHEMA,
        12,
        0,
        1,
        shuffle=True,
        seed=7,
        shuffle_window=1,
        prefetch_windows=2,
        num_workers=num_workers,
        **kwargs,
    )


@pytest.mark.parametrize("num_workers", READERS)
def test_a_shuffled_epoch_is_the_same_for_any_number_of_readers(uneven_files, num_workers):
    def epoch(num_workers, shuffle_window):
        loader = TrainingBatches(
            uneven_files,
            SCHEMA,
            12,
            0,
            1,
            shuffle=True,
            seed=7,
            shuffle_window=shuffle_window,
            prefetch_windows=2,
            num_workers=num_workers,
        )
        loader.set_epoch(1)
        return list(loader)

    for shuffle_window in (1, 2):  # 9 windows, and 5 whose rows are mixed
        assert_same_batches(epoch(num_workers, shuffle_window), epoch(1, shuffle_window))


@pytest.mark.parametrize("num_workers", READERS)
def test_a_resume_mid_epoch_is_the_same_for_any_number_of_readers(uneven_files, num_workers):
    reference = training(uneven_files, 1)
    reference.set_epoch(2)
    expected = list(reference)
    batches_done = 3
    # The skip (36 rows) must pass whole windows and end inside the next one, and the windows
    # wholly skipped must not be a multiple of the readers: dealt before the skip, the windows
    # would then go to other readers than after it, and come back in another order.
    sizes = [sum(g.rows for g in groups) for groups, _ in reference.plan.windows(2, 0)]
    skipped = next(i for i in range(len(sizes)) if sum(sizes[: i + 1]) > batches_done * 12)
    assert sum(sizes[:skipped]) < batches_done * 12 and skipped % 2 and skipped % 3

    resumed = training(uneven_files, num_workers)
    resumed.load_state_dict({"epoch": 2, "batches_done": batches_done})
    assert_same_batches(list(resumed), expected[batches_done:])


@pytest.mark.parametrize("num_workers", READERS)
def test_an_evaluation_pass_is_the_same_for_any_number_of_readers(uneven_files, num_workers):
    def items(num_workers, rank):
        return list(EvaluationBatches(uneven_files, SCHEMA, 7, rank, 2, prefetch_windows=1, num_workers=num_workers))

    for rank in range(2):
        got, expected = items(num_workers, rank), items(1, rank)
        assert [item.valid for item in got] == [item.valid for item in expected]
        assert_same_batches([item.batch for item in got], [item.batch for item in expected])


def test_each_reader_is_a_process_and_all_stop_with_the_consumer(uneven_files):
    before = set(multiprocessing.active_children())
    batches = iter(training(uneven_files, 3))
    next(batches)
    assert len(set(multiprocessing.active_children()) - before) == 3
    batches.close()
    assert set(multiprocessing.active_children()) - before == set()


def test_an_error_in_another_reader_reaches_the_consumer(tmp_path):
    # Row 40 is in row group 1: the second window, dealt to the second reader.
    bad = with_bad_id(tmp_path / "bad.parquet", row=40)
    loader = TrainingBatches([bad], SCHEMA, 8, 0, 1, prefetch_windows=1, num_workers=2)
    with pytest.raises(DataError, match=r"bad\.parquet row group 1, row 8: column 'one' has id 12"):
        list(loader)


@pytest.mark.parametrize(
    "values,message",
    [
        (dict(num_workers=0), r"data\.num_workers must be >= 1 reader process, got 0"),
        (dict(num_workers=2, prefetch_windows=0), r"data\.num_workers=2 needs data\.prefetch_windows >= 1"),
    ],
)
def test_num_workers_is_checked_naming_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        DataConfig(**values).validate()
    DataConfig(num_workers=1, prefetch_windows=0).validate()  # the default reader count: read in-process
