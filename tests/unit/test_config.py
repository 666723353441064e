"""Every config composes and validates; typos and impossible values fail naming the key."""

from __future__ import annotations

import sys

import pytest
from hydra.errors import ConfigCompositionException

from app.config import Config, ConfigError, TableConstraint
from app.hydra_edge import compose_config, config_from_dict
from tests.conftest import CONFIGS, REPO, run_command


GROUPS = ["features", "model", "data", "sharding", "optim", "checkpoint", "trainer", "logging", "distributed"]
# Options that need paths only the user can give, or a dense arch ending in their embedding dim.
NEEDS_PATHS = ["data.train_path=/data/train", "data.val_path=/data/val"]
COMPANIONS = {
    ("data", "parquet"): NEEDS_PATHS,
    ("features", "criteo_kaggle"): ["model.dense_arch_layer_sizes=[512,256,128]"],
    ("features", "criteo_1tb"): ["model.dense_arch_layer_sizes=[512,256,128]"],
}


def load(overrides=()) -> Config:
    return compose_config(list(overrides))


def options(group: str):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_validates(group, option):
    config = load([f"{group}={option}", *COMPANIONS.get((group, option), [])])
    assert isinstance(config, Config)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_and_validates(experiment):
    config = load([f"experiment={experiment}", *NEEDS_PATHS])
    assert config.run_name == experiment


def test_default_is_criteo_shaped():
    config = load()
    assert len(config.features.dense) == 13 and len(config.features.sparse) == 26
    assert config.data.source == "synthetic"


@pytest.mark.parametrize(
    "override,key",
    [
        ("optim.lr=-1", "optim.lr"),
        ("features.embedding_dim=10", "features.embedding_dim"),
        ("sharding.sharding_types=[diagonal]", "sharding.sharding_types"),
        ("optim.sparse=lion", "optim.sparse"),
        ("model.over_arch_layer_sizes=[8,2]", "model.over_arch_layer_sizes"),
        ("model.dense_arch_layer_sizes=[32,8]", "model.dense_arch_layer_sizes"),
        ("checkpoint.keep_last=0", "checkpoint.keep_last"),
        ("data.invalid_ids=clip", "data.invalid_ids"),
        ("sharding.comm_forward_precision=fp4", "sharding.comm_forward_precision"),
        ("sharding.balance=rows", "sharding.balance"),
        ("sharding.proposer=random", "sharding.proposer"),
        ("sharding.inter_host_bw_gbps=0", "sharding.inter_host_bw_gbps"),
        ("data.invalid_dense=drop", "data.invalid_dense"),
        ("data.shuffle_window=0", "data.shuffle_window"),
        ("data.synthetic.test_rows=-1", "data.synthetic.test_rows"),
        ("distributed.threads_per_worker=-1", "distributed.threads_per_worker"),
    ],
)
def test_impossible_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load([override])


def test_per_table_constraints_must_name_a_sparse_feature():
    config = load(["sharding=mixed"])
    assert config.sharding.tables["cat_9"].sharding_types == ["row_wise"]
    config.sharding.tables["no_such_feature"] = TableConstraint(sharding_types=["row_wise"])
    with pytest.raises(ConfigError, match=r"sharding\.tables names unknown features \['no_such_feature'\]"):
        config.validate()
    del config.sharding.tables["no_such_feature"]
    config.sharding.tables["cat_1*"] = TableConstraint(sharding_types=["table_wise"])
    config.validate()  # a pattern is fine when it matches a feature
    config.sharding.tables["dense_*"] = TableConstraint(sharding_types=["table_wise"])
    with pytest.raises(ConfigError, match=r"unknown features \['dense_\*'\]"):
        config.validate()


@pytest.mark.parametrize("override", ["optim.lrr=0.1", "data.batch_size=many", "trainer.epoch=2"])
def test_unknown_keys_and_wrong_types_fail_at_composition(override):
    with pytest.raises(ConfigCompositionException, match=override.split("=")[0].replace(".", r"\.")):
        load([override])


@pytest.mark.parametrize("prefix", ["", "+", "++"])
def test_entrypoint_rejects_an_unknown_key_whatever_its_prefix(tmp_path, prefix):
    # `+optim.lrr=0.1` is what Hydra itself suggests for an unknown key; it used to train at the default lr.
    result = run_command([sys.executable, "-m", "app.train", f"{prefix}optim.lrr=0.1", f"output_root={tmp_path}"],
                         cwd=REPO)
    assert result.returncode == 2, result.stderr
    assert "error: 'optim.lrr' is not a config key: 'optim' has no field 'lrr'. Did you mean 'optim.lr'?" \
        in result.stderr
    assert not list(tmp_path.iterdir()), "a rejected config must not create a run directory"


def test_keys_added_anywhere_are_checked_when_the_config_is_made():
    # What the command line check cannot see (a sweep's or an experiment's additions) is caught here.
    with pytest.raises(ConfigError, match=r"'trainer\.epoch' is not a config key.*Did you mean 'trainer\.epochs'"):
        load(["+trainer.epoch=2"])
    with pytest.raises(ConfigError, match=r"'data\.synthetic\.train_rowz'.*Did you mean 'data\.synthetic\.train_rows'"):
        load(["+data.synthetic.train_rowz=5"])
    with pytest.raises(ConfigError, match=r"'lr' is not a config key.*Did you mean 'optim\.lr'"):
        load(["+lr=0.1"])


def test_every_config_error_exits_2_and_group_schemas_are_not_options(tmp_path):
    for override in ("model=nope", "model=schema", "data.batch_size=many", "optim.lr=-1"):
        result = run_command([sys.executable, "-m", "app.train", override, f"output_root={tmp_path}"], cwd=REPO)
        assert result.returncode == 2, (override, result.stderr)
    help_text = run_command([sys.executable, "-m", "app.train", "--help"], cwd=REPO).stdout
    assert "dcn, dlrm" in help_text and "schema" not in help_text


def test_a_config_round_trips_through_its_dict_form():
    import dataclasses

    config = load(["experiment=planted", "optim.lr=0.3", "sharding=mixed"])
    data = dataclasses.asdict(config)
    assert config_from_dict(data) == config
    data["optim"]["lrr"] = 1.0
    with pytest.raises(Exception, match="lrr"):
        config_from_dict(data)


def test_a_config_error_is_said_by_rank_0_only(tmp_path):
    # Every worker composes the same config and meets the same error: one line on the console
    # (torchrun's workers share it), not one per rank run together.
    import os
    import subprocess

    command = [sys.executable, "-m", "app.train", "optim.lr=-1", f"output_root={tmp_path}"]
    for rank, expected in (("0", "error: optim.lr must be > 0, got -1.0.\n"), ("1", "")):
        env = dict(os.environ, PYTHONPATH=str(REPO), RANK=rank, WORLD_SIZE="2")
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stderr == expected, (rank, result.stderr)
