"""CUDA checks that need a process of their own, since the test process sees no CUDA device
(tests/conftest.py). Each prints its findings as one JSON line for tests/gpu/test_cuda.py.

    python -m tests.gpu.cuda_checks pinned_batches DATA_ROOT
    python -m tests.gpu.cuda_checks async_save CHECKPOINT_DIR
"""

from __future__ import annotations

import json
import sys
from contextlib import closing

import torch
import torch.distributed as dist


def pinned_batches(data_root: str) -> dict[str, bool]:
    """Whether every tensor of a training and an evaluation batch read for CUDA is pinned, and
    whether a non-blocking copy of one reaches the GPU intact."""
    from app.data.files import resolve_files
    from app.data.parquet import EvaluationBatches, TrainingBatches
    from app.data.synthetic import ensure_dataset
    from app.features import FeatureSchema
    from app.hydra_edge import compose_config

    config = compose_config(["experiment=tiny", f"data.synthetic.root={data_root}"])
    schema = FeatureSchema.from_config(config.features)
    train_dir, val_dir = ensure_dataset(schema, config.data.synthetic)
    torch.cuda.set_device(0)  # as a job does before its readers start
    with closing(iter(TrainingBatches(resolve_files(str(train_dir)), schema, 64, 0, 1, pin_memory=True))) as batches:
        train = next(batches)
    with closing(iter(EvaluationBatches(resolve_files(str(val_dir)), schema, 64, 0, 1, pin_memory=True))) as batches:
        val = next(batches).batch
    found = {}
    for split, batch in (("train", train), ("val", val)):
        tensors = {
            "dense": batch.dense_features,
            "labels": batch.labels,
            "values": batch.sparse_features.values(),
            "lengths": batch.sparse_features.lengths(),
        }
        found.update({f"{split}.{name}": tensor.is_pinned() for name, tensor in tensors.items()})
    on_gpu = train.to(torch.device("cuda", 0), non_blocking=True)
    torch.cuda.synchronize()
    found["copied intact"] = torch.equal(on_gpu.dense_features.cpu(), train.dense_features) and torch.equal(
        on_gpu.sparse_features.values().cpu(), train.sparse_features.values()
    )
    return found


def async_save(directory: str) -> dict[str, object]:
    """Two asynchronous saves of a CUDA tensor, changed after each: the device memory the staging
    took, whether the staged copy is pinned, and what loads back into a CUDA tensor."""
    from app.checkpoint import CheckpointStore

    torch.cuda.set_device(0)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # a gloo group, as a job's store has
    weight = torch.full((1024, 1024), 1.0, device="cuda")
    store = CheckpointStore(directory, keep_last=2, rank=0)
    before = torch.cuda.memory_allocated()
    first = store.save(1, {"model": {"w": weight}}, {}, asynchronous=True)
    staged_on_device = torch.cuda.memory_allocated() - before
    weight.add_(1.0)  # training goes on while the checkpoint is written
    second = store.save(2, {"model": {"w": weight}}, {}, asynchronous=True)  # refills the pinned copy
    weight.add_(1.0)
    store.wait()
    loaded = {}
    for path in (first, second):
        target = {"model": {"w": torch.zeros(1024, 1024, device="cuda")}}
        store.load(path, target)
        weights = target["model"]["w"]
        loaded[path.name] = {"device": str(weights.device), "values": weights.unique().tolist()}
    staged = store._pinned_stager.state_dict_cache["model"]["w"] if store._pinned_stager else None
    dist.destroy_process_group()
    return {
        "staged_on_device_bytes": staged_on_device,
        "tensor_bytes": weight.numel() * weight.element_size(),
        "staged_pinned": staged is not None and staged.device.type == "cpu" and staged.is_pinned(),
        "loaded": loaded,
    }


if __name__ == "__main__":
    check, argument = sys.argv[1], sys.argv[2]
    print(json.dumps({"pinned_batches": pinned_batches, "async_save": async_save}[check](argument)), flush=True)
