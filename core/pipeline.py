"""Glue used by the CLI, the workers and the benchmark: database index, calibration halves, artifacts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.calibration import Calibration
from core.checkpoint import LoadedCheckpoint
from core.datasets import DatasetSplits, ImageSet
from core.detector import Detector
from core.index import HammingIndex
from core.models import sign_codes
from core.training import encode_set


def calibration_halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (calibration, held-out) index halves of n benign query images, seeded."""
    perm = np.random.default_rng(seed + 1).permutation(n)
    half = n // 2
    return np.sort(perm[:half]), np.sort(perm[half:])


def build_index(model: torch.nn.Module, images: ImageSet, ids=None, backend: str = "cpu", bits: int | None = None) -> HammingIndex:
    """A HammingIndex of the codes of `images` under ids (default 0..n-1)."""
    codes = sign_codes(encode_set(model, images))
    index = HammingIndex(bits or codes.shape[1], backend)
    index.add(codes, np.arange(len(codes)) if ids is None else ids)
    return index


@dataclass
class CalibrationReport:
    """A calibration fitted on one benign half and its FPR on the other (held-out) half.

    swapped_fpr: the FPR of a calibration fitted on the held-out half, measured on the first half;
    crossfit_fpr: both measurements pooled (every benign image held out once): the same quantity as
    heldout_fpr with half its sampling variance (one split of 500 + 500 has a spread of ~1.4 points).
    """

    calibration: Calibration
    heldout_fpr: float
    n_calibration: int
    n_heldout: int
    swapped_fpr: float = float("nan")
    crossfit_fpr: float = float("nan")


def _raw_scores(detector: Detector, images: ImageSet) -> dict[str, np.ndarray]:
    parts = [detector.raw_scores(x) for _, x in images.batches(256)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def calibrate_detector(
    detector: Detector, splits: DatasetSplits, *, target_fpr: float = 0.05, seed: int = 0, **meta
) -> CalibrationReport:
    """Calibrates on one benign half of the query split and measures the FPR on the other half (and,
    for the cross-fit figure, the other way round). The detector keeps the first half's calibration."""
    cal_idx, test_idx = calibration_halves(len(splits.query), seed)
    cal = detector.calibrate(splits.query.get(cal_idx), target_fpr, split_seed=splits.seed, seed=seed, **meta)
    out = [detector.score_batch(x).adversarial for _, x in splits.query.subset(test_idx).batches(256)]
    fpr = float(np.concatenate(out).mean()) if out else float("nan")
    swapped = float("nan")
    if len(test_idx) >= 2 and len(cal_idx):
        held = _raw_scores(detector, splits.query.subset(test_idx))
        first = _raw_scores(detector, splits.query.subset(cal_idx))
        other = Calibration.fit(held, detector.directions, target_fpr)
        swapped = float(other.reject({k: first[k] for k in other.names}).mean())
    crossfit = (fpr * len(test_idx) + swapped * len(cal_idx)) / (len(test_idx) + len(cal_idx))
    finite = lambda v: v if np.isfinite(v) else None  # noqa: E731  (JSON has no NaN)
    cal.meta.update(heldout_fpr=finite(fpr), n_heldout=int(len(test_idx)), swapped_fpr=finite(swapped),
                    crossfit_fpr=finite(crossfit))
    return CalibrationReport(cal, fpr, len(cal_idx), len(test_idx), swapped, crossfit)


def detector_for_checkpoint(
    ckpt: LoadedCheckpoint,
    splits: DatasetSplits,
    *,
    detector: str = "umcd",
    transform: str | None = None,
    top_k: int = 10,
    backend: str = "cpu",
) -> Detector:
    """A detector whose index holds the codes of the dataset's database split (ids 0..n-1).

    Detectors that need a FeatureReference (umcd-trust-input, ...) get one of the database split."""
    from core.extensions import REFERENCE_DETECTORS, FeatureReference, make_detector

    index = build_index(ckpt.model, splits.database, backend=backend, bits=ckpt.meta.bits)
    if detector in REFERENCE_DETECTORS:
        reference = FeatureReference.build(ckpt.model, splits.database.get())
        return make_detector(detector, ckpt.model, index, reference=reference, transform=transform, top_k=top_k)
    return Detector(ckpt.model, index, None, transform, detector=detector, top_k=top_k)


def model_dir(artifacts: str | Path) -> Path:
    return Path(artifacts) / "models"


def checkpoint_path(artifacts: str | Path, dataset: str, bits: int, backbone: str) -> Path:
    return model_dir(artifacts) / f"csq-{dataset}-{backbone}-{bits}.safetensors"


def calibration_path(artifacts: str | Path, version: str, detector: str) -> Path:
    return Path(artifacts) / "calibrations" / f"{version}-{detector}.json"
