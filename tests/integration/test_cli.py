"""The entrypoint's command line as users type it: every config error exits 2 with one line saying
what and where (said once, by rank 0), before any run directory exists; --help documents every key."""

from __future__ import annotations

import json
import sys

import pytest

from app.config import field_docs
from tests.conftest import REPO, run_command


@pytest.mark.parametrize("prefix", ["", "+", "++"])
def test_entrypoint_rejects_an_unknown_key_whatever_its_prefix(tmp_path, prefix):
    # `+optim.lrr=0.1` is what Hydra itself suggests for an unknown key; it used to train at the default lr.
    result = run_command([sys.executable, "-m", "app.train", f"{prefix}optim.lrr=0.1", f"output_root={tmp_path}"],
                         cwd=REPO)
    assert result.returncode == 2, result.stderr
    assert "error: 'optim.lrr' is not a config key: 'optim' has no field 'lrr'. Did you mean 'optim.lr'?" \
        in result.stderr
    assert not list(tmp_path.iterdir()), "a rejected config must not create a run directory"


def test_every_config_error_exits_2_and_group_schemas_are_not_options(tmp_path):
    for override in ("model=nope", "model=schema", "data.batch_size=many", "optim.lr=-1"):
        result = run_command([sys.executable, "-m", "app.train", override, f"output_root={tmp_path}"], cwd=REPO)
        assert result.returncode == 2, (override, result.stderr)
    # A run (a sweep's point) that fails on its config says so in its summary, as one failing later would.
    summary = json.loads((tmp_path / "default" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "ConfigError: optim.lr must be > 0, got -1.0."
    help_text = run_command([sys.executable, "-m", "app.train", "--help"], cwd=REPO).stdout
    assert "dcn, deepfm, dlrm" in help_text and "schema" not in help_text


def test_a_config_error_is_said_by_rank_0_only(tmp_path):
    # Every worker composes the same config and meets the same error: one line on the console
    # (torchrun's workers share it), not one per rank run together.
    import os
    import subprocess

    command = [sys.executable, "-m", "app.train", "optim.lr=-1", f"output_root={tmp_path}"]
    for rank, expected in (("0", "error: optim.lr must be > 0, got -1.0.\n"), ("1", "")):
        env = dict(os.environ, PYTHONPATH=str(REPO), RANK=rank, WORLD_SIZE="2")
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stderr == expected, (rank, result.stderr)


def test_help_lists_every_key_with_its_default_and_help():
    result = run_command([sys.executable, "-m", "app.train", "--help"], cwd=REPO)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "checkpoint.every_n_steps: int = 500\n" in text
    assert "trainer.epochs: int = 2\n" in text and "optim.lr: float = 0.05\n" in text
    assert "sharding.hbm_cap_gb: Optional[float] = null\n" in text
    assert "    Save a checkpoint every this many steps, and always at the end (0: only at the end); also at" in text
    assert "model: dcn, deepfm, dlrm" in text, "Hydra's list of groups and options stays"
    flat = " ".join(text.split())
    for doc in field_docs():
        if not doc.is_group:
            assert f"{doc.key}: {doc.type} = " in text, doc.key
        assert " ".join(doc.help.split()) in flat, doc.key
    # The group options and overrides given show where they change a default.
    text = run_command([sys.executable, "-m", "app.train", "--help", "experiment=tiny", "optim.lr=0.5"],
                       cwd=REPO).stdout
    assert "checkpoint.every_n_steps: int = 500  (composed: 10)\n" in text
    assert "optim.lr: float = 0.05  (composed: 0.5)\n" in text and "optim.eps: float = 1e-08\n" in text
    assert "features.sparse: List[SparseFeature] = []  (composed: [26 entries])\n" in text
