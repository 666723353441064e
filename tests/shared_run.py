"""The machinery of conftest's shared_run fixture (see tests/conftest.py): one build per pytest
session, whichever xdist worker asks first, under a file lock. Apart from conftest so that it
imports neither torch nor the app (tests/unit/test_shared_run.py runs it in bare processes)."""

from __future__ import annotations

import os
import pickle
import shutil
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from filelock import FileLock


class Shared(NamedTuple):
    """A shared build: its directory, and what its build returned."""

    path: Path
    value: Any


def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory for the whole session, seen by every worker: an xdist worker's base temp is
    <session's>/popen-gw<N>, so the session's is its parent; without xdist it is the base temp
    itself (its parent holds earlier sessions' directories, which must not be reused)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    return root


def build_once(root: Path, name: str, build: Callable[[Path], Any]) -> Shared:
    """root/name, filled by `build` unless this session built it already, and what `build` returned.
    The first failure is kept and said again to every later caller: redoing a broken run in each
    worker would only cost its minutes again."""
    directory, value_file, failure = root / name, root / f"{name}.value", root / f"{name}.failed"
    with FileLock(str(root / f"{name}.lock")):
        if failure.exists():
            pytest.fail(
                f"building shared run {name!r} failed (once, for every test that uses it):\n{failure.read_text()}",
                pytrace=False,
            )
        if not value_file.exists():
            shutil.rmtree(directory, ignore_errors=True)  # a build interrupted in an earlier attempt
            directory.mkdir()
            try:
                value = build(directory)
            except (Exception, pytest.fail.Exception):
                failure.write_text(traceback.format_exc())
                raise
            value_file.write_bytes(pickle.dumps(value))  # last: its presence says the build is complete
        return Shared(directory, pickle.loads(value_file.read_bytes()))
