"""The signed-gradient L_inf PGD loop shared by the L_inf attacks."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from torch import nn

from ._checks import non_negative, positive_int
from .base import Attack, project_linf


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


class LinfPGDAttack(Attack):
    """An L_inf signed-gradient PGD attack whose subclasses only define the per-sample loss.

    Hyper-parameters: ``steps``, ``step_size`` (1/255 units), ``random_start`` (U(-eps, eps)),
    ``threshold_bits`` (the success rule of the subclass).
    """

    norm = "linf"

    def __init__(
        self,
        *,
        steps: int = 100,
        step_size: float = 1.0,
        random_start: bool = False,
        threshold_bits: float | None = None,
    ) -> None:
        super().__init__(threshold_bits=threshold_bits)
        self.steps = positive_int("steps", steps)
        self.step_size = non_negative("step_size", step_size)
        self.random_start = bool(random_start)
        self.hyperparams.update(steps=self.steps, step_size=self.step_size, random_start=self.random_start)

    def pgd_loss(self, model: nn.Module, source_codes: Tensor, targets: Tensor | None) -> Callable[[Tensor], Tensor]:
        """The per-sample loss x' (n, 3, H, W) -> (n,) that the steps minimise."""
        raise NotImplementedError

    def _perturb(
        self,
        model: nn.Module,
        x: Tensor,
        *,
        source_codes: Tensor,
        targets: Tensor | None,
        eps: float | None,
        generator: torch.Generator,
    ) -> Tensor:
        assert eps is not None
        start = random_start(x, eps, generator) if self.random_start else None
        loss = self.pgd_loss(model, source_codes, targets)
        return pgd_minimise(loss, x, eps=eps, step_size=self.step_size / 255.0, steps=self.steps, start=start)
