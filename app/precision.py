"""Mixed precision: the dense arch, interaction and over arch under autocast (bf16 or fp16), the
tables, loss and metrics in fp32; fp16 with a dynamic loss scale.

A loss scale multiplies every gradient, and FBGEMM's fused table optimizers apply theirs inside
the backward, before any optimizer could look at them: a step whose gradients overflow would
update the tables even though GradScaler skips its dense step. So under a loss scale the backward
runs in two halves. Every tensor the tables hand to the dense part passes through
`TableGradients`, which cuts the graph there: the first half (`backward` of the scaled loss)
computes the dense gradients and the gradients arriving at the cut, and stops. Then the step is
judged once, for every rank: the dense and cut gradients are unscaled and checked for inf/NaN
together, and the verdict is all-reduced. Only when every rank's gradients are finite does the
second half run, from the cut into the tables (the sharded tables' fused updates, the replicated
tables' gradients) with the unscaled gradients; otherwise no table, dense layer or optimizer state
changes, and the scale backs off. GradScaler holds the scale and its growth tracker (its
state_dict is what checkpoints keep); the check and the update are its own fused ops.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist

from app.config import ConfigError

log = logging.getLogger(__name__)
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype the dense part computes in (None: fp32), refusing what this device cannot do and
    warning of what it does slowly."""
    dtype = DTYPES[precision]
    if device.type == "cpu" and dtype is torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # torch computes bf16 without the instructions too (converting each operand), with the same
        # numbers: a CPU without them runs it correctly, only slower than fp32.
        log.warning(
            "trainer.precision=bf16 on a CPU without bf16 instructions (AVX512-BF16, AMX or AVX512): "
            "correct, but slower than fp32 here."
        )
    if device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError("trainer.precision=bf16 needs a GPU with bf16 (Ampere or later); use fp16 or fp32.")
    if device.type == "cpu" and dtype is torch.float16:
        log.warning(
            "trainer.precision=fp16 on CPU: correct, but slower than fp32 on CPUs without fp16 "
            "arithmetic; bf16 is the CPU's fast format."
        )
    return dtype


def loss_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without a loss scale; bf16 has fp32's range and needs none."""
    if precision != "fp16":
        return None
    scaler = torch.amp.GradScaler(device.type)
    scaler.scale(torch.ones((), device=device))  # creates its scale and growth tracker now
    return scaler


class TableGradients:
    """The cut between the tables and the dense part under a loss scale (see the module's
    docstring). Without one (fp32, bf16), or outside training, it passes its input through."""

    def __init__(self, scaler: torch.amp.GradScaler | None) -> None:
        self.scaler = scaler
        self._held: list[tuple[torch.Tensor, torch.Tensor]] = []  # (table output, its cut copy)

    @property
    def active(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        # Not a tensor: the train pipeline's fx trace, which only looks for the tables' inputs.
        if not (self.active and torch.is_grad_enabled() and isinstance(values, torch.Tensor) and values.requires_grad):
            return values
        cut = values.detach().requires_grad_()
        self._held.append((values, cut))
        return cut

    def gradients(self) -> list[torch.Tensor]:
        """The gradients that arrived at the cut in the first half of the backward."""
        return [cut.grad for _, cut in self._held if cut.grad is not None]

    def release(self, apply: bool) -> None:
        """The second half of the backward, into the tables, with the (unscaled) gradients at the
        cut; or, when not `apply`, nothing: the tables' graph is dropped."""
        held, self._held = self._held, []
        pairs = [(values, cut.grad) for values, cut in held if cut.grad is not None]
        if apply and pairs:
            torch.autograd.backward([values for values, _ in pairs], [grad for _, grad in pairs])


def unscale_and_check(scaler: torch.amp.GradScaler, gradients: Iterable[torch.Tensor]) -> torch.Tensor:
    """Divide `gradients` by the loss scale in place; returns 1.0 where any of them, on any rank,
    is not finite, else 0.0 (the same on every rank: one all-reduce of one value)."""
    scale = scaler._get_scale_async()
    assert scale is not None, "the loss was scaled first"
    found = torch.zeros((), dtype=torch.float32, device=scale.device)
    inverse = scale.double().reciprocal().float()  # as GradScaler.unscale_ does
    groups = defaultdict(list)
    for grad in gradients:
        groups[grad.device, grad.dtype].append(grad)
    with torch.no_grad():
        for (device, _), grads in groups.items():
            local = torch.zeros((), dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, local, inverse.to(device))
            found = torch.maximum(found, local.to(found.device))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
    return found


def update_scale(scaler: torch.amp.GradScaler, found: torch.Tensor) -> None:
    """GradScaler.update's rule, for the verdict `found`: back off after a skipped step, grow after
    growth_interval good ones."""
    scale, growth_tracker = scaler._get_scale_async(), scaler._growth_tracker
    assert scale is not None and growth_tracker is not None, "the loss was scaled first"
    torch._amp_update_scale_(
        scale,
        growth_tracker,
        found.to(scale.device),
        scaler.get_growth_factor(),
        scaler.get_backoff_factor(),
        scaler.get_growth_interval(),
    )
