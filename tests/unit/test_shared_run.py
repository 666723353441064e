"""tests/conftest.py's shared_run, as pytest-xdist workers use it: separate processes asking for the
same build at once get one build, and a failed build is not redone."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import REPO

# A worker: asks for build `name` under `root`; the build counts itself in root/builds and takes a
# second, so that the other worker asks while it runs.
_WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tests.shared_run import build_once

    root, name, fail = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "fail"

    def build(directory):
        with open(root / "builds", "a") as count:
            count.write("x")
        time.sleep(1)
        if fail:
            raise RuntimeError("the build broke")
        (directory / "model.txt").write_text("trained")
        return {"printed": "final validation AUC 0.7"}

    shared = build_once(root, name, build)
    print(shared.path, (shared.path / "model.txt").read_text(), shared.value["printed"])
""")


def _workers(root, name: str, fail: bool = False):
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(root), name, "fail" if fail else "ok"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    return [(p.wait(timeout=120), *p.communicate()) for p in processes]


def test_two_processes_asking_at_once_share_one_build(tmp_path):
    results = _workers(tmp_path, "tiny_run")
    for code, out, err in results:
        assert code == 0, err
        assert out.split() == [str(tmp_path / "tiny_run"), "trained", "final", "validation", "AUC", "0.7"]
    assert (tmp_path / "builds").read_text() == "x"


def test_a_failed_build_fails_every_asker_without_being_redone(tmp_path):
    results = _workers(tmp_path, "broken_run", fail=True)
    assert [code for code, _, _ in results] == [1, 1]
    assert all("the build broke" in err for _, _, err in results)
    assert (tmp_path / "builds").read_text() == "x"
