"""scripts/plan.py: a dry run of the planner for any world size, without a process group."""

from __future__ import annotations

import json
import re
import sys

from tests.conftest import REPO, run_command
from tests.integration.test_train import script_in_process


def test_plans_the_criteo_1tb_preset_balanced_without_its_data(tmp_path):
    # The preset reads Parquet, and no data path is given: a dry run reads no data.
    result = run_command(
        [
            sys.executable,
            "scripts/plan.py",
            "--world-size",
            "8,64",
            "--summary",
            "--json",
            str(tmp_path / "plan.json"),
            "experiment=criteo_1tb_dcnv2",
        ],
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "memory per rank: torchrec's default (DDR 128 GiB)" in result.stdout
    lines = [line for line in result.stdout.splitlines() if line.startswith("world size")]
    assert [line.split(":")[0] for line in lines] == ["world size   8", "world size  64"]
    for line in lines:  # every rank within 10% of the mean cost, by the planner's estimate
        assert float(re.search(r"cost ([0-9.]+)", line).group(1)) <= 1.1, line
        assert re.search(r"estimated step [0-9.]+ ms", line), line
    report = json.loads((tmp_path / "plan.json").read_text())
    assert report["world_size"] == 64 and len(report["tables"]) == 26
    assert set(report["ranks"]) == {str(r) for r in range(64)}
    assert all(info["tables"] and info["cost"] > 0 for info in report["ranks"].values())
    assert report["estimated_step_ms"] == max(info["cost"] for info in report["ranks"].values())
    assert report["cost_imbalance"] <= 1.1


def test_full_report_and_errors():
    # In this process (script_in_process: the script's main, output and exit code, without a Python
    # start and torch's imports each time); the test above launches the script for real.
    result = script_in_process("plan.py", "--world-size", "2", "sharding=row_wise")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sharding plan for 2 rank(s)" in result.stdout and "row_wise" in result.stdout
    assert "cost" in result.stdout and "imbalance" in result.stdout and "estimated step time" in result.stdout
    refused = script_in_process("plan.py", "--world-size", "2", "sharding.ddr_cap_gb=0.000001")
    assert refused.returncode == 2 and "found no plan for 2 rank(s)" in refused.stderr
    assert "memory per rank: DDR 9.99e-07 GiB (sharding.ddr_cap_gb)" in refused.stderr
    # torch numbers a host's CUDA devices with 8 bits: 200 on one host cannot be placed.
    crowded = script_in_process("plan.py", "--world-size", "8,200", "--device", "cuda")
    assert crowded.returncode == 2 and "--world-size 200 with 200 workers a host" in crowded.stderr
    assert "sharding plan" not in crowded.stdout
