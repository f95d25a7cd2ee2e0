"""torch.compile sees one registered op per attention call: no graph breaks, forward and backward run.

Runs on ``NOFLASH_TEST_DEVICE`` (default cpu); inductor is skipped on MPS, where torch's support is partial.
"""

from __future__ import annotations

import pytest
import torch

import noflash_core as nc
from tests.support.device import DEVICE
from tests.support.reference import math_sdpa
from tests.support.training import adam_losses, assert_same_training


class _Attention(torch.nn.Module):
    def __init__(self, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = nc.scaled_dot_product_attention(q, k, v, is_causal=True, tier=2, block_m=64, block_n=64)
        return self.out(a.transpose(1, 2).reshape(b, n, d))


def _graph_breaks(model, x) -> int:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    return explanation.graph_break_count


def _model_and_input(*shape, grad=False):
    return _Attention().to(DEVICE), torch.randn(*shape).to(DEVICE).requires_grad_(grad)


def test_no_graph_break_from_our_op():
    model, x = _model_and_input(1, 256, 32)
    assert _graph_breaks(model, x) == 0


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_forward_backward_matches_eager(backend):
    if backend == "inductor" and DEVICE.type == "mps":
        pytest.skip("inductor's MPS support is partial")
    torch.manual_seed(0)
    model, x = _model_and_input(1, 256, 32, grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out = compiled(x)
    out.square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    x2 = x.detach().requires_grad_()
    ref = model(x2)
    ref.square().mean().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-5)


def test_compiled_matches_math():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 128, 16).to(DEVICE) for _ in range(3))
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: nc.scaled_dot_product_attention(q, k, v, tier=1, block_m=32),
                       backend="aot_eager", fullgraph=True)
    assert torch.allclose(fn(q, k, v), math_sdpa(q, k, v), atol=1e-5)


def test_compiled_model_trains_like_eager():
    def train(compile_model: bool):
        torch.manual_seed(0)
        model, x = _model_and_input(2, 256, 32)
        step_model = torch.compile(model, backend="aot_eager", fullgraph=True) if compile_model else model
        target = torch.randn(2, 256, 32).to(DEVICE)
        return adam_losses(step_model, model.parameters(), x, target, steps=4, lr=1e-2)

    torch._dynamo.reset()
    assert_same_training(train(True), train(False))
