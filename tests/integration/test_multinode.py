"""Two torchrun agents on this machine act as two nodes (c10d rendezvous), with row-wise tables
spanning both: the multi-node launch path, without a second machine."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from tests.conftest import REPO, run_command
from tests.integration.test_train import records, tiny


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_agents_as_two_nodes_train_row_wise_tables(tmp_path):
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=multinode-test",
        "-m",
        "app.train",
        *tiny(tmp_path, "sharding=row_wise", "trainer.max_steps=8"),
    ]
    # The second agent runs beside the first; run_command waits for the first.
    second = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env()
    )
    try:
        first = run_command(command, cwd=REPO)
        other_output, _ = second.communicate(timeout=300)
    finally:
        second.kill()
    assert first.returncode == 0, first.stderr[-4000:]
    assert second.returncode == 0, other_output[-4000:]
    run_dir = tmp_path / "outputs" / "tiny"
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["world_size"] == 2
    assert all(table["ranks"] == [0, 1] for table in plan["tables"].values())
    assert records(run_dir, "eval")[-1]["step"] == 8


def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env["PATH"] = f"{sys.executable.rsplit('/', 1)[0]}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RANK", None)
    return env
