"""Consistent mimicry: a targeted attack that stays on target under a set of transforms, random draws (EOT) and defense penalties."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ._checks import non_negative, positive_int
from .base import Attack, project_linf, register_attack
from .bpda import Transform, attacker_view, resolve_transform, straight_through, transform_name
from .pgd import random_start
from .success import sign_codes

RandomTransform = Callable[[Tensor, torch.Generator], Tensor]
#: a defense-aware penalty: (model, x' (n, 3, H, W), target outputs (n, K)) -> (n,) differentiable in x'
Penalty = Callable[[nn.Module, Tensor, Tensor], Tensor]

LOSSES = ("hinge", "mse")


def positive(name: str, value: float) -> float:
    """``value`` as a float, raising ValueError unless it is > 0."""
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


def pre_activations(model: nn.Module, x: Tensor) -> Tensor:
    """The hash layer's pre-tanh outputs z (n, K), f(x) = tanh(z).

    For a CSQ-style model (``backbone`` + ``hash_layer``) z is computed directly, so gradients do not
    vanish where tanh saturates; any other model falls back to atanh(f) clamped to |f| <= 1 - 1e-6.
    """
    backbone, hash_layer = getattr(model, "backbone", None), getattr(model, "hash_layer", None)
    if isinstance(backbone, nn.Module) and isinstance(hash_layer, nn.Module):
        return hash_layer(backbone(x))
    f = model(x)
    return torch.atanh(f.clamp(-1 + 1e-6, 1 - 1e-6))


def pre_activations_with_features(model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """(pre-tanh outputs z (n, K), [backbone stage activations]) in one pass of a CSQ-style model."""
    backbone, hash_layer = getattr(model, "backbone", None), getattr(model, "hash_layer", None)
    if not (isinstance(hash_layer, nn.Module) and hasattr(backbone, "forward_features")):
        raise TypeError("feature terms need a CSQ-style model (backbone.forward_features and hash_layer)")
    feats, stages = backbone.forward_features(x)
    return hash_layer(feats), stages


def hinge_to_code(z: Tensor, code: Tensor, margin: float) -> Tensor:
    """sum_k relu(margin - code_k * z_k): (n,) — zero once every pre-activation is past the margin on the code's side.

    z: (n, K) pre-activations; code: (n, K) ±1; margin in pre-activation units (f = tanh(z)).
    """
    return torch.relu(margin - code * z).sum(-1)


@register_attack("consistent_mimicry")
class ConsistentMimicry(Attack):
    """Targeted mimicry of a benign output that stays on target under every transform the defense may apply.

    Per sample it minimises, by signed-gradient PGD in an L_inf ball (cosine-decayed step, the best
    iterate kept),

        L(x') = D(x') + lambda_t · sum_j D(t_j(x')) + lambda_eot · mean_s D(T_s(x'))
                + lambda_c3 · [sum_j r_j(C3(x', t_j(x'))) + mean_s r(C3(x', T_s(x')))] + lambda_penalty · P(x')

    where D is either ``"hinge"``: sum_k relu(margin - h_t,k · z_k(·)) on the pre-tanh outputs z
    (`pre_activations`; no vanishing gradient where tanh saturates), or ``"mse"``: ||f(·) - f_target||²
    (the plain output mimicry). h_t = sign(f_target). t_j are fixed transforms (names or callables,
    BPDA where they have no gradient, as `AdaptiveWhiteBox`); T_s are ``eot_samples`` fresh draws per
    step of a random family ``eot_transform(x, generator)`` (expectation over transformation, drawn
    from the run's seeded generator: the attacker knows the family, not the defense's draws);
    P is an optional defense-aware penalty ``penalty(model, x', f_target) -> (n,)``. The C3 terms are
    threshold-aware (the white-box attacker knows the calibrated thresholds): with
    C3(a, b) = (K - f(a)·f(b))/2 and tau_j the threshold of the C3 criterion under t_j
    (``c3_thresholds``, one per transform; ``eot_c3_threshold`` for the random family),
    r_j(c) = relu(c - kappa·tau_j)/tau_j stops pulling once C3 is safely below its threshold.
    They reuse the outputs of the views' pass (no extra forward pass). ``feature_terms`` adds the
    same threshold-aware term on intermediate features: each (stage s, view j, tau) penalises
    relu(||φ_s(x') - φ_s(v_j(x'))|| - kappa·tau)/tau, φ_s the pooled, normalised activations of
    backbone stage s (`core.extensions.pooled_features`), v_j the j-th fixed transform or, for
    j = -1, the EOT draws (averaged); weight ``lambda_feat``. The features come from the same pass.

    Landing every view of x' on the target code makes C1 benign (x' retrieves the target's
    neighbours), keeps C3 small under each t_j / T_s, and with ``"hinge"`` stops pushing once the
    margin is met, so f(x') is no more saturated than a benign output (C2).

    ``targets``: (n, K) continuous outputs f_target in [-1, 1] of benign images of another class.
    Success: Hamming(h(x'), sign(f_target)) <= threshold_bits, default K/8.
    """

    targeted = True
    norm = "linf"
    default_eps = 8.0
    target_kind = "outputs"
    default_threshold_frac = 0.125

    def __init__(
        self,
        *,
        steps: int = 100,
        step_size: float = 1.0,
        schedule: str = "cosine",
        random_start: bool = False,
        loss: str = "hinge",
        margin: float = 4.0,
        transforms: Sequence[str | Transform] = (),
        lambda_t: float = 1.0,
        bpda: bool | None = None,
        eot_transform: RandomTransform | None = None,
        eot_samples: int = 10,
        lambda_eot: float = 1.0,
        penalty: Penalty | None = None,
        lambda_penalty: float = 1.0,
        c3_thresholds: Sequence[float] | None = None,
        eot_c3_threshold: float | None = None,
        lambda_c3: float = 1.0,
        feature_terms: Sequence[tuple[int, int, float]] = (),
        lambda_feat: float = 1.0,
        kappa: float = 0.8,
        threshold_bits: float | None = None,
    ) -> None:
        super().__init__(threshold_bits=threshold_bits)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
        if eot_transform is not None and not callable(eot_transform):
            raise TypeError("eot_transform must be a callable (x, generator) -> x")
        if penalty is not None and not callable(penalty):
            raise TypeError("penalty must be a callable (model, x, target_outputs) -> (n,)")
        self.steps = positive_int("steps", steps)
        self.step_size = non_negative("step_size", step_size)
        self.schedule = schedule
        self.random_start = bool(random_start)
        self.loss = loss
        self.margin = non_negative("margin", margin)
        self.transforms = [resolve_transform(t) for t in transforms]
        self.lambda_t = non_negative("lambda_t", lambda_t)
        self.bpda = bpda
        self.eot_transform = eot_transform
        self.eot_samples = positive_int("eot_samples", eot_samples)
        self.lambda_eot = non_negative("lambda_eot", lambda_eot)
        self.penalty = penalty
        self.lambda_penalty = non_negative("lambda_penalty", lambda_penalty)
        if c3_thresholds is not None and len(c3_thresholds) != len(self.transforms):
            raise ValueError(f"c3_thresholds needs one threshold per transform ({len(self.transforms)}), got {len(c3_thresholds)}")
        self.c3_thresholds = None if c3_thresholds is None else [positive("c3_thresholds", v) for v in c3_thresholds]
        if eot_c3_threshold is not None and eot_transform is None:
            raise ValueError("eot_c3_threshold needs an eot_transform")
        self.eot_c3_threshold = None if eot_c3_threshold is None else positive("eot_c3_threshold", eot_c3_threshold)
        self.lambda_c3 = non_negative("lambda_c3", lambda_c3)
        self.feature_terms = [(int(st), int(j), positive("feature_terms tau", tau)) for st, j, tau in feature_terms]
        for st, j, _ in self.feature_terms:
            if st < 0 or not -1 <= j < len(self.transforms) or (j == -1 and eot_transform is None):
                raise ValueError(f"feature term (stage {st}, view {j}) needs stage >= 0 and a fixed view index or -1 with EOT")
        self.lambda_feat = non_negative("lambda_feat", lambda_feat)
        self.kappa = non_negative("kappa", kappa)
        self.hyperparams.update(
            steps=self.steps,
            step_size=self.step_size,
            schedule=schedule,
            random_start=self.random_start,
            loss=loss,
            margin=self.margin,
            transforms=[transform_name(t) for t in transforms],
            lambda_t=self.lambda_t if transforms else 0.0,
            bpda=bpda,
            eot_transform=None if eot_transform is None else transform_name(eot_transform),
            eot_samples=self.eot_samples if eot_transform is not None else 0,
            lambda_eot=self.lambda_eot if eot_transform is not None else 0.0,
            penalty=None if penalty is None else transform_name(penalty),
            lambda_penalty=self.lambda_penalty if penalty is not None else 0.0,
            c3_thresholds=self.c3_thresholds,
            eot_c3_threshold=self.eot_c3_threshold,
            lambda_c3=self.lambda_c3 if (self.c3_thresholds or self.eot_c3_threshold) else 0.0,
            feature_terms=[list(t) for t in self.feature_terms],
            lambda_feat=self.lambda_feat if self.feature_terms else 0.0,
            kappa=self.kappa,
        )

    # ------------------------------------------------------------------ views

    def _fixed_views(self, x: Tensor) -> list[Transform]:
        views, used = [], []
        for t in self.transforms:
            view, bpda = attacker_view(t, self.bpda, x)
            views.append(view)
            used.append(bpda)
        if self.transforms:
            self._run_notes["bpda_used"] = used
        return views

    def _eot_view(self, x: Tensor, generator: torch.Generator) -> Callable[[Tensor], Tensor] | None:
        eot = self.eot_transform
        if eot is None:
            return None

        def draw(z: Tensor) -> Tensor:
            return eot(z, generator)

        if self.bpda is True:
            self._run_notes["eot_bpda"] = True
            return straight_through(draw)
        probe = torch.Generator(device=x.device).manual_seed(0)  # probing leaves the run's stream alone
        _, needs = attacker_view(lambda z: eot(z, probe), self.bpda, x)
        self._run_notes["eot_bpda"] = needs
        return straight_through(draw) if needs else draw

    # ------------------------------------------------------------------ attack

    def _distance(
        self, model: nn.Module, batch: Tensor, target: Tensor, code: Tensor, n: int
    ) -> tuple[Tensor, Tensor, list[Tensor] | None]:
        """((views, n) distance of each view's output to the target, (views, n, K) outputs f,
        pooled stage features [(views, n, D_s)] when feature terms need them, else None)."""
        feats = None
        if self.feature_terms:
            from core.extensions import pooled_features

            z, stages = pre_activations_with_features(model, batch)
            feats = [a.view(-1, n, a.shape[-1]) for a in pooled_features(stages)]
            if self.loss == "mse":
                f = torch.tanh(z).view(-1, n, target.shape[1])
                return (f - target.unsqueeze(0)).pow(2).sum(-1), f, feats
            z = z.view(-1, n, target.shape[1])
            return hinge_to_code(z, code.unsqueeze(0), self.margin), torch.tanh(z), feats
        if self.loss == "hinge":
            z = pre_activations(model, batch).view(-1, n, target.shape[1])
            return hinge_to_code(z, code.unsqueeze(0), self.margin), torch.tanh(z), None
        f = model(batch).view(-1, n, target.shape[1])
        return (f - target.unsqueeze(0)).pow(2).sum(-1), f, None

    def _c3_excess(self, f0: Tensor, fv: Tensor, tau: float) -> Tensor:
        """relu(C3 - kappa·tau)/tau per view and sample: f0 (n, K), fv (v, n, K) -> (v, n)."""
        c3 = 0.5 * (f0.shape[-1] - (f0.unsqueeze(0) * fv).sum(-1))
        return torch.relu(c3 - self.kappa * tau) / tau

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
        code = sign_codes(targets)
        fixed = self._fixed_views(x)
        eot = self._eot_view(x, generator)

        def loss_fn(x_adv: Tensor) -> Tensor:
            batch = [x_adv] + [t(x_adv) for t in fixed]
            if eot is not None:
                batch.extend(eot(x_adv) for _ in range(self.eot_samples))
            d, f, feats = self._distance(model, torch.cat(batch), targets, code, n)
            k = 1 + len(fixed)
            total = d[0]
            if fixed:
                total = total + self.lambda_t * d[1:k].sum(0)
            if eot is not None:
                total = total + self.lambda_eot * d[k:].mean(0)
            if self.c3_thresholds is not None:
                for j, tau in enumerate(self.c3_thresholds):
                    total = total + self.lambda_c3 * self._c3_excess(f[0], f[1 + j : 2 + j], tau)[0]
            if self.eot_c3_threshold is not None:
                total = total + self.lambda_c3 * self._c3_excess(f[0], f[k:], self.eot_c3_threshold).mean(0)
            for st, j, tau in self.feature_terms:
                if st >= len(feats):
                    raise ValueError(f"feature term needs stage {st}, the model has {len(feats)} stages")
                views = feats[st][k:] if j == -1 else feats[st][1 + j : 2 + j]
                dis = (views - feats[st][0].unsqueeze(0)).norm(dim=-1)
                total = total + self.lambda_feat * (torch.relu(dis - self.kappa * tau) / tau).mean(0)
            if self.penalty is not None:
                total = total + self.lambda_penalty * self.penalty(model, x_adv, targets)
            return total

        x_adv = random_start(x, eps, generator) if self.random_start else x.clone()
        best, best_loss = x_adv.clone(), torch.full((n,), math.inf, device=x.device, dtype=x.dtype)
        base = self.step_size / 255.0
        for i in range(self.steps):
            x_adv.requires_grad_(True)
            losses = loss_fn(x_adv)
            (grad,) = torch.autograd.grad(losses.sum(), x_adv)
            with torch.no_grad():
                better = losses.detach() < best_loss
                best[better] = x_adv.detach()[better]
                best_loss = torch.where(better, losses.detach(), best_loss)
                alpha = base if self.schedule == "constant" else base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / self.steps)))
                x_adv = project_linf(x_adv.detach() - alpha * grad.sign(), x, eps)
        with torch.no_grad():
            last = loss_fn(x_adv)
            better = last < best_loss
            best[better] = x_adv[better]
        self._run_notes["final_loss_mean"] = float(torch.minimum(last, best_loss).mean())
        return best.detach()
