"""LR schedule shape, and which optimizer each parameter gets."""

from __future__ import annotations

import itertools

import pytest

from app.config import OptimConfig
from app.optim import lr_multiplier


def test_warmup_then_hold():
    m = lr_multiplier(OptimConfig(warmup_steps=4), total_steps=100)
    assert [m(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_decay_reaches_the_floor_at_the_end(decay):
    config = OptimConfig(decay=decay, decay_start_step=10, min_lr_ratio=0.1)
    m = lr_multiplier(config, total_steps=110)
    assert m(5) == 1.0 and m(10) == 1.0
    assert m(60) == pytest.approx(0.55)  # halfway, for both shapes
    assert m(110) == pytest.approx(0.1) and m(500) == pytest.approx(0.1)
    values = [m(s) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_explicit_decay_steps():
    m = lr_multiplier(OptimConfig(decay="linear", decay_steps=10), total_steps=1000)
    assert m(5) == pytest.approx(0.5) and m(10) == 0.0


def test_sparse_adam_is_refused_on_cpu_naming_the_key():
    import torch

    from app.config import ConfigError, FeaturesConfig, ModelConfig, SparseFeature
    from app.features import FeatureSchema
    from app.models import build_model
    from app.optim import apply_sparse_optimizer

    schema = FeatureSchema.from_config(FeaturesConfig(dense=["d"], sparse=[SparseFeature("a", 10)], embedding_dim=8))
    model = build_model(ModelConfig(dense_arch_layer_sizes=[8]), schema, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"optim\.sparse=adam needs CUDA"):
        apply_sparse_optimizer(model, OptimConfig(sparse="adam"), torch.device("cpu"))


def test_decay_after_warmup_starts_where_warmup_ends():
    # decay_start_step=0 with warmup: measured from step 0, the LR would drop where warmup ends.
    m = lr_multiplier(OptimConfig(warmup_steps=10, decay="linear"), total_steps=110)
    assert m(9) == 1.0 and m(10) == 1.0
    assert m(60) == pytest.approx(0.5) and m(110) == 0.0
    values = [m(s) for s in range(9, 111)]
    assert max(a - b for a, b in itertools.pairwise(values)) == pytest.approx(0.01)


def test_a_schedule_put_at_a_step_gives_every_group_that_steps_lr():
    import torch

    from app.optim import set_schedule_step

    config = OptimConfig(warmup_steps=10, decay="cosine")

    def fresh():
        groups = [{"params": [torch.nn.Parameter(torch.ones(1))], "lr": lr} for lr in (0.1, 0.03)]
        optimizer = torch.optim.SGD(groups)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(config, total_steps=40))

    stepped, stepped_schedule = fresh()
    for _ in range(7):
        stepped.step()
        stepped_schedule.step()
    resumed, resumed_schedule = fresh()
    set_schedule_step(resumed_schedule, 7)
    assert [g["lr"] for g in resumed.param_groups] == [g["lr"] for g in stepped.param_groups]
    assert resumed_schedule.get_last_lr() == stepped_schedule.get_last_lr()
    resumed_schedule.step()
    stepped_schedule.step()
    assert [g["lr"] for g in resumed.param_groups] == [g["lr"] for g in stepped.param_groups]
