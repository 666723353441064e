"""Early stopping, the best checkpoint and the test split, through `python -m app.train` on real
Parquet files: a 2-process run interrupted at an evaluation and resumed, then stopped by patience
(shared by several tests), the same command run again, a run stopped by a target, and an
independent scoring of the best checkpoint's export."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from app.data.files import resolve_files
from app.export import load_exported, resolve_checkpoint, score_files
from app.metrics import EvalMetrics
from tests.conftest import REPO, run_command
from tests.integration.test_train import NO_READERS, check, records, script_in_process, tiny, torchrun

# experiment=tiny on 2 ranks: 15 steps an epoch, 30 planned. Evaluated every 5 steps; no evaluation
# after the first improves by more than 0.5, so with a patience of 2 the run stops at step 15.
# keep_last=1 would prune the best (step 5) but for checkpoints/best.
PATIENCE = [
    "trainer.eval_every_n_steps=5",
    "trainer.early_stopping.patience=2",
    "trainer.early_stopping.min_delta=0.5",
    "checkpoint.keep_last=1",
    "trainer.epochs=2",
    NO_READERS,  # early stopping is not about the readers: no fork server to start in each worker
]


def script(name: str, *args):
    return [sys.executable, str(REPO / "scripts" / name), *map(str, args)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("early_stopping_data")
    made = check(
        run_command(
            script(
                "make_dataset.py", "experiment=tiny", f"data.synthetic.root={root}", "data.synthetic.test_rows=1000"
            ),
            cwd=REPO,
        )
    )
    return Path(re.search(r"dataset: (\S+)", made).group(1))


def on_parquet(tmp_path: Path, dataset: Path, *overrides: str):
    return tiny(
        tmp_path,
        "data=parquet",
        f"data.train_path={dataset / 'train'}",
        f"data.val_path={dataset / 'val'}",
        f"data.test_path={dataset / 'test'}",
        *overrides,
    )


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, dataset):
    """2 workers: ended at step 10 (trainer.max_steps=10), an evaluation step whose evaluation
    comes after the run's final checkpoint; resumed, stopped by patience at step 15 of 30 (the
    `first` run of the tests, as the uninterrupted run would); then the same command again."""
    root = tmp_path_factory.mktemp("early_stopping_run")
    command = torchrun(*on_parquet(root, dataset, *PATIENCE))
    check(run_command([*command, "trainer.max_steps=10"], cwd=REPO))
    first = run_command(command, cwd=REPO)
    run_dir = root / "outputs" / "tiny"
    checkpoints_after_first = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    records_after_first = (run_dir / "metrics.jsonl").read_text().splitlines()
    summary_after_first = json.loads((run_dir / "summary.json").read_text()) if first.returncode == 0 else None
    again = run_command(command, cwd=REPO)
    return run_dir, first, again, checkpoints_after_first, records_after_first, summary_after_first


def test_a_run_stops_when_validation_has_not_improved_for_patience_evaluations(stopped_run):
    _, first, _, _, records_after_first, summary = stopped_run
    out = check(first)
    assert (
        "stopping early at step 15 of 30: validation auc has not improved by more than 0.5 in 2 evaluations "
        "(trainer.early_stopping.patience=2; best "
    ) in out
    assert "resumed from" in out
    kinds = [json.loads(line) for line in records_after_first]
    # Step 10's evaluation, the end of the interrupted run, is counted by the resumed one: without
    # it, the resumed run would stop an evaluation later than the uninterrupted one, at 20.
    assert [r["step"] for r in kinds if r["kind"] == "eval"] == [5, 10, 10, 15]
    assert max(r["step"] for r in kinds if r["kind"] == "train") == 15
    assert summary["step"] == 15 and summary["planned_steps"] == 30
    assert summary["stopped_early"].startswith("validation auc has not improved")


@pytest.fixture(scope="module")
def exported_best(stopped_run, tmp_path_factory):
    """scripts/export.py of the stopped run's directory: its default pick."""
    run_dir, first, *_ = stopped_run
    check(first)
    out = tmp_path_factory.mktemp("exported")
    # In this process (script_in_process): test_export_predict.py launches the script for real.
    return out, check(script_in_process("export.py", run_dir, "--out", out))


def test_the_best_checkpoint_survives_keep_last_and_export_takes_it(stopped_run, exported_best):
    run_dir, _, _, checkpoints_after_first, _, _ = stopped_run
    # keep_last=1 pruned step 10 but not step 5, the best: the first evaluation, the only improvement.
    assert checkpoints_after_first == ["best", "latest", "step_00000005", "step_00000015"]
    best = json.loads((run_dir / "checkpoints" / "best").read_text())
    first_eval = records(run_dir, "eval")[0]
    assert (best["checkpoint"], best["step"], best["metric"]) == ("step_00000005", 5, "auc")
    assert best["value"] == first_eval["auc"]
    assert f"exported step 5 of {run_dir.resolve() / 'checkpoints' / 'step_00000005'}:" in exported_best[1]
    assert resolve_checkpoint(run_dir, prefer="latest").name == "step_00000015"  # export --pick latest


def test_test_metrics_are_the_best_checkpoints(stopped_run, dataset, exported_best):
    _, first, _, _, records_after_first, summary = stopped_run
    out = check(first)
    tests = [json.loads(line) for line in records_after_first if json.loads(line)["kind"] == "test"][-1:]
    assert (tests[0]["step"], tests[0]["checkpoint"], tests[0]["samples"]) == (5, "step_00000005", 1000)
    assert re.search(r"test with step_00000005, the best by validation auc \([0-9.]+\): auc [0-9.]+", out)
    assert summary["test"]["auc"] == tests[0]["auc"]
    # Scored independently: the exported best checkpoint, in this one process, on the test split.
    model, config = load_exported(exported_best[0])
    metrics = EvalMetrics(torch.device("cpu"))
    for logits, labels in score_files(model, config, resolve_files(str(dataset / "test")), 300, labeled=True):
        metrics.update(logits, labels)
    independent = metrics.compute()
    assert independent["samples"] == 1000
    for name in ("auc", "logloss", "ne"):
        assert independent[name] == pytest.approx(tests[0][name], abs=1e-6), name


def test_an_early_stopped_run_run_again_trains_no_further(stopped_run):
    run_dir, _, again, checkpoints_after_first, records_after_first, _ = stopped_run
    out = check(again)
    assert "resumed from" in out and "this run stopped early at step 15 (validation auc has not improved" in out
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == checkpoints_after_first
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    added = [json.loads(line) for line in lines[len(records_after_first) :]]
    assert [r["kind"] for r in added] == ["eval", "test"]  # reported again, not trained
    assert added[0]["step"] == 15 and added[1]["checkpoint"] == "step_00000005"
    assert json.loads((run_dir / "checkpoints" / "best").read_text())["checkpoint"] == "step_00000005"


def test_a_run_stops_when_validation_reaches_the_target(tmp_path, dataset):
    # Any model this side of chance has a logloss below 1.0: the first evaluation reaches it.
    args = on_parquet(
        tmp_path,
        dataset,
        "trainer.eval_every_n_steps=5",
        "trainer.early_stopping.metric=logloss",
        "trainer.early_stopping.target=1.0",
        "checkpoint.every_n_steps=0",
        NO_READERS,
    )
    out = check(run_command([sys.executable, "-m", "app.train", *args], cwd=REPO))
    assert re.search(
        r"stopping early at step 5 of 31: validation logloss [0-9.]+ reached "
        r"trainer.early_stopping.target=1.0",
        out,
    )
    run_dir = tmp_path / "outputs" / "tiny"
    assert [r["step"] for r in records(run_dir, "eval")] == [5]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best", "latest", "step_00000005"]
    test = records(run_dir, "test")
    assert len(test) == 1 and test[0]["checkpoint"] == "step_00000005"  # the model in memory: no reload


def test_a_validation_split_of_one_class_is_said_at_start_up_and_its_evaluations_do_not_stop_the_run(tmp_path, dataset):
    import pyarrow as pa
    import pyarrow.parquet as pq

    one_class = tmp_path / "val_one_class"
    one_class.mkdir()
    for path in sorted((dataset / "val").glob("*.parquet")):
        table = pq.read_table(path)
        label = table.schema.get_field_index("label")
        table = table.set_column(label, "label", pa.array([0] * table.num_rows, type=table.schema.field(label).type))
        pq.write_table(table, one_class / path.name, row_group_size=250)
    args = on_parquet(
        tmp_path,
        dataset,
        f"data.val_path={one_class}",
        "trainer.eval_every_n_steps=5",
        "trainer.early_stopping.patience=1",
        "checkpoint.every_n_steps=0",
        "trainer.max_steps=15",
        NO_READERS,
    )
    out = check(run_command([sys.executable, "-m", "app.train", *args], cwd=REPO))
    assert (
        f"the validation split ({one_class}) has one class only: every row's 'label' is 0. Its AUC is "
        "undefined (nan)" in out
    )
    assert "the test split" not in out  # it has both
    assert (
        "validation auc is undefined (nan) at step 5: the evaluation cannot be the best and does not count "
        "toward trainer.early_stopping.patience" in out
    )
    # Patience 1 would have stopped it at step 10 ("best none yet"): it trains to the end.
    assert "stopping early" not in out
    run_dir = tmp_path / "outputs" / "tiny"
    assert [r["step"] for r in records(run_dir, "eval")] == [5, 10, 15]
    assert not (run_dir / "checkpoints" / "best").exists()
