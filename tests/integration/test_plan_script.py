"""scripts/plan.py: a dry run of the planner for any world size, without a process group."""

from __future__ import annotations

import json
import sys

from tests.conftest import REPO, run_command


def test_plans_world_sizes_1_to_64_without_training(tmp_path):
    result = run_command([sys.executable, "scripts/plan.py", "--world-size", "1,64", "--summary",
                          "--json", str(tmp_path / "plan.json")], cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("world size")]
    assert [line.split(":")[0] for line in lines] == ["world size   1", "world size  64"]
    report = json.loads((tmp_path / "plan.json").read_text())
    assert report["world_size"] == 64 and len(report["tables"]) == 26
    assert set(report["ranks"]) == {str(r) for r in range(64)}
    assert all("cost" in info for info in report["ranks"].values() if info["tables"])


def test_full_report_and_errors():
    result = run_command([sys.executable, "scripts/plan.py", "--world-size", "2", "sharding=row_wise"], cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sharding plan for 2 rank(s)" in result.stdout and "row_wise" in result.stdout
    assert "cost" in result.stdout and "imbalance" in result.stdout
    refused = run_command([sys.executable, "scripts/plan.py", "--world-size", "2", "sharding.ddr_cap_gb=0.000001"],
                          cwd=REPO)
    assert refused.returncode == 2 and "found no plan for 2 rank(s)" in refused.stderr
