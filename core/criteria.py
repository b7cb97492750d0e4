"""The three UMCD criteria, batched over model outputs and retrieval distances."""

from __future__ import annotations

import numpy as np
import torch

from core.models import sign_codes

CRITERIA = ("c1", "c2", "c3")
#: the suspicious direction of each criterion: high C1, low C2, high C3 flag an input
DIRECTIONS = {"c1": "high", "c2": "low", "c3": "high"}


def c1_mean_hamming(distances: np.ndarray, bits: int) -> np.ndarray:
    """C1: mean Hamming distance from h(x) to its top-k retrieved codes.

    distances (n, k) int; entries > bits mark missing neighbours (a database smaller than k) and are
    ignored; a row with no neighbour at all gets C1 = bits/2 (the distance of an unrelated code).
    """
    d = np.asarray(distances)
    if d.size and d.max() <= bits:  # every neighbour present (the usual case): a plain mean
        return d.sum(1, dtype=np.float64) / d.shape[1]  # what d.mean(1) computes, without its Python layers
    d = d.astype(np.float64)
    valid = d <= bits
    cnt = valid.sum(1)
    s = np.where(valid, d, 0).sum(1)
    return np.where(cnt > 0, s / np.maximum(cnt, 1), bits / 2.0)


def c2_quantization(f: torch.Tensor | np.ndarray, codes: torch.Tensor | np.ndarray | None = None):
    """C2: L1 quantization loss ||h(x) - f(x)||_1 per row: (n,).

    Tensors (differentiable, for attacks) or NumPy arrays (the detector's host path, where a few
    torch ops per call dominate at batch size 1); ``codes`` h(x) when already computed.
    """
    if codes is None:
        codes = sign_codes(f)
    return abs(codes - f).sum(1)


def c3_disagreement(f: torch.Tensor | np.ndarray, f_t: torch.Tensor | np.ndarray):
    """C3: continuous Hamming disagreement (K - f(x) . f(t(x))) / 2 per row: (n,). Tensors or arrays."""
    return 0.5 * (f.shape[1] - (f * f_t).sum(1))
