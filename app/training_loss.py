"""The training loss as the ranks see it together: its mean since the last log line, and whether
it is still finite.

Both stay on the loss's device between log lines (no host sync per step) and travel in one
all-reduce, the log line's. A run whose loss has been non-finite (nan, inf) on some rank for
trainer.max_nonfinite_steps consecutive steps has diverged: every rank stops with the same
DivergedError, an input error (exit 2), since its fix is the config's (a lower learning rate,
clipping, another precision). Before a checkpoint or an evaluation the ranks also check that the
latest step's loss was finite everywhere, so that no weights that produced a non-finite loss are
saved or judged.
"""

from __future__ import annotations

from typing import overload

import torch
import torch.distributed as dist

from app.errors import UserError


class DivergedError(UserError):
    """The training loss stayed non-finite for trainer.max_nonfinite_steps steps."""


class LossWindow:
    """Loss and throughput since the last log line; the loss is averaged over all ranks."""

    def __init__(self, start: float) -> None:
        self.reset(start)

    def reset(self, start: float) -> None:
        self.start = start
        self.steps = 0
        self._loss_sum: torch.Tensor | None = None

    def add(self, loss: torch.Tensor) -> None:
        self.steps += 1
        loss = loss.detach().float()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss

    def totals(self) -> torch.Tensor:
        """[loss sum, steps] on the losses' device (where the all-reduce of mean_loss needs them)."""
        assert self._loss_sum is not None, "totals of a window without losses"
        return torch.stack([self._loss_sum, self._loss_sum.new_tensor(float(self.steps))])

    @overload
    def mean_loss(self, extra: torch.Tensor) -> tuple[float, torch.Tensor]: ...
    @overload
    def mean_loss(self, extra: None = None) -> tuple[float, None]: ...
    def mean_loss(self, extra: torch.Tensor | None = None) -> tuple[float, torch.Tensor | None]:
        """Collective: the mean loss over every rank's steps of the window, and `extra` (float64,
        summed over the ranks in the same all-reduce), or None without it."""
        total = self.totals().double()
        if extra is not None:
            total = torch.cat([total, extra.to(total)])
        if dist.is_initialized():
            dist.all_reduce(total)
        return (total[0] / total[1]).item(), (total[2:] if extra is not None else None)


class NonFiniteLoss:
    """Counts each rank's consecutive steps with a non-finite loss, on the loss's device. Its
    `slots()` (one pair per rank: the step at which this rank's count reached the limit, 0 if
    never; whether its latest loss is non-finite) are summed over the ranks, so every rank reads
    every rank's pair and all decide alike."""

    def __init__(self, limit: int, rank: int, world_size: int) -> None:
        self.limit, self.rank, self.world_size = limit, rank, world_size
        # Counted on the device, in steps since the first one counted (`_before`: the step before
        # it), so that counting a step copies nothing between host and device.
        self._before = 0
        self._count: torch.Tensor | None = None
        self._run: torch.Tensor | None = None  # non-finite steps in a row, up to the latest
        self._reached: torch.Tensor | None = None  # the count at which _run reached the limit, 0: never

    def add(self, loss: torch.Tensor, step: int) -> None:
        """Count step `step`'s local loss."""
        bad = (~torch.isfinite(loss.detach())).any().to(torch.float64)
        if self._count is None or self._run is None or self._reached is None:  # set together, on the first step
            self._before = step - 1
            self._count = torch.zeros((), dtype=torch.float64, device=loss.device)
            self._run, self._reached = torch.zeros_like(self._count), torch.zeros_like(self._count)
        self._count = self._count + 1
        self._run = (self._run + 1) * bad
        self._reached = torch.where((self._run >= self.limit) & (self._reached == 0), self._count, self._reached)

    def slots(self, device: torch.device) -> torch.Tensor:
        if self._run is None or self._reached is None:
            return torch.zeros(2 * self.world_size, dtype=torch.float64, device=device)
        reached = torch.where(self._reached > 0, self._reached + self._before, self._reached)
        mine = torch.stack([reached, (self._run > 0).to(reached)]).to(device)
        slots = torch.zeros(2 * self.world_size, dtype=torch.float64, device=device)
        slots[2 * self.rank : 2 * self.rank + 2] = mine
        return slots

    def judge(self, slots: torch.Tensor) -> bool:
        """Every rank's summed `slots`: raises DivergedError when a rank reached the limit; else
        whether every rank's latest loss was finite."""
        pairs = slots.view(-1, 2).tolist()
        reached = [(int(step), rank) for rank, (step, _) in enumerate(pairs) if step > 0]
        if reached:
            step, rank = min(reached)
            raise DivergedError(
                f"the training loss is not finite (nan or inf) on rank {rank} for {self.limit} step(s) in a row, up "
                f"to step {step} (trainer.max_nonfinite_steps={self.limit}): training diverged. Lower optim.lr (or "
                "optim.sparse_lr), clip the gradients (optim.clip_grad_norm); the checkpoints saved "
                "before it are kept."
            )
        return not any(latest for _, latest in pairs)

    def at_the_end(self, step: int) -> str:
        """The error of a run whose last step's loss was not finite (on some rank)."""
        return (
            f"the training loss of the last step, {step}, is not finite (nan or inf) on some rank: training "
            "diverged and its model is not saved. Lower optim.lr (or optim.sparse_lr), clip the gradients "
            "(optim.clip_grad_norm); the checkpoints saved before it are kept."
        )

    def latest_finite(self, device: torch.device) -> bool:
        """Collective: whether every rank's latest loss was finite (raises as judge does)."""
        slots = self.slots(device)
        if dist.is_initialized():
            dist.all_reduce(slots)
        return self.judge(slots)
