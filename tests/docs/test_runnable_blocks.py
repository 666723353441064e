"""The docs that run: every fenced code block of README.md and docs/*.md directly preceded by the line

    <!-- docs-test: run -->

or, with regular expressions the block's output must contain (any number of them),

    <!-- docs-test: run; expect="final validation AUC 0\\.\\d{4}"; expect="run dir \\S*outputs/tiny" -->

is run with `bash -e`, verbatim, one test per page: the page's blocks in their order, each in a bash
of its own (variables and `cd` do not carry over), all in one working directory, a fresh copy of the
repository's files (`git ls-files`: the tracked files and the untracked ones git does not ignore)
whose `.venv` is a link to the environment running the tests, as a newcomer's clone after
`make setup` would be. A block must exit 0 and print what each of its expects names (searched in its
stdout and stderr together, `re.MULTILINE`); a failure shows the block, its exit code and the tail
of its output. The page says in words what small settings its blocks use; the blocks of every
page together must stay quick (the suite runs them all on each `make test`).

The copy never reinstalls anything: make's setup stamp (.venv/.setup-*) depends on pyproject.toml
and the Makefile, so their copies keep their times, and are set no later than the stamp of the
environment the tests run in (which is, by being that environment, set up); `make -q setup` in the
copy must then say there is nothing to do, or the test fails before running a block.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import USER_OMP_NUM_THREADS

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!--\s*docs-test:(?P<body>.*?)-->\s*$")
MARKER_BODY = re.compile(r'^\s*run\s*(?P<expects>(?:;\s*expect="(?:[^"\\]|\\.)*"\s*)*)$')
EXPECT = re.compile(r'expect="((?:[^"\\]|\\.)*)"')
FENCE = re.compile(r"^(?P<fence>```+|~~~+)")
BLOCK_TIMEOUT_S = 900  # a tiny run takes seconds; minutes only on a machine loaded by other jobs
OUTPUT_TAIL = 4000


@dataclass
class Block:
    page: Path
    line: int  # of the fence's opening line, 1-based
    code: str
    expects: list[str] = field(default_factory=list)

    def where(self) -> str:
        return f"{shown(self.page)}:{self.line}"


def shown(page: Path) -> str:
    return str(page.relative_to(REPO)) if page.is_relative_to(REPO) else str(page)


def runnable_blocks(page: Path) -> list[Block]:
    """The page's blocks marked runnable, in order. A marker that is malformed or not directly
    followed by a fenced block is an error, so that a typo cannot silently drop a block."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks = []
    for index, line in enumerate(lines):
        marker = MARKER.match(line)
        if not marker:
            continue
        where = f"{shown(page)}:{index + 1}"
        body = MARKER_BODY.match(marker.group("body"))
        if not body:
            raise ValueError(
                f"{where}: malformed marker {line!r}; expected <!-- docs-test: run --> or "
                f'<!-- docs-test: run; expect="regex"; ... -->'
            )
        opening = FENCE.match(lines[index + 1]) if index + 1 < len(lines) else None
        if not opening:
            raise ValueError(f"{where}: the marker is not directly followed by a fenced code block")
        fence = opening.group("fence")
        end = next((j for j in range(index + 2, len(lines)) if lines[j].strip() == fence), None)
        if end is None:
            raise ValueError(f"{where}: the fenced block after the marker is never closed")
        expects = [re.sub(r'\\"', '"', text) for text in EXPECT.findall(body.group("expects"))]
        for expect in expects:
            re.compile(expect)  # a bad pattern is the page's error, said here with its place
        blocks.append(Block(page, index + 2, "\n".join(lines[index + 2 : end]) + "\n", expects))
    return blocks


PAGES_WITH_BLOCKS = [page for page in PAGES if runnable_blocks(page)]


def repository_files() -> list[str]:
    """The files a clone has: git's list (tracked, and untracked ones it does not ignore), or, outside a
    git work tree (an unpacked archive), what the docs' commands use."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True
    )
    if listed.returncode == 0 and listed.stdout:
        return listed.stdout.decode().split("\0")
    top = ["Makefile", "pyproject.toml", "README.md"]
    trees = [
        path
        for folder in ("app", "configs", "scripts", "docs")
        for path in (REPO / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and "_build" not in path.parts
    ]
    return top + [str(path.relative_to(REPO)) for path in trees]


def copy_of_repository(destination: Path) -> Path:
    """A fresh copy of the repository's files (their times kept), its .venv the running one."""
    for name in repository_files():
        source = REPO / name
        if not name or not source.is_file():  # a tracked file deleted in the work tree
            continue
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    (destination / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    stamps = list(Path(sys.prefix).glob(".setup-*"))
    if stamps:
        newest = max(stamp.stat().st_mtime for stamp in stamps)
        for name in ("Makefile", "pyproject.toml"):
            if (destination / name).stat().st_mtime > newest:
                os.utime(destination / name, (newest, newest))
    return destination


def block_environment(root: Path) -> dict:
    """The environment of a shell whose venv is activated in the copy: the copy's `app` first, on
    CPU (tests/conftest.py has hidden CUDA devices already), outside of the make running the tests,
    with torch's default math threads unless the caller set OMP_NUM_THREADS."""
    env = dict(os.environ)
    for name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"):
        env.pop(name, None)
    if USER_OMP_NUM_THREADS is None:  # the figures the pages print were measured with torch's default
        env.pop("OMP_NUM_THREADS", None)
    env["PYTHONPATH"] = str(root)
    env["VIRTUAL_ENV"] = str(root / ".venv")
    env["PATH"] = f"{root / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def failure(block: Block, why: str, output: str) -> str:
    tail = output[-OUTPUT_TAIL:]
    return f"{block.where()}: {why}\n--- block ---\n{block.code}--- output (last {len(tail)} characters) ---\n{tail}"


@pytest.mark.parametrize("page", PAGES_WITH_BLOCKS, ids=lambda page: str(page.relative_to(REPO)))
def test_runnable_blocks_of_a_page_run_and_print_what_the_page_says(page: Path, tmp_path: Path) -> None:
    root = copy_of_repository(tmp_path / "repo")
    env = block_environment(root)
    setup = subprocess.run(["make", "-q", "setup"], cwd=root, env=env, capture_output=True, text=True)
    assert setup.returncode == 0, (
        "`make setup` would run in the copy and reinstall into the shared .venv: "
        "run `make setup` first\n" + setup.stdout + setup.stderr
    )
    for block in runnable_blocks(page):
        try:
            done = subprocess.run(
                ["bash", "-e", "-c", block.code],
                cwd=root,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=BLOCK_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as timeout:
            output = timeout.output.decode(errors="replace") if isinstance(timeout.output, bytes) else timeout.output
            pytest.fail(failure(block, f"still running after {BLOCK_TIMEOUT_S} s", output or ""), pytrace=False)
        if done.returncode != 0:
            pytest.fail(failure(block, f"exit code {done.returncode}", done.stdout), pytrace=False)
        missing = [expect for expect in block.expects if not re.search(expect, done.stdout, re.MULTILINE)]
        if missing:
            pytest.fail(failure(block, f"the output has nothing that matches {missing}", done.stdout), pytrace=False)


def test_the_readme_tour_is_marked_runnable() -> None:
    """The tour is the README's promise to a newcomer: its four steps run on every `make test`."""
    assert len(runnable_blocks(REPO / "README.md")) >= 4


def test_a_malformed_or_misplaced_marker_is_an_error(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- docs-test: rnu -->\n```bash\ntrue\n```\n")
    with pytest.raises(ValueError, match="malformed marker"):
        runnable_blocks(page)
    page.write_text('<!-- docs-test: run; expect="x" -->\n\n```bash\ntrue\n```\n')
    with pytest.raises(ValueError, match="not directly followed"):
        runnable_blocks(page)
    page.write_text('<!-- docs-test: run; expect="a \\"b\\""; expect="c" -->\n```bash\necho\n```\n')
    assert [block.expects for block in runnable_blocks(page)] == [['a "b"', "c"]]
