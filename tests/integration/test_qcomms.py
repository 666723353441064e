"""Quantized embedding communication: with the all-to-alls in fp16, bf16, int8 or mx4, training
on 2 gloo ranks stays within a small tolerance of fp32."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, run_command
from tests.integration.conftest import FinishedRun, comm_precision_run
from tests.integration.test_train import check, records


def run(root, precision: str, sharding: str = "table_wise"):
    command = [arg.replace("{root}", str(root)) for arg in comm_precision_run(sharding, precision)]
    check(run_command(command, cwd=REPO))
    return losses_and_logloss(root / "outputs" / "tiny")


def losses_and_logloss(run_dir):
    return [r["loss"] for r in records(run_dir, "train")], records(run_dir, "eval")[-1]["logloss"]


@pytest.fixture(scope="module")
def exact(table_wise_run: FinishedRun):
    """The fp32 run: the session's table-wise one, which is run(root, "fp32") (tests/integration/conftest.py)."""
    return losses_and_logloss(table_wise_run.run_dir)


@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8", "mx4"])
def test_quantized_communication_stays_close_to_fp32(tmp_path, exact, precision):
    exact_losses, exact_logloss = exact
    losses, logloss = run(tmp_path, precision)
    assert losses != exact_losses  # the all-to-alls really were quantized
    assert losses == pytest.approx(exact_losses, abs=5e-3)
    assert logloss == pytest.approx(exact_logloss, abs=2e-3)


def test_row_wise_reduce_scatter_with_bf16(tmp_path, row_wise_run):
    exact_losses, _ = losses_and_logloss(row_wise_run.run_dir)  # run(..., "fp32", "row_wise"), shared
    losses, _ = run(tmp_path / "bf16", "bf16", "row_wise")
    assert losses != exact_losses
    assert losses == pytest.approx(exact_losses, abs=5e-3)
