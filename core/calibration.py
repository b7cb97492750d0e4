"""Joint calibration of detection thresholds from benign samples only, and a combined anomaly score.

Each criterion has a suspicious direction ("high" or "low"). For a benign calibration set of n
samples, criterion i fires on x when fewer than m+1 benign values are at least as suspicious as x
(x is beyond the (m+1)-th most suspicious benign value). One rank m is shared by all criteria and
chosen as the largest for which the *combined* rule (reject when any criterion fires) flags at
most `target_fpr` of the calibration set. Equivalently, with empirical p-values
p_i(x) = (1 + #benign at least as suspicious as x) / (n + 1), the rule rejects when
min_i p_i(x) <= (m + 1) / (n + 1); the combined score is -log10(min_i p_i(x)).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


def _suspicion(values: np.ndarray, direction: str) -> np.ndarray:
    """Values oriented so that larger is more suspicious."""
    if direction == "high":
        return np.asarray(values, dtype=np.float64)
    if direction == "low":
        return -np.asarray(values, dtype=np.float64)
    raise ValueError(f"direction must be 'high' or 'low', got {direction!r}")


@dataclass
class Calibration:
    """Thresholds for named criteria, fitted on benign samples at a target false positive rate."""

    names: list[str]
    directions: list[str]
    target_fpr: float
    n_samples: int
    rank: int
    thresholds: dict[str, float]
    benign: dict[str, list[float]]  # sorted benign values per criterion (ascending)
    calibration_fpr: float
    meta: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- fitting
    @classmethod
    def fit(
        cls,
        scores: dict[str, np.ndarray],
        directions: dict[str, str],
        target_fpr: float = 0.05,
        **meta,
    ) -> "Calibration":
        """scores: name -> (n,) benign values; directions: name -> 'high'|'low'."""
        if not 0 < target_fpr < 1:
            raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
        names = list(scores)
        n = len(next(iter(scores.values())))
        if n < 2:
            raise ValueError("calibration needs at least two benign samples")
        if any(len(v) != n for v in scores.values()):
            raise ValueError("every criterion needs one value per calibration sample")
        # c[j, i]: number of benign values at least as suspicious as sample j's value of criterion i
        counts = np.stack([_count_at_least(_suspicion(scores[k], directions[k])) for k in names], 1)
        cmin = counts.min(1)
        # the union fires on sample j iff cmin_j <= m; choose the largest m with rate(m) <= target
        sorted_c = np.sort(cmin)
        allowed = int(np.floor(target_fpr * n + 1e-9))  # samples that may fire
        m = int(sorted_c[allowed] - 1) if allowed < n else int(n)
        m = max(m, 0)
        cal_fpr = float((cmin <= m).mean())
        thresholds = {}
        for k in names:
            sus = np.sort(_suspicion(scores[k], directions[k]))[::-1]  # most suspicious first
            v = sus[min(m, n - 1)]
            thresholds[k] = float(v if directions[k] == "high" else -v)
        benign = {k: np.sort(np.asarray(scores[k], dtype=np.float64)).tolist() for k in names}
        meta.setdefault("created_at", time.time())
        return cls(names, [directions[k] for k in names], target_fpr, n, m, thresholds, benign, cal_fpr, meta)

    # ---------------------------------------------------------------- applying
    def _counts(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """(n, m): benign values at least as suspicious as each value."""
        cols = []
        for k, d in zip(self.names, self.directions):
            ref = np.asarray(self.benign[k])
            v = np.asarray(scores[k], dtype=np.float64)
            if d == "high":
                cols.append(len(ref) - np.searchsorted(ref, v, side="left"))
            else:
                cols.append(np.searchsorted(ref, v, side="right"))
        return np.stack(cols, 1)

    def fired(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """(n, m) bool: which criteria fire (in `names` order)."""
        cols = []
        for k, d in zip(self.names, self.directions):
            v = np.asarray(scores[k], dtype=np.float64)
            cols.append(v > self.thresholds[k] if d == "high" else v < self.thresholds[k])
        return np.stack(cols, 1)

    def pvalues(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """(n, m) empirical p-values (1 + count) / (n_samples + 1)."""
        return (self._counts(scores) + 1.0) / (self.n_samples + 1.0)

    def combined_score(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """(n,) -log10 of the smallest per-criterion p-value: higher is more anomalous."""
        return -np.log10(self.pvalues(scores).min(1))

    def reject(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """(n,) bool: the combined rule (any criterion fires)."""
        return self.fired(scores).any(1)

    @property
    def combined_threshold(self) -> float:
        """The combined score above which an input is rejected (equivalent to `reject`).

        Rejection is min p <= (rank + 1) / (n + 1); p moves in steps of 1 / (n + 1), so the boundary
        is put half a step above it to keep a strict `>` exact in floating point.
        """
        return float(-np.log10((self.rank + 1.5) / (self.n_samples + 1.0)))

    # ---------------------------------------------------------------- storage
    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Calibration":
        return cls(**json.loads(text))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        return cls.from_json(Path(path).read_text())


def _count_at_least(sus: np.ndarray) -> np.ndarray:
    """For each value, the number of values (itself included) >= it."""
    s = np.sort(sus)
    return len(s) - np.searchsorted(s, sus, side="left")
