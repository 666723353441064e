"""features.sparse[i].id_mapping: its validation, what the loader does with each mapping's ids, the
managed-collision tables beside the plain ones, and the export's per-shard mapping."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from app.checkpoint.checkpointer import model_differences
from app.config import Config, ConfigError, FeaturesConfig, ModelConfig, SparseFeature, TableConstraint
from app.data import DataError
from app.data.batch import table_to_batch
from app.features import FeatureSchema
from app.models import TABLES_PATH, build_model, embedding_tables
from app.models.managed_collision import ShardFaithfulRemap, mix63

CPU = torch.device("cpu")
MODEL = ModelConfig(arch="dlrm", dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1])


def config(*mappings: str, rows: int = 16) -> Config:
    c = Config()
    c.features = FeaturesConfig(
        dense=["d"],
        embedding_dim=8,
        sparse=[SparseFeature(f"s{i}", rows, id_mapping=m) for i, m in enumerate(mappings)],
    )
    c.model = MODEL
    return c


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda c: setattr(c.features.sparse[0], "id_mapping", "hashed"),
            "features.sparse[0].id_mapping='hashed' is not allowed; choose one of direct, modulo, managed_collision.",
        ),
        (
            lambda c: setattr(c.sharding, "sharding_types", ["table_wise"]),
            "features.sparse[0].id_mapping=managed_collision ('s0') shards only row_wise, but "
            "sharding.sharding_types=['table_wise'] excludes it",
        ),
        (
            lambda c: c.sharding.tables.update({"s*": TableConstraint(sharding_types=["column_wise"])}),
            "but sharding.tables.s0.sharding_types=['column_wise'] excludes it",
        ),
        (
            lambda c: setattr(c.features.managed_collision, "eviction_policy", "fifo"),
            "features.managed_collision.eviction_policy='fifo' is not allowed; choose one of lru, lfu.",
        ),
        (
            lambda c: setattr(c.features.managed_collision, "input_hash_size", 8),
            "features.managed_collision.input_hash_size=8 must lie in [16, 2**62]",
        ),
        (
            lambda c: setattr(c.features.sparse[0], "num_embeddings", 1),
            "features.sparse[0].num_embeddings must be >= 2 with id_mapping=managed_collision",
        ),
    ],
)
def test_impossible_settings_are_refused_naming_the_key(change, message):
    c = config("managed_collision", "direct")
    c.validate()
    change(c)
    with pytest.raises(ConfigError) as error:
        c.validate()
    assert message in str(error.value)


def test_row_wise_among_other_types_is_accepted():
    c = config("managed_collision")
    c.sharding.sharding_types = ["table_wise", "row_wise"]
    c.validate()


def test_the_loader_takes_each_mapping_s_ids():
    schema = FeatureSchema.from_config(config("direct", "modulo", "managed_collision", rows=10).features)
    raw = [2**40 + 3, -7, 12]
    table = pa.table({"label": [0, 1, 0], "d": [0.5, 1.0, 2.0], "s0": [1, 2, 3], "s1": raw, "s2": raw})
    ids = table_to_batch(table, schema).sparse_features.to_dict()
    assert ids["s0"].values().tolist() == [1, 2, 3]
    assert ids["s1"].values().tolist() == [(2**40 + 3) % 10, 3, 2]  # floored: -7 mod 10 is 3
    assert ids["s2"].values().tolist() == raw  # managed collision maps raw ids itself
    with pytest.raises(DataError, match=r"row 0: column 's0' has id 1099511627779; expected ids in \[0, 10\)"):
        table_to_batch(table.set_column(2, "s0", pa.array(raw)), schema)


def test_mix63_is_a_bijection_that_spreads_narrow_ids_over_the_hash_space():
    ids = torch.arange(0, 100_000, dtype=torch.int64)  # sequential ids: all in the first of two blocks unmixed
    mixed = mix63(ids, 2**63 - 1)
    assert mixed.unique().numel() == ids.numel()
    upper_half = float((mix63(ids, 2**40) >= 2**39).float().mean())
    assert 0.49 < upper_half < 0.51
    assert int(mix63(torch.tensor([-1]), 2**40)) == int(mix63(torch.tensor([2**63 - 1]), 2**40))  # low 63 bits


def test_without_managed_collision_the_tables_and_their_keys_are_unchanged():
    model = build_model(MODEL, FeatureSchema.from_config(config("direct", "modulo").features), CPU)
    assert type(embedding_tables(model)).__name__ == "EmbeddingBagCollection"
    assert f"{TABLES_PATH}.embedding_bags.t_s1.weight" in model.state_dict()


def test_managed_collision_tables_sit_beside_the_plain_ones_and_give_new_ids_rows():
    torch.manual_seed(0)
    schema = FeatureSchema.from_config(config("managed_collision", "direct").features)
    model = build_model(MODEL, schema, CPU, tables_device=CPU)
    tables = embedding_tables(model)
    assert [c.feature_names for c in tables.embedding_bag_configs()] == [["s0"], ["s1"]]  # feature order
    keys = set(model.state_dict())
    assert f"{TABLES_PATH}.ebc.embedding_bags.t_s1.weight" in keys
    assert f"{TABLES_PATH}.mc._embedding_module.embedding_bags.t_s0.weight" in keys
    raw = torch.tensor([2**40 - 1, 5, 2**40 - 1, 77])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["s0", "s1"], values=torch.cat([raw, torch.arange(4)]), lengths=torch.ones(8, dtype=torch.long)
    )
    pooled = tables(kjt)
    assert pooled.to_dict()["s0"].shape == (4, 8)
    module = tables.mc._managed_collision_collection._managed_collision_modules["t_s0"]
    assert int((module._mch_sorted_raw_ids != torch.iinfo(torch.int64).max).sum()) == 3  # three distinct ids


def test_the_export_maps_each_id_by_the_shard_that_gave_it_its_row():
    torch.manual_seed(0)
    schema = FeatureSchema.from_config(config("managed_collision", rows=8).features)
    model = build_model(MODEL, schema, CPU, tables_device=CPU, mc_buckets=2)
    module = embedding_tables(model).mc._managed_collision_collection._managed_collision_modules["t_s0"]
    hashed = {1000: None, 2000: None, 3000: None}
    for raw in hashed:
        hashed[raw] = int(mix63(torch.tensor([raw]), module.input_size()))
    # As two row-wise shards of 4 rows would have saved it: each id in the shard its hash block routes
    # it to (the lower or upper half of the hash space), each shard's last row free for misses.
    rows = {0: [], 1: []}
    for h in hashed.values():
        rows[int(h >= module.input_size() // 2)].append(h)
    with torch.no_grad():
        for shard, ids in rows.items():
            for k, h in enumerate(ids):
                module._mch_sorted_raw_ids[4 * shard + k] = h
        module._sort_mch_buffers()
    remap = ShardFaithfulRemap(module, [0, 4, 8], world=2)
    got = remap(torch.tensor([*hashed, 4000 + 2**41]))
    for raw, row in zip(hashed, got[:3].tolist()):
        shard = int(hashed[raw] >= module.input_size() // 2)
        assert 4 * shard <= row < 4 * shard + 3
    unseen_shard = int(mix63(torch.tensor([4000 + 2**41]), module.input_size()) >= module.input_size() // 2)
    assert int(got[3]) == 4 * unseen_shard + 3  # its shard's reserved row


def test_another_id_mapping_is_another_model():
    saved, current = config("modulo"), config("managed_collision")
    assert model_differences(saved, current) == [
        "features.sparse[s0].id_mapping: 'modulo' in the checkpoint, 'managed_collision' now"
    ]
    changed = dataclasses.replace(current.features.managed_collision, eviction_policy="lfu")
    other = config("managed_collision")
    other.features.managed_collision = changed
    assert model_differences(current, other) == [
        "features.managed_collision.eviction_policy: 'lru' in the checkpoint, 'lfu' now"
    ]
