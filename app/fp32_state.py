"""fp16 tables the plan replicates, stepped with their optimizer state and arithmetic in fp32.

A replicated (data_parallel) table is stepped by a torch optimizer, which keeps its state in the
parameter's dtype: for an fp16 table, Adagrad's sum of squared gradients in fp16, where eps (1e-8)
rounds to 0 and a squared small gradient to 0, so a row with no gradient yet divides 0 by 0 and
the table turns NaN. FBGEMM, which steps the same table when it is sharded, keeps that state in
fp32 and writes only the weights back in fp16. `Fp32StateOptimizer` does the same for the
replicated form: the torch optimizer runs on fp32 working copies of the fp16 weights, refreshed
from them before every step (so they are no master weights: the fp16 weights stay the model, as
in the sharded form, and a checkpoint moves between the two forms unchanged), and its state is
fp32. Its state dict has the names and shapes the plain optimizer's has.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch


class Fp32StateOptimizer(torch.optim.Optimizer):
    """`optimizer_class(**kwargs)` over fp32 copies of `params`, its state (fp32) keyed by
    `params` themselves; each step copies the weights and gradients in and the weights back."""

    def __init__(
        self, params: Iterable[torch.Tensor], optimizer_class: Callable[..., torch.optim.Optimizer], **kwargs: Any
    ) -> None:
        params = list(params)
        # .float() of an fp32 parameter is the parameter itself: copies only where needed.
        self._working: dict[torch.Tensor, torch.Tensor] = {p: p.detach().float() for p in params}
        self.inner = optimizer_class(list(self._working.values()), **kwargs)
        super().__init__(params, self.inner.defaults)
        # The same dicts as the inner optimizer's, which creates and fills them in place.
        self.state = defaultdict(dict, {p: self.inner.state[w] for p, w in self._working.items()})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for group, inner_group in zip(self.param_groups, self.inner.param_groups):
            inner_group.update({key: value for key, value in group.items() if key != "params"})  # the LR schedule
        for param, work in self._working.items():
            if work is not param:
                work.copy_(param)  # the weights as they are now (loaded, averaged)
                work.grad = None if param.grad is None else param.grad.float()
        loss = self.inner.step(closure)
        for param, work in self._working.items():
            if work is not param:
                if work.grad is not None:
                    param.copy_(work)
                work.grad = None
        return loss


def fp32_state_factory(
    optimizer_class: Callable[..., torch.optim.Optimizer], **kwargs: Any
) -> Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer]:
    """An optimizer factory (torchrec's KeyedOptimizerWrapper takes one) that keeps fp16
    parameters' state in fp32 and steps fp32 ones with the plain optimizer."""

    def build(params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
        params = list(params)
        if any(p.dtype == torch.float16 for p in params):
            return Fp32StateOptimizer(params, optimizer_class, **kwargs)
        return optimizer_class(params, **kwargs)

    return build
