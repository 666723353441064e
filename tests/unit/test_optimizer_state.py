"""A table's optimizer state, saved in one form (fused: sharded; replicated: a torch optimizer's),
loaded in the other through real DCP files."""

from __future__ import annotations

import logging

import torch
import torch.distributed.checkpoint as dcp

from app.checkpoint import load_state, read_dcp_metadata
from app.checkpoint.optimizer_state import plan_optimizer_load

TABLE = "model.sparse_arch.embedding_bag_collection.embedding_bags.t_a.weight"
FUSED = {"state": {f"sparse.{TABLE}": {"t_a.momentum1": None}}, "param_groups": []}
REPLICATED = {"state": {f"replicated_tables.{TABLE}": {"sum": None, "step": None}}, "param_groups": []}


def optimizer_state(form, **values):
    state = {"state": {key: dict(states) for key, states in form["state"].items()}, "param_groups": []}
    for states in state["state"].values():
        for name in states:
            states[name] = values[name.split(".")[-1]].clone()
    return state


def saved(tmp_path, state):
    dcp.save({"optimizer": state}, checkpoint_id=str(tmp_path))
    return read_dcp_metadata(tmp_path)


def reload(tmp_path, fresh, step=0):
    load = plan_optimizer_load(fresh, read_dcp_metadata(tmp_path))
    load_state(tmp_path, load.targets)
    return load.finish(step)


def test_replicated_row_wise_adagrad_state_loads_into_the_fused_form(tmp_path, single_process_group):
    sums = torch.arange(10.0).reshape(10, 1)
    saved(tmp_path, optimizer_state(REPLICATED, sum=sums, step=torch.tensor(7.0)))
    state = reload(tmp_path, optimizer_state(FUSED, momentum1=torch.zeros(10)))
    assert torch.equal(state["state"][f"sparse.{TABLE}"]["t_a.momentum1"], torch.arange(10.0))


def test_fused_state_loads_into_the_replicated_form_and_its_step_is_the_runs(tmp_path, single_process_group):
    saved(tmp_path, optimizer_state(FUSED, momentum1=torch.arange(10.0)))
    state = reload(tmp_path, optimizer_state(REPLICATED, sum=torch.zeros(10, 1), step=torch.tensor(1.0)), step=42)
    states = state["state"][f"replicated_tables.{TABLE}"]
    assert torch.equal(states["sum"], torch.arange(10.0).reshape(10, 1)) and states["step"].item() == 42


def test_a_state_of_another_size_starts_fresh_with_a_warning_naming_the_table(tmp_path, single_process_group, caplog):
    # Element-wise Adagrad's [rows, dim] sums cannot become row-wise Adagrad's [rows].
    saved(tmp_path, optimizer_state(REPLICATED, sum=torch.ones(10, 4), step=torch.tensor(7.0)))
    with caplog.at_level(logging.WARNING):
        state = reload(tmp_path, optimizer_state(FUSED, momentum1=torch.zeros(10)))
    assert torch.equal(state["state"][f"sparse.{TABLE}"]["t_a.momentum1"], torch.zeros(10))
    assert "no optimizer state of this optimizer for table(s) t_a" in caplog.text
