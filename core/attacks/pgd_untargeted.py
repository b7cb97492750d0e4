"""Untargeted hashing PGD (Yang et al. [46]): push h(x') away from h(x) under an L_inf budget."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import register_attack
from .pgd import LinfPGDAttack


@register_attack("pgd_untargeted")
class PGDUntargeted(LinfPGDAttack):
    """Maximises D_h(h(x'), h(x)) s.t. ||x' - x||_inf <= eps (paper Eq. 4).

    The non-differentiable Hamming distance is relaxed through tanh: each step minimises the
    inner product f(x')·h(x), i.e. maximises the continuous Hamming distance (K - f(x')·h(x))/2.
    Budget (paper §4.1): eps = 8/255, step 1/255, 100 steps; ``random_start`` adds U(-eps, eps).

    Success: Hamming(h(x'), h(x)) >= threshold_bits, default K/2 — the code is at least as far
    from its origin as an unrelated code (CSQ hash centres of different classes are ~K/2 apart).
    """

    targeted = False
    default_eps = 8.0
    default_threshold_frac = 0.5

    def pgd_loss(self, model: nn.Module, source_codes: Tensor, targets: Tensor | None):
        def loss(x_adv: Tensor) -> Tensor:
            return (model(x_adv) * source_codes).sum(1)

        return loss
