"""fp16 in real runs: tables stored in fp16 (features.data_type) that the plan replicates train like
fp32 ones, alone and under trainer.precision=fp16; a step whose gradients overflow on one rank
changes no table, dense layer or optimizer state on any rank; the loss scale resumes exactly; a
checkpoint of other table data types is refused."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.conftest import REPO, run_command
from tests.integration.test_resume import run_dir
from tests.integration.test_train import check, records, script_in_process, tiny, torchrun

# Row 400 of part-00000 is read, unshuffled, in the 4th batch on 1 rank (rows 384-511) and in
# rank 1's 2nd batch on 2 ranks (its row groups are 1, 3, ...: rows 378-505 of the file). A dense
# value of 30000 keeps the forward finite (loss about 5) but overflows fp16 gradients at any
# loss scale above a few hundred.
OVERFLOW_ROW, OVERFLOW_VALUE = 400, 30_000.0
FP16_STEPS = ["data=parquet", "data.shuffle=false", "trainer.precision=fp16", "trainer.log_every_n_steps=1"]


def one_process(*args: str):
    return [sys.executable, "-m", "app.train", *args]


def train_records(root: Path):
    return records(run_dir(root), "train")


@pytest.fixture(scope="module")
def overflowing_data(tmp_path_factory) -> dict[str, Path]:
    """experiment=tiny's synthetic splits, and a copy of the train split with one huge dense value."""
    root = tmp_path_factory.mktemp("data")
    # In this process (script_in_process): a process of its own would cost its imports again.
    check(script_in_process("make_dataset.py", *tiny(root)[:2]))
    synthetic = next((root / "data").iterdir())
    crafted = root / "overflowing"
    shutil.copytree(synthetic / "train", crafted)
    table = pq.read_table(synthetic / "train" / "part-00000.parquet")
    values = table.column("int_0").to_numpy().copy()
    values[OVERFLOW_ROW] = OVERFLOW_VALUE
    table = table.set_column(table.schema.get_field_index("int_0"), "int_0", pa.array(values))
    pq.write_table(table, crafted / "part-00000.parquet", row_group_size=250)
    return {"train": crafted, "val": synthetic / "val", "clean": synthetic / "train"}


def on(data: dict[str, Path], split: str = "train"):
    return [f"data.train_path={data[split]}", f"data.val_path={data['val']}"]


def checkpoint_state(path: Path, tmp_path: Path) -> dict[str, object]:
    """Everything a checkpoint holds (model and optimizer state, every rank's shards), flat."""
    out = tmp_path / f"{path.parent.parent.parent.name}-{path.name}.pt"
    dcp_to_torch_save(path, out)

    def flat(tree, prefix=""):
        items = {}
        for key, value in tree.items():
            items.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
        return items

    return flat(torch.load(out, weights_only=True))


def differing(a: dict[str, object], b: dict[str, object]):
    assert a.keys() == b.keys()
    same = lambda x, y: torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y  # noqa: E731
    return [key for key in a if not same(a[key], b[key])]


def test_replicated_fp16_tables_train_like_fp32_ones(tmp_path):
    """The auto planner replicates criteo_demo's small tables on 2 ranks: fp16 ones used to turn
    NaN after the first step (their torch optimizer's state was fp16: eps rounds to 0, 0/0)."""
    common = ["features=criteo_demo", "trainer.max_steps=15", "checkpoint.every_n_steps=0"]
    finals = {}
    for name, extra in (
        ("fp32", []),
        ("fp16", ["features.data_type=fp16"]),
        ("fp16-scaled", ["features.data_type=fp16", "trainer.precision=fp16"]),
    ):
        root = tmp_path / name
        if name != "fp32":
            shutil.copytree(tmp_path / "fp32" / "data", root / "data")
        check(run_command(torchrun(*tiny(root, *common, *extra)), cwd=REPO))
        plan = json.loads((run_dir(root) / "plan.json").read_text())
        assert "data_parallel" in {table["sharding_type"] for table in plan["tables"].values()}, plan
        finals[name] = records(run_dir(root), "eval")[-1]
        assert all(math.isfinite(r["loss"]) for r in train_records(root)), name
    # Measured: AUC 0.6881 / logloss 0.5901 in fp32, 0.6697 / 0.5980 with fp16 tables, 0.6715 /
    # 0.5982 with trainer.precision=fp16 too (every table is fp16 there, not only the replicated).
    for name in ("fp16", "fp16-scaled"):
        assert math.isfinite(finals[name]["logloss"]) and finals[name]["auc"] > 0.6, finals[name]
        assert finals[name]["logloss"] == pytest.approx(finals["fp32"]["logloss"], abs=0.015), (name, finals)
        assert finals[name]["auc"] == pytest.approx(finals["fp32"]["auc"], abs=0.03), (name, finals)


def test_an_overflow_on_one_rank_changes_nothing_on_any_rank(overflowing_data, tmp_path):
    """Rank 1's 2nd batch overflows: step 2 must leave every table (sharded ones, stepped inside
    the backward, and replicated ones), dense layer and optimizer state as step 1 left them,
    on both ranks, and halve the loss scale; step 3 trains again."""
    # sharding=mixed (cat_9 row-wise, cat_2 column-wise, ...) with two small tables replicated.
    replicated = "+sharding.tables={cat_13:{sharding_types:[data_parallel]},cat_16:{sharding_types:[data_parallel]}}"
    check(
        run_command(
            torchrun(
                *tiny(
                    tmp_path,
                    *FP16_STEPS,
                    *on(overflowing_data),
                    "sharding=mixed",
                    replicated,
                    "trainer.max_steps=3",
                    "checkpoint.every_n_steps=1",
                    "checkpoint.keep_last=3",
                )
            ),
            cwd=REPO,
        )
    )
    plan = {
        name: table["sharding_type"]
        for name, table in json.loads((run_dir(tmp_path) / "plan.json").read_text())["tables"].items()
    }
    assert plan["t_cat_13"] == "data_parallel" and plan["t_cat_9"] == "row_wise", plan
    checkpoints = run_dir(tmp_path) / "checkpoints"
    states = [checkpoint_state(checkpoints / f"step_{step:08d}", tmp_path) for step in (1, 2, 3)]
    assert len(states[0]) > 60 and any("replicated_tables" in key for key in states[0])
    assert differing(states[0], states[1]) == []
    assert len(differing(states[1], states[2])) > 30  # tables and dense layers moved again
    steps = train_records(tmp_path)
    assert [(r["step"], r["loss_scale"], r["skipped_steps"]) for r in steps] == [
        (1, 65536.0, 0),
        (2, 32768.0, 1),
        (3, 32768.0, 1),
    ], steps
    assert all(math.isfinite(r["loss"]) for r in steps)  # an overflow in the backward, not the loss

    # The verdict is every rank's, so the scale is one: saved once, it resumes on 1 rank.
    out = check(
        run_command(
            one_process(*tiny(tmp_path, *FP16_STEPS, *on(overflowing_data, "clean"), "trainer.max_steps=8")), cwd=REPO
        )
    )
    assert "this run has 1 ranks" in out
    assert [r["loss_scale"] for r in train_records(tmp_path)[3:]] == [32768.0] * 2


def test_an_fp16_run_that_backed_off_resumes_exactly(overflowing_data, tmp_path):
    """The loss scale halves at step 4; interrupted at step 6 and resumed, the run ends bitwise
    where the uninterrupted one does: model and optimizer state."""
    common = [*FP16_STEPS, *on(overflowing_data), "trainer.max_steps=12", "checkpoint.every_n_steps=6", "optim=adam"]
    reference = tmp_path / "reference"
    check(run_command(one_process(*tiny(reference, *common)), cwd=REPO))
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir(reference), run_dir(resumed))
    (run_dir(resumed) / "metrics.jsonl").unlink()
    shutil.rmtree(run_dir(resumed) / "checkpoints" / "step_00000012")
    check(run_command(one_process(*tiny(resumed, *common)), cwd=REPO))
    assert train_records(resumed)[0]["step"] == 7
    final = "checkpoints/step_00000012"
    assert (
        differing(
            checkpoint_state(run_dir(reference) / final, tmp_path), checkpoint_state(run_dir(resumed) / final, tmp_path)
        )
        == []
    )
    assert [r["skipped_steps"] for r in train_records(reference)][2:5] == [0, 1, 1]
    assert [r["loss_scale"] for r in train_records(resumed)] == [r["loss_scale"] for r in train_records(reference)][6:]

    # Table weights stored in another precision are another model: refused, not cast.
    before = sorted(p.name for p in (run_dir(resumed) / "checkpoints").glob("step_*"))
    refused = run_command(one_process(*tiny(resumed, *common, "features.data_type=fp16")), cwd=REPO)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "features.data_type: 'fp32' in the checkpoint, 'fp16' now" in refused.stderr
    assert sorted(p.name for p in (run_dir(resumed) / "checkpoints").glob("step_*")) == before
