"""Managed-collision tables: raw ids without a vocabulary (features.sparse[i].id_mapping=managed_collision).

TorchRec's MCHManagedCollisionModule gives every new raw id a row of its own while its table has
room (zero-collision hashing), and once it is full reassigns the rows of the ids its eviction
policy ranks last (lru, lfu) to the ids seen in the step that are not in the table; an id without
a row is mapped to the table's last row (each row-wise shard reserves its own). The features that
use it go into a ManagedCollisionEmbeddingBagCollection beside the plain EmbeddingBagCollection of
the others, both under `TablesWithManagedCollision` at the tables' usual path (app/models
TABLES_PATH): `.ebc` and `.mc`. A model without such features keeps its plain collection there
and its state dict as it was.

What rectrain adds around TorchRec's modules, each for a reason measured when it was written:
- `mix63`, the modules' input hash: the row-wise shards own consecutive blocks of the hash space,
  so raw ids of a narrow range (Criteo's 32-bit hex ids in a 2**40 space) would all land on the
  first shard; a bijection of 63 bits spreads any ids evenly.
- `prepare_sharded`, after DistributedModelParallel: (a) FBGEMM's reset of an evicted row's
  optimizer state (fbgemm::reset_weight_momentum) has no CPU kernel, so the sharded module gets one
  that zeroes the rows' state in every optimizer's layout; (b) a new id's row is re-initialised
  from a generator seeded by (seed, table, shard, step), not the global RNG, so a resumed run
  gives the same rows as the uninterrupted one; (c) each module's history buffer (the ids of a
  step, from which new ids are inserted) gets a fixed size, enough for a step of every rank,
  instead of 1.25 x the first batch it sees, which after a resume would be another batch and
  would drop other ids. It grows when a step brings more ids than that (bags longer than their
  configured hotness), rather than drop them.
- `ShardFaithfulRemap`, for export: an unsharded module maps an id by the whole table, while
  training mapped it by the shard its hash block belongs to (whose misses go to that shard's
  last row); the export splits the saved state back into those shards, so that predict maps
  every id, unseen ones included, exactly as training did.

The eviction interval is 1 (every training step inserts the step's new ids): a longer one would
keep ids in an unsaved history between steps, and a resumed run would lose them.
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.modules.mc_modules import (
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from app.config import ManagedCollisionConfig

_MASK63 = (1 << 63) - 1
_EVICTION_POLICIES = {"lru": LRU_EvictionPolicy, "lfu": LFU_EvictionPolicy}


def mix63(ids: torch.Tensor, input_hash_size: int) -> torch.Tensor:
    """splitmix64's finalizer on 63 bits (a bijection of [0, 2**63): ids keep apart), then mod
    input_hash_size. A negative id is taken by its low 63 bits."""
    x = ids & _MASK63
    x = x ^ (x >> 31)
    x = (x * 0x3F58476D1CE4E5B9) & _MASK63
    x = x ^ (x >> 29)
    x = (x * 0x14D049BB133111EB) & _MASK63
    x = x ^ (x >> 32)
    return x % input_hash_size


@torch.fx.wrap  # one call in the train pipeline's trace of the model
def _merge_pooled(first: KeyedTensor, second: KeyedTensor) -> KeyedTensor:
    return KeyedTensor(
        keys=first.keys() + second.keys(),
        length_per_key=first.length_per_key() + second.length_per_key(),
        values=torch.cat([first.values(), second.values()], dim=1),
    )


class TablesWithManagedCollision(nn.Module):
    """Stands where the EmbeddingBagCollection stands: forward(KJT of every feature) -> the pooled
    KeyedTensor of every feature (the plain tables' first; the head puts them in feature order),
    and embedding_bag_configs() in feature order. Both collections take the whole KJT and pick
    their own features (sharded, their input dists do)."""

    def __init__(
        self,
        configs: list[EmbeddingBagConfig],
        plain: EmbeddingBagCollection | None,
        managed: ManagedCollisionEmbeddingBagCollection,
    ) -> None:
        super().__init__()
        self.ebc = plain
        self.mc = managed
        self._configs = configs

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._configs

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        managed = self.mc(features)[0]
        if self.ebc is None:
            return managed
        return _merge_pooled(self.ebc(features), managed)


def build_tables(
    configs: list[EmbeddingBagConfig],
    managed_features: Sequence[str],
    config: ManagedCollisionConfig,
    device: torch.device,
    buckets: int,
) -> TablesWithManagedCollision:
    """The tables of `configs` (feature order), those of `managed_features` under managed
    collision. `buckets`: the number of row-wise shards (the world size) the modules are sharded
    into (TorchRec asks for a multiple of it; the export needs it to route ids as training did)."""
    managed = [c for c in configs if c.feature_names[0] in managed_features]
    plain = [c for c in configs if c.feature_names[0] not in managed_features]
    modules = {
        c.name: MCHManagedCollisionModule(
            zch_size=c.num_embeddings,
            device=device,
            name=c.name,
            buckets=buckets,
            eviction_policy=_EVICTION_POLICIES[config.eviction_policy](),
            eviction_interval=1,
            input_hash_size=config.input_hash_size,
            input_hash_func=mix63,
        )
        for c in managed
    }
    collection = ManagedCollisionCollection(managed_collision_modules=modules, embedding_configs=managed)
    mc = ManagedCollisionEmbeddingBagCollection(
        EmbeddingBagCollection(tables=managed, device=device), collection, return_remapped_features=False
    )
    return TablesWithManagedCollision(
        configs, EmbeddingBagCollection(tables=plain, device=device) if plain else None, mc
    )


# ---- after sharding -----------------------------------------------------------------------------


def _reset_rows_optimizer_state(tbe, pruned_indices, pruned_indices_offsets, logical_table_ids, buffer_ids) -> None:
    """Stands in for FBGEMM's reset_embedding_weight_momentum (CUDA only, rowwise_adagrad only):
    zeroes the optimizer state of the rows given to new ids, in every optimizer's layout, so that
    a new id does not inherit the evicted one's accumulators."""
    states = tbe.split_optimizer_states()
    offsets = pruned_indices_offsets.tolist()
    for i, table in enumerate(logical_table_ids.tolist()):
        rows = pruned_indices[offsets[i] : offsets[i + 1]]
        for state in states[table] if states else []:
            state[rows] = 0


class _SeededRows:
    """init_fn of the rows managed collision gives to new ids: uniform as TorchRec's default
    init, from a generator seeded by (seed, table, shard, step), so that it depends on nothing a
    checkpoint does not restore (the module's step counter is in its state)."""

    def __init__(self, module: MCHManagedCollisionModule, seed: int, table_index: int, low: float, high: float) -> None:
        self.module, self.seed, self.table_index, self.low, self.high = module, seed, table_index, low, high

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        key = 0
        for part in (
            self.seed,
            self.table_index,
            self.module._output_global_offset,
            int(self.module._current_iter_tensor.item()),
        ):
            key = ((key * 1_000_003) ^ int(part)) & _MASK63
        generator = torch.Generator(device=rows.device)
        generator.manual_seed(key)
        return torch.empty_like(rows).uniform_(self.low, self.high, generator=generator)


def _fixed_history(module: MCHManagedCollisionModule, size: int) -> None:
    """Allocates the module's history buffers at `size` ids (what its first training step would
    do at 1.25 x that step's ids), so that the size never depends on which batch came first; the
    ids a step has already recorded are kept."""
    kept = module._current_history_buffer_offset if module._input_history_buffer_size > 0 else 0
    old = module._history_accumulator[:kept] if kept else None
    module._input_history_buffer_size = size
    module._history_accumulator = torch.empty(size, dtype=torch.int64, device=module.device)
    if old is not None:
        module._history_accumulator[:kept] = old
    for name, _is_mch, is_history in module._eviction_policy.metadata_info:
        if is_history:
            buffer = torch.zeros(size, dtype=torch.int64, device=module.device)
            if kept:
                buffer[:kept] = module._history_metadata[name][:kept]
            module.register_buffer("_history_" + name, buffer, persistent=False)
            module._history_metadata[name] = getattr(module, "_history_" + name)


def _history_that_grows(module: MCHManagedCollisionModule) -> None:
    """Makes the module's profile() grow its history buffers to a step's ids first where they
    would not hold them: TorchRec's keeps the first ids that fit and drops the rest silently (they
    would get no row, whatever room the table has), and a bag may be longer than the configured
    hotness. Counting the ids reads tensor sizes only: no sync with the device."""
    profile = module.profile

    def growing_profile(features: dict[str, JaggedTensor]) -> dict[str, JaggedTensor]:
        if module.training and module._input_history_buffer_size > 0:
            needed = module._current_history_buffer_offset + sum(f.values().numel() for f in features.values())
            if needed > module._input_history_buffer_size:
                _fixed_history(module, max(needed, 2 * module._input_history_buffer_size))
        return profile(features)

    module.profile = growing_profile


def prepare_sharded(model: nn.Module, seed: int, history_size: int) -> int:
    """Fits every sharded managed-collision collection in `model` (a DistributedModelParallel) for
    training (see the module's docstring); `history_size`: the most ids a shard's module can
    receive in one step. Returns how many collections it fitted."""
    from torchrec.distributed.mc_embedding_modules import BaseShardedManagedCollisionEmbeddingCollection

    fitted = 0
    for sharded in model.modules():
        if not isinstance(sharded, BaseShardedManagedCollisionEmbeddingCollection):
            continue
        fitted += 1
        for tbe, _index in sharded._table_to_tbe_and_index.values():
            tbe.reset_embedding_weight_momentum = types.MethodType(_reset_rows_optimizer_state, tbe)
        modules = sharded._managed_collision_collection._managed_collision_modules
        configs = sharded._embedding_module._table_name_to_config
        for index, (table, module) in enumerate(sorted(modules.items())):
            _fixed_history(module, history_size)
            _history_that_grows(module)
            config = configs[table]
            configs[table] = replace(
                config,
                init_fn=_SeededRows(module, seed, index, config.get_weight_init_min(), config.get_weight_init_max()),
            )
    return fitted


# ---- export -------------------------------------------------------------------------------------


def _route(ids: torch.Tensor, input_hash_size: int, buckets: int, world: int) -> torch.Tensor:
    """The rank each (hashed) id was sent to in training: FBGEMM's block bucketize, as TorchRec's
    row-wise input dist calls it for managed-collision tables."""
    out = torch.ops.fbgemm.block_bucketize_sparse_features(
        torch.ones_like(ids),
        ids,
        bucketize_pos=False,
        sequence=True,
        block_sizes=torch.tensor([math.ceil(input_hash_size / buckets)], dtype=ids.dtype),
        my_size=world,
        weights=None,
        total_num_blocks=torch.tensor([buckets], dtype=ids.dtype),
        keep_orig_idx=True,
    )
    return out[0].view(world, -1).argmax(0)


class ShardFaithfulRemap(nn.Module):
    """An unsharded module's (loaded) state split back into the row-wise shards it was saved from
    (`segments`: their first rows, and the table's rows), each shard mapping the ids routed to
    it, its misses to its own last row: the mapping of the sharded training run."""

    def __init__(self, mch: MCHManagedCollisionModule, segments: list[int], world: int) -> None:
        super().__init__()
        self.mch, self.world, self.buckets = mch, world, len(segments) - 1
        self.shards = nn.ModuleList()
        mapping = mch._mch_remapped_ids_mapping
        for rank in range(self.buckets):
            low, high = segments[rank], segments[rank + 1]
            shard = mch.rebuild_with_output_id_range((low, high), segments, device=mapping.device)
            keep = (mapping >= low) & (mapping < high)
            with torch.no_grad():
                shard._mch_sorted_raw_ids.copy_(mch._mch_sorted_raw_ids[keep])
                shard._mch_remapped_ids_mapping.copy_(mapping[keep])
                for name, buffer in shard._mch_metadata.items():
                    buffer.copy_(mch._mch_metadata[name][keep])
                shard._sort_mch_buffers()
            self.shards.append(shard.eval())

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        values = mix63(values, self.mch.input_size())
        ranks = _route(values, self.mch.input_size(), self.buckets, self.world)
        out = torch.empty_like(values)
        shard: MCHManagedCollisionModule  # what self.shards holds
        for rank, shard in enumerate(self.shards):
            chosen = ranks == rank
            ids = JaggedTensor(values=values[chosen], lengths=torch.ones(int(chosen.sum()), dtype=torch.long))
            out[chosen] = shard.remap({"ids": ids})["ids"].values()
        return out


class ExportedManagedCollision(nn.Module):
    """In place of a loaded ManagedCollisionEmbeddingBagCollection for scoring: each managed
    feature's ids mapped as its shards did (ShardFaithfulRemap), then the tables."""

    def __init__(self, mc: ManagedCollisionEmbeddingBagCollection, segments: dict[str, list[int]], world: int) -> None:
        super().__init__()
        self.ebc = mc._embedding_module
        collection = mc._managed_collision_collection
        self.features = {
            table: list(collection._table_to_features[table]) for table in collection._managed_collision_modules
        }
        self.remaps = nn.ModuleDict(
            {
                table: ShardFaithfulRemap(module, segments[table], world)
                for table, module in collection._managed_collision_modules.items()
            }
        )

    def forward(self, features: KeyedJaggedTensor):
        by_feature = features.to_dict()
        keys, values, lengths = [], [], []
        for table, remap in self.remaps.items():
            for feature in self.features[table]:
                keys.append(feature)
                values.append(remap(by_feature[feature].values()))
                lengths.append(by_feature[feature].lengths())
        remapped = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))
        return self.ebc(remapped), None


def for_export(tables: nn.Module, segments: dict[str, list[int]], world: int) -> None:
    """Makes loaded `tables` (TablesWithManagedCollision) score as the sharded run did: `segments`
    per table, from the checkpoint (the first row of every shard, and the table's rows)."""
    tables.mc = ExportedManagedCollision(tables.mc, segments, world)
