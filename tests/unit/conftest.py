"""Fixtures for the core tests: the digits splits and one small CSQ model trained on them (per session)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def digits_splits():
    from core.datasets import load_dataset

    return load_dataset("digits", seed=0)


@pytest.fixture(scope="session")
def trained_digits(digits_splits):
    """A 64-bit smallcnn trained briefly on digits (accurate enough for detection tests)."""
    from core.training import train_csq

    torch.manual_seed(0)
    model, centers, _ = train_csq(digits_splits.train, digits_splits.num_classes, bits=64, epochs=12, progress=False)
    return model, centers


@pytest.fixture()
def tiny_model():
    """An untrained 16-bit smallcnn: real code paths, fast."""
    from core.models import create_model

    torch.manual_seed(0)
    return create_model("smallcnn", 16).eval()
