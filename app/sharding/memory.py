"""The topology the planner sees: each rank's memory caps (from config, this machine's memory
measured, or torchrec's defaults), the bandwidths, and the text that says where each cap came from."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.constants import DDR_CAP, HBM_CAP
from torchrec.distributed.planner.types import HardwareConfig, KernelConfig, TopologyFactory, TrainerConfig

from app.config import ShardingConfig

_GB = 1024**3


def _topology(
    config: ShardingConfig, device: torch.device, world_size: int, local_world_size: int, measured: HardwareConfig
) -> Topology:
    """`measured`: this machine's memory per rank (empty for a dry run). torchrec's TopologyFactory
    resolves each cap from the config first, then `measured`, then torchrec's defaults."""
    gb = lambda value: None if value is None else int(value * _GB)  # noqa: E731
    per_ms = lambda gbps: None if gbps is None else gbps * _GB / 1000  # noqa: E731  torchrec's unit
    return TopologyFactory.create_topology(
        trainer_config=TrainerConfig(
            world_size=world_size,
            local_world_size=local_world_size,
            hbm_cap_bytes=gb(config.hbm_cap_gb),
            ddr_cap_bytes=gb(config.ddr_cap_gb),
        ),
        hardware_config=HardwareConfig(
            hbm_cap_bytes=measured.hbm_cap_bytes,
            ddr_cap_bytes=measured.ddr_cap_bytes,
            hbm_mem_bw=per_ms(config.hbm_bw_gbps),
            ddr_mem_bw=per_ms(config.ddr_bw_gbps),
            intra_host_bw=per_ms(config.intra_host_bw_gbps),
            inter_host_bw=per_ms(config.inter_host_bw_gbps),
        ),
        # use_hardware_based_bandwidth: take the bandwidths above, torchrec's defaults where None.
        kernel_config=KernelConfig(compute_device=device.type, use_hardware_based_bandwidth=True),
    )


def _measured_memory(device: torch.device, local_world_size: int) -> HardwareConfig:
    """This machine's memory per rank, for the caps sharding.hbm_cap_gb / ddr_cap_gb leave null
    (torchrec's defaults, 32 GiB HBM and 128 GiB DDR, fit no machine in particular): on CUDA the
    device's memory, and the host's memory shared by the workers of this node."""
    hbm = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    return HardwareConfig(hbm_cap_bytes=hbm, ddr_cap_bytes=_host_memory_bytes() // max(local_world_size, 1))


def _host_memory_bytes() -> int:
    """Physical memory, or the container's limit where that is lower (cgroup v2, then v1; an
    unlimited cgroup reads "max" or a number larger than the memory)."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
        break
    return total


def offline_memory_note(config: ShardingConfig, device_type: str) -> str | None:
    """What a dry run assumes for the memory caps the config leaves null (None: it sets them)."""
    caps = [("HBM", "hbm_cap_gb", HBM_CAP)] if device_type == "cuda" else []
    unset = [
        f"{kind} {default / _GB:g} GiB"
        for kind, key, default in [*caps, ("DDR", "ddr_cap_gb", DDR_CAP)]
        if getattr(config, key) is None
    ]
    if not unset:
        return None
    return (
        f"memory per rank: torchrec's default ({', '.join(unset)}) where sharding.hbm_cap_gb / ddr_cap_gb "
        "are null. A dry run does not measure the machines it plans for (training does: the device's "
        "memory, and the host's shared by its workers): set them for yours."
    )


def _memory_text(config: ShardingConfig, topology: Topology, measured: HardwareConfig) -> str:
    """Each memory cap the planner fills, per rank, and where it comes from."""
    storage = topology.devices[0].storage
    caps = [
        (
            "DDR",
            storage.ddr,
            "ddr_cap_gb",
            measured.ddr_cap_bytes,
            f"the host's memory / {topology.local_world_size} worker(s)",
        )
    ]
    if topology.compute_device == "cuda":
        caps.insert(0, ("HBM", storage.hbm, "hbm_cap_gb", measured.hbm_cap_bytes, "the device's memory"))
    parts = []
    for kind, value, key, detected, source in caps:
        origin = f"sharding.{key}" if getattr(config, key) is not None else source if detected else "torchrec's default"
        parts.append(f"{kind} {value / _GB:.3g} GiB ({origin})")
    return ", ".join(parts)
