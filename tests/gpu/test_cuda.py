"""The CUDA path on one device: the default job of experiment=tiny with asynchronous saves, a resume
from one of them, export and predict of what it trained, mixed precision, the batches and
checkpoint copies that live in pinned host memory, and the refusal of more workers than devices.

Every job runs in a process of its own that sees the machine's CUDA devices (this one sees none,
so that the rest of the suite stays on CPU: tests/conftest.py). `make test-gpu` runs these tests;
where there is no CUDA device they are skipped."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest

from app.checkpoint import verify
from tests.conftest import REPO, cuda_device_count, run_command
from tests.integration.test_export_predict import script
from tests.integration.test_train import check, records

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(cuda_device_count() == 0, reason="needs a CUDA device; run `make test-gpu` on a GPU machine"),
]

STEPS = 20
ASYNC_EVERY = 5  # checkpoints 5, 10 and 15 are written in the background; 20, the last, is not


def on_cuda(root: Path, *overrides: str, data_root: Path | None = None):
    return [
        sys.executable,
        "-m",
        "app.train",
        "experiment=tiny",
        "distributed.device=cuda",
        f"data.synthetic.root={data_root or root / 'data'}",
        f"output_root={root / 'outputs'}",
        "logging.progress_bar=false",
        *overrides,
    ]


RUN = [
    f"trainer.max_steps={STEPS}",
    f"checkpoint.every_n_steps={ASYNC_EVERY}",
    "checkpoint.async_save=true",
    "checkpoint.keep_last=4",
]


def cuda_check(name: str, argument: Path) -> dict:
    """What tests/gpu/cuda_checks.py's `name` found, run in a process that sees the devices."""
    result = run_command([sys.executable, "-m", "tests.gpu.cuda_checks", name, str(argument)], cwd=REPO, cuda=True)
    check(result)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory):
    """One finished run of experiment=tiny on cuda:0 (root, run dir), shared by the tests below."""
    root = tmp_path_factory.mktemp("cuda")
    check(run_command(on_cuda(root, *RUN), cwd=REPO, cuda=True))
    return root, root / "outputs" / "tiny"


def test_the_default_job_trains_on_cuda(cuda_run):
    _, run_dir = cuda_run
    assert "1 worker(s) on cuda:0" in (run_dir / "train_rank0.log").read_text()
    assert records(run_dir, "train")[-1]["step"] == STEPS
    final = records(run_dir, "eval")[-1]
    assert final["samples"] == 2000 and 0.5 < final["auc"] <= 1.0


def test_asynchronous_saves_of_gpu_tables_are_published_intact(cuda_run):
    _, run_dir = cuda_run
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert saved == [f"step_{step:08d}" for step in range(ASYNC_EVERY, STEPS + 1, ASYNC_EVERY)]
    for name in saved:
        assert verify(run_dir / "checkpoints" / name) is None, name


def test_a_resume_from_an_asynchronous_checkpoint_continues_on_the_gpu(cuda_run, tmp_path):
    root, run_dir = cuda_run
    shutil.copytree(root, tmp_path / "copy")
    copied_run = tmp_path / "copy" / "outputs" / "tiny"
    shutil.rmtree(copied_run / "checkpoints" / f"step_{STEPS:08d}")  # the newest left was saved in the background
    resumed = check(run_command(on_cuda(tmp_path / "copy", *RUN), cwd=REPO, cuda=True))
    assert f"at step {STEPS - ASYNC_EVERY} " in resumed
    assert records(copied_run, "train")[-1]["step"] == STEPS
    # GPU kernels need not be bitwise deterministic: the same training, not the same bits.
    assert records(copied_run, "eval")[-1]["auc"] == pytest.approx(records(run_dir, "eval")[-1]["auc"], abs=0.02)


def test_the_exported_model_scores_on_cpu_as_the_cuda_run_did(cuda_run, tmp_path):
    root, run_dir = cuda_run
    check(run_command(script("export.py", run_dir, "--out", tmp_path / "exported"), cwd=tmp_path))
    val = next((root / "data").iterdir()) / "val"
    printed = check(
        run_command(
            script(
                "predict.py", "--model", tmp_path / "exported", "--data", val, "--out", tmp_path / "predictions.parquet"
            ),
            cwd=tmp_path,
        )
    )
    metrics = {name: float(value) for name, value in re.findall(r"\b(AUC|logloss|NE) ([0-9.]+)", printed)}
    final = records(run_dir, "eval")[-1]
    # CPU and GPU kernels round differently: close, not equal to the last digit.
    assert metrics["AUC"] == pytest.approx(final["auc"], abs=1e-3)
    assert metrics["logloss"] == pytest.approx(final["logloss"], abs=1e-3)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_to_finite_losses(cuda_run, tmp_path, precision):
    root, _ = cuda_run
    overrides = [f"trainer.precision={precision}", "trainer.max_steps=10", "trainer.log_every_n_steps=1"]
    check(run_command(on_cuda(tmp_path, *overrides, data_root=root / "data"), cwd=REPO, cuda=True))
    run_dir = tmp_path / "outputs" / "tiny"
    assert all(math.isfinite(r["loss"]) for r in records(run_dir, "train"))
    assert math.isfinite(records(run_dir, "eval")[-1]["logloss"])


def test_batches_read_for_cuda_are_pinned(cuda_run):
    root, _ = cuda_run
    found = cuda_check("pinned_batches", root / "data")
    assert found == dict.fromkeys(found, True) and "copied intact" in found, found


def test_an_asynchronous_save_stages_in_pinned_host_memory_and_loads_back_onto_the_gpu(tmp_path):
    found = cuda_check("async_save", tmp_path / "checkpoints")
    assert found["staged_on_device_bytes"] < found["tensor_bytes"]  # no copy of the tensor on the GPU
    assert found["staged_pinned"]
    assert found["loaded"] == {
        "step_00000001": {"device": "cuda:0", "values": [1.0]},
        "step_00000002": {"device": "cuda:0", "values": [2.0]},
    }


def test_more_workers_than_cuda_devices_is_refused_with_exit_2(tmp_path):
    workers = cuda_device_count() + 1
    result = run_command(on_cuda(tmp_path, f"distributed.nproc_per_node={workers}"), cwd=REPO, cuda=True)
    assert result.returncode == 2, result.stderr[-4000:]
    assert f"{workers} workers per node and {cuda_device_count()} CUDA device" in result.stderr
