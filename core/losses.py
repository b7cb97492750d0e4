"""The CSQ loss: centre BCE plus lambda times the quantization loss (lambda = 1e-4 as in the paper)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def csq_loss(
    f: torch.Tensor, target_centers: torch.Tensor, quant_weight: float = 1e-4, label_smoothing: float = 0.0
) -> torch.Tensor:
    """f (n, K) in (-1, 1), target_centers (n, K) ±1 -> scalar loss.

    label_smoothing s moves the BCE targets from {0, 1} to {s/2, 1 - s/2}: the optimum output is
    ±(1 - s) instead of ±1, so benign outputs do not saturate tanh (see `train_csq`).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    p = ((f + 1) / 2).clamp(1e-6, 1 - 1e-6)
    target = (target_centers + 1) / 2
    if label_smoothing:
        target = target * (1.0 - label_smoothing) + 0.5 * label_smoothing
    center = F.binary_cross_entropy(p, target)
    quant = ((f.abs() - 1) ** 2).mean()
    return center + quant_weight * quant


def quantization_loss(f: torch.Tensor) -> torch.Tensor:
    """Per-sample L1 quantization loss ||sign(f) - f||_1: (n,)."""
    h = torch.where(f >= 0, torch.ones_like(f), -torch.ones_like(f))
    return (h - f).abs().sum(dim=1)
