"""Small validators for attack hyper-parameters."""

from __future__ import annotations


def positive_int(name: str, value: int) -> int:
    """``value`` as an int, raising ValueError unless it is >= 1."""
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def non_negative(name: str, value: float) -> float:
    """``value`` as a float, raising ValueError unless it is >= 0."""
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)
