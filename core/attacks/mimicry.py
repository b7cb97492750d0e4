"""Output mimicry: a stronger adaptive attacker that copies the continuous outputs of a benign target."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ._checks import non_negative, positive_int
from .base import Attack, register_attack
from .bpda import Transform, attacker_view, resolve_transform, straight_through, transform_name
from .pgd import pgd_minimise, random_start

RandomTransform = Callable[[Tensor, torch.Generator], Tensor]


@register_attack("mimicry")
class OutputMimicry(Attack):
    """Minimises ||f(x') - f_target||² + lambda3·||f(t(x')) - f(x')||²
    + lambda_eot·mean_j ||f(T_j(x')) - f_target||² by signed-gradient PGD in an L_inf ball.

    ``targets``: (n, K) continuous outputs f_target in [-1, 1] of benign images of another class.
    Copying a benign output (not a ±1 code) keeps C2 (quantization loss) benign-looking and lands
    h(x') among the target's neighbours (C1); the lambda3 term keeps the blur response consistent
    (C3). EOT (``eot_transform(x, generator) -> x``, a random transform family) averages
    ``eot_samples`` draws per step, drawn from the run's seeded generator.

    transform / bpda: as `AdaptiveWhiteBox` (t defaults to the 3x3 mean blur; BPDA when the
    transform has no useful gradient or when forced). With bpda=True the EOT transforms are also
    differentiated straight-through. Defaults: eps = 32/255, step 1/255, 100 steps, lambda3 = 0,
    no EOT.

    Success: Hamming(h(x'), sign(f_target)) <= threshold_bits, default K/8.
    """

    targeted = True
    norm = "linf"
    default_eps = 32.0
    target_kind = "outputs"
    default_threshold_frac = 0.125

    def __init__(
        self,
        *,
        steps: int = 100,
        step_size: float = 1.0,
        random_start: bool = False,
        lambda3: float = 0.0,
        transform: str | Transform | None = None,
        bpda: bool | None = None,
        eot_transform: RandomTransform | None = None,
        eot_samples: int = 4,
        lambda_eot: float = 1.0,
        threshold_bits: float | None = None,
    ) -> None:
        super().__init__(threshold_bits=threshold_bits)
        self.steps = positive_int("steps", steps)
        self.step_size = non_negative("step_size", step_size)
        self.random_start = bool(random_start)
        self.lambda3 = non_negative("lambda3", lambda3)
        self.transform = resolve_transform(transform)
        self.bpda = bpda
        if eot_transform is not None and not callable(eot_transform):
            raise TypeError("eot_transform must be a callable (x, generator) -> x")
        self.eot_transform = eot_transform
        self.eot_samples = positive_int("eot_samples", eot_samples)
        self.lambda_eot = non_negative("lambda_eot", lambda_eot)
        self.hyperparams.update(
            steps=self.steps,
            step_size=self.step_size,
            random_start=self.random_start,
            lambda3=self.lambda3,
            transform=transform_name(transform),
            bpda=bpda,
            eot_transform=None if eot_transform is None else transform_name(eot_transform),
            eot_samples=self.eot_samples if eot_transform is not None else 0,
            lambda_eot=self.lambda_eot if eot_transform is not None else 0.0,
        )

    def _eot_view(self, x: Tensor, generator: torch.Generator) -> Callable[[Tensor], Tensor] | None:
        """The EOT family as the attacker differentiates it (a fresh draw per call)."""
        eot = self.eot_transform
        if eot is None:
            return None

        def draw(z: Tensor) -> Tensor:
            return eot(z, generator)

        if self.bpda is True:
            return straight_through(draw)
        probe_gen = torch.Generator(device=x.device).manual_seed(0)  # probing leaves the run's stream alone
        _, needs_bpda = attacker_view(lambda z: eot(z, probe_gen), self.bpda, x)
        return straight_through(draw) if needs_bpda else draw

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
        t = None
        if self.lambda3 > 0:
            t, used_bpda = attacker_view(self.transform, self.bpda, x)
            self._run_notes["bpda_used"] = used_bpda
        eot = self._eot_view(x, generator)
        start = random_start(x, eps, generator) if self.random_start else None

        def loss(x_adv: Tensor) -> Tensor:
            batch = [x_adv]
            if t is not None:
                batch.append(t(x_adv))
            if eot is not None:
                batch.extend(eot(x_adv) for _ in range(self.eot_samples))
            out = model(torch.cat(batch)).split(n)
            f = out[0]
            total = (f - targets).pow(2).sum(1)
            if t is not None:
                total = total + self.lambda3 * (out[1] - f).pow(2).sum(1)
            if eot is not None:
                draws = torch.stack(out[1 + (t is not None) :])
                total = total + self.lambda_eot * (draws - targets).pow(2).sum(2).mean(0)
            return total

        return pgd_minimise(loss, x, eps=eps, step_size=self.step_size / 255.0, steps=self.steps, start=start)
