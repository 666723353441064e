"""A crafted checkpoint where users meet one: resuming the run and exporting it refuse the file
that names code, exit 2 naming it, and run nothing. Its manifest is updated too, so it verifies."""

from __future__ import annotations

import sys

from tests.conftest import REPO, run_command
from tests.integration.test_train import script_in_process, tiny
from tests.unit.test_checkpoint import forge_metadata


def test_resume_and_export_refuse_a_checkpoint_whose_metadata_names_code(one_process_run, tmp_path):
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

    # In this process (script_in_process): a process of its own would cost its imports again.
    exported = script_in_process("export.py", checkpoints.parent, "--out", tmp_path / "exported")
    assert exported.returncode == 2, exported.stderr[-3000:]
    assert refusal in exported.stderr and "Traceback" not in exported.stderr, exported.stderr[-3000:]
    assert not marker.exists() and not (tmp_path / "exported").exists()
