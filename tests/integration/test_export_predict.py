"""Export and predict after a real 2-process run with row-wise sharded tables: the exported model,
in one process without torch.distributed, scores the val split exactly as the run's evaluation did."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from app.metrics import auc
from tests.conftest import REPO, run_command
from tests.integration.test_train import check, records, tiny, torchrun


def script(name: str, *args: str):
    return [sys.executable, str(REPO / "scripts" / name), *map(str, args)]


def test_the_exported_model_scores_the_val_split_as_the_run_did(tmp_path):
    check(run_command(torchrun(*tiny(tmp_path, "sharding=row_wise")), cwd=REPO))
    run_dir = tmp_path / "outputs" / "tiny"
    plan = json.loads((run_dir / "plan.json").read_text())
    assert {t["sharding_type"] for t in plan["tables"].values()} == {"row_wise"}  # every table split over 2 ranks
    final_eval = records(run_dir, "eval")[-1]

    exported = check(run_command(script("export.py", run_dir, "--out", tmp_path / "exported"), cwd=tmp_path))
    step = final_eval["step"]
    assert f"exported step {step} of {run_dir.resolve() / 'checkpoints' / f'step_{step:08d}'}:" in exported

    val = next((tmp_path / "data").iterdir()) / "val"
    predictions = tmp_path / "predictions.parquet"
    printed = check(run_command(script("predict.py", "--model", tmp_path / "exported", "--data", val,
                                       "--out", predictions), cwd=tmp_path))
    assert "is_fx_tracing" not in printed  # torch's note to library authors stays off the console
    metrics = {name: float(value) for name, value in re.findall(r"\b(AUC|logloss|NE) ([0-9.]+)", printed)}
    assert metrics["AUC"] == pytest.approx(final_eval["auc"], abs=1e-6)  # printed to 6 decimals
    assert metrics["logloss"] == pytest.approx(final_eval["logloss"], abs=1e-6)
    assert metrics["NE"] == pytest.approx(final_eval["ne"], abs=1e-6)

    # One row per val row, in file order, and the AUC of what was written is the run's: exactly, but
    # for pairs of rows whose logits differ and whose float32 probabilities do not (a tie counts half).
    table = pq.read_table(predictions)
    assert table.schema == pa.schema([("prediction", pa.float32()), ("label", pa.float32())])
    labels = np.concatenate([pq.read_table(f, columns=["label"])["label"].to_numpy()
                             for f in sorted(val.glob("*.parquet"))])
    assert table.num_rows == len(labels) == final_eval["samples"]
    assert np.array_equal(table["label"].to_numpy(), labels)
    scores = torch.from_numpy(table["prediction"].to_numpy().copy())
    _, where, counts = np.unique(scores.numpy(), return_inverse=True, return_counts=True)
    positives_at = np.bincount(where, weights=labels, minlength=len(counts))
    tied_pairs = float((positives_at * (counts - positives_at)).sum())
    positives = labels.sum()
    ties_weigh = 0.5 * tied_pairs / (positives * (len(labels) - positives))
    assert auc(scores, torch.from_numpy(labels)) == pytest.approx(final_eval["auc"], abs=1e-9 + ties_weigh)

    missing = run_command(script("predict.py", "--model", tmp_path / "nowhere", "--data", val, "--out", predictions),
                          cwd=tmp_path)
    assert missing.returncode == 2 and f"error: {tmp_path / 'nowhere'}: no such directory" in missing.stderr


def test_predict_scores_an_fp16_run_in_its_precision_as_its_validation_did(tmp_path):
    """trainer.precision=fp16 (bf16 takes the same path, but this CPU may refuse it for training):
    predict computes the dense part under the run's autocast, so its metrics are the final
    evaluation's to the printed decimals (scored in fp32 they differed: AUC 0.666927 vs 0.666948)."""
    check(run_command([sys.executable, "-m", "app.train", *tiny(tmp_path, "trainer.precision=fp16")], cwd=REPO))
    run_dir = tmp_path / "outputs" / "tiny"
    final_eval = records(run_dir, "eval")[-1]
    exported = check(run_command(script("export.py", run_dir, "--out", tmp_path / "exported"), cwd=tmp_path))
    assert "predict.py computes its dense part in fp16, the run's trainer.precision" in exported

    val = next((tmp_path / "data").iterdir()) / "val"
    printed = check(run_command(script("predict.py", "--model", tmp_path / "exported", "--data", val,
                                       "--out", tmp_path / "predictions.parquet"), cwd=tmp_path))
    assert "the dense part computed in fp16 (the run's trainer.precision" in printed
    printed_metrics = dict(re.findall(r"\b(AUC|logloss|NE) ([0-9.]+)", printed))
    assert printed_metrics == {name: f"{final_eval[key]:.6f}" for name, key in (("AUC", "auc"), ("logloss", "logloss"),
                                                                                 ("NE", "ne"))}
