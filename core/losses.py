"""The CSQ loss: centre BCE plus lambda times the quantization loss (lambda = 1e-4 as in the paper)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def csq_loss(f: torch.Tensor, target_centers: torch.Tensor, quant_weight: float = 1e-4) -> torch.Tensor:
    """f (n, K) in (-1, 1), target_centers (n, K) ±1 -> scalar loss."""
    p = ((f + 1) / 2).clamp(1e-6, 1 - 1e-6)
    center = F.binary_cross_entropy(p, (target_centers + 1) / 2)
    quant = ((f.abs() - 1) ** 2).mean()
    return center + quant_weight * quant


def quantization_loss(f: torch.Tensor) -> torch.Tensor:
    """Per-sample L1 quantization loss ||sign(f) - f||_1: (n,)."""
    h = torch.where(f >= 0, torch.ones_like(f), -torch.ones_like(f))
    return (h - f).abs().sum(dim=1)
