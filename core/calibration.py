"""Joint calibration of detection thresholds from benign samples only, and a combined anomaly score.

Each criterion has a suspicious direction ("high" or "low"). For a benign calibration set of n
samples, criterion i fires on x when at most m_i benign values are at least as suspicious as x
(x is beyond the (m_i+1)-th most suspicious benign value). The ranks are set jointly so that the
*combined* rule (reject when any criterion fires) flags at most `target_fpr` of the calibration set,
each calibration sample judged against the other n - 1 as a new input would be (leave-one-out):

1. one rank m shared by all criteria, the largest for which the combined rule stays within target;
2. then, because ties (C1 is 0 for most benign queries) and the union make one shared step coarse,
   each criterion's own rank m_i is raised to its next tie group, lowest level first, while the union
   still stays within target (without ties this lands exactly on floor(target * n) samples).

With empirical p-values p_i(x) = (1 + #benign at least as suspicious as x) / (n + 1) and levels
q_i = (m_i + 1) / (n + 1), the rule rejects when min_i p_i(x) / q_i <= 1. The combined score is
-log10(q * min_i p_i(x) / q_i) with q = (m + 1) / (n + 1): -log10(min_i p_i(x)) when every m_i = m
(the smallest per-criterion p-value), and in general exactly equivalent to the rule through
`combined_threshold`.
"""

from __future__ import annotations

import bisect
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


class CalibrationWarning(UserWarning):
    """The calibration set is too small for the target: the fitted rule's false positive rate is above it."""


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
    ranks: dict[str, int] | None = None  # per-criterion ranks m_i (None: every criterion at `rank`)
    #: leave-one-out FPR on the calibration set: each sample judged against the others, as a new input
    #: would be (the estimate of the held-out FPR; `calibration_fpr` counts each sample against itself too)
    expected_fpr: float | None = None

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
        # A new input fires criterion i when at most m_i benign values are at least as suspicious. Seen
        # as such an input, calibration sample j has c[j, i] - 1 of the *other* samples at least as
        # suspicious (leave-one-out); ranks are chosen on those counts. Counting j against itself
        # would make every criterion look one rank stricter than it is on new data, and the union of
        # three criteria would run ~3/n above target on held-out images.
        loo = counts - 1
        allowed = int(np.floor(target_fpr * n + 1e-9))  # samples that may fire
        sorted_c = np.sort(loo.min(1))
        # one shared rank first: the largest m with #{j: min_i loo[j, i] <= m} <= allowed
        m = int(sorted_c[allowed] - 1) if allowed < n else n - 1
        m = max(m, 0)  # rank 0: fire only beyond every benign value
        ranks = _refine_ranks(loo, m, allowed, n)
        expected_fpr = float((loo <= ranks[None, :]).any(1).mean())
        if expected_fpr > target_fpr:  # only at rank 0 everywhere: each criterion fires past its most extreme value
            warnings.warn(
                f"{n} benign samples are too few for a combined false positive rate of {target_fpr:g} over "
                f"{len(names)} criteria: even firing only beyond each criterion's most extreme benign value, "
                f"the rule flags {expected_fpr:.3f} of them (leave-one-out); calibrate on at least "
                f"~{math.ceil(len(names) / target_fpr)} samples or raise the target", CalibrationWarning, stacklevel=2)
        cal_fpr = float((counts <= ranks[None, :]).any(1).mean())
        thresholds = {}
        for i, k in enumerate(names):
            sus = np.sort(_suspicion(scores[k], directions[k]))[::-1]  # most suspicious first
            v = sus[min(int(ranks[i]), n - 1)]
            thresholds[k] = float(v if directions[k] == "high" else -v)
        benign = {k: np.sort(np.asarray(scores[k], dtype=np.float64)).tolist() for k in names}
        meta.setdefault("created_at", time.time())
        return cls(names, [directions[k] for k in names], target_fpr, n, m, thresholds, benign, cal_fpr, meta,
                   {k: int(r) for k, r in zip(names, ranks)}, expected_fpr)

    # ---------------------------------------------------------------- applying
    def _prepared(self) -> tuple[list, np.ndarray, list | None]:
        """Per criterion (name, suspicious side is high, sorted benign values as an array), the combined score's
        scale q / q_i / (n + 1), and the same benign values as Python floats for `_decide_small` (None when
        one is NaN, where bisection and ``np.searchsorted`` disagree): converted once, on first use, since
        they are on the query path; both paths read these same values."""
        cache = self.__dict__.setdefault("_arrays", {})
        if "_prepared" not in cache:
            rows = [(k, d == "high", np.asarray(self.benign[k], dtype=np.float64))
                    for k, d in zip(self.names, self.directions)]
            scale = (self.rank + 1.0) / (self.criterion_ranks() + 1.0) / (self.n_samples + 1.0)
            lists = None if any(np.isnan(ref).any() for _, _, ref in rows) else [ref.tolist() for _, _, ref in rows]
            cache["_prepared"] = (rows, scale, lists)
        return cache["_prepared"]

    def _counts_fired(self, scores: dict[str, np.ndarray], counts: bool = True) -> tuple[np.ndarray | None, np.ndarray]:
        """((n, m) benign values at least as suspicious as each value, or None if not asked; (n, m) bool fired),
        in one pass over the criteria."""
        rows = self._prepared()[0]
        cnt, fired = [], []
        thresholds = self.thresholds
        for k, high, ref in rows:
            v, thr = np.asarray(scores[k], dtype=np.float64), thresholds[k]
            if counts:
                cnt.append(len(ref) - np.searchsorted(ref, v, side="left") if high else np.searchsorted(ref, v, side="right"))
            fired.append(v > thr if high else v < thr)
        return (np.stack(cnt, 1) if counts else None), np.stack(fired, 1)

    def _counts(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """(n, m): benign values at least as suspicious as each value."""
        return self._counts_fired(scores)[0]

    def fired(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """(n, m) bool: which criteria fire (in `names` order)."""
        return self._counts_fired(scores, counts=False)[1]

    #: batches up to this size are decided in Python scalars (`_decide_small`): at batch size 1 its ~10 µs
    #: against ~35 µs for the ~17 NumPy calls of the vectorised path, whose per-call cost dominates there
    SMALL_BATCH = 4

    def decide(self, scores: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """((n,) combined score, (n, m) fired): `combined_score` and `fired` in one pass (the detector's
        per-batch decision); the same values whichever path computes them (tested)."""
        small = self._decide_small(scores)
        if small is not None:
            return small
        counts, fired = self._counts_fired(scores)
        return self._combined_from_counts(counts), fired

    def _decide_small(self, scores: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
        """`decide` for a few values, by bisecting the sorted benign values: None (the vectorised path) for a
        larger batch, columns of unequal lengths, or a NaN among the values or the benign ones (bisection
        and ``np.searchsorted`` order NaN differently)."""
        rows, scale, lists = self._prepared()
        if lists is None:
            return None
        arrays = [np.asarray(scores[k], dtype=np.float64) for k, _, _ in rows]
        n = len(arrays[0]) if arrays and arrays[0].ndim == 1 else 0
        if not 0 < n <= self.SMALL_BATCH or any(a.shape != (n,) for a in arrays):
            return None
        values = [a.tolist() for a in arrays]
        if any(v != v for col in values for v in col):
            return None
        thresholds, scale = self.thresholds, scale.tolist()
        fired, best = [], []
        for j in range(n):
            row, low = [], math.inf
            for (k, high, _), ref, col, s in zip(rows, lists, values, scale):
                v = col[j]
                count = len(ref) - bisect.bisect_left(ref, v) if high else bisect.bisect_right(ref, v)
                row.append(v > thresholds[k] if high else v < thresholds[k])
                low = min(low, (count + 1.0) * s)
            fired.append(row)
            best.append(low)
        return -np.log10(np.array(best)), np.array(fired, dtype=bool).reshape(n, len(rows))

    def pvalues(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """(n, m) empirical p-values (1 + count) / (n_samples + 1)."""
        return (self._counts(scores) + 1.0) / (self.n_samples + 1.0)

    def criterion_ranks(self) -> np.ndarray:
        """(m,) int: each criterion's rank m_i (in `names` order)."""
        if self.ranks is None:
            return np.full(len(self.names), self.rank, dtype=np.int64)
        return np.array([self.ranks[k] for k in self.names], dtype=np.int64)

    def combined_score(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """(n,) -log10(q * min_i p_i / q_i): the smallest per-criterion p-value, each scaled to its level
        (q_i = (m_i + 1) / (n + 1), q the shared level). Higher is more anomalous."""
        return self._combined_from_counts(self._counts(scores))

    def _combined_from_counts(self, counts: np.ndarray) -> np.ndarray:
        scale = self._prepared()[1]  # q / q_i = (m + 1) / (m_i + 1) per criterion, times 1 / (n + 1)
        return -np.log10(((counts + 1.0) * scale[None, :]).min(1))

    def reject(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """(n,) bool: the combined rule (any criterion fires)."""
        return self.fired(scores).any(1)

    @property
    def combined_threshold(self) -> float:
        """The combined score above which an input is rejected (equivalent to `reject`).

        Rejection is min_i p_i / q_i <= 1, i.e. score >= -log10 q. The next ratio above 1 is
        (m_i + 2) / (m_i + 1) >= 1 + 1 / n, so the boundary is put at ratio 1 + 0.5 / (n + 1), between
        the two, to keep a strict `>` exact in floating point.
        """
        shared = (self.rank + 1.0) / (self.n_samples + 1.0)
        return float(-np.log10(shared * (1.0 + 0.5 / (self.n_samples + 1.0))))

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


def _refine_ranks(counts: np.ndarray, m: int, allowed: int, n: int) -> np.ndarray:
    """Per-criterion ranks (k,) from the shared rank m: repeatedly raise the criterion whose next tie
    group (the next count value in its column) is the lowest, if the union of fired samples stays
    within ``allowed``; a criterion whose next step overshoots is done (the union only grows).

    counts: (n, k) benign values at least as suspicious as each sample's value, per criterion.
    """
    k = counts.shape[1]
    ranks = np.full(k, m, dtype=np.int64)
    fired = (counts <= ranks[None, :]).any(1)
    active = set(range(k))
    while active:
        steps = {}
        for i in active:
            above = counts[:, i][counts[:, i] > ranks[i]]
            nxt = int(above.min()) if len(above) else n
            steps[i] = nxt
        i = min(active, key=lambda j: (steps[j], j))
        nxt = steps[i]
        if nxt >= n:  # no further tie group (or it would fire on every sample)
            active.discard(i)
            continue
        grown = fired | (counts[:, i] <= nxt)
        if grown.sum() > allowed:
            active.discard(i)
            continue
        ranks[i], fired = nxt, grown
    return ranks


def _count_at_least(sus: np.ndarray) -> np.ndarray:
    """For each value, the number of values (itself included) >= it."""
    s = np.sort(sus)
    return len(s) - np.searchsorted(s, sus, side="left")
