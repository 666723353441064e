"""The planted-truth generator: deterministic, recorded best scores, multi-hot, atomic publish."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from app.config import DataConfig, SyntheticConfig
from app.data.files import check_files, resolve_files
from app.data.synthetic import PROBABILITY_COLUMN, ScoreTally, best_achievable, dataset_dir, ensure_dataset, generate
from tests.conftest import REPO
from tests.unit.data.conftest import SCHEMA


def config(tmp_path, **overrides) -> SyntheticConfig:
    values = dict(
        root=str(tmp_path / "synthetic"),
        train_rows=3000,
        val_rows=1000,
        rows_per_file=1000,
        rows_per_row_group=250,
        seed=5,
    )
    values.update(overrides)
    return SyntheticConfig(**values)


def test_generation_is_deterministic_by_seed(tmp_path):
    first = generate(SCHEMA, config(tmp_path), tmp_path / "a")
    second = generate(SCHEMA, config(tmp_path), tmp_path / "b")
    other = generate(SCHEMA, config(tmp_path, seed=6), tmp_path / "c")
    assert first == second
    for name in ("train/part-00002.parquet", "val/part-00000.parquet"):
        assert pq.read_table(tmp_path / "a" / name).equals(pq.read_table(tmp_path / "b" / name))
    val = "val/part-00000.parquet"
    assert not pq.read_table(tmp_path / "a" / val).equals(pq.read_table(tmp_path / "c" / val))
    assert first != other


def test_files_match_the_schema_and_metadata_records_the_best_scores(tmp_path):
    metadata = generate(SCHEMA, config(tmp_path), tmp_path / "d")
    files = resolve_files(str(tmp_path / "d" / "train"))
    assert len(files) == 3
    check_files(files, SCHEMA)
    assert pq.ParquetFile(files[0]).metadata.num_row_groups == 4
    table = pq.read_table(files[0])
    assert str(table.schema.field("many").type) == "list<element: int64>"
    lengths = np.array([len(x) for x in table.column("many").to_pylist()])
    assert lengths.min() >= 1 and lengths.max() <= 3
    assert table.column("one").to_numpy().max() < 10
    assert 0.5 < metadata["best_auc"] < 1.0 and metadata["best_logloss"] > 0
    assert metadata == json.loads((tmp_path / "d" / "metadata.json").read_text())
    assert metadata["splits"]["val"]["rows"] == 1000


def test_ensure_dataset_generates_once_and_reuses(tmp_path):
    cfg = config(tmp_path)
    train, val = ensure_dataset(SCHEMA, cfg)
    assert train.parent == dataset_dir(SCHEMA, cfg) and val.parent == train.parent
    stamp = (train / "part-00000.parquet").stat().st_mtime_ns
    assert ensure_dataset(SCHEMA, cfg) == (train, val)
    assert (train / "part-00000.parquet").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "synthetic").iterdir()] == [train.parent.name]  # no temp dirs left
    assert dataset_dir(SCHEMA, config(tmp_path, train_rows=2000)) != train.parent


# Two jobs started together on one dataset (two pytest-xdist workers, two users' jobs): each
# generates it once it is told to go, at the same moment.
_JOB = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from app.config import SyntheticConfig
    from app.data.synthetic import ensure_dataset
    from tests.unit.data.conftest import SCHEMA

    cfg, ready, go = SyntheticConfig(**json.loads(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3])
    ready.touch()
    while not go.exists():
        time.sleep(0.01)
    train, val = ensure_dataset(SCHEMA, cfg)
    print(train, val)
""")


def test_two_jobs_generating_the_same_dataset_at_once_both_use_one_complete_dataset(tmp_path):
    cfg = config(tmp_path)
    go = tmp_path / "go"
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", _JOB, json.dumps(cfg.__dict__), str(tmp_path / f"ready{i}"), str(go)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.time() < deadline and all(job.poll() is None for job in jobs), [job.communicate() for job in jobs]
        time.sleep(0.01)
    go.touch()
    printed = [job.communicate(timeout=120) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], printed
    train = Path(printed[0][0].split()[0])
    assert printed[0][0] == printed[1][0] and train.parent == dataset_dir(SCHEMA, cfg)
    assert [p.name for p in (tmp_path / "synthetic").iterdir()] == [train.parent.name]  # the loser's copy is gone
    check_files(resolve_files(str(train)), SCHEMA)
    assert json.loads((train.parent / "metadata.json").read_text())["splits"]["val"]["rows"] == 1000


def test_a_failed_generation_leaves_nothing_that_looks_complete(tmp_path):
    cfg = config(tmp_path, rows_per_row_group=0)  # pyarrow refuses: fails mid-generation
    with pytest.raises(Exception):  # noqa: B017, PT011 (any failure: the test is about what it leaves)
        ensure_dataset(SCHEMA, cfg)
    assert not (tmp_path / "synthetic").exists() or not any((tmp_path / "synthetic").iterdir())


@pytest.mark.parametrize(
    "scores,expected", [([0.1, 0.4, 0.35, 0.8], 0.75), ([0.5] * 4, 0.5), ([0.1, 0.2, 0.3, 0.4], 1.0)]
)
def test_auc_reference_values(scores, expected):
    tally = ScoreTally()
    tally.add(np.array([0, 0, 1]), np.array(scores[:3]))
    tally.add(np.array([1]), np.array(scores[3:]))  # streamed in two parts
    assert tally.auc() == expected


def test_recorded_best_scores_are_those_of_the_per_row_true_probabilities(tmp_path):
    metadata = generate(SCHEMA, config(tmp_path, test_rows=1500), tmp_path / "t")
    assert sorted(metadata["splits"]) == ["test", "train", "val"]
    for split in ("val", "test"):
        table = pq.read_table(tmp_path / "t" / split)
        assert table.num_rows == metadata["splits"][split]["rows"]
        labels = table.column("label").to_numpy().astype(np.int64)
        truth = table.column(PROBABILITY_COLUMN).to_numpy()
        exact = binary_auroc(torch.from_numpy(truth), torch.from_numpy(labels)).item()
        assert metadata["splits"][split]["best_auc"] == pytest.approx(exact, abs=1e-5)
        logloss = -np.mean(labels * np.log(truth) + (1 - labels) * np.log(1 - truth))
        assert metadata["splits"][split]["best_logloss"] == pytest.approx(logloss, rel=1e-9)
    assert metadata["best_auc"] == metadata["splits"]["val"]["best_auc"]


def test_the_best_achievable_scores_of_the_data_a_job_validates_on(tmp_path):
    cfg = config(tmp_path, test_rows=500)
    synthetic = DataConfig(source="synthetic", synthetic=cfg)
    assert best_achievable(SCHEMA, synthetic) is None  # not generated yet
    train, val = ensure_dataset(SCHEMA, cfg)
    metadata = json.loads((train.parent / "metadata.json").read_text())
    best = best_achievable(SCHEMA, synthetic)
    assert best == {
        "auc": metadata["best_auc"],
        "logloss": metadata["best_logloss"],
        "path": str(train.parent / "metadata.json"),
    }
    # A generated dataset read as Parquet: the split validated on, from the metadata beside it.
    on_test = best_achievable(
        SCHEMA, DataConfig(source="parquet", train_path=str(train), val_path=str(train.parent / "test"))
    )
    assert on_test["auc"] == metadata["splits"]["test"]["best_auc"] != best["auc"]
    # Parquet files without a metadata.json (or a file, or a glob): not known.
    copied = tmp_path / "elsewhere" / "val"
    copied.mkdir(parents=True)
    for path in [str(copied), str(val / "part-00000.parquet"), str(val / "*.parquet")]:
        assert best_achievable(SCHEMA, DataConfig(source="parquet", train_path=str(train), val_path=path)) is None


def test_raw_ids_spread_over_id_bits_carry_the_same_rows_and_truth(tmp_path):
    rows = generate(SCHEMA, config(tmp_path), tmp_path / "rows")
    raw = generate(SCHEMA, config(tmp_path, id_bits=40), tmp_path / "raw")
    assert raw["best_auc"] == rows["best_auc"] and raw["splits"]["train"] == rows["splits"]["train"]
    assert dataset_dir(SCHEMA, config(tmp_path)) != dataset_dir(SCHEMA, config(tmp_path, id_bits=40))
    for name in ("train/part-00000.parquet", "val/part-00000.parquet"):
        a, b = pq.read_table(tmp_path / "rows" / name), pq.read_table(tmp_path / "raw" / name)
        assert a.select([SCHEMA.label, PROBABILITY_COLUMN]).equals(b.select([SCHEMA.label, PROBABILITY_COLUMN]))
        for feature in SCHEMA.sparse:
            column_a, column_b = a[feature.name].combine_chunks(), b[feature.name].combine_chunks()
            if feature.hotness > 1:
                assert column_a.offsets.equals(column_b.offsets)
                column_a, column_b = column_a.flatten(), column_b.flatten()
            ids, spread = column_a.to_numpy(), column_b.to_numpy()
            assert spread.min() >= 0 and spread.max() < 2**40
            # One raw id per table row and one row per raw id: a bijection, far outside the table.
            pairs = set(zip(ids.tolist(), spread.tolist()))
            assert len(pairs) == len(set(ids.tolist())) == len(set(spread.tolist()))
            assert (spread >= feature.num_embeddings).mean() > 0.99


def test_id_bits_must_hold_every_table(tmp_path):
    from app.config import ConfigError
    from app.hydra_edge import compose_config

    with pytest.raises(
        ConfigError, match=r"data\.synthetic\.id_bits=10: 2\*\*10 raw ids cannot hold the rows of \['cat_2'"
    ):
        compose_config(["features=criteo_small", "data.synthetic.id_bits=10"])
    with pytest.raises(ConfigError, match=r"data\.synthetic\.id_bits must be 0"):
        compose_config(["data.synthetic.id_bits=63"])
