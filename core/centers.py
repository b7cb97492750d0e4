"""CSQ hash centres: Hadamard rows when K allows, else Bernoulli codes with a checked minimum distance."""

from __future__ import annotations

import numpy as np
import torch


def hadamard_matrix(k: int) -> np.ndarray:
    """Sylvester Hadamard matrix (k, k) in {-1, +1}; k must be a power of two."""
    if k < 1 or k & (k - 1):
        raise ValueError(f"Hadamard matrices here need a power of two, got {k}")
    h = np.ones((1, 1), dtype=np.int8)
    while h.shape[0] < k:
        h = np.block([[h, h], [h, -h]])
    return h


def hadamard_centers(num_classes: int, bits: int) -> np.ndarray:
    """Rows of H (pairwise distance exactly K/2) when C <= K; rows of [H; -H] when C <= 2K."""
    h = hadamard_matrix(bits)
    if num_classes <= bits:
        return h[:num_classes].astype(np.float32)
    if num_classes <= 2 * bits:
        return np.concatenate([h, -h])[:num_classes].astype(np.float32)
    raise ValueError(f"{num_classes} classes do not fit Hadamard centres of {bits} bits")


def pairwise_hamming(codes: np.ndarray) -> np.ndarray:
    """(C, C) Hamming distances between ±1 codes (C, K)."""
    c = np.asarray(codes, dtype=np.float64)
    return (c.shape[1] - c @ c.T) / 2


def bernoulli_centers(
    num_classes: int, bits: int, *, min_distance: int | None = None, seed: int = 0, max_tries: int = 10_000
) -> np.ndarray:
    """Random ±1 centres (p = 1/2) whose pairwise Hamming distances are all >= min_distance (default K/4)."""
    min_distance = bits // 4 if min_distance is None else min_distance
    rng = np.random.default_rng(seed)
    centers: list[np.ndarray] = []
    tries = 0
    while len(centers) < num_classes:
        tries += 1
        if tries > max_tries:
            raise RuntimeError(
                f"could not draw {num_classes} centres of {bits} bits at distance >= {min_distance}"
            )
        c = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=bits)
        if all((bits - float(c @ o)) / 2 >= min_distance for o in centers):
            centers.append(c)
    return np.stack(centers)


def make_centers(num_classes: int, bits: int, *, seed: int = 0) -> np.ndarray:
    """Hadamard centres when K is a power of two and C <= 2K, Bernoulli centres otherwise: (C, K) ±1."""
    if bits & (bits - 1) == 0 and num_classes <= 2 * bits:
        return hadamard_centers(num_classes, bits)
    return bernoulli_centers(num_classes, bits, seed=seed)


def centers_for_labels(labels: torch.Tensor, centers: torch.Tensor, generator: torch.Generator | None = None):
    """Each sample's centre: its class centre, or for multi-label samples the sign of the sum of its
    classes' centres with ties broken at random. labels (n, C) {0,1}, centers (C, K) -> (n, K) ±1."""
    s = labels.float() @ centers
    ties = s == 0
    if ties.any():
        rnd = torch.randint(0, 2, s.shape, generator=generator, device=s.device).float() * 2 - 1
        s = torch.where(ties, rnd, s)
    return torch.sign(s)
