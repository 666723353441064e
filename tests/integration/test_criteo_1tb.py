"""experiment=criteo_1tb_dcnv2 end to end, scaled down: Criteo-layout text written here, converted
multi-hot with the MLPerf DLRMv2 reference's 26 hotness values (features=criteo_1tb), then trained
with the preset's model and optimizer on tiny tables for a few steps."""

from __future__ import annotations

import gzip
import json
import math
import random
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO, run_command
from tests.integration.test_train import check, records

HOTNESS = [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1]
SIZES = [50 + 7 * j for j in range(26)]  # tiny tables in place of criteo_1tb's (up to 40M rows)
ROWS = {"day_0": 3000, "day_23": 1000}
# criteo_1tb's features with tiny tables: the hotness stays the reference's.
SPARSE = (
    "features.sparse=["
    + ",".join(f"{{name:cat_{j},num_embeddings:{s},hotness:{h}}}" for j, (s, h) in enumerate(zip(SIZES, HOTNESS)))
    + "]"
)
SCALED_DOWN = [
    SPARSE,
    "features.embedding_dim=8",
    "model.dense_arch_layer_sizes=[16,8]",
    "model.over_arch_layer_sizes=[16,8,1]",
    "model.dcn_low_rank_dim=4",
    "data.batch_size=128",
    "data.eval_batch_size=512",
    "trainer.eval_every_n_steps=10",
    "checkpoint.every_n_steps=0",
    "logging.progress_bar=false",
]


def criteo_text(path: Path, rows: int, seed: int) -> Path:
    """Criteo's layout: label, 13 integers, 26 hex categoricals, tab-separated, some fields empty;
    values drawn with a skew so that ids repeat, and a label that depends on a few of them."""
    rng = random.Random(seed)
    lines = []
    for _ in range(rows):
        ints = ["" if rng.random() < 0.1 else str(int(rng.expovariate(0.05))) for _ in range(13)]
        cats = [
            "" if rng.random() < 0.05 else f"{int(rng.paretovariate(1.2)) * 2654435761 % 2**32:08x}" for _ in range(26)
        ]
        score = (int(cats[0] or "0", 16) % 3) + (float(ints[1] or 0) > 20)
        lines.append("\t".join([str(int(rng.random() < 0.15 + 0.2 * score)), *ints, *cats]))
    path.write_text("\n".join(lines) + "\n")
    return path


def convert(raw: Path, out: Path, *extra: str):
    return run_command(
        [
            sys.executable,
            "scripts/convert_criteo.py",
            "--out",
            str(out),
            str(raw),
            "features=criteo_1tb",
            SPARSE,
            *extra,
        ],
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The train (day_0) and val (day_23) conversions, and a second conversion of day_0 with the
    same seed and one with another."""
    root = tmp_path_factory.mktemp("criteo_1tb")
    raw = {day: criteo_text(root / day, rows, seed=i) for i, (day, rows) in enumerate(ROWS.items())}
    raw["day_0"] = root / "day_0.gz"  # gzipped, as the 1TB days come
    raw["day_0"].write_bytes(gzip.compress((root / "day_0").read_bytes()))
    for name, day, extra in [
        ("train", "day_0", []),
        ("val", "day_23", []),
        ("again", "day_0", []),
        ("seed_1", "day_0", ["--multi-hot-seed", "1"]),
    ]:
        check(convert(raw[day], root / name, *extra))
    return root


def test_the_conversion_is_multi_hot_with_the_reference_hotness_deterministic_by_seed(converted):
    files = sorted((converted / "train").glob("*.parquet"))
    table = pq.read_table(files)
    assert table.num_rows == ROWS["day_0"]
    for j, hotness in enumerate(HOTNESS):
        column = table.column(f"cat_{j}")
        if hotness == 1:
            assert str(column.type) == "int64", j
            continue
        assert str(column.type) == "list<element: int64>", j
        lengths = {len(bag) for bag in column.to_pylist() if bag is not None}
        assert lengths == {hotness}, (j, lengths)
        assert all(0 <= i < SIZES[j] for bag in column.to_pylist() if bag for i in bag), j
    settings = json.loads((converted / "train" / "_conversion.json").read_text())["settings"]
    assert settings["multi_hot"]["hotness"] == HOTNESS and settings["multi_hot"]["seed"] == 0
    again = pq.read_table(sorted((converted / "again").glob("*.parquet")))
    assert again.equals(table)  # the same seed: the same bags
    other = pq.read_table(sorted((converted / "seed_1").glob("*.parquet")))
    assert other.column("cat_20").to_pylist() != table.column("cat_20").to_pylist()
    assert [b and b[0] for b in other.column("cat_20").to_pylist()] == [
        b and b[0] for b in table.column("cat_20").to_pylist()
    ]  # the one-hot id stays first


def test_the_preset_trains_on_the_multi_hot_conversion(converted, tmp_path):
    args = [
        sys.executable,
        "-m",
        "app.train",
        "experiment=criteo_1tb_dcnv2",
        *SCALED_DOWN,
        f"data.train_path={converted / 'train'}",
        f"data.val_path={converted / 'val'}",
        f"output_root={tmp_path}",
    ]
    out = check(run_command(args, cwd=REPO, timeout=300))
    run_dir = tmp_path / "criteo_1tb_dcnv2"
    resolved = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert resolved["model"]["arch"] == "dcn" and resolved["model"]["dcn_num_layers"] == 3
    assert {k: resolved["optim"][k] for k in ("dense", "sparse", "lr", "warmup_steps", "decay")} == {
        "dense": "adagrad",
        "sparse": "adagrad",
        "lr": 0.005,
        "warmup_steps": 0,
        "decay": "none",
    }
    assert resolved["trainer"]["epochs"] == 1
    assert resolved["trainer"]["early_stopping"]["target"] == 0.80275  # MLPerf's quality target stops it
    train = records(run_dir, "train")
    evals = records(run_dir, "eval")
    assert train and all(math.isfinite(r["loss"]) for r in train)
    assert [r["step"] for r in evals][-1] == ROWS["day_0"] // 128  # one epoch of 128-row batches
    assert all(math.isfinite(r["auc"]) and math.isfinite(r["logloss"]) for r in evals)
    assert "final validation AUC" in out
    assert "best achievable" not in out  # converted data records no best AUC: only the AUC is said
