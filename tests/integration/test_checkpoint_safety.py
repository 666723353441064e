"""A crafted checkpoint where users meet one: resuming the run and exporting it refuse the file
that names code, exit 2 naming it, and run nothing. Its manifest is updated too, so it verifies."""

from __future__ import annotations

import sys

from scripts.export import main as export_main
from tests.conftest import REPO, run_command
from tests.integration.test_train import tiny
from tests.unit.test_checkpoint import forge_metadata


def test_resume_and_export_refuse_a_checkpoint_whose_metadata_names_code(one_process_run, tmp_path, capsys):
    # The run `train` finished, copied from the session's shared one (tests/integration/conftest.py).
    train = [sys.executable, "-m", "app.train", *tiny(tmp_path, "trainer.max_steps=5")]
    one_process_run.copy_to(tmp_path)
    checkpoints = tmp_path / "outputs" / "tiny" / "checkpoints"
    newest = checkpoints / (checkpoints / "latest").read_text()
    marker = tmp_path / "ran"
    forge_metadata(newest, marker)
    refusal = f"error: {newest / '.metadata'}: refused to load: it names io.open, which a checkpoint never contains"

    resumed = run_command(train, cwd=REPO)
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    assert refusal in resumed.stderr and "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    assert not marker.exists()

    # scripts/export.py's main, in this process (a process of its own would cost its imports again):
    # exit 2 and the one line, no exception.
    assert export_main([str(checkpoints.parent), "--out", str(tmp_path / "exported")]) == 2
    assert refusal in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "exported").exists()
