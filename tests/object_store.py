"""A real S3-compatible server for the tests: moto's server mode, started as a subprocess on
127.0.0.1 at a free port. The test process's AWS_* variables point at it, so every job a test
starts (they inherit the environment, see conftest.run_command) finds it as a user's job finds
their store: AWS_ENDPOINT_URL and the credentials, nothing passed by the tests themselves."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import kill_tree


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environment(endpoint: str, home: Path) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "rectrain-test",
        "AWS_SECRET_ACCESS_KEY": "rectrain-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        # Nothing of the machine's own AWS set-up (profiles, ~/.aws) may reach the tests, and a
        # missing credential must fail at once rather than after the EC2 metadata service's timeouts.
        "AWS_CONFIG_FILE": str(home / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@contextmanager
def s3_server(log_dir: Path) -> Iterator[str]:
    """An S3 server for the block; yields its endpoint URL, with os.environ pointing at it."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(log_dir / "moto.log", "w")  # noqa: SIM115 (the server writes to it for its life)
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    saved = {key: os.environ.get(key) for key in _environment(endpoint, log_dir)}
    os.environ.update(_environment(endpoint, log_dir))
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, (log_dir / "moto.log").read_text()
                assert time.time() < deadline, "moto's S3 server did not start in time"
                time.sleep(0.1)
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        kill_tree(server.pid)
        server.wait()
        log.close()


def s3():
    """An s3fs filesystem for the server that os.environ points at (a fresh one: no cached listings)."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
