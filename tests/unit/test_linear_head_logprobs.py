"""The fused linear head (``whetstone_ml.logprobs.linear_target_logprobs``): values equal
``log_softmax(h Wᵀ + h Aᵀ Bᵀ).gather`` in float64, its hand-written backward passes
``gradcheck`` (hidden states, the LoRA factors; several targets per row, repeated ones among
them), and block sizes do not change the result."""

from __future__ import annotations

import pytest
import torch

from whetstone_ml.logprobs import linear_target_logprobs


def inputs(rows: int, k: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(11, 6, generator=gen, dtype=torch.float64)
    a = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(11, 3, generator=gen, dtype=torch.float64) * 0.3
    targets = torch.randint(0, 11, (rows, k), generator=gen)
    targets[0, -1] = targets[0, 0]  # a repeated target id in one row
    return h, w, a, b, targets


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_values_equal_full_log_softmax(k: int, chunk: int) -> None:
    h, w, a, b, targets = inputs(9, k, seed=k)
    want = torch.log_softmax(h @ w.T + (h @ a.T) @ b.T, -1).gather(-1, targets)
    got = linear_target_logprobs(h, w, targets, (a, b), chunk_tokens=chunk)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    base = torch.log_softmax(h @ w.T, -1).gather(-1, targets)
    torch.testing.assert_close(linear_target_logprobs(h, w, targets, None, chunk), base)
    assert not torch.allclose(got, base)  # the LoRA term matters


@pytest.mark.parametrize("with_lora", [False, True])
def test_backward_passes_gradcheck(with_lora: bool) -> None:
    h, w, a, b, targets = inputs(7, 3, seed=5)
    h.requires_grad_()
    a.requires_grad_(with_lora)
    b.requires_grad_(with_lora)

    def fn(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return linear_target_logprobs(h, w, targets, (a, b) if with_lora else None, 3)

    assert torch.autograd.gradcheck(fn, (h, a, b))


def test_gradients_equal_autograd_of_the_reference() -> None:
    h, w, a, b, targets = inputs(10, 2, seed=8)
    g = torch.randn(10, 2, dtype=torch.float64)
    grads = []
    for fused in (True, False):
        leaves = [t.clone().requires_grad_() for t in (h, a, b)]
        hh, aa, bb = leaves
        if fused:
            lp = linear_target_logprobs(hh, w, targets, (aa, bb), chunk_tokens=4)
        else:
            lp = torch.log_softmax(hh @ w.T + (hh @ aa.T) @ bb.T, -1).gather(-1, targets)
        (lp * g).sum().backward()
        grads.append([t.grad for t in leaves])
    for x, y in zip(*grads, strict=True):
        assert x is not None and y is not None
        torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-10)
