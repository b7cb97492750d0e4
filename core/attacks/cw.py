"""Untargeted Carlini-Wagner L2 attack (CW [10]) adapted to hashing: flip every bit past zero."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import non_negative, positive_int
from .base import Attack, project_linf, register_attack
from .success import hamming, sign_codes


@register_attack("cw")
class CWUntargeted(Attack):
    """Minimises ||x' - x||_2^2 + c · Σ_k max(f_k(x')·h_k(x) + kappa, 0) over x' = (tanh(w) + 1)/2.

    The hinge pushes each output f_k past zero, away from its clean bit h_k(x); kappa is the margin.
    Adam with learning rate ``lr`` runs ``steps`` steps on w (paper §4.1: lr 0.01, 500 steps).
    With ``binary_search_steps`` > 1 the constant c is searched per sample as in CW (halved
    towards the last success, x10 while none). This is an L2 attack: ``eps`` defaults to None
    (no L_inf bound); an eps given to `run` additionally clips x' to that L_inf ball.

    Of every iterate that succeeds, the one with the lowest ||x' - x||_2 is returned per sample;
    samples that never succeed return the last iterate. Success: Hamming(h(x'), h(x)) >=
    threshold_bits, default K/2, as for the untargeted PGD. ``AttackResult.l2``/``linf`` report
    the distortion.
    """

    targeted = False
    norm = "l2"
    default_eps = None
    default_threshold_frac = 0.5

    def __init__(
        self,
        *,
        steps: int = 500,
        lr: float = 0.01,
        c: float = 5.0,
        kappa: float = 0.0,
        binary_search_steps: int = 1,
        threshold_bits: float | None = None,
    ) -> None:
        super().__init__(threshold_bits=threshold_bits)
        self.steps = positive_int("steps", steps)
        self.lr = non_negative("lr", lr)
        self.c = non_negative("c", c)
        self.kappa = non_negative("kappa", kappa)
        self.binary_search_steps = positive_int("binary_search_steps", binary_search_steps)
        self.hyperparams.update(
            steps=self.steps, lr=self.lr, c=self.c, kappa=self.kappa, binary_search_steps=self.binary_search_steps
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
        n = x.shape[0]
        threshold = self.threshold_for(source_codes.shape[1])
        w0 = torch.atanh((2.0 * x - 1.0).clamp(-1.0 + 1e-6, 1.0 - 1e-6))
        c = torch.full((n,), self.c, dtype=x.dtype, device=x.device)
        lo = torch.zeros_like(c)
        hi = torch.full_like(c, math.inf)
        best_adv = x.clone()
        best_dist = torch.full_like(c, math.inf)
        last_adv = x.clone()

        for _ in range(self.binary_search_steps):
            w = w0.clone().requires_grad_(True)
            optimiser = torch.optim.Adam([w], lr=self.lr)
            found = torch.zeros(n, dtype=torch.bool, device=x.device)
            for _ in range(self.steps):
                x_adv = (torch.tanh(w) + 1.0) / 2.0
                if eps is not None:
                    x_adv = project_linf(x_adv, x, eps)
                f = model(x_adv)
                dist = (x_adv - x).pow(2).flatten(1).sum(1)
                hinge = F.relu(f * source_codes + self.kappa).sum(1)
                loss = (dist + c * hinge).sum()
                optimiser.zero_grad(set_to_none=True)
                (w.grad,) = torch.autograd.grad(loss, w)
                optimiser.step()
                with torch.no_grad():
                    ok = hamming(sign_codes(f), source_codes) >= threshold
                    better = ok & (dist < best_dist)
                    best_dist = torch.where(better, dist, best_dist)
                    best_adv[better] = x_adv.detach()[better]
                    found |= ok
                    last_adv = x_adv.detach()
            # Per-sample binary search on c (CW): tighten towards the smallest c that succeeds.
            hi = torch.where(found, torch.minimum(hi, c), hi)
            lo = torch.where(found, lo, torch.maximum(lo, c))
            c = torch.where(torch.isfinite(hi), (lo + hi) / 2.0, c * 10.0)

        succeeded = torch.isfinite(best_dist)
        self._run_notes["c_final_mean"] = float(c.mean())
        return torch.where(succeeded.view(-1, 1, 1, 1), best_adv, last_adv)
