"""Untargeted hashing PGD (Yang et al. [46]): push h(x') away from h(x) under an L_inf budget."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import non_negative, positive_int
from .base import Attack, register_attack
from .pgd import pgd_minimise, random_start


@register_attack("pgd_untargeted")
class PGDUntargeted(Attack):
    """Maximises D_h(h(x'), h(x)) s.t. ||x' - x||_inf <= eps (paper Eq. 4).

    The non-differentiable Hamming distance is relaxed through tanh: each step minimises the
    inner product f(x')·h(x), i.e. maximises the continuous Hamming distance (K - f(x')·h(x))/2.
    Budget (paper §4.1): eps = 8/255, step 1/255, 100 steps; ``random_start`` adds U(-eps, eps).

    Success: Hamming(h(x'), h(x)) >= threshold_bits, default K/2 — the code is at least as far
    from its origin as an unrelated code (CSQ hash centres of different classes are ~K/2 apart).
    """

    targeted = False
    norm = "linf"
    default_eps = 8.0
    default_threshold_frac = 0.5

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

        def loss(x_adv: Tensor) -> Tensor:
            return (model(x_adv) * source_codes).sum(1)

        return pgd_minimise(loss, x, eps=eps, step_size=self.step_size / 255.0, steps=self.steps, start=start)
