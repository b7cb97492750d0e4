"""Hash-code helpers shared by the attacks: sign codes, Hamming distances and the success rules."""

from __future__ import annotations

import torch
from torch import Tensor


def sign_codes(outputs: Tensor) -> Tensor:
    """Binary codes h = sign(f) with sign(0) = +1.

    outputs: (n, K) continuous model outputs. Returns (n, K) float tensor in {-1, +1},
    same dtype and device as ``outputs``.
    """
    one = torch.ones((), dtype=outputs.dtype, device=outputs.device)
    return torch.where(outputs >= 0, one, -one)


def hamming(a: Tensor, b: Tensor) -> Tensor:
    """Hamming distance between ±1 codes, (K - a·b) / 2.

    a: (n, K) or (K,) in {-1, +1}; b: (n, K) or (K,) in {-1, +1} (broadcast against each other).
    Returns (n,) int64 bit counts (a 0-d tensor when both inputs are (K,)).
    """
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"code lengths differ: {a.shape[-1]} vs {b.shape[-1]}")
    k = a.shape[-1]
    dot = (a.to(torch.float64) * b.to(torch.float64)).sum(-1)
    return torch.round((k - dot) / 2).to(torch.int64)


def continuous_hamming(a: Tensor, b: Tensor) -> Tensor:
    """Differentiable Hamming relaxation (K - a·b) / 2 for outputs in [-1, 1].

    a, b: (n, K) (broadcastable). Returns (n,) in the dtype of the inputs, in bits.
    """
    k = a.shape[-1]
    return (k - (a * b).sum(-1)) / 2


def untargeted_success(hamming_to_source: Tensor, threshold_bits: float) -> Tensor:
    """Untargeted rule: success when Hamming(h(x'), h(x)) >= threshold_bits. Returns (n,) bool."""
    return hamming_to_source >= threshold_bits


def targeted_success(hamming_to_target: Tensor, threshold_bits: float) -> Tensor:
    """Targeted rule: success when Hamming(h(x'), h_t) <= threshold_bits. Returns (n,) bool."""
    return hamming_to_target <= threshold_bits
