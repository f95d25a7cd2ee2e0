"""A few optimizer steps on a small model, for the tests that check training through noflash matches torch."""

from __future__ import annotations

from typing import Callable, Iterable, List

import torch

__all__ = ["adam_losses", "assert_same_training"]


def adam_losses(forward: Callable[[torch.Tensor], torch.Tensor], params: Iterable[torch.nn.Parameter],
                x: torch.Tensor, target: torch.Tensor, steps: int, lr: float) -> List[float]:
    """``steps`` Adam steps on ``mse_loss(forward(x), target)``; returns the loss before each step."""
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(forward(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_same_training(ours: List[float], theirs: List[float], rel: float = 1e-5) -> None:
    """The loss falls, and every step's loss matches the reference run's within ``rel``."""
    assert ours[-1] < ours[0], ours
    for a, b in zip(ours, theirs):
        assert abs(a - b) <= rel * abs(b), (ours, theirs)
