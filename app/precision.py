"""Mixed precision: the dense arch, interaction and over arch under autocast (bf16 or fp16), the
tables, loss and metrics in fp32; fp16 with a dynamic loss scale.

A loss scale multiplies every gradient, and FBGEMM's fused table optimizers apply theirs inside
the backward, before any optimizer could unscale them. So the pooled embeddings pass through
`TableGradients`, which divides their gradient by the scale on its way into the tables (and
drops a step's non-finite one, as GradScaler skips the dense step that produced it); the dense
gradients are unscaled by GradScaler as usual.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from app.config import ConfigError

log = logging.getLogger(__name__)
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The dtype the dense part computes in (None: fp32), refusing what this device cannot do."""
    dtype = DTYPES[precision]
    if device.type == "cpu" and dtype is torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise ConfigError("trainer.precision=bf16 needs a CPU with bf16 instructions (AVX512-BF16, AMX or "
                          "AVX512 at least) or a CUDA device; this CPU has none: use trainer.precision=fp32.")
    if device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError("trainer.precision=bf16 needs a GPU with bf16 (Ampere or later); use fp16 or fp32.")
    if device.type == "cpu" and dtype is torch.float16:
        log.warning("trainer.precision=fp16 on CPU: correct, but slower than fp32 on CPUs without fp16 "
                    "arithmetic; bf16 is the CPU's fast format.")
    return dtype


def loss_scaler(precision: str, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """fp16 gradients underflow without a loss scale; bf16 has fp32's range and needs none."""
    if precision != "fp16":
        return None
    scaler = torch.amp.GradScaler(device.type)
    scaler.scale(torch.ones((), device=device))  # creates its scale tensor now: the first forward reads it
    return scaler


class _DivideGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scale,) = ctx.saved_tensors
        grad = grad / scale.to(grad.dtype)
        # No host sync: a non-finite gradient becomes zeros, and GradScaler skips the dense step.
        return torch.where(torch.isfinite(grad).all(), grad, torch.zeros_like(grad)), None


class TableGradients:
    """Unscales the gradients that flow into the tables (see the module's docstring)."""

    def __init__(self, scaler: Optional[torch.amp.GradScaler]) -> None:
        self.scaler = scaler

    def __call__(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.scaler is None or not self.scaler.is_enabled():
            return pooled
        # The scale as a tensor (get_scale() would wait for the device on every step).
        return _DivideGradient.apply(pooled, self.scaler._get_scale_async())
