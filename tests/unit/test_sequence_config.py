"""features.sequence and what depends on it: impossible values fail naming the key."""

from __future__ import annotations

import re

import pytest

from app.config import ConfigError, ShardingConfig
from app.features import FeatureSchema
from app.hydra_edge import compose_config
from app.sharding import sequence_constraints


def load(*overrides: str):
    return compose_config(["experiment=sequence", *overrides])


def test_the_sequence_experiment_composes():
    config = load()
    (history,) = config.features.sequence
    assert (history.name, history.target, history.max_length, history.num_embeddings) == ("history", "item", 10, 100)


@pytest.mark.parametrize(
    "override,message",
    [
        ("features.sequence.0.target=nope", "features.sequence[0].target='nope' is not a sparse feature"),
        ("features.sequence.0.target=''", "features.sequence[0].target='' is not a sparse feature"),
        ("features.sequence.0.max_length=0", "features.sequence[0].max_length must be >= 1"),
        ("features.sequence.0.num_embeddings=50", "features.sequence[0].num_embeddings=50 is smaller than its target"),
        ("features.sequence.0.num_embeddings=0", "features.sequence[0].num_embeddings must be > 0"),
        ("features.sequence.0.name=user", "features.sequence[0].name='user' is already a column"),
        ("features.sequence.0.name=''", "features.sequence[0].name must be a non-empty column name"),
        ("features.sequence.0.embedding_dim=6", "features.sequence[0].embedding_dim=6 is not valid"),
        (
            "features.sequence=[{name: history, num_embeddings: 100, target: item}, "
            "{name: h2, num_embeddings: 100, target: item, embedding_dim: 8}]",
            "every sequence table must have the same width",
        ),
        ("model.sequence_attention_layer_sizes=[]", "model.sequence_attention_layer_sizes must be a non-empty list"),
        ("data.synthetic.id_bits=20", "data.synthetic.id_bits=20 with features.sequence"),
    ],
)
def test_impossible_values_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(override)


@pytest.mark.parametrize("types", [["data_parallel"], ["table_row_wise"], ["table_column_wise"]])
def test_sharding_types_an_embedding_collection_does_not_take_are_refused(types):
    schema = FeatureSchema.from_config(load().features)
    with pytest.raises(ConfigError, match=r"leaves the sequence feature 'history' \(features.sequence\) no type"):
        sequence_constraints(ShardingConfig(sharding_types=types), schema)
    allowed = sequence_constraints(ShardingConfig(sharding_types=[*types, "row_wise"]), schema)
    assert allowed["t_history"].sharding_types == ["row_wise"]
    assert sequence_constraints(ShardingConfig(), schema)["t_history"].sharding_types == [
        "table_wise",
        "column_wise",
        "row_wise",
    ]


def test_a_checkpoint_of_other_histories_is_another_model():
    from app.checkpoint import model_differences

    saved = load()
    assert model_differences(saved, load("features.sequence.0.max_length=20")) == []  # no shape changes
    assert model_differences(saved, load("features.sequence=[]")) == [
        "features.sequence: 'history' is in the checkpoint, not in the config"
    ]
    assert model_differences(saved, load("features.sequence.0.num_embeddings=120")) == [
        "features.sequence[history].num_embeddings: 100 in the checkpoint, 120 now"
    ]
    assert model_differences(saved, load("model.sequence_attention_layer_sizes=[8]")) == [
        "model.sequence_attention_layer_sizes: [32] in the checkpoint, [8] now"
    ]
