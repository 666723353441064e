"""Process group, device and local self-launch.

The same code runs in three ways: under torchrun (the environment names rank and world size),
as one plain process (a one-rank group, since DistributedModelParallel always needs one), and as
a plain process that starts N local workers itself (`distributed.nproc_per_node=N`, so a Hydra
sweep point can use several processes without wrapping the sweep in torchrun).
"""

from __future__ import annotations

import datetime
import gc
import logging
import multiprocessing
import os
import signal
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from app.config import ConfigError, DistributedConfig
from app.errors import BAD_INPUT


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def under_launcher() -> bool:
    """True inside a worker started by torchrun or elastic_launch."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_device(
    config: DistributedConfig, local_rank: int, local_world_size: int, cuda_devices: int
) -> tuple[torch.device, str]:
    """(this worker's device, the process group backend) that distributed.device and
    distributed.backend ask for, with `cuda_devices` CUDA devices visible to the process; a
    ConfigError naming the keys where they cannot work. Touches no device (init() selects it)."""
    use_cuda = config.device == "cuda" or (config.device == "auto" and cuda_devices > 0)
    if not use_cuda:
        if config.backend == "nccl":
            why = "distributed.device=cpu" if config.device == "cpu" else "distributed.device=auto found no CUDA device"
            raise ConfigError(
                f"distributed.backend=nccl needs CUDA, but {why}: use distributed.backend=gloo (or "
                "auto) to train on CPU."
            )
        return torch.device("cpu"), "gloo"
    chosen = "distributed.device=cuda" if config.device == "cuda" else "distributed.device=auto chose CUDA"
    if config.backend == "gloo":
        # gloo carries CUDA tensors in broadcast and all-reduce only: the all-to-alls and
        # reduce-scatters of sharded tables would fail at the first step.
        raise ConfigError(
            f"{chosen}, but distributed.backend=gloo cannot train on CUDA (gloo has no all-to-all or "
            "reduce-scatter of CUDA tensors, which sharded tables need): use distributed.backend=nccl "
            "(or auto), or distributed.device=cpu to train on CPU over gloo."
        )
    if cuda_devices == 0:
        why = (
            "this torch is built without CUDA"
            if torch.version.cuda is None
            else f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}"
        )
        raise ConfigError(f"{chosen}, but no CUDA device is visible ({why}): use distributed.device=cpu (or auto).")
    workers = max(local_world_size, local_rank + 1)
    if workers > cuda_devices:
        # Each worker drives cuda:<LOCAL_RANK>, and NCCL cannot share a device between processes.
        devices = f"{cuda_devices} CUDA device{'s' if cuda_devices > 1 else ''}"
        raise ConfigError(
            f"{chosen}, but {workers} workers per node and {devices} visible: each worker needs a "
            f"device of its own. Start at most {cuda_devices} per node (torchrun --nproc_per_node, "
            "distributed.nproc_per_node), or use distributed.device=cpu."
        )
    return torch.device("cuda", local_rank), "nccl"


def _launcher_store(timeout: datetime.timedelta) -> dist.Store:
    """The launcher's store, under a prefix of its own per restart. torchrun keeps one store for
    all the restarts of a job (--max-restarts): without the prefix, the workers of a restart read
    the addresses their killed predecessors published there, and cannot connect."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=not agent_hosts_it and rank == 0,
        timeout=timeout,
    )
    return dist.PrefixStore(f"rectrain/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init(config: DistributedConfig) -> DistEnv:
    """Join (or, for one plain process, create) the default process group."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    device, backend = resolve_device(config, local_rank, local_world_size, torch.cuda.device_count())
    # Bound to its device, the NCCL group forms its communicator now (a bad setup fails here, not at
    # the first step), sub-groups split from it, and a barrier knows which device to use.
    device_id = None
    if device.type == "cuda":
        torch.cuda.set_device(device)
        device_id = device
    timeout = datetime.timedelta(seconds=config.timeout_s)
    if not dist.is_initialized():
        if under_launcher():
            dist.init_process_group(
                backend=backend,
                store=_launcher_store(timeout),
                timeout=timeout,
                rank=int(os.environ["RANK"]),
                world_size=int(os.environ["WORLD_SIZE"]),
                device_id=device_id,
            )
        else:
            dist.init_process_group(
                backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, device_id=device_id
            )
    if config.threads_per_worker:
        torch.set_num_threads(config.threads_per_worker)
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=local_world_size,
        device=device,
    )


def new_gloo_group() -> dist.ProcessGroup:
    """Collective: a new gloo group of all ranks, for coordination that must not share a group
    (and its ordering of collectives) with training's, e.g. from a background thread."""
    return dist.new_group(backend="gloo")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Destroy every process group, torchrec's cached ones too. torchrec keeps the intra- and
    cross-node groups of table_row_wise and table_column_wise tables in module globals: left there,
    a later job in this process (a sweep's next point) would be handed the destroyed ones, and the
    last are torn down during the interpreter's exit, in no set order with the libraries they use
    (where a 2-rank test once aborted: "terminate called without an active exception").
    The sharded model's modules reference their groups from reference cycles, which only the
    garbage collector frees: collected here, the groups' threads are joined now, not by the
    interpreter's exit, where that abort came back."""
    if dist.is_initialized():
        dist.destroy_process_group()
    from torchrec.distributed import comm

    for cached in ("_INTRA_PG", "_CROSS_PG", "_INTRA_PG_2D", "_CROSS_PG_2D"):
        setattr(comm, cached, None)
    gc.collect()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(entrypoint: Callable[..., Any], args: tuple, nproc: int) -> dict[int, Any]:
    """Run `entrypoint(*args)` in `nproc` local workers with torchrun's machinery (each worker gets
    RANK, WORLD_SIZE, LOCAL_RANK... in its environment); returns each rank's return value.
    A failing worker raises ChildFailedError with that worker's traceback.

    SIGTERM to this process is passed on to the workers, which stop at an agreed step, save and
    return as usual. (torch's launcher would instead raise in this process, stop waiting for the
    workers' results, and kill them 30 s later; its other signals keep its handling.)"""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    launch_config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{_free_port()}",
        max_restarts=0,
        monitor_interval=1,
        signals_to_handle="SIGINT,SIGHUP,SIGQUIT",  # not SIGTERM: passed on below
    )
    previous = signal.signal(signal.SIGTERM, _pass_on_to_workers)
    quiet = _QuietOnBadInput()
    loggers = [logging.getLogger(name) for name in _LAUNCHER_LOGGERS]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        return elastic_launch(launch_config, entrypoint)(*args)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for logger in loggers:
            logger.removeFilter(quiet)


# Where torch's launcher says that a worker ended: the process context that stops the others, and
# the agent's poll, which logs the worker's exit with a ProcessExitedException traceback.
_LAUNCHER_LOGGERS = ("torch.multiprocessing.spawn", "torch.distributed.elastic.multiprocessing.api")


class _QuietOnBadInput(logging.Filter):
    """Drops the launcher's traceback of a worker that exited with BAD_INPUT (it said why, in one
    line: that is the whole story), and its note on stopping the other workers (they end because
    one did, whatever its reason: the error or the ChildFailedError says it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from torch.multiprocessing import ProcessExitedException

        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ProcessExitedException) and error.exit_code == BAD_INPUT:
            return False
        return not str(record.msg).startswith("Terminating process")


def _pass_on_to_workers(signum, frame) -> None:
    for worker in multiprocessing.active_children():
        if worker.pid is not None:  # started, as active children are
            os.kill(worker.pid, signum)
