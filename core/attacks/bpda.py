"""Transforms as an adaptive attacker sees them: the default mean blur and BPDA (straight-through) wrapping."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Transform = Callable[[Tensor], Tensor]

DEFAULT_TRANSFORM = "mean_blur"


def mean_blur(x: Tensor, kernel_size: int = 3) -> Tensor:
    """k x k mean blur with reflect padding (OpenCV's default border); differentiable.

    x: (n, C, H, W) -> (n, C, H, W), same dtype and device.
    """
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError("kernel_size must be an odd positive integer")
    p = kernel_size // 2
    if p == 0:
        return x
    return F.avg_pool2d(F.pad(x, (p, p, p, p), mode="reflect"), kernel_size, stride=1)


def resolve_transform(transform: str | Transform | None) -> Transform:
    """The transform t(·) as a callable on (n, 3, H, W) tensors.

    None means the detector's default (``mean_blur``). A name is looked up in
    ``core.transforms.get_transform`` when that module exists, else among this module's own
    (``mean_blur``/``mean_blur3``). A callable is returned unchanged.
    """
    if callable(transform):
        return transform
    name = DEFAULT_TRANSFORM if transform is None else str(transform)
    try:
        from core.transforms import get_transform  # the detector's own transforms, when present
    except ImportError:
        get_transform = None
    if get_transform is not None:
        try:
            return get_transform(name)
        except (KeyError, ValueError):
            pass
    if name in ("mean_blur", "mean_blur3", "meanblur"):
        return mean_blur
    raise KeyError(f"unknown transform {name!r}")


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
