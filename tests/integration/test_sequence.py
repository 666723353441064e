"""Sequence features (features.sequence) through the path users take, on the planted dataset of
experiment=sequence (its history carries a signal nothing else does):

- 2 gloo ranks with every table row-wise, the histories' EmbeddingCollection included;
- checkpoints, resumed on 1 worker (another world size) into a second epoch;
- export of the resumed run, and predict.py, whose AUC is the final evaluation's;
- learnability: on the same files, the model with the history beats the same model without it.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_command
from tests.integration.test_export_predict import script
from tests.integration.test_train import check, records, torchrun

ROWS = ["data.synthetic.train_rows=16000", "data.synthetic.val_rows=4000"]


def sequence_job(root: Path, *overrides: str):
    return [
        "experiment=sequence",
        f"data.synthetic.root={root / 'data'}",
        f"output_root={root / 'outputs'}",
        "logging.progress_bar=false",
        *ROWS,
        *overrides,
    ]


def app_train(*args: str):
    return [sys.executable, "-m", "app.train", *args]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Trained once for every test of the module: the 2-rank run, its 1-worker resume, and the
    same model without the history on the same files."""
    root = tmp_path_factory.mktemp("sequence")
    two_ranks = sequence_job(root, "sharding=row_wise", "checkpoint.every_n_steps=20")
    first = check(run_command(torchrun(*two_ranks), cwd=REPO))
    run_dir = root / "outputs" / "sequence"
    first_eval = records(run_dir, "eval")[-1]
    plan = json.loads((run_dir / "plan.json").read_text())

    resumed = check(run_command(app_train(*two_ranks, "trainer.epochs=2", "trainer.max_steps=145"), cwd=REPO))
    dataset = next((root / "data").iterdir())
    # The same files, the same global batch (2 x 128), no history: the column is there, unread.
    without = sequence_job(
        root,
        "run_name=without",
        "features.sequence=[]",
        "data.source=parquet",
        f"data.train_path={dataset / 'train'}",
        f"data.val_path={dataset / 'val'}",
        "data.batch_size=256",
        "checkpoint.every_n_steps=0",
    )
    check(run_command(app_train(*without), cwd=REPO))
    return {
        "root": root,
        "run_dir": run_dir,
        "dataset": dataset,
        "first": first,
        "first_eval": first_eval,
        "plan": plan,
        "resumed": resumed,
        "without_eval": records(root / "outputs" / "without", "eval")[-1],
    }


def test_two_ranks_shard_the_histories_then_one_worker_resumes(runs):
    tables = runs["plan"]["tables"]
    assert tables["t_history"]["sharding_type"] == "row_wise" and tables["t_history"]["ranks"] == [0, 1]
    assert tables["t_history"]["num_embeddings"] == 100
    assert runs["first_eval"]["samples"] == 4000
    steps = runs["first_eval"]["step"]
    checkpoint = runs["run_dir"] / "checkpoints" / f"step_{steps:08d}"
    # 16,000 rows: 62 steps of 2 x 128 (the last 128 dropped), the same samples as 125 of 128.
    assert f"resumed from {checkpoint} at step 125 (epoch 0)" in runs["resumed"]
    log = (runs["run_dir"] / "train_rank0.log").read_text()
    assert "starts fresh" not in log  # the histories' table and its optimizer state were in the checkpoint
    assert records(runs["run_dir"], "eval")[-1]["step"] == 145  # then 20 steps into a second epoch


def test_the_exported_model_scores_the_val_split_as_the_resumed_run_did(runs):
    final_eval = records(runs["run_dir"], "eval")[-1]
    out = runs["root"] / "exported"
    check(run_command(script("export.py", runs["run_dir"], "--pick", "latest", "--out", out), cwd=REPO))
    printed = check(
        run_command(
            script(
                "predict.py",
                "--model",
                out,
                "--data",
                runs["dataset"] / "val",
                "--out",
                runs["root"] / "predictions.parquet",
            ),
            cwd=REPO,
        )
    )
    metrics = {name: float(value) for name, value in re.findall(r"\b(AUC|logloss) ([0-9.]+)", printed)}
    assert metrics["AUC"] == pytest.approx(final_eval["auc"], abs=1e-6)
    assert metrics["logloss"] == pytest.approx(final_eval["logloss"], abs=1e-6)


def test_the_history_carries_a_signal_the_model_learns(runs):
    with_history, without = runs["first_eval"]["auc"], runs["without_eval"]["auc"]
    metadata = json.loads((runs["dataset"] / "metadata.json").read_text())
    assert with_history > without + 0.05, (with_history, without)
    assert with_history < metadata["best_auc"]  # the planted truth bounds both
