"""scripts/report.py on a real sweep's directories (made once for the module, copied for each test)
that a user, a crash or an attacker changed: malformed files make their point unreadable, with the
reason, and the report goes on; values are shown as text in every format, never run (Markdown's
HTML, a spreadsheet's formulas, matplotlib's mathtext)."""

from __future__ import annotations

import csv
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_command
from tests.integration.test_train import script_in_process


def check(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory) -> Path:
    """Two finished points of a real sweep, each with two evaluations."""
    root = tmp_path_factory.mktemp("sweep")
    args = [
        sys.executable,
        "-m",
        "app.train",
        "-m",
        "experiment=tiny",
        "optim.lr=0.01,0.02",
        "trainer.max_steps=2",
        "trainer.eval_every_n_steps=1",
        f"data.synthetic.root={root / 'data'}",
        f"output_root={root / 'outputs'}",
        "logging.progress_bar=false",
        "data.prefetch_windows=0",  # read in the training process: no readers' fork server to start
    ]
    check(run_command(args, cwd=REPO))
    return root / "outputs" / "tiny"


@pytest.fixture
def sweep(real_sweep, tmp_path) -> Path:
    copy = tmp_path / "sweep"
    shutil.copytree(real_sweep, copy, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    return copy


def point_dir(sweep: Path, lr: str) -> Path:
    return next(sweep.glob(f"*optim.lr={lr},*"))


def report(sweep: Path):
    """scripts/report.py's output, and report.csv's rows by point. The script runs in this process
    (script_in_process: its main, output and exit code, without a Python start and its imports each
    time); test_train.py's sweep tests launch it for real."""
    out = check(script_in_process("report.py", sweep))
    with open(sweep / "report" / "report.csv", newline="") as table:
        return out, {row["point"]: row for row in csv.DictReader(table)}


def edit_json(path: Path, **fields) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


DAMAGE = {
    "summary a list": (
        lambda p: (p / "summary.json").write_text("[1, 2]"),
        "summary.json: a JSON object was expected, got a list",
    ),
    "pid not a number": (
        lambda p: edit_json(p / "summary.json", status="running", pid="abc"),
        "summary.json: pid is 'abc', not a process id",
    ),
    "pid too large": (
        lambda p: edit_json(p / "summary.json", status="running", pid=99999999999),
        "summary.json: pid is 99999999999, not a process id",
    ),
    "eval without step": (
        lambda p: append(p / "metrics.jsonl", '{"kind": "eval", "auc": 0.9}\n'),
        "metrics.jsonl line 3: an eval record without a step (got None)",
    ),
    "metrics line a number": (
        lambda p: append(p / "metrics.jsonl", "5\n"),
        "metrics.jsonl line 3: a JSON object was expected, got the number 5",
    ),
    "binary metrics": (
        lambda p: (p / "metrics.jsonl").write_bytes(bytes(range(256)) * 4),
        "metrics.jsonl: not text (binary data?)",
    ),
    "overrides a number": (
        lambda p: (p / ".hydra" / "overrides.yaml").write_text("5\n"),
        ".hydra/overrides.yaml: a list of overrides (key=value) was expected, got the number 5",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_point_with_a_malformed_file_is_reported_unreadable_with_the_reason(sweep, damage):
    spoil, reason = DAMAGE[damage]
    spoiled, intact = point_dir(sweep, "0.01"), point_dir(sweep, "0.02")
    auc = json.loads((intact / "summary.json").read_text())["validation"]["auc"]
    spoil(spoiled)
    out, rows = report(sweep)
    assert "2 point(s) of 2 planned (1 finished, 1 unreadable)" in out
    assert rows[spoiled.name]["status"] == f"unreadable: {reason}"
    assert rows[spoiled.name]["final_auc"] == rows[spoiled.name]["best_auc"] == ""
    assert rows[intact.name]["status"] == "finished" and float(rows[intact.name]["final_auc"]) == auc
    assert list(rows) == [intact.name, spoiled.name]  # the unreadable one last
    assert f"unreadable: {reason}" in (sweep / "report" / "report.html").read_text().replace("&#x27;", "'")


@pytest.mark.parametrize(
    "content, reason",
    [
        ("- a\n- b\n", "multirun.yaml: a mapping was expected, got a list"),
        ("hydra: null\n", "multirun.yaml: hydra is null, a mapping was expected"),
    ],
)
def test_a_malformed_multirun_yaml_is_said_and_every_point_still_reported(sweep, content, reason):
    (sweep / "multirun.yaml").write_text(content)
    out, rows = report(sweep)
    assert f"2 point(s) (2 finished); unreadable {reason}" in out
    assert [row["status"] for row in rows.values()] == ["finished", "finished"]
    assert {row["optim.lr"] for row in rows.values()} == {"0.01", "0.02"}  # still found varying


def set_override(run_dir: Path, key: str, value: str) -> None:
    path = run_dir / ".hydra" / "overrides.yaml"
    listed = [o for o in yaml.safe_load(path.read_text()) if not o.startswith(f"{key}=")]
    path.write_text(yaml.safe_dump([*listed, f"{key}={value}"]))


def test_values_from_overrides_directory_names_and_errors_are_text_in_every_format(sweep):
    first = point_dir(sweep, "0.01").rename(sweep / "<img src=x onerror=alert(1)>")
    second = point_dir(sweep, "0.02").rename(sweep / "=1+2")
    set_override(first, "optim.lr", "<script>alert(3)</script>")
    set_override(second, "optim.lr", r"a$\foo$b")  # mathtext, to matplotlib
    set_override(first, "+tag", "-0.5")
    set_override(second, "+tag", "-2+3|x")
    edit_json(second / "summary.json", status="failed", error="ValueError: <b>bold</b> | \\ @SUM(1)\nsecond line")
    _out, rows = report(sweep)
    files = sweep / "report"
    assert (files / "final_auc_vs_optim.lr.png").stat().st_size > 0 and (files / "val_auc.png").stat().st_size > 0

    markdown = (files / "report.md").read_text()
    assert "<" not in markdown and ">" not in markdown
    assert r"&lt;script&gt;alert(3)&lt;/script&gt;" in markdown and "&lt;img src=x onerror=alert(1)&gt;" in markdown
    assert (
        r"a$\\foo$b" in markdown
        and r"failed: ValueError: &lt;b&gt;bold&lt;/b&gt; \| \\ @SUM(1) second line" in markdown
    )
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(table) == 4 and all(len(re.findall(r"(?<!\\)\|", line)) == 13 for line in table)  # 12 cells each

    assert rows.keys() == {"<img src=x onerror=alert(1)>", "'=1+2"}  # a formula's start, quoted away
    first_row, second_row = rows["<img src=x onerror=alert(1)>"], rows["'=1+2"]
    assert first_row["tag"] == "-0.5" and second_row["tag"] == "'-2+3|x"  # a number stays a number
    assert first_row["optim.lr"] == "<script>alert(3)</script>" and second_row["optim.lr"] == r"a$\foo$b"
    assert float(first_row["final_auc"]) > 0 and second_row["status"].startswith("failed: ValueError: <b>bold</b>")

    page = (files / "report.html").read_text()
    assert "<script>" not in page and "<img src=x" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(3)&lt;/script&gt;" in page
