"""`--dist loadgroup` for this suite (tests/conftest.py registers it where pytest-xdist runs):
tests that share a costly fixture run on one worker, every other test is scheduled on its own.

A test's group is its xdist_group mark's name, or else the test module that defines a module- or
session-scoped fixture it uses (built once per worker that runs a test of it: grouped, once).
Fixtures defined in a conftest.py are not grouped on: they are cheap, or shared across workers
through conftest's shared_run.

pytest-xdist's own loadgroup scheduler reads groups from suffixes it appends to node ids
(`test_x@group`), which pytest 9 no longer lets a plugin change: with pytest 9.2 and xdist 3.8
every test is scheduled alone. So the workers, which see the tests' marks and fixtures, write the
groups to a file in the session's temporary directory while they collect, and the controller's
scheduler, which sees only node ids, reads it when it divides the work (after every worker has
collected).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from xdist.scheduler import LoadScopeScheduling

GROUPS_FILE = "xdist_groups.json"


def group_of(item: pytest.Item) -> str | None:
    for mark in item.iter_markers("xdist_group"):
        return str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
    info = getattr(item, "_fixtureinfo", None)
    for definitions in info.name2fixturedefs.values() if info is not None else ():
        for definition in definitions:
            module = getattr(definition.func, "__module__", "") or ""
            if (
                definition.scope in ("module", "package", "session")
                and module.startswith("tests.")
                and not module.endswith("conftest")
            ):
                return module
    return None


def write_groups(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a worker: {node id: group} of the grouped tests, beside the workers' own temporary
    directories (the controller's base temp). Every worker writes the same; each replaces it whole."""
    if not os.environ.get("PYTEST_XDIST_WORKER") or not config.option.basetemp:
        return
    groups: dict[str, str] = {}
    for item in items:
        group = group_of(item)
        if group is not None:
            groups[item.nodeid] = group
    path = Path(config.option.basetemp).parent / GROUPS_FILE
    staging = path.with_name(f"{GROUPS_FILE}.{os.environ['PYTEST_XDIST_WORKER']}")
    staging.write_text(json.dumps(groups))
    os.replace(staging, path)


class GroupScheduling(LoadScopeScheduling):
    """xdist's scope scheduling with a test's group as its scope, and each other test its own."""

    def __init__(self, config: pytest.Config, log=None) -> None:
        super().__init__(config, log)
        # The directory xdist makes its workers' base temps in (xdist reads the same private attribute).
        self._groups_file = config._tmp_path_factory.getbasetemp() / GROUPS_FILE  # type: ignore[attr-defined]
        self._groups: dict[str, str] | None = None

    def _split_scope(self, nodeid: str) -> str:
        if self._groups is None:  # first asked once every worker has collected
            self._groups = json.loads(self._groups_file.read_text()) if self._groups_file.exists() else {}
        return self._groups.get(nodeid, nodeid)


class XdistGroups:
    """The plugin: the controller's scheduler for --dist loadgroup."""

    @pytest.hookimpl(tryfirst=True)  # before xdist's own, which would answer first
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log):
        if config.getvalue("dist") == "loadgroup":
            return GroupScheduling(config, log)
        return None
