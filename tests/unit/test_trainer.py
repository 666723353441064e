"""The training loop's own bookkeeping (the loop itself runs in tests/integration)."""

from __future__ import annotations

import torch

from app.trainer import _Window


def test_the_loss_window_keeps_its_totals_on_the_device_of_the_losses():
    # Meta stands in for CUDA: it refuses CPU tensors beside its own, as CUDA does in stack/cat.
    window = _Window(start=0.0)
    for loss in (0.5, 0.25):
        window.add(torch.tensor(loss, device="meta"))
    totals = window.totals()
    assert totals.device.type == "meta" and totals.shape == (2,)
    window = _Window(start=0.0)
    window.add(torch.tensor(0.5))
    window.add(torch.tensor(0.25))
    assert window.totals().tolist() == [0.75, 2.0]
    assert window.mean_loss() == 0.375
