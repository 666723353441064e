"""Resume with the default plan (sharding=auto), for each optimizer preset: on the same number of
workers a resumed run ends bitwise identical to an uninterrupted one; on another number (1 -> 2,
2 -> 1, 2 -> 4) it converts the optimizer state the plans keep differently (small tables are
replicated on 2+ ranks, sharded on 1), trains the configured samples and uses, at every step, the
LR an uninterrupted run of that shape uses. Interruptions are made by resuming a copy of an
uninterrupted run from one of its own checkpoints, so both runs saw the same schedule horizon.

Real runs prove it for representatives, each launch costing seconds of imports alone: the same
number of workers for sgd (no optimizer state, inside its warmup) and adam (the most state: dense
Adam with its step counter, row-wise Adagrad tables; given sgd's schedule, inside its decay);
another number of workers, under torchrun and back, for adam with that live schedule (2 -> 4 for
adam too). Each preset's state (sgd, adagrad, adam) resuming bitwise on one plan, and converted
between the fused and the replicated form, is proven in one process by
tests/unit/test_resume_optimizers.py: the resume path is the same code for every preset."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from app.export import MODEL_FILE, export_checkpoint
from tests.conftest import REPO, run_command
from tests.integration.test_train import check, records, tiny

# 31 steps an epoch on 1 rank, 15 on 2, 7 on 4 (experiment=tiny: 4000 rows, batch 128 a rank).
COMMON = ["trainer.epochs=2", "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=5", "checkpoint.keep_last=100"]
PRESETS = {
    "sgd": ["optim=sgd", "optim.warmup_steps=10"],  # warmup, then linear decay to the end
    "adagrad": ["optim=adagrad"],
    # Dense Adam: stateful, with a step counter; given sgd's schedule, so that the resumes onto
    # another number of workers (of this preset only) meet a live one.
    "adam": ["optim=adam", "optim.warmup_steps=10", "optim.decay=linear", "optim.min_lr_ratio=0.1"],
}


def launcher(ranks: int) -> list[str]:
    """app.train in one process, or under torchrun on `ranks` ranks."""
    if ranks == 1:
        return [sys.executable, "-m", "app.train"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    return [*torchrun, "-m", "app.train"]


def train(root: Path, ranks: int, *overrides: str) -> str:
    return check(run_command([*launcher(ranks), *tiny(root, *overrides)], cwd=REPO))


def run_dir(root: Path) -> Path:
    return root / "outputs" / "tiny"


def interrupted_copy(source: Path, target: Path, at_step: int) -> Path:
    """A copy of the run at `source` as if it had stopped after its checkpoint at `at_step`."""
    shutil.copytree(run_dir(source), run_dir(target))
    (run_dir(target) / "metrics.jsonl").unlink()
    for checkpoint in (run_dir(target) / "checkpoints").glob("step_*"):
        if int(checkpoint.name.split("_")[1]) > at_step:
            shutil.rmtree(checkpoint)
    shutil.copytree(source / "data", target / "data")
    return target


def parameters(root: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    out = export_checkpoint(run_dir(root), tmp_path / f"export-{root.name}", prefer="latest")
    return torch.load(out / MODEL_FILE, weights_only=True)


def assert_bitwise_equal(root: Path, reference: Path, tmp_path: Path) -> None:
    expected, got = parameters(reference, tmp_path), parameters(root, tmp_path)
    assert got.keys() == expected.keys() and len(expected) > 26
    for key, value in expected.items():
        assert torch.equal(got[key], value), f"{root.name}: {key} differs from the uninterrupted run"
    assert records(run_dir(root), "eval")[-1]["auc"] == records(run_dir(reference), "eval")[-1]["auc"]


def assert_schedule_of(root: Path, reference: Path, first_step: int) -> None:
    """The resumed run trained from `first_step` to the reference's end, with its LRs at each step."""
    steps: list[dict] = records(run_dir(root), "train")
    expected = {r["step"]: r for r in records(run_dir(reference), "train")}
    assert [r["step"] for r in steps] == list(range(first_step, max(expected) + 1))
    for record in steps:
        for key in ("lr", "sparse_lr"):
            assert record[key] == pytest.approx(expected[record["step"]][key], rel=1e-12, abs=0), (key, record)
    assert steps[-1]["samples"] == expected[max(expected)]["samples"]


def uninterrupted_command(preset: str, ranks: int) -> list[str]:
    """The uninterrupted run of `preset` on `ranks` ranks, for the root tests/integration/conftest.py
    gives it ("{root}"); `uninterrupted(preset, ranks)` is that run, trained once a session."""
    return [*launcher(ranks), *tiny(Path("{root}"), *COMMON, *PRESETS[preset])]


# sgd (no optimizer state) inside its warmup, adam (the most state) inside its decay; every preset's
# state resumes bitwise, and trains on bitwise, in tests/unit/test_resume_optimizers.py.
@pytest.mark.parametrize("preset, at_step", [("sgd", 5), ("adam", 20)])
def test_resume_on_the_same_number_of_workers_is_bitwise_identical(preset, at_step, uninterrupted, tmp_path):
    reference = uninterrupted(preset, 2)
    root = interrupted_copy(reference, tmp_path / f"at{at_step}", at_step)
    out = train(root, 2, *COMMON, *PRESETS[preset])
    assert f"resumed from {run_dir(root) / 'checkpoints' / f'step_{at_step:08d}'}" in out
    assert_bitwise_equal(root, reference, tmp_path)
    assert_schedule_of(root, reference, first_step=at_step + 1)


def test_resume_on_another_number_of_workers_continues_the_schedule(uninterrupted, tmp_path):
    preset = "adam"  # the most state, and a live schedule (see the module's docstring)
    # 1 -> 2: 20 steps of 128 samples are 10 steps of 256; the small tables become data_parallel.
    grown = interrupted_copy(uninterrupted(preset, 1), tmp_path / "grown", at_step=20)
    out = train(grown, 2, *COMMON, *PRESETS[preset])
    assert "written by 1 ranks with a global batch of 128, this run has 2 ranks and 256" in out
    assert "Missing key" not in out and "starts fresh" not in out
    assert_schedule_of(grown, uninterrupted(preset, 2), first_step=11)

    # 2 -> 1: 10 steps of 256 are 20 of 128; the replicated tables' state goes back into the fused kernels.
    shrunk = interrupted_copy(uninterrupted(preset, 2), tmp_path / "shrunk", at_step=10)
    out = train(shrunk, 1, *COMMON, *PRESETS[preset])
    assert "starts fresh" not in out
    assert_schedule_of(shrunk, uninterrupted(preset, 1), first_step=21)
    for root, reference in ((grown, uninterrupted(preset, 2)), (shrunk, uninterrupted(preset, 1))):
        # Another data order than the reference's, so close, not equal.
        final, expected = records(run_dir(root), "eval")[-1], records(run_dir(reference), "eval")[-1]
        assert final["step"] == expected["step"] and abs(final["auc"] - expected["auc"]) < 0.03


def test_resume_onto_four_workers(uninterrupted, tmp_path):
    # adam's run, shared with the tests above: the most state, on 4 ranks.
    root = interrupted_copy(uninterrupted("adam", 2), tmp_path / "four", at_step=10)
    out = train(root, 4, *COMMON, *PRESETS["adam"])
    assert "this run has 4 ranks and 512" in out and "starts fresh" not in out
    train_records = records(run_dir(root), "train")
    # 2560 samples are 5 steps of 512; 2 epochs of 7 steps end at step 14.
    assert [r["step"] for r in train_records] == list(range(6, 15))
    assert records(run_dir(root), "eval")[-1]["step"] == 14


def test_k_step_averaging_resumes_exactly_with_a_stateful_dense_optimizer(k_step_adam_run, tmp_path):
    # Adam's moments differ between ranks until averaged: averaged with the parameters, every
    # rank's state is the one a checkpoint holds, so a resume changes nothing. The uninterrupted
    # run, k=4, is the session's (tests/integration/conftest.py; test_kstep.py's k=4 run too).
    overrides = [*COMMON, *PRESETS["adam"], "trainer.dense_average_every=4"]
    root = interrupted_copy(k_step_adam_run.root, tmp_path / "resumed", at_step=10)  # between two averages
    train(root, 2, *overrides)
    assert_bitwise_equal(root, k_step_adam_run.root, tmp_path)


def test_a_changed_batch_size_continues_after_as_many_samples(uninterrupted, tmp_path):
    # 20 steps of 128 on 1 rank, then data.batch_size=256: 10 steps of 256 are done, of 2 x 15.
    # adam's runs, shared with the tests above, have a live schedule.
    root = interrupted_copy(uninterrupted("adam", 1), tmp_path / "bigger", at_step=20)
    out = train(root, 1, *COMMON, *PRESETS["adam"], "data.batch_size=256")
    assert "global batch of 128, this run has 1 ranks and 256" in out
    # 1 rank x 256 has the steps, and so the schedule, of 2 ranks x 128.
    assert_schedule_of(root, uninterrupted("adam", 2), first_step=11)
