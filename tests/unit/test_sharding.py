"""Planner inputs from config, refusal of CUDA-only and unsupported kernels, the search for the
fastest plan, memory caps, and the plan report."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from app.config import (
    ConfigError,
    FeaturesConfig,
    ModelConfig,
    OptimConfig,
    ShardingConfig,
    SparseFeature,
    TableConstraint,
)
from app.features import FeatureSchema
from app.hydra_edge import compose_config
from app.models import build_model
from app.optim import apply_sparse_optimizer
from app.sharding import parameter_constraints, plan_offline, plan_report, plan_sharding, sharders, write_plan_report

SCHEMA = FeatureSchema.from_config(
    FeaturesConfig(dense=["d"], sparse=[SparseFeature("small", 100), SparseFeature("big", 5000)], embedding_dim=8)
)


def test_global_constraints_with_a_per_table_override():
    config = ShardingConfig(
        sharding_types=["table_wise"],
        compute_kernels=["fused"],
        tables={"big": TableConstraint(sharding_types=["row_wise", "table_row_wise"])},
    )
    constraints = parameter_constraints(config, SCHEMA, "cpu")
    assert constraints["t_small"].sharding_types == ["table_wise"]
    assert constraints["t_big"].sharding_types == ["row_wise", "table_row_wise"]
    assert constraints["t_big"].compute_kernels == ["fused"]


def test_patterns_name_several_tables_and_a_feature_name_wins():
    config = ShardingConfig(
        tables={
            "*": TableConstraint(sharding_types=["column_wise"], min_partition=4),
            "big": TableConstraint(compute_kernels=["fused_uvm_caching"], cache_load_factor=0.2),
        }
    )
    constraints = parameter_constraints(config, SCHEMA, "cuda")
    assert constraints["t_small"].sharding_types == ["column_wise"] and constraints["t_small"].min_partition == 4
    big = constraints["t_big"]
    assert big.compute_kernels == ["fused_uvm_caching"] and big.cache_params.load_factor == 0.2
    assert big.sharding_types is None  # its own entry replaces the pattern's, it does not merge with it


def test_no_constraints_leaves_the_planner_free():
    assert parameter_constraints(ShardingConfig(), SCHEMA, "cpu") == {}


def test_cuda_only_kernels_are_refused_on_cpu_naming_the_key():
    config = ShardingConfig(tables={"big": TableConstraint(compute_kernels=["fused_uvm_caching"])})
    with pytest.raises(ConfigError, match=r"sharding\.tables\.big\.compute_kernels: fused_uvm_caching needs CUDA"):
        parameter_constraints(config, SCHEMA, "cpu")
    assert parameter_constraints(config, SCHEMA, "cuda")["t_big"].compute_kernels == ["fused_uvm_caching"]


def plan_for(config: ShardingConfig, world_size: int):
    model = build_model(ModelConfig(dense_arch_layer_sizes=[8]), SCHEMA, torch.device("cpu"))
    apply_sparse_optimizer(model, OptimConfig(), torch.device("cpu"))
    # Planning for 2 ranks needs no second process: the planner only reads the topology.
    return plan_sharding(model, config, SCHEMA, torch.device("cpu"), 32, world_size, world_size, dist.group.WORLD)


def test_plan_report_describes_tables_and_ranks(tmp_path, single_process_group):
    config = ShardingConfig(
        tables={
            "big": TableConstraint(sharding_types=["row_wise"]),
            "small": TableConstraint(sharding_types=["table_wise"]),
        }
    )
    plan, chosen = plan_for(config, 2)
    report = plan_report(plan, SCHEMA, 2, chosen)
    big, small = report["tables"]["t_big"], report["tables"]["t_small"]
    assert big["sharding_type"] == "row_wise" and big["ranks"] == [0, 1]
    assert sum(s["sizes"][0] for s in big["shards"]) == 5000
    assert small["sharding_type"] == "table_wise" and len(small["ranks"]) == 1
    total = sum(r["embedding_bytes"] for r in report["ranks"].values())
    assert total == (5000 + 100) * 8 * 4
    for info in report["ranks"].values():  # the planner's own accounting, per rank
        assert info["ddr_bytes"] >= info["embedding_bytes"] and info["hbm_bytes"] == 0  # CPU: host memory
        assert info["cost"] > 0 and info["cost"] >= info["compute_cost"]
    assert report["cost_imbalance"] >= 1.0 and report["planned_memory_imbalance"] >= 1.0
    assert report["estimated_step_ms"] == max(info["cost"] for info in report["ranks"].values())

    text = write_plan_report(report, tmp_path)
    assert json.loads((tmp_path / "plan.json").read_text()) == json.loads(json.dumps(report))
    assert (tmp_path / "plan.txt").read_text() == text
    assert "t_big" in text and "row_wise" in text and "imbalance" in text and "cost" in text
    assert f"estimated step time: {report['estimated_step_ms']:.4g} ms" in text


def test_an_impossible_plan_is_a_clear_error(single_process_group):
    config = ShardingConfig(ddr_cap_gb=1e-6, sharding_types=["table_wise"])
    with pytest.raises(ConfigError, match="found no plan for 2 rank\\(s\\) on cpu"):
        plan_for(config, 2)


SKEWED = FeatureSchema.from_config(
    FeaturesConfig(
        dense=["d"],
        embedding_dim=16,
        sparse=[SparseFeature("big", 4_000_000)] + [SparseFeature(f"small{i}", 1000 + 500 * i) for i in range(25)],
    )
)


@pytest.mark.parametrize("world_size", [2, 4])
def test_memory_balance_on_a_skewed_model(world_size):
    model = build_model(ModelConfig(dense_arch_layer_sizes=[16]), SKEWED, torch.device("cpu"))
    apply_sparse_optimizer(model, OptimConfig(), torch.device("cpu"))
    plan, chosen = plan_offline(model, ShardingConfig(balance="memory"), SKEWED, "cpu", 512, world_size, world_size)
    report = plan_report(plan, SKEWED, world_size, chosen)
    assert report["tables"]["t_big"]["sharding_type"] == "row_wise"
    planned = [info["hbm_bytes"] + info["ddr_bytes"] for info in report["ranks"].values()]
    mean = sum(planned) / world_size
    assert all(abs(p - mean) <= 0.10 * mean for p in planned), planned
    assert report["imbalance"] <= 1.10


def test_bandwidths_and_search_strategy_reach_the_planner():
    from torchrec.distributed.planner.types import HardwareConfig

    from app.sharding.memory import _topology

    config = ShardingConfig(
        intra_host_bw_gbps=100,
        inter_host_bw_gbps=12.5,
        ddr_bw_gbps=40,
        proposer="uniform",
        partitioner="memory_balanced",
    )
    topology = _topology(config, torch.device("cpu"), 4, 2, HardwareConfig())
    assert topology.intra_host_bw == 100 * 2**30 / 1000 and topology.inter_host_bw == 12.5 * 2**30 / 1000
    assert topology.ddr_mem_bw == 40 * 2**30 / 1000 and topology.local_world_size == 2
    model = build_model(ModelConfig(dense_arch_layer_sizes=[16]), SKEWED, torch.device("cpu"))
    apply_sparse_optimizer(model, OptimConfig(), torch.device("cpu"))
    plan, _ = plan_offline(model, config, SKEWED, "cpu", 512, 4, 2)
    report = plan_report(plan, SKEWED, 4)
    assert len({t["sharding_type"] for t in report["tables"].values()}) == 1  # uniform: one type for all


# Three 16-wide tables on 8 ranks: whole tables keep 5 ranks idle, and torchrec's enumerator
# offers no narrower column slices (it splits at 128 columns).
NARROW = FeatureSchema.from_config(
    FeaturesConfig(
        dense=["d"],
        embedding_dim=16,
        sparse=[SparseFeature(f"f{i}", 1000 * (i + 1)) for i in range(3)],
    )
)


def _offline_report(config: ShardingConfig, world_size: int = 8) -> dict:
    model = build_model(ModelConfig(dense_arch_layer_sizes=[16]), NARROW, torch.device("cpu"))
    apply_sparse_optimizer(model, OptimConfig(), torch.device("cpu"))
    plan, chosen = plan_offline(model, config, NARROW, "cpu", 512, world_size, world_size)
    return plan_report(plan, NARROW, world_size, chosen)


def test_the_default_search_keeps_every_rank_busy_and_the_slowest_one_fastest():
    torchrec_only = _offline_report(ShardingConfig(proposer="default"))
    assert {t["sharding_type"] for t in torchrec_only["tables"].values()} == {"table_wise"}
    assert torchrec_only["cost_imbalance"] > 2.5  # 3 busy ranks of 8

    best = _offline_report(ShardingConfig())
    assert best["estimated_step_ms"] < 0.9 * torchrec_only["estimated_step_ms"]
    assert best["cost_imbalance"] <= 1.1
    assert all(info["tables"] for info in best["ranks"].values())
    for table in best["tables"].values():
        widths = [s["sizes"][1] for s in table["shards"]]
        assert table["sharding_type"] == "column_wise" and sum(widths) == 16 and all(w % 4 == 0 for w in widths)


def test_the_default_search_keeps_to_the_constraints():
    whole = _offline_report(ShardingConfig(sharding_types=["table_wise"]))
    assert {t["sharding_type"] for t in whole["tables"].values()} == {"table_wise"}
    assert (
        whole["estimated_step_ms"]
        == _offline_report(ShardingConfig(sharding_types=["table_wise"], proposer="default"))["estimated_step_ms"]
    )
    wide = _offline_report(ShardingConfig(tables={"*": TableConstraint(min_partition=8)}))
    widths = {s["sizes"][1] for t in wide["tables"].values() for s in t["shards"]}
    assert widths and min(widths) >= 8


def test_training_plans_for_the_hosts_memory_and_a_dry_run_for_torchrecs_default(single_process_group):
    from app.sharding.memory import _host_memory_bytes

    # One whole table twice the memory each of 64 workers on this host would have: the default
    # 128 GiB a rank holds it, this host's share does not.
    world_size = 64
    per_worker = _host_memory_bytes() // world_size
    rows = 2 * per_worker // (16 * 4)
    schema = FeatureSchema.from_config(
        FeaturesConfig(dense=["d"], embedding_dim=16, sparse=[SparseFeature("huge", rows)])
    )
    model = build_model(ModelConfig(dense_arch_layer_sizes=[16]), schema, torch.device("meta"))
    apply_sparse_optimizer(model, OptimConfig(), torch.device("cpu"))
    config = ShardingConfig(sharding_types=["table_wise"])
    plan, _ = plan_offline(model, config, schema, "cpu", 512, world_size, world_size)
    assert plan.plan  # planned for torchrec's default DDR per rank
    with pytest.raises(ConfigError, match=rf"DDR {per_worker / 2**30:.3g} GiB \(the host's memory / 64 worker"):
        plan_sharding(model, config, schema, torch.device("cpu"), 512, world_size, world_size, dist.group.WORLD)
    # sharding.ddr_cap_gb still wins over the measured memory
    config.ddr_cap_gb = 128
    plan, _ = plan_sharding(model, config, schema, torch.device("cpu"), 512, world_size, world_size, dist.group.WORLD)
    assert plan.plan


@pytest.mark.parametrize("tables", [{}, {"f*": TableConstraint(compute_kernels=["key_value"])}])
def test_key_value_tables_are_refused_naming_the_key(tables):
    config = ShardingConfig(compute_kernels=[] if tables else ["key_value"], tables=tables)
    key = "sharding.tables.f*.compute_kernels" if tables else "sharding.compute_kernels"
    with pytest.raises(ConfigError, match=rf"{key.replace('*', '[*]')}=key_value is not supported yet: .*clone"):
        config.validate()


def test_key_value_is_refused_where_users_set_it():
    with pytest.raises(ConfigError, match=r"sharding.compute_kernels=key_value is not supported yet"):
        compose_config(["sharding.compute_kernels=[fused,key_value]"])


def _codec_precisions(config: ShardingConfig) -> dict:
    registry = sharders(config, torch.device("cpu"), 512)[0].qcomm_codecs_registry
    return {op: (codecs.forward.quantized_dtype, codecs.backward.quantized_dtype) for op, codecs in registry.items()}


def test_bf16_communication_stays_bf16_on_cpu():
    # torchrec's own registry would send fp16 here (it assumes gloo cannot carry bf16).
    precisions = _codec_precisions(ShardingConfig(comm_forward_precision="bf16", comm_backward_precision="bf16"))
    assert set(precisions.values()) == {(torch.bfloat16, torch.bfloat16)}


def test_scaled_precisions_fall_back_for_reduce_scatter_only():
    precisions = _codec_precisions(ShardingConfig(comm_forward_precision="int8", comm_backward_precision="mx4"))
    assert precisions["POOLED_EMBEDDINGS_ALL_TO_ALL"] == (torch.uint8, torch.uint8)
    assert precisions["POOLED_EMBEDDINGS_REDUCE_SCATTER"] == (torch.float16, torch.bfloat16)


def test_fp32_communication_needs_no_codecs():
    assert sharders(ShardingConfig(), torch.device("cpu"), 512)[0].qcomm_codecs_registry is None


def test_fp8_communication_is_refused_on_cpu_naming_the_key():
    with pytest.raises(ConfigError, match=r"sharding.comm_backward_precision=fp8 needs CUDA"):
        sharders(ShardingConfig(comm_backward_precision="fp8"), torch.device("cpu"), 512)
    cuda_sharders = sharders(ShardingConfig(comm_backward_precision="fp8"), torch.device("cuda"), 512)
    registry = cuda_sharders[0].qcomm_codecs_registry
    assert registry["POOLED_EMBEDDINGS_ALL_TO_ALL"].backward.quantized_dtype == torch.uint8


@pytest.mark.parametrize("op", ["POOLED_EMBEDDINGS_ALL_TO_ALL", "POOLED_EMBEDDINGS_REDUCE_SCATTER"])
def test_small_gradients_survive_fp16_communication(op):
    # The gradient of a pooled embedding at 8192 rows a rank (the loss is their mean): ~5e-8, below
    # fp16's smallest normal 6.1e-5; unscaled, fp16 flushes or rounds them coarsely (27% L1 error).
    config = ShardingConfig(comm_forward_precision="fp16", comm_backward_precision="fp16")
    codec = sharders(config, torch.device("cpu"), 8192)[0].qcomm_codecs_registry[op].backward
    gradients = torch.full((4096,), 5e-8) * torch.linspace(0.5, 2.0, 4096)
    encoded = codec.encode(gradients)
    assert encoded.dtype == torch.float16
    decoded = codec.decode(encoded)
    assert decoded.dtype == torch.float32
    assert ((decoded - gradients).abs().sum() / gradients.abs().sum()).item() < 1e-3
    # Values as large as a batch's summed gradient still fit fp16 once scaled.
    assert torch.isfinite(codec.encode(torch.tensor([1.0]))).all()


def _replicated_table_gradient(rank: int, init_file: str, local: bool, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    from tests.unit.test_optim_sharded import batch, sharded

    overrides = ["sharding=data_parallel", f"trainer.dense_average_every={4 if local else 0}"]
    model, _, schema = sharded(*overrides, env=_env(rank))
    torch.manual_seed(rank)  # each rank its own batch
    loss, _ = model(batch(schema, seed=rank))
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    results[rank] = {name: g for name, g in gradients.items() if "t_cat_0" in name or "over_arch" in name}
    dist.destroy_process_group()


def _env(rank: int):
    from app.distributed import DistEnv

    return DistEnv(rank=rank, world_size=2, local_rank=rank, local_world_size=2, device=torch.device("cpu"))


@pytest.mark.parametrize("local", [False, True])
def test_k_step_averaging_keeps_replicated_tables_gradients_local_too(tmp_path, local):
    # With k-step averaging no gradient is all-reduced, the data_parallel tables' included (TorchRec
    # wraps them in DDPs of their own); without it, every rank has the mean gradient.
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_replicated_table_gradient, args=(str(tmp_path / "init"), local, results), nprocs=2, join=True)
    names = sorted(results[0])
    assert any("t_cat_0" in name for name in names) and any("over_arch" in name for name in names)
    for name in names:
        same = torch.equal(results[0][name], results[1][name])
        assert same != local, f"{name}: {'all-reduced' if same else 'local'}"
