"""The plan report: what the planner decided, per table and per rank, as plain data (plan.json,
for tools) and as text (plan.txt, for people)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from torchrec.distributed.planner.types import ShardingOption
from torchrec.distributed.types import ParameterSharding, ShardingPlan

from app.config import SparseFeature
from app.features import FeatureSchema, table_name
from app.models import TABLES_PATH
from app.models.sequence import SEQUENCE_TABLES_PATH


def _table_plans(plan: ShardingPlan) -> dict[str, object]:
    """Every table's ParameterSharding: the plain collection's at TABLES_PATH, or, with
    managed-collision tables, those of both collections below it."""
    found: dict[str, object] = {}
    for path, module_plan in plan.plan.items():
        if path == TABLES_PATH or path.startswith(TABLES_PATH + "."):
            found.update(module_plan)
    return found


def plan_report(
    plan: ShardingPlan, schema: FeatureSchema, world_size: int, options: list[ShardingOption] | None = None
) -> dict:
    """What the planner decided, as plain data: per table, and per rank its tables' bytes and,
    from the chosen `options`, its planned HBM and DDR use and the planner's cost estimate."""
    tables, ranks = _tables_and_ranks(plan, schema, world_size)
    _add_planned_use(ranks, options or [])
    report = {
        "world_size": world_size,
        "tables": tables,
        "ranks": ranks,
        # max over mean of per-rank table bytes: how evenly memory is spread
        "imbalance": _imbalance([ranks[str(r)]["embedding_bytes"] for r in range(world_size)]),
    }
    if options:
        report.update(_planned_ratings(ranks, world_size))
    return report


def _reported_features(schema: FeatureSchema) -> dict[str, SparseFeature]:
    """The feature of every table, by table name: the sparse features' and the histories' (fp32),
    reported alike."""
    features = {table_name(f.name): f for f in schema.sparse}
    features.update(
        {
            table_name(f.name): SparseFeature(f.name, f.num_embeddings, embedding_dim=schema.sequence_dim(f))
            for f in schema.sequence
        }
    )
    return features


def _shards(sharding: ParameterSharding, full: list[int], world_size: int) -> list[dict]:
    """A table's shards as plain data: the rank each is on, its offsets and sizes."""
    if sharding.sharding_spec is not None:
        return [
            {"rank": s.placement.rank(), "offsets": list(s.shard_offsets), "sizes": list(s.shard_sizes)}
            for s in sharding.sharding_spec.shards
        ]
    # data_parallel: a full replica on every rank
    return [{"rank": r, "offsets": [0, 0], "sizes": full} for r in range(world_size)]


def _tables_and_ranks(plan: ShardingPlan, schema: FeatureSchema, world_size: int) -> tuple[dict, dict]:
    """(per table: its feature, shape, sharding and shards; per rank: its tables and their bytes)."""
    features = _reported_features(schema)
    tables: dict[str, dict] = {}
    rank_bytes: dict[int, int] = defaultdict(int)
    rank_tables: dict[int, list[str]] = defaultdict(list)
    for name, sharding in sorted({**_table_plans(plan), **plan.plan.get(SEQUENCE_TABLES_PATH, {})}.items()):
        feature = features[name]
        full = [feature.num_embeddings, schema.table_dim(feature)]
        element_bytes = 2 if schema.table_data_type(feature) == "fp16" else 4
        shards = _shards(sharding, full, world_size)
        for shard in shards:
            rank_bytes[shard["rank"]] += shard["sizes"][0] * shard["sizes"][1] * element_bytes
            rank_tables[shard["rank"]].append(name)
        tables[name] = {
            "feature": feature.name,
            "num_embeddings": feature.num_embeddings,
            "embedding_dim": full[1],
            "sharding_type": sharding.sharding_type,
            "compute_kernel": sharding.compute_kernel,
            "ranks": sorted({s["rank"] for s in shards}),
            "shards": shards,
        }
    ranks = {
        str(r): {"tables": sorted(set(rank_tables[r])), "embedding_bytes": rank_bytes[r]} for r in range(world_size)
    }
    return tables, ranks


def _add_planned_use(ranks: dict, options: list[ShardingOption]) -> None:
    """Adds to each rank the planned HBM and DDR bytes and the planner's cost estimates of the
    shards the chosen `options` place on it."""
    for option in options:
        for shard in option.shards:
            if shard.rank is None:
                continue
            info = ranks[str(shard.rank)]
            for key, value in (
                ("hbm_bytes", shard.storage.hbm if shard.storage else 0),
                ("ddr_bytes", shard.storage.ddr if shard.storage else 0),
                ("cost", shard.perf.total if shard.perf else 0.0),
                ("compute_cost", (shard.perf.fwd_compute + shard.perf.bwd_compute) if shard.perf else 0.0),
                ("comms_cost", (shard.perf.fwd_comms + shard.perf.bwd_comms) if shard.perf else 0.0),
            ):
                info[key] = info.get(key, 0) + value


def _planned_ratings(ranks: dict, world_size: int) -> dict[str, float]:
    """How evenly the planned memory and cost are spread, and the step time the planner expects."""
    costs = [ranks[str(r)].get("cost", 0.0) for r in range(world_size)]
    return {
        "planned_memory_imbalance": _imbalance(
            [ranks[str(r)].get("hbm_bytes", 0) + ranks[str(r)].get("ddr_bytes", 0) for r in range(world_size)]
        ),
        # The planner's own rating of a plan (torchrec's NoopPerfModel): a step waits for its slowest rank.
        "estimated_step_ms": max(costs),
        "cost_imbalance": _imbalance(costs),
    }


def _imbalance(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return max(values) / mean if mean else 1.0


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def format_plan_report(report: dict) -> str:
    lines = [f"sharding plan for {report['world_size']} rank(s)", ""]
    lines.append(f"{'table':<14}{'rows':>12}{'dim':>5}  {'sharding':<18}{'kernel':<8}ranks (shard rows x cols)")
    for name, table in report["tables"].items():
        shards = ", ".join(f"{s['rank']}:{s['sizes'][0]}x{s['sizes'][1]}" for s in table["shards"])
        lines.append(
            f"{name:<14}{table['num_embeddings']:>12}{table['embedding_dim']:>5}  "
            f"{table['sharding_type']:<18}{table['compute_kernel']:<8}{shards}"
        )
    lines += [
        "",
        "per rank: fp32 table weights; planned HBM and DDR (weights, optimizer state, buffers); "
        "the planner's cost estimate in ms (compute + communication)",
    ]
    for rank, info in report["ranks"].items():
        line = f"  rank {rank}: {_mb(info['embedding_bytes']):>12} in {len(info['tables'])} table(s)"
        if "cost" in info:
            line += (
                f"; HBM {_mb(info['hbm_bytes'])}, DDR {_mb(info['ddr_bytes'])}; cost {info['cost']:.4g} "
                f"(compute {info['compute_cost']:.4g}, comms {info['comms_cost']:.4g})"
            )
        lines.append(line)
    lines.append(
        f"  imbalance (max / mean): table bytes {report['imbalance']:.3f}"
        + (
            f", planned memory {report['planned_memory_imbalance']:.3f}, cost {report['cost_imbalance']:.3f}"
            if "cost_imbalance" in report
            else ""
        )
    )
    if "estimated_step_ms" in report:
        lines.append(
            f"  estimated step time: {report['estimated_step_ms']:.4g} ms (the planner's estimate for the "
            "embeddings: the slowest rank's cost)"
        )
    return "\n".join(lines) + "\n"


def write_plan_report(report: dict, run_dir: Path) -> str:
    """Writes plan.json and plan.txt into run_dir; returns the text."""
    text = format_plan_report(report)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plan.json").write_text(json.dumps(report, indent=2))
    (run_dir / "plan.txt").write_text(text)
    return text
