"""Which device and backend a worker gets, and the clear errors where the config asks for what this
machine cannot do. The device count is given to resolve_device, so the CUDA decisions run here on
CPU; init() runs for real, with the devices this process sees (none: tests/conftest.py hides them)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist

from app import distributed
from app.config import ConfigError, DistributedConfig
from tests.conftest import REPO, run_command


def resolve(
    device: str = "auto",
    backend: str = "auto",
    *,
    local_rank: int = 0,
    local_world_size: int = 1,
    cuda_devices: int = 0,
):
    return distributed.resolve_device(
        DistributedConfig(device=device, backend=backend), local_rank, local_world_size, cuda_devices
    )


def test_auto_is_cuda_and_nccl_where_a_device_is_visible_else_cpu_and_gloo():
    assert resolve(cuda_devices=0) == (torch.device("cpu"), "gloo")
    assert resolve(cuda_devices=2, local_rank=1, local_world_size=2) == (torch.device("cuda", 1), "nccl")
    assert resolve("cpu", cuda_devices=2) == (torch.device("cpu"), "gloo")


def test_asking_for_cuda_without_a_device_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"distributed.device=cuda, but no CUDA device is visible"):
        distributed.init(DistributedConfig(device="cuda"))
    assert not dist.is_initialized()


def test_nccl_without_cuda_is_refused_before_any_process_group():
    with pytest.raises(ConfigError, match=r"distributed.backend=nccl needs CUDA, but distributed.device=cpu"):
        distributed.init(DistributedConfig(device="cpu", backend="nccl"))
    with pytest.raises(ConfigError, match=r"distributed.device=auto found no CUDA device"):
        distributed.init(DistributedConfig(backend="nccl"))
    assert not dist.is_initialized()


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_gloo_on_cuda_is_refused_since_sharded_tables_need_its_missing_collectives(device):
    with pytest.raises(ConfigError, match=r"distributed.backend=gloo cannot train on CUDA .* all-to-all"):
        resolve(device, "gloo", cuda_devices=1)
    with pytest.raises(ConfigError, match=r"distributed.backend=gloo cannot train on CUDA"):
        distributed.init(DistributedConfig(device="cuda", backend="gloo"))
    assert not dist.is_initialized()


def test_more_workers_per_node_than_cuda_devices_names_both_counts():
    # torchrun --nproc_per_node=2 on a one-GPU machine: rank 0 fits, but both ranks must refuse alike.
    for local_rank in (0, 1):
        with pytest.raises(
            ConfigError,
            match=r"distributed.device=auto chose CUDA, but 2 workers per node and "
            r"1 CUDA device visible: each worker needs a device of its own",
        ):
            resolve(local_rank=local_rank, local_world_size=2, cuda_devices=1)
    with pytest.raises(ConfigError, match=r"distributed.device=cuda, but 3 workers per node and 2 CUDA devices"):
        resolve("cuda", local_rank=2, local_world_size=1, cuda_devices=2)


def test_the_test_suite_and_the_processes_it_starts_see_no_cuda_device():
    # So distributed.device=auto means CPU and gloo in every test not marked gpu, on any machine.
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""
    show = [sys.executable, "-c", "import os; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))"]
    assert run_command(show, cwd=REPO).stdout.strip() == "''"
