"""Transforms as an adaptive attacker sees them: the detector's t(·) and BPDA (straight-through) wrapping."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from core.transforms import get_transform, mean_blur

Transform = Callable[[Tensor], Tensor]

DEFAULT_TRANSFORM = "meanblur3"  # the detector's default t(·): 3x3 mean blur, reflect padding

__all__ = [
    "DEFAULT_TRANSFORM",
    "Transform",
    "attacker_view",
    "has_useful_gradient",
    "mean_blur",
    "resolve_transform",
    "straight_through",
    "transform_name",
]


def resolve_transform(transform: str | Transform | None) -> Transform:
    """The transform t(·) as a callable on (n, 3, H, W) tensors.

    None means the detector's default (``meanblur3``); a name is looked up in the detector's
    registry (``core.transforms.get_transform``: meanblur3, median3, bitdepth4, nlm, ...);
    a callable is returned unchanged.
    """
    if callable(transform):
        return transform
    return get_transform(DEFAULT_TRANSFORM if transform is None else str(transform))


def transform_name(transform: str | Transform | None) -> str:
    """A short name for a transform, for ``AttackResult.params``."""
    if transform is None:
        return DEFAULT_TRANSFORM
    if isinstance(transform, str):
        return transform
    return getattr(transform, "name", None) or getattr(transform, "__name__", None) or type(transform).__name__


def straight_through(transform: Transform) -> Transform:
    """BPDA with the identity: forward is t(x), backward treats t as the identity."""

    def st(x: Tensor) -> Tensor:
        return x + (transform(x) - x).detach()

    st.__name__ = f"bpda({transform_name(transform)})"
    return st


def has_useful_gradient(transform: Transform, probe: Tensor) -> bool:
    """True when ``transform`` passes a non-zero gradient back to its input at ``probe``.

    A transform may declare itself with a boolean attribute ``differentiable``; otherwise one
    backward pass through the transform alone (not the model) decides: no graph, or an all-zero
    gradient (rounding, quantisation), means BPDA is needed.
    """
    declared = getattr(transform, "differentiable", None)
    if declared is not None:
        return bool(declared)
    x = probe.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y = transform(x)
        if not isinstance(y, Tensor) or not y.requires_grad:
            return False
        weights = torch.linspace(0.5, 1.5, y.numel(), device=y.device, dtype=y.dtype).view_as(y)
        (g,) = torch.autograd.grad((y * weights).sum(), x, allow_unused=True)
    return g is not None and bool(g.abs().sum() > 0)


def attacker_view(transform: Transform, bpda: bool | None, probe: Tensor) -> tuple[Transform, bool]:
    """The transform the attacker differentiates through, and whether BPDA is in use.

    bpda=True forces the straight-through estimator; False requires a true gradient (raises when
    the transform has none); None picks BPDA only when `has_useful_gradient` says so.
    """
    if bpda is True:
        return straight_through(transform), True
    useful = has_useful_gradient(transform, probe)
    if bpda is False:
        if not useful:
            raise ValueError(f"transform {transform_name(transform)!r} has no gradient; use bpda=True or None")
        return transform, False
    return (transform, False) if useful else (straight_through(transform), True)
