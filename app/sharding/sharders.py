"""The sharders the planner and DistributedModelParallel use, and their quantized communication.

TorchRec's sharder offers row_wise and table_row_wise only on CUDA. They work on CPU over gloo
(tests/integration/test_sharding_equivalence.py proves them against an unsharded model), and a
table larger than one worker's memory needs them, so our sharder allows them on CPU too.
"""

from __future__ import annotations

import logging

import torch
from fbgemm_gpu.quantize_comm import QuantizedCommCodec as FbgemmQuantizedCommCodec
from fbgemm_gpu.split_embedding_configs import SparseType
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.fbgemm_qcomm_codec import CommType, QCommsConfig, get_qcomm_codecs
from torchrec.distributed.mc_embeddingbag import ManagedCollisionEmbeddingBagCollectionSharder
from torchrec.distributed.types import CommOp, QuantizedCommCodecs, ShardingType

from app.config import CUDA_ONLY_COMM_PRECISIONS, ConfigError, ShardingConfig

log = logging.getLogger("app.sharding")  # the name its lines have always carried in the logs

# Encodings with per-row or per-block scales: a reduce-scatter cannot sum them while encoded.
_SCALED_PRECISIONS = ("int8", "fp8", "mx4")
_CPU_EXTRA_TYPES = (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)


class _CPUCapableSharder(EmbeddingBagCollectionSharder):
    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        return types + [t for t in _CPU_EXTRA_TYPES if t not in types]


class _CPUCapableMCSharder(ManagedCollisionEmbeddingBagCollectionSharder):
    """TorchRec's sharder of managed-collision tables (row_wise only), made to work on CPU: its
    types are those its EBC sharder and its MC sharder share, so it needs our CPU-capable EBC
    sharder to offer row_wise at all; its kernels are a fixed list whatever the device, of which
    only fused runs on CPU; and it defaults its device to CUDA where DMP passes none."""

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        if compute_device_type == "cuda":
            return super().compute_kernels(sharding_type, compute_device_type)
        return [EmbeddingComputeKernel.FUSED.value]

    def shard(self, module, params, env, device=None, module_fqn=None):
        return super().shard(module, params, env, device or torch.device("cpu"), module_fqn)


def sharders(
    config: ShardingConfig, device: torch.device, batch_size: int, sparse_clip_value: float | None = None
) -> list:
    """The sharders the planner and DistributedModelParallel use, with quantized communication
    codecs when the config asks for a precision below fp32 (`batch_size`: per rank), and FBGEMM's
    element-wise gradient clipping in the fused table optimizers when `sparse_clip_value` is set."""
    fused_params = (
        None if sparse_clip_value is None else {"gradient_clipping": True, "max_gradient": float(sparse_clip_value)}
    )
    codecs = _qcomm_codecs(config, device, batch_size)
    tables = _CPUCapableSharder(qcomm_codecs_registry=codecs, fused_params=fused_params)
    # The managed-collision sharder is only used where the model has such tables.
    return [
        tables,
        _CPUCapableMCSharder(
            ebc_sharder=_CPUCapableSharder(qcomm_codecs_registry=codecs, fused_params=fused_params),
            qcomm_codecs_registry=codecs,
        ),
        # The histories' tables (features.sequence); torchrec offers its types on CPU too.
        EmbeddingCollectionSharder(qcomm_codecs_registry=codecs, fused_params=fused_params),
    ]


class _ScaledFP16Codec(FbgemmQuantizedCommCodec):
    """fp16 gradients sent as `scale` x their value, and divided by it after decoding, in fp32.
    The loss is a mean over the rank's batch, so the gradients of pooled embeddings shrink as
    1/batch: measured on experiment=tiny's model, at 8192 rows a rank 22% of them flush to zero in
    fp16 and the rest are subnormal (17% L1 error); scaled by the batch size the error is 1.8e-4
    at any batch, with values far below fp16's maximum. (FBGEMM's own loss_scale divides the fp16
    values before decoding them, where the small ones underflow again.)"""

    def __init__(self, scale: float) -> None:
        super().__init__(comm_precision=SparseType.FP16, is_fwd=False)
        self.scale = float(scale)

    def encode(self, input_tensor: torch.Tensor, ctx=None) -> torch.Tensor:
        return super().encode(input_tensor * self.scale, ctx)

    def decode(self, input_tensor: torch.Tensor, ctx=None) -> torch.Tensor:
        return super().decode(input_tensor, ctx) / self.scale


def _qcomm_codecs(
    config: ShardingConfig, device: torch.device, batch_size: int
) -> dict[str, QuantizedCommCodecs] | None:
    """One codec pair per embedding collective. torchrec's get_qcomm_codecs_registry turns bf16
    into fp16 whenever the device is a CPU, an assumption older than gloo's bf16 all-to-all (torch
    2.13 sends bf16 over gloo; tests/integration/test_qcomms.py trains with it), so we build the
    registry here and keep only its reduce-scatter rule."""
    forward, backward = config.comm_forward_precision, config.comm_backward_precision
    if (forward, backward) == ("fp32", "fp32"):
        return None
    for key, precision in (("comm_forward_precision", forward), ("comm_backward_precision", backward)):
        if precision in CUDA_ONLY_COMM_PRECISIONS and device.type != "cuda":
            raise ConfigError(
                f"sharding.{key}={precision} needs CUDA (fbgemm has no CPU {precision} "
                f"kernel), but this job runs on {device.type}; use fp16, bf16, int8 or mx4."
            )
    registry = {}
    for op in (
        CommOp.POOLED_EMBEDDINGS_ALL_TO_ALL,
        CommOp.POOLED_EMBEDDINGS_REDUCE_SCATTER,
        CommOp.SEQUENCE_EMBEDDINGS_ALL_TO_ALL,
    ):
        op_forward, op_backward = forward, backward
        if op == CommOp.POOLED_EMBEDDINGS_REDUCE_SCATTER:
            # torchrec's own fallbacks for fp8 and mx4, which int8 needs as well.
            op_forward = "fp16" if forward in _SCALED_PRECISIONS else forward
            op_backward = "bf16" if backward in _SCALED_PRECISIONS else backward
            if (op_forward, op_backward) != (forward, backward):
                log.info(
                    "Reduce-scatters (row_wise and table_row_wise tables) send %s forward and %s "
                    "backward: %s/%s values cannot be summed while encoded.",
                    op_forward,
                    op_backward,
                    forward,
                    backward,
                )
        qcomms = QCommsConfig(forward_precision=CommType(op_forward), backward_precision=CommType(op_backward))
        registry[op.name] = get_qcomm_codecs(qcomms)
        if op_backward == "fp16":
            registry[op.name].backward = _ScaledFP16Codec(scale=batch_size)
    return registry
