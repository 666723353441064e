"""Quantized embedding communication: with the all-to-alls in fp16, bf16, int8 or mx4, training
on 2 gloo ranks stays within a small tolerance of fp32."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, run_command
from tests.integration.test_train import check, records, tiny, torchrun


def run(root, precision: str, sharding: str = "table_wise"):
    args = tiny(root, f"sharding={sharding}", "trainer.max_steps=15", "trainer.log_every_n_steps=1",
                f"sharding.comm_forward_precision={precision}", f"sharding.comm_backward_precision={precision}")
    check(run_command(torchrun(*args), cwd=REPO))
    run_dir = root / "outputs" / "tiny"
    return [r["loss"] for r in records(run_dir, "train")], records(run_dir, "eval")[-1]["logloss"]


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    return run(tmp_path_factory.mktemp("fp32"), "fp32")


@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8", "mx4"])
def test_quantized_communication_stays_close_to_fp32(tmp_path, exact, precision):
    exact_losses, exact_logloss = exact
    losses, logloss = run(tmp_path, precision)
    assert losses != exact_losses  # the all-to-alls really were quantized
    assert losses == pytest.approx(exact_losses, abs=5e-3)
    assert logloss == pytest.approx(exact_logloss, abs=2e-3)


def test_row_wise_reduce_scatter_with_bf16(tmp_path):
    exact_losses, _ = run(tmp_path / "fp32", "fp32", "row_wise")
    losses, _ = run(tmp_path / "bf16", "bf16", "row_wise")
    assert losses != exact_losses
    assert losses == pytest.approx(exact_losses, abs=5e-3)
