"""The signed-gradient L_inf PGD loop shared by the L_inf attacks."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .base import project_linf


def random_start(x: Tensor, eps: float, generator: torch.Generator) -> Tensor:
    """x + U(-eps, eps) noise, clamped to [0, 1]. x: (n, 3, H, W); eps in [0, 1] pixel units."""
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return project_linf(x + (2.0 * noise - 1.0) * eps, x, eps)


def pgd_minimise(
    loss_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    start: Tensor | None = None,
) -> Tensor:
    """Minimises ``loss_fn`` by signed-gradient steps inside the L_inf ball around x.

    loss_fn: x' (n, 3, H, W) -> (n,) per-sample losses (summed for the gradient, so samples do
        not interact). x: (n, 3, H, W) in [0, 1], left untouched. eps, step_size: [0, 1] pixel
        units. start: the initial x' (default x). Returns the last iterate x' (detached), with
        ||x' - x||_inf <= eps and x' in [0, 1].
    """
    x_adv = (x if start is None else start).detach().clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = loss_fn(x_adv).sum()
        (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            x_adv = project_linf(x_adv - step_size * grad.sign(), x, eps)
    return x_adv.detach()
