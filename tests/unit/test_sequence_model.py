"""The DIN attention unit and models with sequence features (app/models/sequence.py): masking by
length, empty histories, every architecture, and models without them unchanged."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
import torch

from app.config import FeaturesConfig, ModelConfig, SequenceFeature, SparseFeature
from app.data.batch import table_to_batch
from app.features import FeatureSchema
from app.models import build_model, sequence_tables
from app.models.sequence import TargetAttention

CPU = torch.device("cpu")
SCHEMA = FeatureSchema.from_config(
    FeaturesConfig(
        dense=["d0", "d1"],
        sparse=[SparseFeature("item", 10), SparseFeature("user", 5)],
        embedding_dim=8,
        sequence=[SequenceFeature("history", 12, max_length=4, target="item")],
    )
)
MODEL = ModelConfig(
    dense_arch_layer_sizes=[8],
    over_arch_layer_sizes=[16, 1],
    sequence_attention_layer_sizes=[6],
    dcn_low_rank_dim=4,
    deep_fm_dimension=8,
)


def test_positions_past_a_rows_length_do_not_count_and_an_empty_history_gives_zeros():
    torch.manual_seed(0)
    attention = TargetAttention(4, [5], CPU)
    query, keys = torch.randn(3, 4), torch.randn(3, 6, 4)
    lengths = torch.tensor([6, 2, 0])
    out = attention(query, keys, lengths)
    changed = keys.clone()
    changed[1, 2:] = torch.randn(4, 4)  # past row 1's length
    changed[2] = torch.randn(6, 4)  # all of row 2's empty history
    again = attention(query, changed, lengths)
    torch.testing.assert_close(again, out)
    assert torch.equal(out[2], torch.zeros(4))
    assert not torch.equal(attention(query, keys, torch.tensor([6, 3, 0]))[1], out[1])  # one more position counts


def batch():
    return table_to_batch(
        pa.table(
            {
                "label": pa.array([0, 1, 1]),
                "d0": pa.array(np.ones(3)),
                "d1": pa.array(np.zeros(3)),
                "item": pa.array([1, 2, 3], type=pa.int64()),
                "user": pa.array([0, 4, 2], type=pa.int64()),
                "history": pa.array([[1, 5, 7, 2, 9], [], [3]], type=pa.list_(pa.int64())),
            }
        ),
        SCHEMA,
    )


@pytest.mark.parametrize("arch", ["dlrm", "dcn", "deepfm"])
def test_every_architecture_takes_the_attention_pooled_history_into_its_over_arch(arch):
    config = dataclasses.replace(MODEL, arch=arch)
    torch.manual_seed(0)
    plain = build_model(config, dataclasses.replace(SCHEMA, sequence=()), CPU, tables_device=CPU)
    torch.manual_seed(0)
    model = build_model(config, SCHEMA, CPU, tables_device=CPU)
    widths = [m.model.over_arch.model[0]._mlp[0]._linear.in_features for m in (plain, model)]
    assert widths[1] == widths[0] + 8  # the history's 8-wide attention-pooled vector
    loss, (_, logits, _) = model(batch())
    assert logits.shape == (3,)
    loss.backward()
    table = sequence_tables(model).embeddings["t_history"].weight
    touched = sorted(set(torch.nonzero(table.grad.abs().sum(1)).flatten().tolist()))
    assert touched == [1, 2, 3, 5, 7, 9]  # history ids kept (the last 4 of row 0) and the candidates 1, 2, 3
    assert all(p.grad is not None for p in model.model.sequence_arch.attention.parameters())


def test_a_model_without_sequence_features_keeps_its_state_dict():
    torch.manual_seed(0)
    plain = build_model(MODEL, dataclasses.replace(SCHEMA, sequence=()), CPU, tables_device=CPU)
    torch.manual_seed(0)
    model = build_model(MODEL, SCHEMA, CPU, tables_device=CPU)
    assert type(plain).__name__ == "DLRMTrain" and sequence_tables(plain) is None
    assert not any("sequence" in k for k in plain.state_dict())
    added = set(model.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) <= set(model.state_dict())
    assert added and all(k.startswith("model.sequence_arch.") for k in added)
    assert "model.sequence_arch.embedding_collection.embeddings.t_history.weight" in added
