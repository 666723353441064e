"""Where the suite's time goes, in CPU seconds as well as wall seconds.

On 2 shared cores a test's wall time says as much about its neighbours as about itself; the CPU
seconds it costs (its pytest process's, plus every process it started and waited for: launchers,
workers, scripts) do not depend on the load, so they are what to cut. Each test's figures travel
to the controlling process in its report (pytest-xdist sends user_properties back), which prints:
- during the run, a line with the clock time for each test over SLOW_TEST_S wall seconds, so that
  a run stopped from outside (a CI time limit) still shows how far it got and what was slow;
- at the end, the tests costing the most CPU seconds and the total.
A process a test leaves running, or one nobody waits for (a reader's fork server, reparented when
its trainer exits), is not counted: the figures are a floor.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Generator

import pytest

SLOW_TEST_S = 60.0
TOP = 25


def _cpu_seconds() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


_CPU_AT_START = pytest.StashKey[float]()


class CpuTime:
    def __init__(self, config: pytest.Config) -> None:
        self.reports = not hasattr(config, "workerinput")  # the controller, or a run without xdist
        self.per_test: dict[str, tuple[float, float]] = {}  # nodeid: (wall s, CPU s), all phases

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Generator[None, None, None]:
        item.stash[_CPU_AT_START] = _cpu_seconds()
        yield

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo) -> Generator[None, None, None]:
        outcome = yield
        report = outcome.get_result()
        if report.when == "teardown":
            report.user_properties.append(("cpu_s", _cpu_seconds() - item.stash[_CPU_AT_START]))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not self.reports:
            return
        wall, cpu = self.per_test.get(report.nodeid, (0.0, 0.0))
        wall += report.duration
        cpu = dict(report.user_properties).get("cpu_s", cpu) if report.when == "teardown" else cpu
        self.per_test[report.nodeid] = (wall, cpu)
        if report.when == "teardown" and wall > SLOW_TEST_S:
            stamp = time.strftime("%H:%M:%S", time.gmtime())
            os.write(2, f"\n[{stamp}Z] {wall:.0f} s wall, {cpu:.0f} s CPU: {report.nodeid}\n".encode())

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.per_test:
            return
        ranked = sorted(self.per_test.items(), key=lambda entry: -entry[1][1])
        terminalreporter.write_sep("=", f"CPU seconds: the {TOP} costliest tests (a floor: see tests/cpu_time.py)")
        for nodeid, (wall, cpu) in ranked[:TOP]:
            terminalreporter.write_line(f"{cpu:8.1f} s CPU {wall:8.1f} s wall  {nodeid}")
        total_cpu = sum(cpu for _, cpu in self.per_test.values())
        total_wall = sum(wall for wall, _ in self.per_test.values())
        terminalreporter.write_line(
            f"{len(self.per_test)} tests: {total_cpu:.0f} s CPU, {total_wall:.0f} s wall (summed over tests)"
        )
