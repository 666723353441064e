"""Evaluation on 2 workers when the validation split has fewer row groups than workers: one
worker has no validation rows, and still takes part in every collective of the evaluation."""

from __future__ import annotations

import json
import math

from tests.conftest import REPO, run_command
from tests.integration.test_train import check, records, tiny, torchrun


def test_a_worker_without_validation_rows_evaluates_with_the_others(tmp_path):
    # 200 validation rows in one file of one row group: all of them go to one worker. The tables are
    # split column_wise: that sharding type trains to the end here (test_train.py's
    # test_every_sharding_type_trains_to_the_end).
    overrides = ["data.synthetic.val_rows=200", "data.synthetic.rows_per_file=2000", "trainer.max_steps=6"]
    out = check(run_command(torchrun(*tiny(tmp_path, *overrides, "sharding=column_wise")), cwd=REPO))
    final = records(tmp_path / "outputs" / "tiny", "eval")[-1]
    assert final["samples"] == 200 and math.isfinite(final["auc"]) and math.isfinite(final["logloss"])
    assert "final validation AUC" in out
    plan = json.loads((tmp_path / "outputs" / "tiny" / "plan.json").read_text())
    assert {t["sharding_type"] for t in plan["tables"].values()} == {"column_wise"}
