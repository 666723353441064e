"""Sharding: planner constraints from config, the collective plan, the DMP wrap, the plan report.

TorchRec's planner chooses, for every table, how to split it across ranks (whole tables, column
slices, row slices, or replicas) and which kernel runs it, by estimated cost within each rank's
memory. This package turns the sharding config into the planner's inputs and reports what it chose
(plan.txt for people, plan.json for tools). Its modules:

- sharders: the CPU-capable sharders (row_wise and table_row_wise over gloo, managed-collision
  tables on CPU) and the quantized communication codecs;
- constraints: the planner's per-table constraints from the sharding config;
- memory: the topology, each rank's memory caps and where they come from;
- proposer: the column-split proposer and the planner's search;
- planner: plan_sharding (collective, in training) and plan_offline (a dry run, scripts/plan.py);
- wrap: shard_model (DistributedModelParallel) and the DDPs inside it;
- report: plan_report, format_plan_report, write_plan_report (plan.json, plan.txt).
"""

from app.sharding.constraints import (
    SEQUENCE_SHARDING_TYPES,
    parameter_constraints,
    schema_feature,
    sequence_constraints,
)
from app.sharding.memory import offline_memory_note
from app.sharding.planner import plan_offline, plan_sharding
from app.sharding.report import format_plan_report, plan_report, write_plan_report
from app.sharding.sharders import sharders
from app.sharding.wrap import data_parallel_modules, shard_model

__all__ = [
    "SEQUENCE_SHARDING_TYPES",
    "data_parallel_modules",
    "format_plan_report",
    "offline_memory_note",
    "parameter_constraints",
    "plan_offline",
    "plan_report",
    "plan_sharding",
    "schema_feature",
    "sequence_constraints",
    "shard_model",
    "sharders",
    "write_plan_report",
]
