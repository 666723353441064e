"""A diverging run, as a user starts it: `optim.lr=1e12` on 2 workers. It stops with one error
naming the step (exit 2), saves nothing of the diverged model, keeps the checkpoints and the best
from before, and summary.json says why."""

from __future__ import annotations

import json
import sys

from tests.conftest import REPO, run_command
from tests.integration.test_train import records, tiny


def test_a_diverging_run_stops_naming_the_step_and_saves_or_judges_nothing_non_finite(two_rank_run, tmp_path):
    # The sound run before is a copy of the session's 2-rank one (tests/integration/conftest.py):
    # one epoch of 15 steps, checkpoints at steps 10 and 15, evaluated at the end (so 15 is the best).
    run_dir = two_rank_run.copy_to(tmp_path) / "outputs" / "tiny"
    best = (run_dir / "checkpoints" / "best").read_text()
    assert json.loads(best)["step"] == 15

    # Resumed at step 15 into a second epoch, on 2 workers the run launches itself, then diverges.
    overrides = ["optim.lr=1e12", "trainer.epochs=2", "trainer.eval_every_n_steps=5", "checkpoint.every_n_steps=5"]
    command = [sys.executable, "-m", "app.train", "distributed.nproc_per_node=2", *tiny(tmp_path, *overrides)]
    result = run_command(command, cwd=REPO)
    assert result.returncode == 2, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "error: the training loss is not finite (nan or inf) on rank" in errors[0], (
        result.stderr[-4000:]
    )
    assert "for 3 step(s) in a row, up to step " in errors[0] and "trainer.max_nonfinite_steps=3" in errors[0]
    train = records(run_dir, "train")
    assert train[-1]["step"] == 20 and train[-1]["loss"] != train[-1]["loss"]  # nan: logged, then stopped
    # Nothing after step 15 is saved, evaluated or made the best.
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000010", "step_00000015"]
    assert [r["step"] for r in records(run_dir, "eval")] == [15]
    assert (run_dir / "checkpoints" / "best").read_text() == best
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "DivergedError: " + errors[0][len("error: ") :]
