"""Data and checkpoints in an object store: a real S3-compatible server (moto's server mode, see
tests/object_store.py) on 127.0.0.1, reached by the jobs as a user's are, through AWS_* variables.
One server, one uploaded dataset and one finished 2-worker run serve the whole session."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, children, kill_tree, pause_tree, run_command, start
from tests.integration.test_train import check, records, tiny, torchrun
from tests.object_store import s3, s3_server

BUCKET = "rectrain-test"
pytest.importorskip("moto", reason="moto[server] (the dev extra) runs the S3 server these tests use")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("s3")) as endpoint:
        s3().mkdir(BUCKET)
        yield endpoint


@pytest.fixture(scope="session")
def s3_data(s3_endpoint, tmp_path_factory):
    """The tiny synthetic dataset, generated locally once and uploaded: (train URL, val glob URL)."""
    from app.data.synthetic import ensure_dataset
    from app.features import FeatureSchema
    from app.hydra_edge import compose_config

    config = compose_config(tiny(tmp_path_factory.mktemp("local")))
    train, val = ensure_dataset(FeatureSchema.from_config(config.features), config.data.synthetic)
    fs = s3()
    fs.put(str(train), f"{BUCKET}/tiny/train", recursive=True)
    fs.put(str(val), f"{BUCKET}/tiny/val", recursive=True)
    return f"s3://{BUCKET}/tiny/train/", f"s3://{BUCKET}/tiny/val/*.parquet"


def s3_job(root: Path, s3_data, name: str, *overrides: str):
    """tiny, from the bucket's Parquet files, checkpointing into s3://BUCKET/runs/<name>
    asynchronously every 5 steps (15 steps on 2 ranks)."""
    train, val = s3_data
    return tiny(
        root,
        "data.source=parquet",
        f"data.train_path={train}",
        f"data.val_path={val}",
        f"checkpoint.dir=s3://{BUCKET}/runs/{name}",
        "checkpoint.every_n_steps=5",
        "checkpoint.async_save=true",
        *overrides,
    )


@pytest.fixture(scope="session")
def s3_run(s3_data, tmp_path_factory):
    """A finished 2-worker run: (its local root, its checkpoints' URL, its console output)."""
    root = tmp_path_factory.mktemp("s3run")
    out = check(run_command(torchrun(*s3_job(root, s3_data, "reference")), cwd=REPO))
    return root, f"s3://{BUCKET}/runs/reference", out


def step_dirs(fs, url: str):
    """{step dir name: has meta.json} under a checkpoints URL."""
    found = {}
    for key in fs.find(url.removeprefix("s3://")):
        parts = key.split("/")
        if parts[-2].startswith("step_"):
            found[parts[-2]] = found.get(parts[-2], False) or parts[-1] == "meta.json"
    return found


def test_two_workers_train_from_a_bucket_and_checkpoint_into_it_then_export_and_predict(s3_run, tmp_path):
    from app.checkpoint import verify

    root, url, out = s3_run
    assert "final validation AUC" in out and f"saved checkpoint {url}/step_00000015" in out
    assert records(root / "outputs" / "tiny", "eval")[-1]["samples"] == 2000  # every val row, read from S3
    assert step_dirs(s3(), url) == {"step_00000010": True, "step_00000015": True}  # keep_last=2
    assert not (root / "outputs" / "tiny" / "checkpoints").exists()
    for name in ("step_00000010", "step_00000015"):
        assert verify(f"{url}/{name}") is None
    exported = check(
        run_command([sys.executable, "scripts/export.py", url, "--out", str(tmp_path / "model")], cwd=REPO)
    )
    assert f"exported step 15 of {url}/step_00000015" in exported
    predicted = check(
        run_command(
            [
                sys.executable,
                "scripts/predict.py",
                "--model",
                str(tmp_path / "model"),
                "--data",
                f"s3://{BUCKET}/tiny/val/",
                "--out",
                str(tmp_path / "p.parquet"),
            ],
            cwd=REPO,
        )
    )
    assert "2,000 predictions" in predicted


def test_a_worker_killed_while_writing_a_checkpoint_resumes_from_the_bucket_to_identical_metrics(
    s3_run, s3_data, tmp_path
):
    reference_root, _, _ = s3_run
    url = f"s3://{BUCKET}/runs/killed"
    args = torchrun(*s3_job(tmp_path, s3_data, "killed"))
    job = start(args, tmp_path / "job.log")
    fs = s3()
    try:
        # Until a save is under way (objects of a step, no meta.json yet) after one is published.
        deadline, dirs = time.time() + 240, {}
        while not (True in dirs.values() and False in dirs.values()):
            assert job.poll() is None, (
                "the job ended before a save could be interrupted:\n" + (tmp_path / "job.log").read_text()[-3000:]
            )
            assert time.time() < deadline, "no save under way in time"
            dirs = step_dirs(fs, url)
            time.sleep(0.01)
        workers = [c for c in children(job.pid) if b"app.train" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        assert job.wait(timeout=120) != 0
    finally:
        kill_tree(job.pid)
    interrupted = [name for name, published in dirs.items() if not published]
    # The failed save's objects are removed by the job that failed, or left without a meta.json.
    assert not any(step_dirs(fs, url).get(name) for name in interrupted), (
        "killed too late: the save it interrupted was published"
    )
    newest_published = max(name for name, published in dirs.items() if published)

    out = check(run_command(args, cwd=REPO))
    assert f"resumed from {url}/{newest_published} " in out
    # The interrupted save's objects were never taken for a checkpoint, and keep-last removed them.
    assert all(step_dirs(fs, url).values()) and set(step_dirs(fs, url)) == {"step_00000010", "step_00000015"}
    final = records(tmp_path / "outputs" / "tiny", "eval")[-1]
    reference = records(reference_root / "outputs" / "tiny", "eval")[-1]
    assert {k: final[k] for k in ("step", "auc", "logloss", "ne")} == {
        k: reference[k] for k in ("step", "auc", "logloss", "ne")
    }


def test_a_damaged_object_in_the_newest_checkpoint_falls_back_to_the_one_before(s3_run, s3_data, tmp_path):
    _, url, _ = s3_run
    fs = s3()
    copy = f"{BUCKET}/runs/damaged"
    fs.copy(url.removeprefix("s3://"), copy, recursive=True)
    shard = sorted(k for k in fs.find(f"{copy}/step_00000015") if k.endswith(".distcp"))[1]
    data = bytearray(fs.cat_file(shard))
    data[len(data) // 2] ^= 0xFF  # the same size: only the CRC-32 can tell
    fs.pipe_file(shard, bytes(data))
    out = check(run_command(torchrun(*s3_job(tmp_path, s3_data, "damaged", "trainer.max_steps=12")), cwd=REPO))
    assert (
        f"{shard.rsplit('/', 1)[1]} is damaged" in out and f"resumed from s3://{copy}/step_00000010 at step 10 " in out
    )
    assert records(tmp_path / "outputs" / "tiny", "eval")[-1]["step"] == 12


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["data.train_path=gs://a-bucket/train/"],
            "data.train_path='gs://a-bucket/train/': gs:// needs a filesystem package that is not installed",
        ),
        (["data.train_path=nosuch://a/b"], "data.train_path='nosuch://a/b': unknown URL scheme 'nosuch'"),
        (
            [f"checkpoint.dir=s3://{BUCKET}-missing/runs/x"],
            f"cannot write checkpoints to s3://{BUCKET}-missing/runs/x (from checkpoint.dir): FileNotFoundError",
        ),
        (["output_root=s3://a-bucket/outputs"], "output_root='s3://a-bucket/outputs': must be a local directory"),
    ],
)
def test_unusable_urls_are_refused_naming_the_key(s3_data, tmp_path, overrides, expected):
    train, val = s3_data
    args = tiny(tmp_path, "data.source=parquet", f"data.train_path={train}", f"data.val_path={val}", *overrides)
    # In tmp_path: Hydra makes the run directory (here a local "s3:/..." one) before the config is checked.
    result = run_command([sys.executable, "-m", "app.train", *args], cwd=tmp_path)
    assert result.returncode == 2 and expected in result.stderr, result.stderr[-3000:]


def test_missing_credentials_are_refused_naming_the_key(s3_data, tmp_path, monkeypatch):
    train, val = s3_data
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    args = tiny(tmp_path, "data.source=parquet", f"data.train_path={train}", f"data.val_path={val}")
    result = run_command([sys.executable, "-m", "app.train", *args], cwd=REPO)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"data.train_path={train!r}: cannot list it (NoCredentialsError" in result.stderr, result.stderr[-3000:]
    # data.storage_options supplies them instead, for every split: the test split is read with them too.
    credentials = ["+data.storage_options.key=rectrain-test", "+data.storage_options.secret=rectrain-test-secret"]
    args = tiny(
        tmp_path,
        "data.source=parquet",
        f"data.train_path={train}",
        f"data.val_path={val}",
        f"data.test_path={val}",
        "trainer.max_steps=4",
        "checkpoint.every_n_steps=0",
        *credentials,
    )
    check(run_command([sys.executable, "-m", "app.train", *args], cwd=REPO))
    assert records(tmp_path / "outputs" / "tiny", "test")[-1]["samples"] == 2000  # every test row, from S3


def test_a_save_that_fails_leaves_a_published_checkpoint_of_the_same_name_intact(s3_endpoint):
    """A run resumed on fewer ranks counts steps of another size, so it can save a step whose name
    a published checkpoint has. In a bucket, where saves are written in place, that save must not
    touch the published one before it is complete: here it fails half-way (an object it cannot
    serialise), and the old checkpoint is still there, intact."""
    import torch
    from torch.distributed.checkpoint.api import CheckpointException

    from app.checkpoint import CheckpointStore, verify

    url = f"s3://{BUCKET}/runs/same-name"
    store = CheckpointStore(url, keep_last=2, rank=0)
    store.save(5, {"model": {"w": torch.full((256,), 1.0)}}, {}, samples=100)
    with pytest.raises(CheckpointException):
        store.save(5, {"model": {"w": torch.full((256,), 2.0)}, "extra": lambda: None}, {}, samples=100)
    assert verify(f"{url}/step_00000005") is None
    loaded = {"model": {"w": torch.zeros(256)}}
    store.load(store.latest(), loaded)
    assert loaded["model"]["w"].unique().tolist() == [1.0]
    # A save of the same position that completes replaces it.
    store.save(5, {"model": {"w": torch.full((256,), 3.0)}}, {}, samples=100)
    store.load(store.latest(), loaded)
    assert loaded["model"]["w"].unique().tolist() == [3.0] and verify(f"{url}/step_00000005") is None
    assert step_dirs(s3(), url) == {"step_00000005": True}
    # Another position's step 5 (a run resumed on a larger batch) takes a name of its own.
    store.save(5, {"model": {"w": torch.full((256,), 4.0)}}, {}, samples=50)
    assert step_dirs(s3(), url) == {"step_00000005": True, "step_00000005_samples_50": True}
    store.load(store.storage.path("step_00000005"), loaded)
    assert loaded["model"]["w"].unique().tolist() == [3.0] and verify(f"{url}/step_00000005") is None


def test_export_from_a_store_that_is_down_or_refuses_fails_in_one_line(s3_endpoint, tmp_path, monkeypatch):
    url = f"s3://{BUCKET}/runs/reference"
    export = [sys.executable, "scripts/export.py", url, "--out", str(tmp_path / "model")]
    with socket.socket() as probe:  # a port nothing listens on: the store is down
        probe.bind(("127.0.0.1", 0))
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{probe.getsockname()[1]}")
    down = run_command(export, cwd=REPO)
    assert down.returncode == 2 and "Traceback" not in down.stderr, down.stderr[-3000:]
    assert (
        f"error: {url}: cannot read it (EndpointConnectionError: Could not connect to the endpoint URL" in down.stderr
    ), down.stderr[-3000:]
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    refused = run_command(export, cwd=REPO)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert f"error: {url}: cannot read it (NoCredentialsError: Unable to locate credentials)" in refused.stderr, (
        refused.stderr[-3000:]
    )
    assert not (tmp_path / "model").exists()


def test_a_second_job_on_checkpoints_in_use_in_a_bucket_is_refused_until_their_holder_dies(s3_data, tmp_path):
    """Two jobs with other run directories, one checkpoint.dir: the lease in the bucket refuses the
    second; once the first is SIGKILLed its lease is stale (its holder is gone), and taken over."""
    lease = f"{BUCKET}/runs/leased/.rectrain.lease"
    args = s3_job(tmp_path / "first", s3_data, "leased", "trainer.epochs=100", "checkpoint.async_save=false")
    first = start([sys.executable, "-m", "app.train", *args], tmp_path / "first.log")
    fs = s3()
    try:
        deadline = time.time() + 300
        while not fs.exists(lease):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no lease taken in time"
            time.sleep(0.2)
            fs.invalidate_cache()
        holder = json.loads(fs.cat_file(lease))
        assert holder["pid"] == first.pid
        pause_tree(first.pid)  # alive and holding, renewing nothing for far less than LEASE_STALE_S
        others = s3_job(tmp_path / "second", s3_data, "leased", "trainer.max_steps=3")
        second = run_command([sys.executable, "-m", "app.train", *others], cwd=REPO)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert (
            f"error: the run is in use by another job: s3://{lease} is leased by pid {first.pid} on host "
            f"{holder['host']} (renewed "
        ) in second.stderr, second.stderr[-3000:]
        assert first.poll() is None
    finally:
        kill_tree(first.pid)
        first.wait(timeout=60)
    taken_over = check(run_command([sys.executable, "-m", "app.train", *others], cwd=REPO))
    assert f"taking over the stale lease s3://{lease} of pid {first.pid}" in taken_over
    assert not fs.exists(lease)  # released at the end
