"""Print the sharding plan a config would get on N workers, without training or any process group:
a dry run to try before asking for machines.

    python scripts/plan.py --world-size 8
    python scripts/plan.py --world-size 16 --local-world-size 8 features=criteo_1tb \
        model.dense_arch_layer_sizes=[512,256,128]
    python scripts/plan.py --world-size 1,2,4,8,16,32,64 --summary sharding.ddr_cap_gb=64
    python scripts/plan.py --world-size 4 --json plan.json       # also write the report as JSON

Everything of the form key=value is a config override, as for app.train (sharding.*, features.*,
data.batch_size ...); the data paths are not needed (a dry run reads no data). The planner sees
the topology the sharding config describes, with torchrec's default memory per rank where
sharding.hbm_cap_gb / ddr_cap_gb are null (training measures its machine; this does not); the
device type is the one training would use on this machine unless --device says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.config import Config, ManagedCollisionConfig
from app.errors import BAD_INPUT, UserError
from app.features import FeatureSchema
from app.hydra_edge import compose_config
from app.models import build_model
from app.optim import apply_sparse_optimizer
from app.sharding import format_plan_report, offline_memory_note, plan_offline, plan_report

# torch's CUDA device index is 8 bits (c10::DeviceIndex): the planner's cuda:<local rank> overflows past it.
_CUDA_DEVICES_PER_HOST = 128


def _dry_run_config(overrides: list[str]) -> Config:
    """The config app.train would run, validated but for where the data is: a dry run reads none,
    and a synthetic source is the one without paths to check."""
    config = compose_config(overrides, validate=False)
    dataclasses.replace(config, data=dataclasses.replace(config.data, source="synthetic")).validate()
    return config


def _world_sizes(text: str) -> list[int]:
    sizes = [int(part) for part in text.split(",") if part]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected world sizes >= 1 separated by commas, got {text!r}")
    return sizes


def _parse_args(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace, list[str]]:
    """(the parser, for errors found later; the options; the config overrides, key=value)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=_world_sizes, required=True, help="one or more, e.g. 8 or 1,2,4,8")
    parser.add_argument(
        "--local-world-size", type=int, default=None, help="workers per node (default: the world size, one node)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="the device type to plan for")
    parser.add_argument("--summary", action="store_true", help="one line per world size instead of the full plan")
    parser.add_argument("--json", default=None, help="write the (last) report to this file")
    args, overrides = parser.parse_known_args(argv)
    logging.disable(logging.WARNING)  # the planner's per-table chatter; errors still show
    unknown = [o for o in overrides if "=" not in o]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return parser, args, overrides


def _check_cuda_hosts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A parser error where a host would hold more CUDA workers than torch can number."""
    for world_size in args.world_size:
        local = min(args.local_world_size or world_size, world_size)
        if local > _CUDA_DEVICES_PER_HOST:
            parser.error(
                f"--world-size {world_size} with {local} workers a host: torch numbers a host's CUDA "
                f"devices 0 to {_CUDA_DEVICES_PER_HOST - 1}; give --local-world-size (workers a host, "
                "e.g. 8)."
            )


def _model_to_plan(
    config: Config,
    schema: FeatureSchema,
    device_type: str,
    managed_collision: ManagedCollisionConfig | None = None,
    mc_buckets: int = 1,
) -> nn.Module:
    """The model training would shard, its tables on meta, with its sparse optimizer (the planner
    counts the optimizer's state); managed_collision and mc_buckets as build_model takes them."""
    model = build_model(
        config.model, schema, torch.device("cpu"), managed_collision=managed_collision, mc_buckets=mc_buckets
    )  # tables stay on meta
    apply_sparse_optimizer(model, config.optim, torch.device(device_type))
    return model


def _summary_line(world_size: int, report: dict[str, Any], planning_s: float) -> str:
    types = sorted({t["sharding_type"] for t in report["tables"].values()})
    return (
        f"world size {world_size:>3}: {', '.join(types)}; estimated step "
        f"{report['estimated_step_ms']:.4g} ms; imbalance: table bytes {report['imbalance']:.3f}, "
        f"planned memory {report['planned_memory_imbalance']:.3f}, cost {report['cost_imbalance']:.3f}; "
        f"planned in {planning_s:.1f} s"
    )


def main(argv: list[str]) -> int:
    parser, args, overrides = _parse_args(argv)
    try:
        config = _dry_run_config(overrides)
        device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device_type == "cuda":
            _check_cuda_hosts(parser, args)
        note = offline_memory_note(config.sharding, device_type)
        if note:
            print(note + "\n")
        schema = FeatureSchema.from_config(config.features)
        model = _model_to_plan(config, schema, device_type)
        report = None
        for world_size in args.world_size:
            local = min(args.local_world_size or world_size, world_size)
            if any(f.id_mapping == "managed_collision" for f in schema.sparse):
                # Managed-collision modules are built for their number of row-wise shards.
                model = _model_to_plan(
                    config,
                    schema,
                    device_type,
                    managed_collision=config.features.managed_collision,
                    mc_buckets=world_size,
                )
            started = time.perf_counter()
            plan, chosen = plan_offline(
                model, config.sharding, schema, device_type, config.data.batch_size, world_size, local
            )
            planning_s = time.perf_counter() - started
            report = plan_report(plan, schema, world_size, chosen)
            print(
                _summary_line(world_size, report, planning_s) if args.summary else format_plan_report(report),
                flush=True,
            )
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return BAD_INPUT
    if args.json and report is not None:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
