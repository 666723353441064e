"""Quantized embedding communication: fp16 all-to-alls train within a small tolerance of fp32
on 2 gloo ranks; bf16, which torchrec supports over NCCL only, is refused on gloo."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, run_command
from tests.integration.test_train import check, records, tiny, torchrun


def run(tmp_path, precision: str):
    root = tmp_path / precision
    args = tiny(root, "sharding=table_wise", "trainer.max_steps=15", "trainer.log_every_n_steps=1",
                f"sharding.comm_forward_precision={precision}", f"sharding.comm_backward_precision={precision}")
    check(run_command(torchrun(*args), cwd=REPO))
    run_dir = root / "outputs" / "tiny"
    return [r["loss"] for r in records(run_dir, "train")], records(run_dir, "eval")[-1]["logloss"]


def test_fp16_communication_stays_close_to_fp32(tmp_path):
    exact_losses, exact_logloss = run(tmp_path, "fp32")
    losses, logloss = run(tmp_path, "fp16")
    assert losses != exact_losses  # the all-to-alls really were quantized
    assert losses == pytest.approx(exact_losses, abs=5e-3)
    assert logloss == pytest.approx(exact_logloss, abs=2e-3)


def test_bf16_communication_is_refused_on_gloo(tmp_path):
    result = run_command(torchrun(*tiny(tmp_path, "trainer.max_steps=2", "sharding.comm_forward_precision=bf16")),
                         cwd=REPO)
    assert result.returncode != 0
    assert "torchrec sends bf16 all-to-alls over NCCL only" in result.stdout + result.stderr
