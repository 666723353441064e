"""Mixed precision and the optimizer step on a real sharded model (one rank): the dense part in
bf16/fp16 with tables, loss and logits in fp32; fp16's loss scale never reaches the tables'
fused updates; a non-finite fp16 step changes nothing; dense gradient clipping."""

from __future__ import annotations

import pytest
import torch

from app.features import FeatureSchema
from app.hydra_edge import compose_config
from app.job import build_sharded_model
from app.optim import OptimizerStep, build_optimizer, dense_parameters
from app.precision import TableGradients, autocast_dtype, loss_scaler
from tests.unit.test_optim_sharded import ENV, batch, local

TABLE = "model.sparse_arch.embedding_bag_collection.embedding_bags.t_cat_0.weight"


def _build(*overrides: str):
    config = compose_config(["experiment=tiny", "sharding=table_wise", "optim=sgd", "optim.warmup_steps=0", *overrides])
    schema = FeatureSchema.from_config(config.features)
    scaler = loss_scaler(config.trainer.precision, ENV.device)
    table_gradients = TableGradients(scaler)
    torch.manual_seed(0)
    model = build_sharded_model(config, schema, ENV, run_dir=None, table_gradients=table_gradients)
    optimizer = build_optimizer(model, config.optim)
    return model, OptimizerStep(optimizer, config.optim.clip_grad_norm, scaler, table_gradients), schema


def _one_step(model, step: OptimizerStep, schema, data=None):
    before = {name: local(value).clone() for name, value in model.state_dict().items()}
    step.optimizer.zero_grad()
    loss, (_, logits, _) = model(data or batch(schema, size=64))
    step.backward(loss)
    step.step()
    after = {name: local(value) for name, value in model.state_dict().items()}
    return {name: after[name] - before[name] for name in before}, loss, logits


def test_bf16_computes_the_dense_part_in_bf16_and_returns_fp32(single_process_group):
    model, step, schema = _build("trainer.precision=bf16")
    seen = {}
    over_arch = model.module.model.over_arch
    over_arch.register_forward_hook(lambda module, args, out: seen.update(over_arch=out.dtype))
    _, loss, logits = _one_step(model, step, schema)
    assert seen["over_arch"] == torch.bfloat16
    assert loss.dtype == logits.dtype == torch.float32


@pytest.mark.parametrize("sharding", ["table_wise", "data_parallel"])
def test_fp16_loss_scale_does_not_reach_the_tables(sharding, single_process_group):
    """Sharded tables (stepped by FBGEMM inside the backward) and replicated ones (stepped after
    it by their torch optimizer, whose gradients GradScaler used to unscale a second time: they
    did not move at all) take the update they take in fp32."""
    deltas = {}
    for precision in ("fp32", "fp16"):
        model, step, schema = _build(f"trainer.precision={precision}", f"sharding={sharding}")
        deltas[precision], _, _ = _one_step(model, step, schema)
    assert step.scaler.get_scale() > 1000  # the loss really was scaled
    table_ratio = deltas["fp16"][TABLE].norm() / deltas["fp32"][TABLE].norm()
    assert deltas["fp32"][TABLE].norm() > 0 and abs(table_ratio - 1) < 0.05, table_ratio


def test_a_non_finite_fp16_step_changes_nothing_and_lowers_the_scale(single_process_group):
    model, step, schema = _build("trainer.precision=fp16")
    scale = step.scaler.get_scale()
    data = batch(schema, size=64)
    data.dense_features[0, 0] = float("inf")
    deltas, _, _ = _one_step(model, step, schema, data)
    assert all(not delta.any() for delta in deltas.values())
    assert step.scaler.get_scale() < scale


def test_a_step_whose_dense_gradients_alone_overflow_leaves_the_tables_alone(single_process_group):
    """The tables' fused update runs inside the backward: it must wait for the verdict on the
    dense gradients too, which GradScaler alone gives only after the backward."""
    model, step, schema = _build("trainer.precision=fp16")
    over_arch = model.module.model.over_arch
    last = list(over_arch.parameters())[-1]
    last.register_hook(lambda grad: grad * float("inf"))
    deltas, loss, _ = _one_step(model, step, schema)
    assert torch.isfinite(loss)
    assert [name for name, delta in deltas.items() if delta.any()] == []
    assert step.skipped_steps == 1


def test_clip_grad_norm_bounds_the_dense_update(single_process_group):
    updates = {}
    for clip in ("null", "0.001"):
        model, step, schema = _build("optim.lr=1.0", f"optim.clip_grad_norm={clip}")
        deltas, _, _ = _one_step(model, step, schema)
        dense = {name for name in deltas if "embedding_bags" not in name}
        updates[clip] = torch.cat([deltas[name].flatten() for name in dense]).norm().item()
    assert updates["0.001"] == pytest.approx(0.001, rel=1e-3)  # lr 1: the update is the clipped gradient
    assert updates["null"] > 0.01
    assert step.last_grad_norm > 0.001
    assert len(dense_parameters(step.optimizer)) == len(dense)


def test_precisions_the_device_cannot_do_are_refused_or_warned(caplog):
    assert autocast_dtype("fp32", torch.device("cpu")) is None
    with caplog.at_level("WARNING"):
        assert autocast_dtype("fp16", torch.device("cpu")) is torch.float16
    assert "slower than fp32" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    # Slow only where the CPU lacks bf16 instructions, which is said; the numbers are the same.
    assert ("without bf16 instructions" in caplog.text) == (not torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_sparse_clip_value_bounds_every_table_update(single_process_group):
    """FBGEMM clips each sample's pooled gradient before summing a row's: on a table of 40,000 rows, 64 rows
    of a batch hit no row twice, so the largest update is the clip value itself."""
    largest = {}
    for clip in ("null", "0.00001"):
        model, step, schema = _build("optim.lr=1.0", f"optim.sparse_clip_value={clip}")
        deltas, _, _ = _one_step(model, step, schema)
        largest[clip] = deltas[TABLE.replace("t_cat_0", "t_cat_9")].abs().max().item()
    assert largest["0.00001"] == pytest.approx(0.00001, rel=1e-3)  # lr 1 x the clipped gradient element
    assert largest["null"] > 0.00002
