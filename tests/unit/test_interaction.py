"""The dot interaction with its own backward gives torchrec's values and gradients."""

from __future__ import annotations

import torch
from torchrec.models.dlrm import InteractionArch

from app.models.interaction import DotInteraction


def _inputs(batch=64, features=7, dim=8):
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(batch, dim, generator=generator, requires_grad=True)
    sparse = torch.randn(batch, features, dim, generator=generator, requires_grad=True)
    grad = torch.randn(batch, dim + (features + 1) * features // 2, generator=generator)
    return dense, sparse, grad


def _run(module, dense, sparse, grad):
    dense.grad = sparse.grad = None
    out = module(dense, sparse)
    out.float().backward(grad)
    return out.detach().float(), dense.grad.clone(), sparse.grad.clone()


def test_values_and_gradients_are_torchrecs():
    dense, sparse, grad = _inputs()
    expected = _run(InteractionArch(7), dense, sparse, grad)
    actual = _run(DotInteraction(7), dense, sparse, grad)
    for want, got in zip(expected, actual):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_under_bf16_autocast_it_computes_in_bf16_close_to_fp32():
    dense, sparse, grad = _inputs()
    expected = _run(InteractionArch(7), dense, sparse, grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = DotInteraction(7)(dense, sparse)
    assert out.dtype == torch.bfloat16
    actual = _run(lambda d, s: DotInteraction(7)(d.bfloat16(), s.bfloat16()), dense, sparse, grad)
    for want, got in zip(expected, actual):
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.1)
