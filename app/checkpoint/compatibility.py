"""Whether a checkpoint fits this run: the model its config describes against the current config's,
key by key (model_differences: another model's weights cannot be loaded into this one), and a
managed-collision table's world size (check_managed_collision_world_size). The Checkpointer
refuses a checkpoint that does not fit, naming what differs (checkpointer.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from app.checkpoint.precision_state import table_precision_differences
from app.config import Config, ConfigError

if TYPE_CHECKING:
    from app.checkpoint.checkpointer import SavedCheckpoint

# What the model's shapes depend on: a checkpoint whose values differ cannot be loaded into it.
_MODEL_SHAPE_KEYS = {
    "features": ("label", "dense", "embedding_dim", "pooling"),
    "model": (
        "arch",
        "dense_arch_layer_sizes",
        "over_arch_layer_sizes",
        "dcn_num_layers",
        "dcn_low_rank_dim",
        "deep_fm_dimension",
    ),
}


def model_differences(saved: Config, current: Config) -> list[str]:
    """How the model a checkpoint's config describes differs from the current config's, one line
    per config key; empty when the model fits."""
    lines = []

    def compare(key: str, old: Any, new: Any) -> None:
        if old != new:
            lines.append(f"{key}: {old!r} in the checkpoint, {new!r} now")

    for group, keys in _MODEL_SHAPE_KEYS.items():
        for key in keys:
            compare(f"{group}.{key}", getattr(getattr(saved, group), key), getattr(getattr(current, group), key))
    old_tables = {f.name: f for f in saved.features.sparse}
    new_tables = {f.name: f for f in current.features.sparse}
    for name in sorted(old_tables.keys() - new_tables.keys()):
        lines.append(f"features.sparse: {name!r} is in the checkpoint, not in the config")
    for name in sorted(new_tables.keys() - old_tables.keys()):
        lines.append(f"features.sparse: {name!r} is in the config, not in the checkpoint")
    for name in sorted(old_tables.keys() & new_tables.keys()):
        compare(
            f"features.sparse[{name}].num_embeddings", old_tables[name].num_embeddings, new_tables[name].num_embeddings
        )
        if old_tables[name].embedding_dim or new_tables[name].embedding_dim:  # else features.embedding_dim says it
            compare(
                f"features.sparse[{name}].embedding_dim",
                old_tables[name].embedding_dim or saved.features.embedding_dim,
                new_tables[name].embedding_dim or current.features.embedding_dim,
            )
    lines += _managed_collision_differences(saved, current, old_tables, new_tables)
    lines += _sequence_differences(saved, current)
    lines += table_precision_differences(saved, current)
    if saved.features.labels or current.features.labels:
        _multi_task_differences(saved, current, compare)
    return lines


def _multi_task_differences(saved: Config, current: Config, compare) -> None:
    """A multi-task model's shape: its tasks (label columns, in order) and its towers or experts.
    The tasks' loss weights change no shape."""
    compare("features.labels", saved.features.tasks(), current.features.tasks())
    for key in ("multi_task", "tower_layer_sizes"):
        compare(f"model.{key}", getattr(saved.model, key), getattr(current.model, key))
    if saved.model.multi_task == current.model.multi_task == "mmoe":
        compare("model.num_experts", saved.model.num_experts, current.model.num_experts)


def _sequence_differences(saved: Config, current: Config) -> list[str]:
    """model_differences of features.sequence: the histories' tables and their attention units
    (max_length changes no shape: a run may resume with another)."""
    old = {f.name: f for f in saved.features.sequence}
    new = {f.name: f for f in current.features.sequence}
    lines = [
        f"features.sequence: {name!r} is in the checkpoint, not in the config"
        for name in sorted(old.keys() - new.keys())
    ]
    lines += [
        f"features.sequence: {name!r} is in the config, not in the checkpoint"
        for name in sorted(new.keys() - old.keys())
    ]
    for name in sorted(old.keys() & new.keys()):
        for key, was, now in (
            ("num_embeddings", old[name].num_embeddings, new[name].num_embeddings),
            (
                "embedding_dim",
                old[name].embedding_dim or saved.features.embedding_dim,
                new[name].embedding_dim or current.features.embedding_dim,
            ),
        ):
            if was != now:
                lines.append(f"features.sequence[{name}].{key}: {was!r} in the checkpoint, {now!r} now")
    saved_layers = list(saved.model.sequence_attention_layer_sizes)
    current_layers = list(current.model.sequence_attention_layer_sizes)
    if old and new and saved_layers != current_layers:
        lines.append(
            f"model.sequence_attention_layer_sizes: {saved_layers!r} in the checkpoint, {current_layers!r} now"
        )
    return lines


def _managed_collision_differences(saved: Config, current: Config, old_tables: dict, new_tables: dict) -> list[str]:
    """How the tables' id mappings differ: another mapping is another model (a managed-collision
    table has state of its own, and its rows mean other ids)."""
    lines = []
    for name in sorted(old_tables.keys() & new_tables.keys()):
        old, new = old_tables[name].id_mapping, new_tables[name].id_mapping
        if old != new:
            lines.append(f"features.sparse[{name}].id_mapping: {old!r} in the checkpoint, {new!r} now")
    if any(f.id_mapping == "managed_collision" for f in current.features.sparse):
        for key in ("eviction_policy", "input_hash_size"):
            old = getattr(saved.features.managed_collision, key)
            new = getattr(current.features.managed_collision, key)
            if old != new:
                lines.append(f"features.managed_collision.{key}: {old!r} in the checkpoint, {new!r} now")
    return lines


def check_managed_collision_world_size(saved: SavedCheckpoint, world_size: int) -> None:
    """A managed-collision table's state is split by row-wise shard, each shard managing the ids of
    its block of the hash space: on another number of ranks the blocks differ, and every id would
    be looked for on another shard than the one that gave it its row."""
    managed = [f.name for f in saved.config.features.sparse if f.id_mapping == "managed_collision"]
    if managed and saved.world_size != world_size:
        raise ConfigError(
            f"checkpoint {saved.path} was saved by {saved.world_size} rank(s) and this run has {world_size}: "
            f"the managed-collision tables of {managed} (features.sparse[i].id_mapping=managed_collision) assign "
            f"ids to rows per row-wise shard, so they resume only on {saved.world_size} rank(s). Run with "
            f"{saved.world_size} workers, or start a new run_name."
        )
