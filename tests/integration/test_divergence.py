"""A diverging run, as a user starts it: `optim=sgd optim.lr=1e12` on 2 workers. It stops with
one error naming the step (exit 2), saves nothing of the diverged model, keeps the checkpoints
and the best from before, and summary.json says why."""

from __future__ import annotations

import json
import sys

from tests.conftest import REPO, run_command
from tests.integration.test_train import check, records, tiny


def test_a_diverging_run_stops_naming_the_step_and_saves_or_judges_nothing_non_finite(tmp_path):
    run_dir = tmp_path / "outputs" / "tiny"
    common = [
        sys.executable,
        "-m",
        "app.train",
        "distributed.nproc_per_node=2",
        *tiny(
            tmp_path,
            "optim=sgd",
            "trainer.eval_every_n_steps=5",
            "checkpoint.every_n_steps=5",
            "checkpoint.keep_last=10",
        ),
    ]
    check(run_command([*common, "trainer.max_steps=5"], cwd=REPO))  # sound: step 5 saved, and the best
    best = (run_dir / "checkpoints" / "best").read_text()
    assert json.loads(best)["step"] == 5

    result = run_command([*common, "optim.lr=1e12"], cwd=REPO)  # resumed at step 5, then diverges
    assert result.returncode == 2, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "error: the training loss is not finite (nan or inf) on rank" in errors[0], (
        result.stderr[-4000:]
    )
    assert "for 3 step(s) in a row, up to step " in errors[0] and "trainer.max_nonfinite_steps=3" in errors[0]
    train = records(run_dir, "train")
    assert train[-1]["step"] == 10 and train[-1]["loss"] != train[-1]["loss"]  # nan: logged, then stopped
    # Nothing after step 5 is saved, evaluated or made the best.
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000005"]
    assert [r["step"] for r in records(run_dir, "eval")] == [5]
    assert (run_dir / "checkpoints" / "best").read_text() == best
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "DivergedError: " + errors[0][len("error: ") :]
