"""checkpoints/best through `python -m app.train`: it names the weights that were evaluated, never
a later checkpoint saved under the same step number (a run resumed on a larger global batch counts
lower steps), and a pointer that does not hold together (forged, or left behind by a crash between
publishing a checkpoint and writing the pointer) is repaired or started over, with a warning."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from app.data.files import resolve_files
from app.export import load_exported, score_files
from app.metrics import EvalMetrics
from tests.conftest import REPO, run_command
from tests.integration.test_early_stopping import script
from tests.integration.test_train import check, records, tiny

# The reproduction: only the first evaluation is a best (nothing improves AUC by 1.0).
REPRODUCTION = ["trainer.eval_every_n_steps=10", "checkpoint.every_n_steps=10", "checkpoint.keep_last=2",
                "trainer.early_stopping.min_delta=1.0", "trainer.epochs=3", "data.synthetic.test_rows=1000",
                "trainer.max_steps=30"]


def train(root: Path, *overrides: str) -> str:
    return check(run_command([sys.executable, "-m", "app.train", *tiny(root, *overrides)], cwd=REPO))


def pointer(run_dir: Path) -> dict:
    return json.loads((run_dir / "checkpoints" / "best").read_text())


def meta(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / "checkpoints" / name / "meta.json").read_text())


def test_a_run_resumed_on_a_larger_batch_never_replaces_the_best_checkpoint(tmp_path):
    run_dir = tmp_path / "outputs" / "tiny"
    train(tmp_path, *REPRODUCTION)  # 1 rank x 128: the best is step 10, after 1280 samples
    assert pointer(run_dir)["samples"] == 1280
    out = train(tmp_path, *REPRODUCTION, "data.batch_size=512")  # step 30 of 128 is step 7 of 512
    assert "continues after 3584 samples, at step 7" in out
    # The resumed run counts the samples of its own steps: step 10 of 512 is 5120 (not 3840 + 3 x 512).
    assert [(r["step"], r["samples"]) for r in records(run_dir, "train") if r["step"] in (10, 15)][-2:] == \
        [(10, 5120), (15, 7680)]
    best = pointer(run_dir)
    assert (best["checkpoint"], best["step"], best["samples"]) == ("step_00000010", 10, 1280)
    assert (meta(run_dir, "step_00000010")["samples"], meta(run_dir, "step_00000010")["global_batch_size"]) == \
        (1280, 128)
    assert f"saved checkpoint {run_dir / 'checkpoints' / 'step_00000010_samples_5120'}" in out  # its own name
    test = records(run_dir, "test")[-1]
    assert (test["checkpoint"], test["step"]) == ("step_00000010", 10)
    # Export takes the best by default: the checkpoint the pointer names, and the test AUC logged is its.
    exported = check(run_command(script("export.py", run_dir, "--out", tmp_path / "best"), cwd=tmp_path))
    assert f"exported step 10 of {run_dir.resolve() / 'checkpoints' / 'step_00000010'}:" in exported
    model, config = load_exported(tmp_path / "best")
    metrics = EvalMetrics(torch.device("cpu"))
    test_split = Path(config.data.synthetic.root)
    files = resolve_files(str(next(test_split.glob("*/test"))))
    for logits, labels in score_files(model, config, files, 500, labeled=True):
        metrics.update(logits, labels)
    assert metrics.compute()["auc"] == pytest.approx(test["auc"], abs=1e-6)
