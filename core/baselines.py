"""Baseline detectors (LID, feature squeezing, FS-Adaptive, MeanBlur) and UMCD behind one benchmark interface.

Every detector maps images to named raw scores, turns them into decision scores (the identity for
unsupervised detectors; a logistic regression for the supervised LID), and is calibrated with
`Calibration.fit` on benign images only, at a target false positive rate. Prediction disagreement is
measured in Hamming space on the hashing outputs, ``(K - f(x)·f(t(x))) / 2`` (the continuous form of
C3), in place of the softmax L1 distance the baselines were published with.

`BENCHMARK_DETECTORS` is the registry the benchmark loops over:

=============== ============================================================== ===========
name            what it thresholds                                             supervised
=============== ============================================================== ===========
lid             logistic regression on LID of every backbone stage and f(x)    yes
lid-unsup       LID of the final outputs f(x) alone                            no
fs-median       disagreement with a 2x2 median filter                          no
fs-nlm          disagreement with non-local means 13-3-2                       no
fs-adaptive     disagreement with the entropy-driven squeezer of Liang et al.  no
meanblur        disagreement with a 3x3 mean blur (C3 as its own detector)     no
umcd            C1, C2 and C3 jointly                                          no
umcd-c3 ...     the ablations of Table 2                                       no
=============== ============================================================== ===========
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from core.calibration import Calibration
from core.criteria import c3_disagreement
from core.detector import Detector, DetectorSpec, ScoreContext, register_criterion, register_detector
from core.index import HammingIndex
from core.registry import Registry
from core.transforms import TRANSFORMS

# ---------------------------------------------------------------------------------------------------
# FS-Adaptive (Liang et al. [25]): entropy-driven scalar quantization and cross-shaped mean smoothing
# ---------------------------------------------------------------------------------------------------

#: entropy bands (bits) and their squeezers, as in the authors' reference code (DeepDetector):
#: H < 4: quantization interval 128 (2 levels); 4 <= H < 5: interval 64 (4 levels);
#: H >= 5: interval 43 (6 levels), then a cross-shaped 13-tap mean filter (radius 3), keeping per
#: pixel whichever of the quantized / quantized-and-smoothed values is closer to the input.
ENTROPY_LOW, ENTROPY_HIGH = 4.0, 5.0
INTERVALS = (128, 64, 43)
CROSS_RADIUS = 3


def image_entropy(x: torch.Tensor) -> torch.Tensor:
    """Mean over channels of the 256-bin histogram entropy (bits) of each image: x (n, c, H, W) in [0, 1] -> (n,)."""
    n, c, h, w = x.shape
    v = (x.clamp(0, 1) * 255).floor().long().view(n * c, h * w)
    counts = torch.zeros(n * c, 256, dtype=torch.float64, device=x.device)
    counts.scatter_add_(1, v, torch.ones_like(v, dtype=torch.float64))
    p = counts / (h * w)
    ent = -(torch.where(p > 0, p * torch.log2(p.clamp_min(1e-300)), torch.zeros_like(p))).sum(1)
    return ent.view(n, c).mean(1).to(x.dtype)


def scalar_quantization(x: torch.Tensor, interval: int) -> torch.Tensor:
    """Uniform scalar quantization of [0, 1] images with an interval in 0-255 units (floor, as the reference)."""
    return torch.floor(x * 255.0 / interval) * interval / 255.0


def cross_mean_filter(x: torch.Tensor, radius: int = CROSS_RADIUS) -> torch.Tensor:
    """Mean over a cross of 4*radius+1 taps on interior pixels; a border of `radius` pixels is kept as is."""
    n, c, h, w = x.shape
    if h <= 2 * radius or w <= 2 * radius:
        return x.clone()
    size = 2 * radius + 1
    kernel = torch.zeros(size, size, dtype=x.dtype, device=x.device)
    kernel[radius, :] = 1.0
    kernel[:, radius] = 1.0
    kernel = (kernel / kernel.sum()).expand(c, 1, size, size)
    inner = F.conv2d(x, kernel, groups=c)  # (n, c, h - 2r, w - 2r)
    out = x.clone()
    out[:, :, radius : h - radius, radius : w - radius] = inner
    return out


def fs_adaptive(x: torch.Tensor) -> torch.Tensor:
    """The FS-Adaptive squeezer, chosen per image by its entropy: (n, 3, H, W) in [0, 1] -> same shape."""
    ent = image_entropy(x)
    out = torch.empty_like(x)
    low, mid, high = ent < ENTROPY_LOW, (ent >= ENTROPY_LOW) & (ent < ENTROPY_HIGH), ent >= ENTROPY_HIGH
    if low.any():
        out[low] = scalar_quantization(x[low], INTERVALS[0])
    if mid.any():
        out[mid] = scalar_quantization(x[mid], INTERVALS[1])
    if high.any():
        xh = x[high]
        q = scalar_quantization(xh, INTERVALS[2])
        qf = cross_mean_filter(q)
        out[high] = torch.where((qf - xh).abs() < (q - xh).abs(), qf, q)
    return out


@TRANSFORMS.register("fs_adaptive")
def _fs_adaptive_transform():
    return fs_adaptive


# ---------------------------------------------------------------------------------------------------
# The squeezing baselines as detector specs over one criterion: the Hamming-space disagreement
# ---------------------------------------------------------------------------------------------------

@register_criterion("squeeze", "high")
def _squeeze(ctx: ScoreContext) -> np.ndarray:
    """Largest continuous Hamming disagreement (K - f·f_t)/2 over the detector's transforms: (n,)."""
    parts = [c3_disagreement(ctx.f, f_t) for f_t in ctx.f_t]
    return torch.stack(parts).amax(0).cpu().numpy().astype(np.float64)


register_detector(DetectorSpec("fs-median", ("squeeze",), ("median2",), "feature squeezing: 2x2 median [45]"))
register_detector(DetectorSpec("fs-nlm", ("squeeze",), ("nlm",), "feature squeezing: non-local means 13-3-2 [45]"))
register_detector(DetectorSpec("fs-adaptive", ("squeeze",), ("fs_adaptive",), "entropy-adaptive squeezing [25]"))
register_detector(DetectorSpec("meanblur", ("squeeze",), ("meanblur3",), "3x3 mean blur disagreement [23]"))


# ---------------------------------------------------------------------------------------------------
# The common interface
# ---------------------------------------------------------------------------------------------------


class BenchmarkDetector(ABC):
    """A detector as the benchmark sees it: raw scores -> decision scores -> a calibrated any-fires rule.

    images are (n, 3, H, W) float in [0, 1]; every score array is (n,) float64.
    """

    name: str = ""
    label: str = ""
    supervised: bool = False

    def __init__(self) -> None:
        self.calibration: Calibration | None = None

    @abstractmethod
    def raw_scores(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, np.ndarray]:
        """name -> (n,) raw scores (for supervised detectors: the feature columns)."""

    @property
    @abstractmethod
    def directions(self) -> dict[str, str]:
        """name -> 'high' | 'low': the suspicious side of each decision score."""

    def decision_scores(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The scores that are thresholded (the raw scores themselves unless supervised)."""
        return {k: np.asarray(raw[k], dtype=np.float64) for k in self.directions}

    def fit(self, benign: dict[str, np.ndarray], adversarial: dict[str, np.ndarray]) -> "BenchmarkDetector":
        """Trains a supervised detector on raw scores of benign and adversarial images."""
        raise TypeError(f"{self.name} is unsupervised: it has nothing to fit on adversarial examples")

    def calibrate(
        self, benign: torch.Tensor | dict[str, np.ndarray], target_fpr: float = 0.05, **meta
    ) -> Calibration:
        """Fits thresholds on benign images (or their raw scores) only; sets and returns the calibration."""
        raw = benign if isinstance(benign, dict) else self.raw_scores(benign)
        self.calibration = Calibration.fit(
            self.decision_scores(raw), self.directions, target_fpr, detector=self.name, **meta
        )
        return self.calibration

    def _cal(self, calibration: Calibration | None) -> Calibration:
        cal = calibration or self.calibration
        if cal is None:
            raise RuntimeError(f"{self.name} is not calibrated: call calibrate() first")
        return cal

    def reject(
        self, scores: torch.Tensor | dict[str, np.ndarray], calibration: Calibration | None = None
    ) -> np.ndarray:
        """(n,) bool: flagged as adversarial (any decision score beyond its threshold)."""
        raw = scores if isinstance(scores, dict) else self.raw_scores(scores)
        return self._cal(calibration).reject(self.decision_scores(raw))

    def anomaly_score(
        self, scores: torch.Tensor | dict[str, np.ndarray], calibration: Calibration | None = None
    ) -> np.ndarray:
        """(n,) higher is more suspicious: -log10 of the smallest calibrated p-value (for ROC/AUC)."""
        raw = scores if isinstance(scores, dict) else self.raw_scores(scores)
        dec = self.decision_scores(raw)
        if len(self.directions) == 1:  # one score: the score itself orders finer than its p-value
            (k, d), = self.directions.items()
            return dec[k] if d == "high" else -dec[k]
        return self._cal(calibration).combined_score(dec)


def _batched(fn: Callable[[torch.Tensor], dict[str, np.ndarray]], images: torch.Tensor, batch_size: int):
    parts = [fn(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    if not parts:
        raise ValueError("no images to score")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


class SpecDetector(BenchmarkDetector):
    """A `core.detector.DETECTORS` spec (UMCD and its ablations, the squeezing baselines) as a benchmark detector."""

    def __init__(self, model: torch.nn.Module, index: HammingIndex, spec: str, *, label: str, top_k: int = 10) -> None:
        super().__init__()
        self.name = spec
        self.label = label
        self.detector = Detector(model, index, None, detector=spec, top_k=top_k)

    @property
    def directions(self) -> dict[str, str]:
        return self.detector.directions

    def raw_scores(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, np.ndarray]:
        return _batched(self.detector.raw_scores, images, batch_size)


# ---------------------------------------------------------------------------------------------------
# LID (Ma et al. [28])
# ---------------------------------------------------------------------------------------------------

#: activations with more dimensions are average-pooled spatially to at most this many (memory bound)
LID_MAX_DIMS = 16384


def lid_mle(distances: torch.Tensor, k: int) -> torch.Tensor:
    """Maximum-likelihood LID from distances to references: (n, m) -> (n,), using the k smallest non-zero.

    LID = -k / sum_{i<=k} log(r_i / r_k) (Ma et al.; Amsaleg et al.). Zero distances (a sample that
    is itself a reference) are skipped.
    """
    d = distances.double()
    d = torch.where(d > 0, d, torch.full_like(d, float("inf")))
    k = min(k, d.shape[1])
    r = torch.topk(d, k, dim=1, largest=False).values  # ascending
    r = r.clamp_min(1e-12)
    logs = torch.log(r / r[:, -1:]).sum(1)
    return torch.where(logs < 0, -k / logs, torch.full_like(logs, float(k) * 1e6))


def _flatten_activation(a: torch.Tensor) -> torch.Tensor:
    """(n, ...) -> (n, D) with D <= LID_MAX_DIMS (spatial average pooling when needed)."""
    if a.dim() == 4 and a[0].numel() > LID_MAX_DIMS:
        c = a.shape[1]
        side = max(1, int((LID_MAX_DIMS // c) ** 0.5))
        a = F.adaptive_avg_pool2d(a, side)
    return a.flatten(1).float()


class LIDFeatures:
    """LID of each layer's activations against a fixed minibatch of benign reference images.

    layers: the model's backbone stages (``forward_with_features``) and the final outputs f(x).
    """

    def __init__(self, model: torch.nn.Module, references: torch.Tensor, *, k: int = 20, final_only: bool = False):
        if len(references) < 2:
            raise ValueError("LID needs at least two reference images")
        self.model = model.eval()
        self.k = min(k, len(references) - 1)
        self.final_only = final_only
        self.device = next(model.parameters()).device
        self._refs = self._activations(references)

    @torch.no_grad()
    def _activations(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = images.to(self.device, torch.float32)
        if self.final_only or not hasattr(self.model, "forward_with_features"):
            return [self.model(x).float()]
        f, inter = self.model.forward_with_features(x)
        return [_flatten_activation(a) for a in inter] + [f.float()]

    @property
    def names(self) -> list[str]:
        n = len(self._refs)
        return ["lid_f"] if n == 1 else [f"lid_l{i}" for i in range(n - 1)] + ["lid_f"]

    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        acts = self._activations(images)
        out = {}
        for name, a, r in zip(self.names, acts, self._refs):
            out[name] = lid_mle(torch.cdist(a, r), self.k).cpu().numpy()
        return out


class LIDSupervised(BenchmarkDetector):
    """LID as published [28]: a logistic regression on per-layer LID features, trained on adversarial vs clean.

    SUPERVISED: it needs adversarial examples of the attack it is evaluated on (the benchmark trains
    it on one fold of attacked images and tests it on the other). Its decision score is the
    regression's logit, thresholded on benign calibration images like every other detector.
    """

    name = "lid"
    label = "LID [28]"
    supervised = True

    def __init__(self, model: torch.nn.Module, references: torch.Tensor, *, k: int = 20, seed: int = 0) -> None:
        super().__init__()
        self.features = LIDFeatures(model, references, k=k)
        self.seed = seed
        self.classifier = None

    @property
    def directions(self) -> dict[str, str]:
        return {"lid": "high"}

    def raw_scores(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, np.ndarray]:
        return _batched(self.features, images, batch_size)

    def _matrix(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        return np.stack([np.asarray(raw[k], dtype=np.float64) for k in self.features.names], 1)

    def fit(self, benign: dict[str, np.ndarray], adversarial: dict[str, np.ndarray]) -> "LIDSupervised":
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        xb, xa = self._matrix(benign), self._matrix(adversarial)
        if len(xb) == 0 or len(xa) == 0:
            raise ValueError("LID needs benign and adversarial examples to fit")
        x = np.concatenate([xb, xa])
        y = np.concatenate([np.zeros(len(xb)), np.ones(len(xa))])
        self.classifier = make_pipeline(
            StandardScaler(), LogisticRegression(max_iter=2000, random_state=self.seed)
        ).fit(x, y)
        return self

    def decision_scores(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.classifier is None:
            raise RuntimeError("the supervised LID detector is not fitted: call fit(benign, adversarial) first")
        return {"lid": self.classifier.decision_function(self._matrix(raw)).astype(np.float64)}


class LIDUnsupervised(BenchmarkDetector):
    """LID of the final hashing outputs f(x) against benign references, thresholded on benign images only."""

    name = "lid-unsup"
    label = "LID, unsupervised (f(x))"

    def __init__(self, model: torch.nn.Module, references: torch.Tensor, *, k: int = 20) -> None:
        super().__init__()
        self.features = LIDFeatures(model, references, k=k, final_only=True)

    @property
    def directions(self) -> dict[str, str]:
        return {"lid_f": "high"}

    def raw_scores(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, np.ndarray]:
        return _batched(self.features, images, batch_size)


# ---------------------------------------------------------------------------------------------------
# The registry the benchmark loops over
# ---------------------------------------------------------------------------------------------------

#: factory(model, index, *, references, top_k, seed) -> BenchmarkDetector
BENCHMARK_DETECTORS: Registry[BenchmarkDetector] = Registry("benchmark detector")

#: Table 1's rows in the paper's order, and Table 2's ablation rows
TABLE1_DETECTORS = ("lid", "fs-median", "fs-nlm", "fs-adaptive", "meanblur", "umcd")
ABLATION_DETECTORS = ("umcd-c3", "umcd-c1c3", "umcd-c2c3", "umcd")

_SPEC_LABELS = {
    "fs-median": "FS-Median [45]",
    "fs-nlm": "FS-NLM [45]",
    "fs-adaptive": "FS-Adaptive [25]",
    "meanblur": "MeanBlur [23]",
    "umcd": "UMCD (ours)",
    "umcd-c3": "C3 alone",
    "umcd-c1c3": "C1 + C3",
    "umcd-c2c3": "C2 + C3",
}


def _spec_factory(spec: str, label: str):
    def make(model, index, *, references=None, top_k: int = 10, seed: int = 0) -> BenchmarkDetector:
        return SpecDetector(model, index, spec, label=label, top_k=top_k)

    return make


for _name, _label in _SPEC_LABELS.items():
    BENCHMARK_DETECTORS.register(_name)(_spec_factory(_name, _label))


@BENCHMARK_DETECTORS.register("lid")
def _lid(model, index, *, references=None, top_k: int = 10, seed: int = 0) -> BenchmarkDetector:
    if references is None:
        raise ValueError("LID needs references=(m, 3, H, W) benign images")
    return LIDSupervised(model, references, seed=seed)


@BENCHMARK_DETECTORS.register("lid-unsup")
def _lid_unsup(model, index, *, references=None, top_k: int = 10, seed: int = 0) -> BenchmarkDetector:
    if references is None:
        raise ValueError("LID needs references=(m, 3, H, W) benign images")
    return LIDUnsupervised(model, references)


def create_benchmark_detector(
    name: str, model: torch.nn.Module, index: HammingIndex, *, references: torch.Tensor | None = None,
    top_k: int = 10, seed: int = 0,
) -> BenchmarkDetector:
    """A registered benchmark detector by name (see BENCHMARK_DETECTORS.names())."""
    return BENCHMARK_DETECTORS.get(name)(model, index, references=references, top_k=top_k, seed=seed)


def reference_images(images, n: int = 100, seed: int = 0) -> torch.Tensor:
    """A seeded random minibatch of n benign reference images (LID's k-NN reference set): (n, 3, H, W).

    images: a (N, 3, H, W) tensor, or an ImageSet (only the chosen images are loaded).
    """
    g = np.random.default_rng(seed + 7)
    idx = np.sort(g.choice(len(images), size=min(n, len(images)), replace=False))
    if isinstance(images, torch.Tensor):
        return images[torch.as_tensor(idx)]
    return images.get(idx)
