"""Every config composes and validates; typos and impossible values fail naming the key."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest
from omegaconf import OmegaConf

import app.config
from app.config import GROUP_SCHEMAS, Config, ConfigError, TableConstraint, field_docs
from app.hydra_edge import compose_config, config_from_dict
from tests.conftest import CONFIGS, REPO

GROUPS = ["features", "model", "data", "sharding", "optim", "checkpoint", "trainer", "logging", "distributed"]
# Options that need paths only the user can give, or a dense arch ending in their embedding dim.
NEEDS_PATHS = ["data.train_path=/data/train", "data.val_path=/data/val"]
COMPANIONS = {
    ("data", "parquet"): NEEDS_PATHS,
    ("features", "criteo_kaggle"): ["model.dense_arch_layer_sizes=[512,256,128]"],
    ("features", "criteo_1tb"): ["model.dense_arch_layer_sizes=[512,256,128]"],
    ("features", "criteo_kaggle_capped"): ["model.dense_arch_layer_sizes=[512,256,64]"],
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
        ("features.sparse.2.embedding_dim=6", "features.sparse[2].embedding_dim"),
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
        ("data.num_workers=0", "data.num_workers"),
        ("data.synthetic.test_rows=-1", "data.synthetic.test_rows"),
        ("distributed.threads_per_worker=-1", "distributed.threads_per_worker"),
        ("trainer.early_stopping.metric=accuracy", "trainer.early_stopping.metric"),
        ("trainer.early_stopping.patience=-1", "trainer.early_stopping.patience"),
        ("trainer.early_stopping.min_delta=-0.1", "trainer.early_stopping.min_delta"),
        ("trainer.early_stopping.target=nan", "trainer.early_stopping.target"),
        ("trainer.max_nonfinite_steps=0", "trainer.max_nonfinite_steps"),
    ],
)
def test_impossible_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load([override])


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lr=inf", "optim.lr=inf"),  # lr > 0 lets inf through
        ("optim.lr=nan", "optim.lr=nan"),
        ("optim.sparse_lr=inf", "optim.sparse_lr=inf"),
        ("optim.clip_grad_norm=inf", "optim.clip_grad_norm=inf"),
        ("optim.betas=[0.9,-inf]", "optim.betas[1]=-inf"),
        ("data.dense_fill_value=nan", "data.dense_fill_value=nan"),
        ("sharding.inter_host_bw_gbps=inf", "sharding.inter_host_bw_gbps=inf"),
        # A float inside a list of groups.
        ("features.labels=[{name: label, weight: 1.0}, {name: conv, weight: inf}]", "features.labels[1].weight=inf"),
    ],
)
def test_every_float_key_refuses_non_finite_values_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key) + " is not a finite number"):
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
    # A ConfigError (a UserError: every script says it and exits 2), not Hydra's own exception.
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load([override])


def test_keys_added_anywhere_are_checked_when_the_config_is_made():
    # What the command line check cannot see (a sweep's or an experiment's additions) is caught here.
    with pytest.raises(ConfigError, match=r"'trainer\.epoch' is not a config key.*Did you mean 'trainer\.epochs'"):
        load(["+trainer.epoch=2"])
    with pytest.raises(ConfigError, match=r"'data\.synthetic\.train_rowz'.*Did you mean 'data\.synthetic\.train_rows'"):
        load(["+data.synthetic.train_rowz=5"])
    with pytest.raises(ConfigError, match=r"'lr' is not a config key.*Did you mean 'optim\.lr'"):
        load(["+lr=0.1"])


def test_a_config_round_trips_through_its_dict_form():
    import dataclasses

    config = load(["experiment=planted", "optim.lr=0.3", "sharding=mixed"])
    data = dataclasses.asdict(config)
    assert config_from_dict(data) == config
    data["optim"]["lrr"] = 1.0
    with pytest.raises(Exception, match="lrr"):
        config_from_dict(data)


def _differences(left, right, prefix: str = "") -> dict:
    """{dotted key: (left, right)} wherever two dataclasses.asdict() forms differ."""
    if isinstance(left, dict) and isinstance(right, dict):
        found = {}
        for key in [*left, *(k for k in right if k not in left)]:
            found.update(_differences(left.get(key), right.get(key), f"{prefix}{key}."))
        return found
    return {} if left == right else {prefix.rstrip("."): (left, right)}


def test_group_schemas_are_configs_dataclass_fields():
    assert list(GROUP_SCHEMAS) == GROUPS
    assert all(GROUP_SCHEMAS[g] is type(getattr(Config(), g)) for g in GROUPS)
    not_groups = {"hydra", "experiment", "sweep", "launcher"}
    assert {p.name for p in CONFIGS.iterdir() if p.is_dir()} - not_groups == set(GROUPS)


def test_the_default_config_is_the_dataclass_defaults():
    # The dataclasses are the one source of defaults: `python -m app.train` with no overrides runs
    # Config() but for the dataset the default features option (criteo_demo) describes: its columns
    # and tables, and its pooling (mean: the generator averages a multi-hot row's ids).
    composed, defaults = dataclasses.asdict(load()), dataclasses.asdict(Config())
    for group in GROUPS:
        if group == "features":
            continue
        differences = _differences(composed[group], defaults[group], f"{group}.")
        assert not differences, f"configs/ and app/config/ disagree (composed, dataclass): {differences}"
    for key in ("run_name", "seed", "output_root"):
        assert composed[key] == defaults[key], key
    differences = _differences(composed["features"], defaults["features"], "features.")
    assert set(differences) == {"features.dense", "features.sparse", "features.pooling"}, differences
    assert Config().features.dense == [] and Config().features.sparse == []


@pytest.mark.parametrize("group", GROUPS)
def test_group_options_hold_only_what_they_change(group):
    # An option sets no key to its dataclass default, but for the values that name it (model.arch=dlrm).
    naming = {"model.arch", "data.source", "optim.dense", "optim.sparse"}
    defaults = _leaves(dataclasses.asdict(GROUP_SCHEMAS[group]()), f"{group}.")
    for path in sorted((CONFIGS / group).glob("*.yaml")):
        values = OmegaConf.to_container(OmegaConf.load(path))
        repeated = {k for k, v in _leaves(values, f"{group}.").items() if k in defaults and defaults[k] == v} - naming
        assert not repeated, f"{path.relative_to(REPO)} repeats defaults of app/config/: {sorted(repeated)}"
        if path.stem == "default":
            assert values == {}, f"{path.relative_to(REPO)}: the defaults are app/config/'s"


def _leaves(values: dict, prefix: str) -> dict:
    """{dotted key: value} of a nested dict (a list is one value)."""
    found = {}
    for name, value in values.items():
        found.update(_leaves(value, f"{prefix}{name}.") if isinstance(value, dict) else {f"{prefix}{name}": value})
    return found


def test_every_field_has_help_text():
    schemas = [
        c
        for _, c in inspect.getmembers(app.config, inspect.isclass)
        if dataclasses.is_dataclass(c) and c.__module__.startswith("app.config")
    ]
    assert len(schemas) >= 13  # the groups, Config, SparseFeature, SyntheticConfig, TableConstraint
    missing = [f"{c.__name__}.{f.name}" for c in schemas for f in dataclasses.fields(c) if not f.metadata.get("help")]
    assert not missing, f"fields without help text: {missing}"
    documented = {d.key for d in field_docs()}
    assert {
        "checkpoint.every_n_steps",
        "data.synthetic.seed",
        "features.sparse.<i>.hotness",
        "sharding.tables.<feature>.min_partition",
    } <= documented
