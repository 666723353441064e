"""Real training jobs: 2-process torchrun on real Parquet files, checkpoints on disk, resume,
self-launched workers, and Hydra sweeps (a grid and Optuna)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_command

# Where a test is not about the readers: each worker reads in its own process (data.prefetch_windows=0),
# without the readers' fork server, whose imports (torch, pyarrow) cost about 1.6 CPU seconds.
NO_READERS = "data.prefetch_windows=0"


def tiny(tmp_path: Path, *overrides: str):
    return [
        "experiment=tiny",
        f"data.synthetic.root={tmp_path / 'data'}",
        f"output_root={tmp_path / 'outputs'}",
        "logging.progress_bar=false",
        *overrides,
    ]


def torchrun(*args: str):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "app.train",
        *args,
    ]


def records(run_dir: Path, kind: str):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def check(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    return result.stdout + result.stderr


def script_in_process(name: str, *args) -> subprocess.CompletedProcess:
    """`python scripts/<name> args` run in this process: its main, its output and its exit code as
    the command's, without the interpreter start and imports (torch and torchrec: about 4 CPU seconds) that a
    subprocess pays. For the checks of what a script says and how it exits; the command itself is
    proven by the tests that launch it for real (test_export_predict.py, the sweep tests here)."""
    path = REPO / "scripts" / name
    argv, sys.argv = sys.argv, [str(path), *map(str, args)]
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exit:  # every script ends in sys.exit(main(...)) or exits 2 itself
        code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(
        [sys.executable, str(path), *map(str, args)], code, out.getvalue(), err.getvalue()
    )


def test_two_process_training_saves_then_resumes(two_rank_run, tmp_path):
    # The first command is the session's shared run (tests/integration/conftest.py):
    # torchrun ... experiment=tiny checkpoint.every_n_steps=5; it is continued in a copy of it.
    first = two_rank_run.output
    run_dir = two_rank_run.copy_to(tmp_path) / "outputs" / "tiny"
    assert "final validation AUC" in first
    # The console has rank 0's story; fbgemm's INFO chatter and library warnings reach the log files only.
    assert "Successfully loaded" not in first and "FutureWarning" not in first and "Sharding spec" not in first
    assert "Successfully loaded" in (run_dir / "train_rank1.log").read_text()
    for name in (".hydra/config.yaml", "plan.txt", "plan.json", "metrics.jsonl", "checkpoints/latest"):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["world_size"] == 2 and len(plan["tables"]) == 26

    steps_per_epoch = records(run_dir, "train")[-1]["step"]  # tiny logs every 5 steps
    final_eval = records(run_dir, "eval")[-1]
    assert final_eval["samples"] == 2000  # every val row once, padding excluded
    latest = (run_dir / "checkpoints" / "latest").read_text()
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 2 and checkpoints[-1] == latest  # keep_last=2

    # The same command with a second epoch continues from the last checkpoint, step count and all.
    second = check(run_command(torchrun(*tiny(tmp_path, "checkpoint.every_n_steps=5", "trainer.epochs=2")), cwd=REPO))
    final_step = int(latest.split("_")[1])
    assert f"at step {final_step} " in second
    train_steps = [r["step"] for r in records(run_dir, "train")]
    assert train_steps == sorted(train_steps) and len(set(train_steps)) == len(train_steps)
    assert max(train_steps) > steps_per_epoch
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{2 * final_step:08d}"


def test_a_run_stopped_mid_epoch_resumes_at_the_same_sample(tmp_path):
    # Every step's loss is logged; a resumed run that read other samples than the uninterrupted one
    # (one batch early or late, reshuffled, another rank's rows) would log other losses. The
    # uninterrupted run saves at step 19 (and at its end, 30): a copy of it without the later
    # checkpoint is the run as stopped 4 steps into its second epoch (15 steps an epoch), so that
    # one run is both the reference and the stopped one. (A run stopped by trainer.max_steps and
    # resumed: test_early_stopping.py's stopped_run.) Its tables are split table_row_wise: that
    # sharding type trains to the end, and resumes exactly, here.
    common = [
        "trainer.log_every_n_steps=1",
        "checkpoint.every_n_steps=19",
        "data.shuffle_window=2",
        "trainer.epochs=2",
        "sharding=table_row_wise",
    ]
    straight_out = check(run_command(torchrun(*tiny(tmp_path / "straight", *common)), cwd=REPO))
    assert "final validation AUC" in straight_out
    plan = json.loads((tmp_path / "straight" / "outputs" / "tiny" / "plan.json").read_text())
    assert {t["sharding_type"] for t in plan["tables"].values()} == {"table_row_wise"}
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "straight", stopped)
    checkpoints = stopped / "outputs" / "tiny" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000019", "step_00000030"]
    shutil.rmtree(checkpoints / "step_00000030")
    (stopped / "outputs" / "tiny" / "metrics.jsonl").unlink()
    resumed = check(run_command(torchrun(*tiny(stopped, *common)), cwd=REPO))
    assert "at step 19 (epoch 1)" in resumed

    def losses(root):
        return {r["step"]: r["loss"] for r in records(root / "outputs" / "tiny", "train")}

    straight, after_stop = losses(tmp_path / "straight"), losses(stopped)
    assert sorted(straight) == list(range(1, 31)) and sorted(after_stop) == list(range(20, 31))
    for step in range(20, 31):
        assert after_stop[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6), step


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise"])
def test_every_sharding_type_trains_to_the_end(sharding, request):
    # The session's runs of one epoch (tests/integration/conftest.py). The other types train to the
    # end in runs that other tests make anyway, each asserting its plan: data_parallel in
    # test_self_launched_workers, table_row_wise in test_a_run_stopped_mid_epoch_resumes_at_the_same_sample,
    # table_column_wise in the submitit sweep's finished point, column_wise in test_evaluation.py.
    shared = request.getfixturevalue(f"{sharding}_run")
    assert "final validation AUC" in shared.output
    plan = json.loads((shared.run_dir / "plan.json").read_text())
    assert {t["sharding_type"] for t in plan["tables"].values()} == {sharding}


def test_self_launched_workers(tmp_path):
    args = [
        sys.executable,
        "-m",
        "app.train",
        *tiny(
            tmp_path,
            "distributed.nproc_per_node=2",
            "distributed.threads_per_worker=3",
            "trainer.max_steps=4",
            "sharding=data_parallel",  # that sharding type trains to the end (test_every_sharding_type...)
        ),
    ]
    result = run_command(args, cwd=REPO)
    out = check(result)
    assert "2 worker(s) on cpu, 2 on this node, 3 CPU threads each" in out
    # The last lines: the AUC reached, then the generated dataset's best achievable one and the gap.
    final, best = result.stdout.splitlines()[-2:]
    reached = float(re.match(r"final validation AUC (0\.\d{4}) ", final).group(1))
    metadata = next((tmp_path / "data").iterdir()) / "metadata.json"
    recorded = json.loads(metadata.read_text())["best_auc"]
    said = re.fullmatch(
        rf"best achievable validation AUC {recorded:.4f} \(the true click probabilities', "
        rf"{re.escape(str(metadata))}\): reached {reached:.4f}, gap (-?0\.\d{{4}})",
        best,
    )
    assert said and abs(float(said.group(1)) - (recorded - reached)) < 2e-4, best
    plan = json.loads((tmp_path / "outputs" / "tiny" / "plan.json").read_text())
    assert plan["world_size"] == 2 and {t["sharding_type"] for t in plan["tables"].values()} == {"data_parallel"}


def test_more_readers_than_cores_are_warned_of_and_sgd_with_the_dcn_head_trains(tmp_path):
    # On one core (taskset), 2 reader processes per worker compete with training for it. The run is
    # also test_other_optimizers_and_the_dcn_head_train's of optim=sgd and model=dcn: one launch.
    args = [
        "taskset",
        "-c",
        "0",
        sys.executable,
        "-m",
        "app.train",
        *tiny(tmp_path, "data.num_workers=2", "trainer.max_steps=4", "optim=sgd", "model=dcn"),
    ]
    out = check(run_command(args, cwd=REPO))
    assert (
        "data.num_workers=2: 2 reader processes on this node (2 per worker x 1 worker(s)) for 1 CPU core(s) "
        "available; readers beyond the cores compete with training for them."
    ) in out
    assert "final validation AUC" in out


def session(tb_dir: Path):
    """The HParams session of a run's TensorBoard files: (hyperparameters, end status)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import api_pb2, metadata

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    values = {name: getattr(value, value.WhichOneof("kind")) for name, value in start.hparams.items()}
    return values, api_pb2.Status.Name(end.status)


def report(*dirs: Path) -> str:
    """scripts/report.py's table; its files go to <first dir>/report."""
    return check(run_command([sys.executable, "scripts/report.py", *map(str, dirs)], cwd=REPO))


def test_sweep_runs_each_point_in_its_own_directory_and_the_report_ranks_them(tmp_path):
    args = [
        sys.executable,
        "-m",
        "app.train",
        "-m",
        "optim.lr=0.01,0.02,0.05",
        *tiny(tmp_path, "trainer.max_steps=6", "trainer.eval_every_n_steps=3", NO_READERS),
    ]
    check(run_command(args, cwd=REPO))
    sweep_dir = tmp_path / "outputs" / "tiny"
    points = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    rates = ["0.01", "0.02", "0.05"]
    assert len(points) == 3 and all(f"optim.lr={rate}" in p.name for p, rate in zip(points, rates))
    for point in points:
        assert (point / "checkpoints" / "latest").exists()
        summary = json.loads((point / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["step"] == 6 and summary["world_size"] == 1
        assert summary["validation"]["auc"] == records(point, "eval")[-1]["auc"]

    # TensorBoard's HParams dashboard: each point a session with its hyperparameters and status,
    # read back through TensorBoard's own event reader and plugin data.
    for point, rate in zip(points, rates):
        hparams, status = session(point / "tb")
        assert hparams["optim.lr"] == float(rate) and hparams["model.arch"] == "dlrm"
        assert hparams["experiment"] == "tiny" and hparams["data.batch_size"] == 128
        assert status == "STATUS_SUCCESS"

    out = report(sweep_dir)
    assert "3 point(s) of 3 planned (3 finished)" in out
    files = sweep_dir / "report"
    for name in ("report.csv", "report.md", "report.html", "val_auc.png", "final_auc_vs_optim.lr.png"):
        assert (files / name).stat().st_size > 0, name
    # The table, best first, against what each point's metrics.jsonl says.
    with open(files / "report.csv") as table:
        rows = list(csv.DictReader(table))
    expected = sorted(points, key=lambda p: -max(e["auc"] for e in records(p, "eval")))
    assert [row["point"] for row in rows] == [p.name for p in expected]
    for row, point in zip(rows, expected):
        evaluations = records(point, "eval")
        best = max(evaluations, key=lambda e: e["auc"])
        assert f"optim.lr={row['optim.lr']}," in point.name and row["status"] == "finished" and row["step"] == "6/6"
        assert float(row["final_auc"]) == pytest.approx(evaluations[-1]["auc"], abs=1e-12)
        assert float(row["final_logloss"]) == pytest.approx(evaluations[-1]["logloss"], abs=1e-12)
        assert float(row["best_auc"]) == pytest.approx(best["auc"], abs=1e-12) and int(row["best_step"]) == best["step"]
        assert float(row["samples_per_s"]) > 0 and float(row["wall_time_s"]) > 0
    markdown = (files / "report.md").read_text()
    assert markdown.count("optim.lr=") == 3 and f"{float(rows[0]['best_auc']):.4f}" in markdown
    page = (files / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and rows[0]["point"] in page


def test_a_sweep_runs_every_point_records_the_failed_ones_and_exits_non_zero_at_the_end(one_process_run, tmp_path):
    # Point 0 fails at run time on a damaged Parquet file, points 1 and 3 on their config: the
    # sweep still runs point 2 to the end, then says which points failed and exits 2 (bad input).
    synthetic = one_process_run.dataset  # the session's generated tiny dataset, only read
    damaged = tmp_path / "damaged" / "part-00000.parquet"
    damaged.parent.mkdir()
    damaged.write_bytes((synthetic / "val" / "part-00000.parquet").read_bytes()[:3000])
    args = [
        sys.executable,
        "-m",
        "app.train",
        "-m",
        f"data.val_path={damaged.parent},{synthetic / 'val'}",
        "optim.lr=0.01,-1",
        *tiny(tmp_path, "trainer.max_steps=2", "data=parquet", f"data.train_path={synthetic / 'train'}"),
    ]
    result = run_command(args, cwd=REPO)
    assert result.returncode == 2, result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    sweep_dir = tmp_path / "outputs" / "tiny"
    points = {}
    for point in (p for p in sweep_dir.iterdir() if p.is_dir()):
        overrides = yaml.safe_load((point / ".hydra" / "overrides.yaml").read_text())
        lr = next(o for o in overrides if o.startswith("optim.lr="))
        points[(str(damaged.parent) in " ".join(overrides), lr)] = point
    assert len(points) == 4
    summary = {key: json.loads((point / "summary.json").read_text()) for key, point in points.items()}
    assert summary[(True, "optim.lr=0.01")]["status"] == "failed"
    assert f"{damaged}: not a readable Parquet file" in summary[(True, "optim.lr=0.01")]["error"]
    for damaged_val in (True, False):
        assert summary[(damaged_val, "optim.lr=-1")]["status"] == "failed"
        assert summary[(damaged_val, "optim.lr=-1")]["error"] == "ConfigError: optim.lr must be > 0, got -1.0."
    assert summary[(False, "optim.lr=0.01")]["status"] == "finished" and summary[(False, "optim.lr=0.01")]["step"] == 2
    failed = [str(points[key]) for key in ((True, "optim.lr=0.01"), (True, "optim.lr=-1"), (False, "optim.lr=-1"))]
    assert result.stderr.endswith(f"error: 3 of 4 sweep point(s) failed: {', '.join(failed)}\n"), result.stderr[-4000:]
    # Each point's error is said once, when it fails.
    assert result.stderr.count("optim.lr must be > 0, got -1.0.") == 2
    assert result.stderr.count(f"{damaged}: not a readable Parquet file") == 1


def test_optuna_sweep_maximises_auc_and_a_rerun_resumes_its_trials(tmp_path):
    args = [
        sys.executable,
        "-m",
        "app.train",
        "+sweep=optuna",
        "hydra.sweeper.n_trials=2",
        *tiny(tmp_path, "trainer.max_steps=3", NO_READERS),
    ]
    check(run_command(args, cwd=REPO))
    sweep_dir = tmp_path / "outputs" / "sweep_optuna"
    trials = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name != ".hydra")
    assert len(trials) == 2 and all("optim.lr=" in t.name and "optim.sparse_lr=" in t.name for t in trials)
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(records(t, "eval")[-1]["auc"] for t in trials))
    # The sampler is seeded and training is repeatable: the same command proposes the same trials,
    # which resume from their final checkpoints instead of training again.
    again = check(run_command(args, cwd=REPO))
    assert again.count("resumed from") == 2
    assert sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name != ".hydra") == trials

    out = check(script_in_process("report.py", sweep_dir))  # launched for real by the grid sweep's test
    assert "2 point(s) of 2 planned (2 finished)" in out
    files = sweep_dir / "report"
    for name in (
        "optuna_history.png",
        "optuna_importances.png",
        "final_auc_vs_optim.lr.png",
        "final_auc_vs_optim.sparse_lr.png",
        "val_auc.png",
        "report.html",
    ):
        assert (files / name).stat().st_size > 0, name
    with open(files / "report.csv") as table:
        rows = list(csv.DictReader(table))
    assert float(rows[0]["final_auc"]) == pytest.approx(results["best_value"], abs=1e-12)
    assert {row["optim.lr"] for row in rows} == {t.name.split("optim.lr=")[1].split(",")[0] for t in trials}


def test_an_optuna_trial_that_fails_is_marked_failed_and_the_search_goes_on(tmp_path):
    # A search space where some trials cannot run (data.batch_size=0): Optuna's sweeper stopped at
    # the first; each is now a failed trial, the others are searched, and the command exits 2.
    args = [
        sys.executable,
        "-m",
        "app.train",
        "+sweep=optuna",
        "hydra.sweeper.n_trials=3",
        "data.batch_size=choice(0,64)",
        *tiny(tmp_path, "trainer.max_steps=2", NO_READERS),
    ]
    result = run_command(args, cwd=REPO)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-4000:]
    trials = [p for p in (tmp_path / "outputs" / "sweep_optuna").iterdir() if p.is_dir() and p.name != ".hydra"]
    statuses = sorted(json.loads((t / "summary.json").read_text())["status"] for t in trials)
    failed = [t for t in trials if "data.batch_size=0," in t.name]
    assert len(trials) == 3 and statuses == sorted(["failed"] * len(failed) + ["finished"] * (3 - len(failed)))
    assert 0 < len(failed) < 3  # with the seeded sampler: trials 0 and 2
    assert f"error: {len(failed)} of 3 sweep point(s) failed: " in result.stderr
    assert "Best value: " in result.stdout + result.stderr


def test_other_optimizers_and_the_dcn_head_train(uninterrupted_run):
    # optim=adam: test_resume.py's run of it on 1 process, shared by the session. optim=sgd with
    # model=dcn: the run of test_more_readers_than_cores_are_warned_of_and_sgd_with_the_dcn_head_trains.
    assert "final validation AUC" in uninterrupted_run("adam", 1).output


def test_bad_input_and_restarting_over_checkpoints_fail_clearly_and_keep_them(one_process_run, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # A finished job, as `python -m app.train experiment=tiny trainer.max_steps=5` leaves it: a copy
    # of the session's shared run (tests/integration/conftest.py).
    one_process_run.copy_to(tmp_path)
    checkpoints = tmp_path / "outputs" / "tiny" / "checkpoints"
    saved = sorted(p.name for p in checkpoints.iterdir())

    # The same job continued on Parquet files where one row group holds an id past its table.
    synthetic = next((tmp_path / "data").iterdir())
    table = pq.read_table(synthetic / "train" / "part-00000.parquet")
    ids = table.column("cat_3").to_numpy().copy()
    # cat_3 has 10000 rows. The resumed job skips the 5 batches (640 rows) it has trained on, so the
    # bad id goes past them: row 700, in the third row group of 250.
    ids[700] = 10_000
    bad = tmp_path / "bad" / "part-00000.parquet"
    bad.parent.mkdir()
    pq.write_table(
        table.set_column(table.schema.get_field_index("cat_3"), "cat_3", pa.array(ids)), bad, row_group_size=250
    )
    train = [sys.executable, "-m", "app.train"]
    second = [
        *train,
        *tiny(
            tmp_path,
            "trainer.max_steps=8",
            "data=parquet",
            f"data.train_path={bad.parent}",
            f"data.val_path={synthetic / 'val'}",
            "data.shuffle=false",
        ),
    ]
    result = run_command(second, cwd=REPO)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "bad/part-00000.parquet row group 2, row 200: column 'cat_3' has id 10000" in result.stderr
    assert sorted(p.name for p in checkpoints.iterdir()) == saved
    # Starting over in a run directory that holds checkpoints is refused, not mixed in.
    fresh = run_command([*train, *tiny(tmp_path, "checkpoint.resume=false", NO_READERS)], cwd=REPO)
    assert fresh.returncode == 2 and "checkpoint.resume=false, but" in fresh.stderr, fresh.stderr[-3000:]
    assert sorted(p.name for p in checkpoints.iterdir()) == saved

    # Where checkpoints cannot be written, the job says so before any work, not at its first save.
    blocked = tmp_path / "outputs" / "blocked" / "checkpoints"
    blocked.parent.mkdir()
    blocked.write_text("a file where the checkpoints directory goes")
    result = run_command([*train, *tiny(tmp_path, "run_name=blocked", NO_READERS)], cwd=REPO)
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        f"error: cannot write checkpoints to {blocked} (from output_root and run_name): a file is in the way."
        in result.stderr
    )
    assert "Traceback" not in result.stderr
    # ... and where the run directory itself cannot be made (Hydra makes it), exit code 2 too.
    result = run_command([*train, *tiny(tmp_path, f"output_root={blocked}")], cwd=REPO)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr == (
        f"error: cannot write the run directory {blocked / 'tiny'} (from output_root and run_name): Not a directory.\n"
    )


def _with_bad_id(source: Path, target: Path, row: int) -> None:
    """A copy of the Parquet file `source` at `target` whose row `row` holds an id past cat_3's table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(source)
    ids = table.column("cat_3").to_numpy().copy()
    ids[row] = 10_000  # cat_3 has 10000 rows
    target.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        table.set_column(table.schema.get_field_index("cat_3"), "cat_3", pa.array(ids)), target, row_group_size=250
    )


def test_bad_rows_are_reported_once_and_found_late_they_cost_no_training(one_process_run, tmp_path):
    synthetic = one_process_run.dataset  # the session's generated tiny dataset, only read
    on_parquet = ["data=parquet", f"data.train_path={synthetic / 'train'}", "trainer.max_steps=4"]

    # An error every rank meets is said once, by rank 0, on a line of its own.
    result = run_command(torchrun(*tiny(tmp_path, "optim.lr=-1")), cwd=REPO)
    assert result.returncode != 0
    assert [line for line in result.stderr.splitlines() if "optim.lr must be > 0" in line] == [
        "error: optim.lr must be > 0, got -1.0."
    ], result.stderr[-4000:]

    # In the first row group of a split: found before the first step, by every rank, said once.
    early = tmp_path / "early" / "part-00000.parquet"
    _with_bad_id(synthetic / "val" / "part-00000.parquet", early, row=10)
    result = run_command(torchrun(*tiny(tmp_path, *on_parquet, f"data.val_path={early.parent}")), cwd=REPO)
    assert result.returncode != 0
    assert result.stderr.count("part-00000.parquet row group 0, row 10: column 'cat_3' has id 10000") == 1, (
        result.stderr[-4000:]
    )
    assert "from scratch" not in result.stdout + result.stderr  # not one step was trained
    assert "error: " in result.stderr and not list((tmp_path / "outputs" / "tiny").glob("checkpoints/step_*"))
    # The same from workers the job starts itself: said once, exit code 2, and nothing else: neither
    # torch's launcher's traceback of the worker's exit nor a ChildFailedError of the job's own.
    self_launched = [
        sys.executable,
        "-m",
        "app.train",
        "distributed.nproc_per_node=2",
        *tiny(tmp_path, *on_parquet, f"data.val_path={early.parent}"),
    ]
    result = run_command(self_launched, cwd=REPO)
    assert result.returncode == 2 and "ChildFailedError" not in result.stderr, result.stderr[-4000:]
    assert "Traceback" not in result.stderr and "ProcessExitedException" not in result.stderr, result.stderr[-4000:]
    assert result.stderr.count("row group 0, row 10: column 'cat_3' has id 10000") == 1

    # In row group 3 of the val split, which rank 1 evaluates: found at the final evaluation, after
    # the final checkpoint; said by rank 1, on a line of its own.
    late = tmp_path / "late"
    _with_bad_id(synthetic / "val" / "part-00000.parquet", late / "part-00000.parquet", row=3 * 250 + 7)
    shutil.copy(synthetic / "val" / "part-00001.parquet", late)
    result = run_command(torchrun(*tiny(tmp_path, *on_parquet, f"data.val_path={late}")), cwd=REPO)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "column 'cat_3' has id 10000" in line]
    assert len(lines) == 1 and lines[0].startswith("error (rank 1): ") and "row group 3, row 7:" in lines[0], (
        result.stderr[-4000:]
    )
    assert (tmp_path / "outputs" / "tiny" / "checkpoints" / "step_00000004").is_dir()


def test_submitit_local_sweep_runs_points_as_separate_jobs_of_two_workers_and_reports_a_failed_one(tmp_path):
    # Each point a submitit job of 2 tasks (as a Slurm job of tasks_per_node=2 would be), each task a
    # worker; the second point fails on purpose (a config error every task meets): the first finishes,
    # the sweep command fails, and the report shows both.
    args = [
        sys.executable,
        "-m",
        "app.train",
        "-m",
        "+launcher=local",
        "hydra.launcher.tasks_per_node=2",
        "data.batch_size=64,0",
        # The finished point's tables are split table_column_wise: that sharding type trains to the end.
        *tiny(tmp_path, "trainer.max_steps=4", "sharding=table_column_wise", NO_READERS),
    ]
    result = run_command(args, cwd=REPO)
    sweep_dir = tmp_path / "outputs" / "tiny"
    good, bad = (next(sweep_dir.glob(f"data.batch_size={size},*")) for size in (64, 0))
    # The failed point's error, from its job's log, said once and without a traceback; exit code 2.
    assert result.returncode == 2, result.stderr[-4000:]
    assert "Traceback" not in result.stderr and "UncompletedJobError" not in result.stderr, result.stderr[-4000:]
    output = result.stdout + result.stderr
    assert output.count("data.batch_size must be > 0, got 0.") == 1, output[-4000:]
    assert f"error: sweep point {bad} failed: ConfigError: data.batch_size must be > 0, got 0.\n" in result.stderr
    assert result.stderr.endswith(f"error: 1 of 2 sweep point(s) failed: {bad}\n"), result.stderr[-4000:]
    summary = json.loads((good / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["world_size"] == 2 and summary["step"] == 4
    plan = json.loads((good / "plan.json").read_text())
    assert (good / "train_rank1.log").exists() and plan["world_size"] == 2
    assert {t["sharding_type"] for t in plan["tables"].values()} == {"table_column_wise"}
    assert json.loads((bad / "summary.json").read_text())["status"] == "failed"
    assert list((sweep_dir / ".submitit").iterdir())  # submitit's own job folders

    out = check(script_in_process("report.py", sweep_dir))  # launched for real by the grid sweep's test
    assert "2 point(s) of 2 planned (1 failed, 1 finished)" in out
    with open(sweep_dir / "report" / "report.csv") as table:
        rows = list(csv.DictReader(table))
    assert [row["data.batch_size"] for row in rows] == ["64", "0"]
    assert rows[0]["status"] == "finished" and float(rows[0]["final_auc"]) == records(good, "eval")[-1]["auc"]
    assert (
        rows[1]["status"] == "failed: ConfigError: data.batch_size must be > 0, got 0." and rows[1]["final_auc"] == ""
    )
