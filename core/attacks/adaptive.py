"""The white-box adaptive attack of the paper's Eq. 13, aimed at C1, C2 and C3 together (BPDA-capable)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import non_negative, positive_int
from .base import Attack, register_attack
from .bpda import Transform, attacker_view, resolve_transform, transform_name
from .pgd import pgd_minimise, random_start
from .success import continuous_hamming, sign_codes


def adaptive_loss_terms(
    f: Tensor, f_t: Tensor, target_codes: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The three terms of Eq. 13 per sample, each (n,).

    f: (n, K) outputs f(x'); f_t: (n, K) outputs f(t(x')); target_codes: (n, K) ±1 (h_t).
    L1 = D_h(f(x'), h_t) = (K - f·h_t)/2 (Eq. 10, against C1);
    L2 = -||h(x') - f(x')||_1 with h(x') = sign(f(x')) held constant (Eq. 11, against C2);
    L3 = D_h(f(t(x')), f(x')) = (K - f_t·f)/2 (Eq. 12, against C3).
    """
    l1 = continuous_hamming(f, target_codes)
    l2 = -(sign_codes(f).detach() - f).abs().sum(1)
    l3 = continuous_hamming(f_t, f)
    return l1, l2, l3


@register_attack("adaptive")
class AdaptiveWhiteBox(Attack):
    """Minimises L = L1 + lambda1·L2 + lambda2·L3 (Eq. 13) by signed-gradient PGD in an L_inf ball.

    ``targets``: (n, K) ±1 target codes h_t. x' and t(x') go through the model in one batch.
    Defaults follow the paper's white-box experiments (§4.3, Table 4): eps = 32/255, step 1/255,
    100 steps, lambda1 = 0.0075; lambda2 = 0.3 (one of the two values of Fig. 5).

    transform: t(·) — a callable on (n, 3, H, W), a name, or None for the detector's 3x3 mean
    blur. bpda: True forces BPDA (the transform's backward is the identity, straight-through);
    False demands the transform's true gradient; None (default) uses the true gradient when the
    transform has a non-zero one (the mean blur) and BPDA otherwise (median, bit-depth reduction).
    ``params["bpda_used"]`` records the choice.

    Success: Hamming(h(x'), h_t) <= threshold_bits, default K/8 (as DHTA).
    """

    targeted = True
    norm = "linf"
    default_eps = 32.0
    target_kind = "codes"
    default_threshold_frac = 0.125

    def __init__(
        self,
        *,
        lambda1: float = 0.0075,
        lambda2: float = 0.3,
        steps: int = 100,
        step_size: float = 1.0,
        random_start: bool = False,
        transform: str | Transform | None = None,
        bpda: bool | None = None,
        threshold_bits: float | None = None,
    ) -> None:
        super().__init__(threshold_bits=threshold_bits)
        self.lambda1 = non_negative("lambda1", lambda1)
        self.lambda2 = non_negative("lambda2", lambda2)
        self.steps = positive_int("steps", steps)
        self.step_size = non_negative("step_size", step_size)
        self.random_start = bool(random_start)
        self.transform = resolve_transform(transform)
        self.bpda = bpda
        self.hyperparams.update(
            lambda1=self.lambda1,
            lambda2=self.lambda2,
            steps=self.steps,
            step_size=self.step_size,
            random_start=self.random_start,
            transform=transform_name(transform),
            bpda=bpda,
        )

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
        assert eps is not None and targets is not None
        n = x.shape[0]
        t, used_bpda = attacker_view(self.transform, self.bpda, x)
        self._run_notes["bpda_used"] = used_bpda
        start = random_start(x, eps, generator) if self.random_start else None

        def loss(x_adv: Tensor) -> Tensor:
            out = model(torch.cat([x_adv, t(x_adv)]))
            l1, l2, l3 = adaptive_loss_terms(out[:n], out[n:], targets)
            return l1 + self.lambda1 * l2 + self.lambda2 * l3

        return pgd_minimise(loss, x, eps=eps, step_size=self.step_size / 255.0, steps=self.steps, start=start)
