"""Exported models: a sharded training checkpoint as one unsharded model file, scored in one process.

    export_checkpoint(Path("outputs/tiny"), Path("exported/tiny"))   # its best checkpoint: model.pt + config.json
    model, config = load_exported(Path("exported/tiny"))
    for logits, labels in score_files(model, config, files, batch_size=2048, labeled=True): ...

A checkpoint holds every rank's shards of every table (DCP). Export builds the plain model with
full tables on the CPU and has DCP read the shards into them in this one process, without a
process group: DCP's load planner maps the saved chunks onto whole tensors from the checkpoint's
metadata alone, whatever the sharding and world size were. No key mapping is needed: the sharded
model's state_dict keys are the plain model's (DistributedModelParallel strips its wrapper and
DDP prefixes, and sharded tables keep their unsharded names); they are still checked against the
metadata first, so a mismatch is a clear error rather than one from deep inside DCP.

Nothing arbitrary is unpickled. The checkpoint is read as training reads it (app/checkpoint/safe_load.py's
load_state): its .metadata pickle admits only the classes DCP's metadata is made of, and its
entries are loaded with torch.load(weights_only=True); export asks for tensor entries only. A
checkpoint that names anything else is refused with an ExportError naming the file. model.pt is
a plain dict of tensors, loaded with weights_only=True, and config.json is JSON.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from app.checkpoint import (
    META_FILE,
    MODEL_KEY,
    CheckpointError,
    find_checkpoint,
    load_state,
    read_dcp_metadata,
    read_meta,
    weights_only_refusal,
)
from app.config import Config, ConfigError
from app.data import DataError
from app.data.batch import InputPolicy, decode
from app.data.files import check_files, open_parquet
from app.errors import UserError
from app.features import FeatureSchema
from app.hydra_edge import config_from_dict
from app.models import build_model, embedding_tables
from app.models.managed_collision import for_export
from app.precision import DTYPES
from app.storage import UrlPath, atomic_output, location, write_atomically
from app.storage_failure import describe, storage_cause

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"  # written last: an export without it is incomplete
_CPU = torch.device("cpu")


class ExportError(UserError, ValueError):
    """A checkpoint or exported model that cannot be read; the message names the path."""


# ---- export -------------------------------------------------------------------------------------


def resolve_checkpoint(path: Path, prefer: str = "best") -> Path:
    """A checkpoint dir (or a checkpoints/best pointer) as given; of a run dir or its checkpoints/
    dir, with `prefer` "best" the checkpoint checkpoints/best names (the best by validation
    metric), where there is one, else the newest intact one; with "latest" the newest."""
    try:
        return find_checkpoint(location(path), prefer=prefer)  # a local path or an object-store URL
    except CheckpointError as error:
        raise ExportError(str(error)) from error
    except Exception as error:  # a store that is down, or refuses: botocore's errors are not OSErrors
        cause = storage_cause(error)
        if cause is None:
            raise
        raise ExportError(
            f"{path}: cannot read it ({describe(cause)}); check the path, and for a URL the bucket, "
            "the credentials and the endpoint (AWS_* variables, ~/.aws)."
        ) from error


def _read_meta(checkpoint: Path) -> dict:
    try:
        meta = read_meta(checkpoint)
    except CheckpointError as error:
        raise ExportError(str(error)) from error
    if not isinstance(meta.get("config"), dict):
        raise ExportError(f"{checkpoint / META_FILE}: holds no config, so the model cannot be rebuilt.")
    return meta


def _config_in(path: Path, data: dict) -> Config:
    """The training config a checkpoint's meta.json or an export's config.json holds, read as plain
    data (app/hydra_edge.py's config_from_dict); an ExportError naming the file where it is not one
    this version of rectrain can build."""
    try:
        return config_from_dict(data)
    except ConfigError as error:
        raise ExportError(f"{path}: its config is not one this version of rectrain can use: {error}") from error


def _check_keys(checkpoint: Path, state: dict[str, torch.Tensor]) -> None:
    """The checkpoint's model entries must be exactly `state`'s tensors, with the same shapes."""
    try:
        metadata = read_dcp_metadata(checkpoint)
    except CheckpointError as error:  # it names something that is not DCP metadata
        raise ExportError(str(error)) from error
    except (OSError, EOFError, ValueError, pickle.UnpicklingError) as error:
        message = f"{checkpoint}: incomplete checkpoint, its DCP metadata is not readable ({error})."
        raise ExportError(message) from error
    prefix = f"{MODEL_KEY}."
    saved = {k[len(prefix) :]: v for k, v in metadata.state_dict_metadata.items() if k.startswith(prefix)}
    missing, unexpected = sorted(set(state) - set(saved)), sorted(set(saved) - set(state))
    if missing or unexpected:
        raise ExportError(
            f"{checkpoint}: the checkpoint's model does not match the model its config builds; "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    for key, tensor in state.items():
        entry = saved[key]
        if not isinstance(entry, TensorStorageMetadata) or tuple(entry.size) != tuple(tensor.shape):
            shown = tuple(entry.size) if isinstance(entry, TensorStorageMetadata) else type(entry).__name__
            raise ExportError(
                f"{checkpoint}: {key!r} is {shown} in the checkpoint; the model its config builds "
                f"has {tuple(tensor.shape)}."
            )


def export_checkpoint(checkpoint: Path, out_dir: Path, prefer: str = "best") -> Path:
    """Write out_dir/model.pt (the full state_dict, unsharded) and out_dir/config.json from a
    checkpoint dir, or from a run dir's best checkpoint (`prefer` "best": where it has one, else
    its newest intact one; "latest": its newest); returns out_dir."""
    checkpoint = resolve_checkpoint(checkpoint, prefer)
    meta = _read_meta(checkpoint)
    config = _config_in(checkpoint / META_FILE, meta["config"])
    model = build_model(
        config.model,
        FeatureSchema.from_config(config.features),
        _CPU,
        tables_device=_CPU,
        managed_collision=config.features.managed_collision,
        mc_buckets=int(meta["world_size"]),
    )
    state = model.state_dict()
    _check_keys(checkpoint, state)
    managed_collision = _managed_collision_shards(checkpoint, config, int(meta["world_size"]))
    try:
        with warnings.catch_warnings():
            # Only the model: DCP loads the keys asked for, so the optimizer's state is never read.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process is the intent
            load_state(checkpoint, {MODEL_KEY: state}, no_dist=True)
    except CheckpointError as error:
        raise ExportError(str(error)) from error
    except (OSError, dcp.CheckpointException) as error:  # e.g. one rank's .distcp file missing
        # DCP wraps the cause with its traceback; the cause alone says which file.
        cause = next(iter(error.failures.values()))[0] if isinstance(error, dcp.CheckpointException) else error
        raise ExportError(f"{checkpoint}: incomplete checkpoint, its shards are not readable ({cause}).") from error

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # config.json marks a complete export: drop an older one first, so a crash below never
    # leaves a new model.pt beside the old config.
    (out_dir / CONFIG_FILE).unlink(missing_ok=True)
    with atomic_output(out_dir / MODEL_FILE) as tmp:
        torch.save(dict(state), tmp)
    exported = {
        "step": meta["step"],
        "checkpoint": str(checkpoint if isinstance(checkpoint, UrlPath) else checkpoint.resolve()),
        "parameters": sum(t.numel() for t in state.values()),
        "config": meta["config"],
    }
    if managed_collision:
        exported["managed_collision"] = managed_collision
    write_atomically(out_dir / CONFIG_FILE, json.dumps(exported, indent=2))
    return out_dir


def _managed_collision_shards(checkpoint: Path, config: Config, world_size: int) -> dict | None:
    """How the managed-collision tables were split into row-wise shards (the first row of each, and
    the table's rows), from the checkpoint's chunks: predict maps each id by the shard training
    sent it to (app/models/managed_collision.py). None without such tables."""
    if not any(f.id_mapping == "managed_collision" for f in config.features.sparse):
        return None
    segments: dict[str, list[int]] = {}
    for key, entry in read_dcp_metadata(checkpoint).state_dict_metadata.items():
        if (
            key.startswith(f"{MODEL_KEY}.")
            and key.endswith("._mch_sorted_raw_ids")
            and isinstance(entry, TensorStorageMetadata)
        ):
            starts = sorted({chunk.offsets[0] for chunk in entry.chunks})
            segments[key.split(".")[-2]] = [*starts, int(entry.size[0])]
    return {"world_size": world_size, "segments": segments}


# ---- load ---------------------------------------------------------------------------------------


def read_export_info(out_dir: Path) -> dict:
    """config.json of an export: {"step", "checkpoint", "parameters", "config"}."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ExportError(f"{out_dir}: no such directory; expected an export from scripts/export.py.")
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (out_dir / name).is_file():
            raise ExportError(f"{out_dir}: incomplete export, {name} is missing; export the checkpoint again.")
    try:
        info = json.loads((out_dir / CONFIG_FILE).read_text())
    except ValueError as error:
        raise ExportError(f"{out_dir / CONFIG_FILE}: not valid JSON ({error}).") from error
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
        raise ExportError(f"{out_dir / CONFIG_FILE}: holds no config; export the checkpoint again.")
    return info


def load_exported(out_dir: Path) -> tuple[nn.Module, Config]:
    """The exported model on the CPU in eval mode, and the config it was trained with."""
    out_dir = Path(out_dir)
    info = read_export_info(out_dir)
    config = _config_in(out_dir / CONFIG_FILE, info["config"])
    shards = info.get("managed_collision")
    # The dense part computes in the run's trainer.precision, as its evaluations did: scored in fp32,
    # a bf16 or fp16 run's AUC would differ from its validation's (in the 5th decimal, measured).
    model = build_model(
        config.model,
        FeatureSchema.from_config(config.features),
        _CPU,
        tables_device=_CPU,
        autocast_dtype=DTYPES[config.trainer.precision],
        managed_collision=config.features.managed_collision,
        mc_buckets=shards["world_size"] if shards else 1,
    )
    path = out_dir / MODEL_FILE
    state = _read_model_file(path)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise ExportError(f"{path}: not the model {CONFIG_FILE} describes ({error}).") from error
    # fp16 tables are stored as such, but scored in fp32: FBGEMM's kernels, which trained them, sum
    # fp16 rows in fp32, while nn.EmbeddingBag would sum (and round) in fp16.
    embedding_tables(model).float()
    if shards:
        for_export(embedding_tables(model), shards["segments"], shards["world_size"])
    return model.eval(), config


def _read_model_file(path: Path) -> dict[str, torch.Tensor]:
    """model.pt's tensors, loaded as plain data; ExportError naming the file for anything else."""
    if not zipfile.is_zipfile(path):  # what torch.save writes: any other file is junk to it
        raise ExportError(
            f"{path}: not a file of plain tensors written by scripts/export.py (not a torch.save "
            "archive); export the checkpoint again."
        )
    try:
        return torch.load(path, map_location=_CPU, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ExportError(
            f"{path}: not a file of plain tensors, so it is not loaded (torch.load with "
            f"weights_only=True refused it: {weights_only_refusal(error)})."
        ) from error
    except Exception as error:  # a damaged archive fails deep in torch's reader, in many ways
        raise ExportError(f"{path}: not readable ({type(error).__name__}: {error}).") from error


# ---- scoring ------------------------------------------------------------------------------------


def check_inputs(files: Sequence[str], schema: FeatureSchema) -> bool:
    """The footer checks training makes, with or without a label column; returns whether the
    files carry labels (all of them or none)."""
    labeled: list[bool] = []
    for path in files:
        try:
            labeled.append(all(task in pq.read_schema(path).names for task in schema.tasks))
        except Exception as error:  # pyarrow raises several types for a damaged file
            raise DataError(f"{path}: not a readable Parquet file ({error}).") from error
    if any(labeled) and not all(labeled):
        what = f"{schema.label!r} column" if len(schema.tasks) == 1 else f"label columns {list(schema.tasks)}"
        raise DataError(
            f"{files[labeled.index(False)]}: no {what}, but "
            f"{files[labeled.index(True)]} has one; label all files or none."
        )
    if all(labeled):
        check_files(files, schema)
    else:  # check_files needs a label column: a dense column in its place (checked twice) does
        check_files(files, dataclasses.replace(schema, label=schema.dense[0], labels=()))
    return all(labeled)


def score_files(
    model: nn.Module, config: Config, files: Sequence[str], batch_size: int, labeled: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(logits, labels or None) of every row of `files`, in order, one batch at a time (B x T of
    each for a multi-task model, a column per task in features.labels' order). Rows are
    decoded and checked as training does it (config.data's input policy), a row group at a time."""
    schema = FeatureSchema.from_config(config.features)
    policy = InputPolicy.from_config(config.data)
    columns = schema.columns if labeled else [c for c in schema.columns if c not in schema.tasks]
    for path in files:
        parquet = open_parquet(path)
        for index in range(parquet.metadata.num_row_groups):
            table = parquet.read_row_group(index, columns=columns)
            if table.num_rows == 0:
                continue
            if not labeled:  # the model's forward takes labels; these are never reported
                for task in schema.tasks:
                    table = table.append_column(task, pa.array(np.zeros(table.num_rows, np.float32)))
            rows = decode(table, schema, f"{path} row group {index}", policy)
            for start in range(0, len(rows), batch_size):
                batch = rows.slice(start, start + batch_size).to_batch(
                    schema.sparse_names, sequence=schema.sequence_inputs
                )
                with torch.no_grad():
                    _, (_loss, logits, labels) = model(batch)
                yield logits, labels if labeled else None
