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
from tests.integration.test_train import check, records, script_in_process, tiny

# The reproduction: only the first evaluation is a best (nothing improves AUC by 1.0).
REPRODUCTION = [
    "trainer.eval_every_n_steps=10",
    "checkpoint.every_n_steps=10",
    "checkpoint.keep_last=2",
    "trainer.early_stopping.min_delta=1.0",
    "trainer.epochs=3",
    "data.synthetic.test_rows=1000",
    "trainer.max_steps=30",
]


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
    best = pointer(run_dir)
    assert (best["checkpoint"], best["step"], best["samples"]) == ("step_00000010", 10, 1280)
    assert (meta(run_dir, "step_00000010")["samples"], meta(run_dir, "step_00000010")["global_batch_size"]) == (
        1280,
        128,
    )
    assert f"saved checkpoint {run_dir / 'checkpoints' / 'step_00000010_samples_5120'}" in out  # its own name
    test = records(run_dir, "test")[-1]
    assert (test["checkpoint"], test["step"]) == ("step_00000010", 10)
    # Export takes the best by default: the checkpoint the pointer names, and the test AUC logged is its.
    # In this process (script_in_process): a process of its own would cost its imports again.
    exported = check(script_in_process("export.py", run_dir, "--out", tmp_path / "best"))
    assert f"exported step 10 of {run_dir.resolve() / 'checkpoints' / 'step_00000010'}:" in exported
    model, config = load_exported(tmp_path / "best")
    metrics = EvalMetrics(torch.device("cpu"))
    test_split = Path(config.data.synthetic.root)
    files = resolve_files(str(next(test_split.glob("*/test"))))
    for logits, labels in score_files(model, config, files, 500, labeled=True):
        metrics.update(logits, labels)
    assert metrics.compute()["auc"] == pytest.approx(test["auc"], abs=1e-6)
    # The resumed run counts the samples of its own steps: step 10 of 512 is 5120 (not 3840 + 3 x 512).
    assert [(r["step"], r["samples"]) for r in records(run_dir, "train") if r["step"] in (10, 15)][-2:] == [
        (10, 5120),
        (15, 7680),
    ]


def test_a_forged_best_pointer_is_refused_and_the_best_starts_over(one_process_run, tmp_path):
    # A copy of the session's run of `trainer.max_steps=5` (tests/integration/conftest.py): its
    # final evaluation makes step 5 the best.
    run_dir = one_process_run.copy_to(tmp_path) / "outputs" / "tiny"
    forged = {**pointer(run_dir), "value": float("nan")}
    (run_dir / "checkpoints" / "best").write_text(json.dumps(forged))  # {"value": NaN, ...}
    out = train(tmp_path, "trainer.max_steps=10", "trainer.eval_every_n_steps=5")
    # The best started over: step 5, evaluated again, is the best by a real value, or a later one is.
    best = pointer(run_dir)
    evaluations = {r["step"]: r["auc"] for r in records(run_dir, "eval")}
    assert best["value"] == evaluations[best["step"]] and best["value"] == max(evaluations.values())
    assert meta(run_dir, best["checkpoint"])["samples"] == best["samples"]
    assert (
        "checkpoints/best is not valid: its metric and value ('auc', nan) are not a metric name and a finite "
        "number; it is not used" in out
    )


def test_a_crash_between_publishing_the_best_and_writing_its_pointer_is_repaired_on_resume(
    one_process_run_of_10_steps, tmp_path
):
    common = [
        "trainer.eval_every_n_steps=5",
        "checkpoint.every_n_steps=5",
        "checkpoint.keep_last=1",
        "trainer.early_stopping.min_delta=1.0",
    ]  # only the first evaluation, step 5's, is a best
    # A run of 10 steps, evaluated and checkpointed every 5: a copy of the session's shared one
    # (tests/integration/conftest.py). The run directory as rank 0 leaves it when it dies right
    # after publishing step 5, which its evaluation made the best, and before writing checkpoints/best.
    run_dir = one_process_run_of_10_steps.copy_to(tmp_path) / "outputs" / "tiny"
    checkpoints = run_dir / "checkpoints"
    shutil.rmtree(checkpoints / "step_00000010")
    (checkpoints / "best").unlink()
    (checkpoints / "latest").write_text("step_00000005")
    out = train(tmp_path, *common, "trainer.max_steps=15")
    best = pointer(run_dir)
    assert (best["checkpoint"], best["step"]) == ("step_00000005", 5)
    assert best["value"] == records(run_dir, "eval")[0]["auc"]
    # keep_last=1 spares the best: without the pointer, step 5 would have been pruned.
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000005", "step_00000015"]
    assert re.search(
        r"checkpoints/best did not name the checkpoint of the best evaluation so far \(validation auc "
        r"[0-9.]+ at step 5: the run before stopped before it was written\): it now names step_00000005",
        out,
    )
