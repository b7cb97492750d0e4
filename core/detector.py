"""The batched UMCD detector: embed x and t(x) in one batch, search top-k, compute criteria, decide.

`Detector.score_batch(images)` needs no broker and no database: a model, a HammingIndex, a
Calibration and a transform are all it holds. Detector variants (the paper's rule, ablations and
extensions) are specs in the DETECTORS registry: which criteria, over which transforms.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from core.calibration import Calibration
from core.criteria import c1_mean_hamming, c2_quantization, c3_disagreement
from core.index import HammingIndex, pack_codes
from core.models import sign_codes
from core.registry import Registry
from core.transforms import get_transform


@dataclass
class ScoreContext:
    """What a criterion may look at for a batch of n images.

    images (n, 3, H, W) in [0, 1]; f (n, K) continuous outputs; f_t: one (n, K) per transform;
    codes (n, K) ±1; ids/distances (n, k) top-k neighbours (-1 / K+1 where missing). `host(name)` gives
    f, codes or f_t[j] ("f_t0", "f_t1", ...) as NumPy arrays, converted once per batch.
    """

    images: torch.Tensor
    f: torch.Tensor
    f_t: list[torch.Tensor]
    codes: torch.Tensor
    ids: np.ndarray
    distances: np.ndarray
    bits: int
    model: torch.nn.Module
    index: HammingIndex
    #: name -> (the tensor, its host array): converted once per batch, and again if the field is replaced
    _host: dict[str, tuple[torch.Tensor, np.ndarray]] = field(default_factory=dict, repr=False)

    def host(self, name: str) -> np.ndarray:
        """"f", "codes" or "f_t<j>" as a host array: a view of a CPU tensor, converted once per batch (the
        criteria read the same outputs, and at batch size 1 each torch op costs more than the arithmetic)."""
        t = self.f_t[int(name[3:])] if name.startswith("f_t") else getattr(self, name)
        cached = self._host.get(name)
        if cached is None or cached[0] is not t:
            cached = self._host[name] = (t, _host(t))
        return cached[1]


@dataclass(frozen=True)
class Criterion:
    name: str
    direction: str  # "high" or "low": which side is suspicious
    fn: Callable[[ScoreContext], np.ndarray]


CRITERIA: Registry[Criterion] = Registry("criterion")


def register_criterion(name: str, direction: str):
    def deco(fn):
        CRITERIA.register(name)(lambda: Criterion(name, direction, fn))
        return fn

    return deco


def _host(t: torch.Tensor) -> np.ndarray:
    """A tensor as a NumPy array on the host (no copy for CPU tensors)."""
    return t.detach().cpu().numpy()


@register_criterion("c1", "high")
def _c1(ctx: ScoreContext) -> np.ndarray:
    return c1_mean_hamming(ctx.distances, ctx.bits)


@register_criterion("c2", "low")
def _c2(ctx: ScoreContext) -> np.ndarray:
    return c2_quantization(ctx.host("f"), ctx.host("codes")).astype(np.float64)


@register_criterion("c3", "high")
def _c3(ctx: ScoreContext) -> np.ndarray:
    return c3_disagreement(ctx.host("f"), ctx.host("f_t0")).astype(np.float64)


@dataclass(frozen=True)
class DetectorSpec:
    """A detector variant: criteria names and the transforms whose outputs they read."""

    name: str
    criteria: tuple[str, ...]
    transforms: tuple[str, ...] = ("meanblur3",)
    description: str = ""


DETECTORS: Registry[DetectorSpec] = Registry("detector")


def register_detector(spec: DetectorSpec) -> DetectorSpec:
    DETECTORS.register(spec.name)(lambda: spec)
    return spec


register_detector(DetectorSpec("umcd", ("c1", "c2", "c3"), description="the paper's rule: C1, C2 and C3"))
register_detector(DetectorSpec("umcd-c3", ("c3",), description="ablation: C3 alone"))
register_detector(DetectorSpec("umcd-c1c3", ("c1", "c3"), description="ablation: C1 + C3"))
register_detector(DetectorSpec("umcd-c2c3", ("c2", "c3"), description="ablation: C2 + C3"))


@dataclass
class DetectionBatch:
    """Per-image results of one batch (n images)."""

    codes: np.ndarray  # (n, K) int8 ±1
    f: np.ndarray  # (n, K) float32
    ids: np.ndarray  # (n, k) int64
    distances: np.ndarray  # (n, k) int32
    scores: dict[str, np.ndarray]  # name -> (n,)
    combined: np.ndarray  # (n,)
    fired: np.ndarray  # (n, m) bool, columns in `names` order
    names: list[str]
    thresholds: dict[str, float]
    timings: dict[str, float] = field(default_factory=dict)  # seconds for the whole batch

    def __len__(self) -> int:
        return len(self.codes)

    @property
    def adversarial(self) -> np.ndarray:
        return self.fired.any(1)

    @property
    def verdicts(self) -> list[str]:
        return ["adversarial" if a else "benign" for a in self.adversarial]

    def record(self, i: int) -> dict:
        """JSON-ready result of image i."""
        i = range(len(self))[i]  # negative indices count from the end; out of range raises IndexError
        return self._records(i, i + 1)[0]

    def records(self) -> list[dict]:
        """``record(i)`` of every image, converted per batch rather than per image (a worker builds one per
        request: this is on its batcher's path). The records share one ``thresholds`` dict."""
        return self._records(0, len(self))

    def _records(self, start: int, stop: int) -> list[dict]:
        """The JSON-ready results of images ``start`` to ``stop - 1``, converted to Python values at once."""
        if stop <= start:
            return []
        rows = slice(start, stop)
        fired = self.fired[rows].tolist()
        scores = {k: np.asarray(v[rows], dtype=np.float64).tolist() for k, v in self.scores.items()}
        combined = np.asarray(self.combined[rows], dtype=np.float64).tolist()
        codes = [row.tobytes().hex() for row in pack_codes(self.codes[rows])]
        ids, distances = self.ids[rows].tolist(), self.distances[rows].tolist()
        complete = (self.ids[rows] >= 0).all(1).tolist()
        thresholds = dict(self.thresholds)  # one dict for the call's records (a worker encodes it once a batch)
        out = []
        for j in range(stop - start):
            ids_j, dist_j = ids[j], distances[j]
            if not complete[j]:  # fewer than k codes in the index: FAISS pads with id -1
                ids_j, dist_j = [a for a in ids_j if a >= 0], [d for a, d in zip(ids_j, dist_j) if a >= 0]
            out.append({
                "verdict": "adversarial" if any(fired[j]) else "benign",
                "fired": [name for name, f in zip(self.names, fired[j]) if f],
                "scores": {**{k: v[j] for k, v in scores.items()}, "combined": combined[j]},
                "thresholds": thresholds,
                "topk": {"ids": ids_j, "distances": dist_j},
                "code": codes[j],
            })
        return out


class Detector:
    """UMCD detection over a model, a Hamming index and a calibration.

    images: (n, 3, H, W) float in [0, 1]. x and every t(x) go through the model as one batch.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        index: HammingIndex,
        calibration: Calibration | None = None,
        transform: str | None = None,
        *,
        detector: str = "umcd",
        top_k: int = 10,
        device: str | torch.device | None = None,
    ) -> None:
        self.model = model.eval()
        self.index = index
        self.calibration = calibration
        spec = DETECTORS.create(detector)
        if transform is not None and spec.transforms[:1] != (transform,):
            spec = DetectorSpec(spec.name, spec.criteria, (transform, *spec.transforms[1:]), spec.description)
        self.spec = spec
        self.criteria = [CRITERIA.create(c) for c in spec.criteria]
        self.transforms = [get_transform(t) for t in spec.transforms]
        self.top_k = top_k
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.bits = index.bits
        self.max_forward = self.MAX_FORWARD.get(self.device.type, 1024)

    @property
    def directions(self) -> dict[str, str]:
        return {c.name: c.direction for c in self.criteria}

    #: images per forward pass by device type: larger stacked batches are cut into chunks of x and
    #: their t(x). On a CPU the small CNN's per-image cost rises past ~128-256 images a pass (cache:
    #: 0.31 ms/image at 128, 0.47 at 256, ~0.5 at 512 on the 2-core development machine); a GPU
    #: wants large passes.
    MAX_FORWARD = {"cpu": 128, "cuda": 4096}

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(f(x) (n, K), [f(t(x)) (n, K) per transform]): x and its t(x) stacked into one forward pass
        (for large n, one pass per chunk of x with its t(x), at most `max_forward` images each)."""
        x = images.to(self.device, torch.float32)
        n, views = len(x), 1 + len(self.transforms)
        chunk = max(1, self.max_forward // views)
        if n <= chunk:
            out = self.model(torch.cat([x] + [t(x) for t in self.transforms]))
            return out[:n], [out[n * (j + 1) : n * (j + 2)] for j in range(len(self.transforms))]
        parts = [self.embed(x[i : i + chunk]) for i in range(0, n, chunk)]
        return (torch.cat([p[0] for p in parts]),
                [torch.cat([p[1][j] for p in parts]) for j in range(len(self.transforms))])

    @torch.no_grad()
    def retrieve(self, images: torch.Tensor, k: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Plain retrieval (no detection): (codes (n, K), ids (n, k), distances (n, k))."""
        codes = sign_codes(_host(self.model(images.to(self.device, torch.float32))))
        ids, d = self.index.search(codes, k or self.top_k)
        return codes.astype(np.int8), ids, d

    def context(self, images: torch.Tensor) -> tuple[ScoreContext, dict[str, float]]:
        t0 = time.perf_counter()
        f, f_t = self.embed(images)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        f_host = _host(f)
        codes_host = sign_codes(f_host)  # on the host for the search either way; no torch op at batch size 1
        ids, dists = self.index.search(codes_host, self.top_k)
        t2 = time.perf_counter()
        codes = sign_codes(f) if f.device.type != "cpu" else torch.from_numpy(codes_host)
        ctx = ScoreContext(images, f, f_t, codes, ids, dists, self.bits, self.model, self.index,
                           {"f": (f, f_host), "codes": (codes, codes_host)})
        return ctx, {"model": t1 - t0, "search": t2 - t1}

    def raw_scores(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """name -> (n,) criterion values, uncalibrated (for calibration and ROC curves)."""
        ctx, _ = self.context(images)
        return {c.name: np.asarray(c.fn(ctx), dtype=np.float64) for c in self.criteria}

    def score_batch(self, images: torch.Tensor) -> DetectionBatch:
        """Scores, fired criteria and verdicts for a batch; needs a calibration."""
        if self.calibration is None:
            raise RuntimeError("score_batch needs a calibration: run calibrate() first")
        ctx, timings = self.context(images)
        t2 = time.perf_counter()
        with torch.no_grad():
            scores = {c.name: np.asarray(c.fn(ctx), dtype=np.float64) for c in self.criteria}
        cal = self.calibration
        missing = [n for n in cal.names if n not in scores]
        if missing:
            raise ValueError(f"calibration needs criteria {missing} that detector {self.spec.name!r} does not compute")
        sub = {n: scores[n] for n in cal.names}
        timings["criteria"] = time.perf_counter() - t2
        combined, fired = cal.decide(sub)
        return DetectionBatch(
            codes=ctx.host("codes").astype(np.int8),
            f=ctx.host("f").astype(np.float32),
            ids=ctx.ids,
            distances=ctx.distances,
            scores=scores,
            combined=combined,
            fired=fired,
            names=list(cal.names),
            thresholds=dict(cal.thresholds),
            timings=timings,
        )

    def calibrate(self, benign: torch.Tensor, target_fpr: float = 0.05, batch_size: int = 256, **meta) -> Calibration:
        """Fits thresholds on benign images (n, 3, H, W) only, sets and returns the calibration."""
        parts = [self.raw_scores(benign[i : i + batch_size]) for i in range(0, len(benign), batch_size)]
        scores = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        meta = {"detector": self.spec.name, "transforms": list(self.spec.transforms), "top_k": self.top_k, **meta}
        self.calibration = Calibration.fit(scores, self.directions, target_fpr, **meta)
        return self.calibration

import core.extensions  # noqa: E402,F401  (registers the extension transforms, criteria and detectors)
