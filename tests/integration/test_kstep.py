"""k-step model averaging of the dense part on 2 gloo ranks: with SGD and k=1 it is exactly the
synchronous run (the mean of locally updated parameters is the update by the mean gradient);
with k=4 the ranks really step apart between averages, and training still converges."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, run_command
from tests.integration.test_resume import PRESETS
from tests.integration.test_train import check, records, tiny, torchrun


def run(tmp_path, every: int, *overrides: str):
    root = tmp_path / f"k{every}"
    out = check(
        run_command(
            torchrun(
                *tiny(
                    root,
                    "trainer.epochs=2",
                    "trainer.log_every_n_steps=1",
                    f"trainer.dense_average_every={every}",
                    *overrides,
                )
            ),
            cwd=REPO,
        )
    )
    return (out, *losses_and_eval(root / "outputs" / "tiny"))


def losses_and_eval(run_dir):
    return [r["loss"] for r in records(run_dir, "train")], records(run_dir, "eval")[-1]


def test_k1_with_sgd_equals_synchronous_training(tmp_path, uninterrupted):
    # The synchronous run: test_resume.py's uninterrupted SGD run on 2 ranks, shared by the session
    # (tests/integration/conftest.py); the k=1 run has its optimizer settings.
    sync_losses, sync_eval = losses_and_eval(uninterrupted("sgd", 2) / "outputs" / "tiny")
    out, losses, final = run(tmp_path, 1, *PRESETS["sgd"])
    assert "k-step averaging: 30 dense parameter averages" in out
    assert losses == pytest.approx(sync_losses, abs=1e-5)
    assert final["logloss"] == pytest.approx(sync_eval["logloss"], abs=1e-5)


def test_k4_steps_apart_between_averages_and_converges(tmp_path, uninterrupted):
    # The synchronous run: test_resume.py's uninterrupted run of the default optimizer (adagrad) on
    # 2 ranks, shared by the session (tests/integration/conftest.py).
    sync_losses, sync_eval = losses_and_eval(uninterrupted("adagrad", 2) / "outputs" / "tiny")
    out, losses, final = run(tmp_path, 4)
    assert "k-step averaging:" in out
    assert losses != pytest.approx(sync_losses, abs=1e-6)  # gradients were not all-reduced
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert final["auc"] > 0.6 and abs(final["logloss"] - sync_eval["logloss"]) < 0.05
