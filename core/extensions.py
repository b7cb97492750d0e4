"""Detector extensions beyond the paper: more transforms, secret random denoisers, feature, neighbour and trust checks.

Importing this module registers its transforms (core.transforms.TRANSFORMS), criteria
(core.detector.CRITERIA) and detector specs; `core.detector` imports it at its end. Specs that need
only the model and the index (umcd-multi, umcd-rand, umcd-feat, umcd-nbr, umcd-rand-feat) are in
core.detector.DETECTORS and run through `Detector(model, index, ..., detector=name)`. Specs that
also read a `FeatureReference` of the database (umcd-trust-input, umcd-trust, umcd-fknn: does x look,
in pixels or early features, like the database images of the code it retrieves?) are in
REFERENCE_DETECTORS and run through `ReferenceDetector` / `make_detector(name, model, index,
reference=...)`; a reference is built once per model version (`FeatureReference.build`, saved at
`reference_path`).

Threat model of the randomised defense: the attacker knows the model, the criteria, the
thresholds and the *family* of denoisers, but not the deployment secret, so not which member is
applied to a given image. The member (and any noise it adds) is drawn per image from a keyed
hash (BLAKE2b, key = the secret) of the image's 8-bit pixels: the verdict of an image is
reproducible (same secret, same image, same verdict, whatever batch it arrives in) and differs
across secrets; an attacker who cannot compute the hash faces a fresh draw for every candidate
x' it submits, so the best it can do is expectation over the family (EOT).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core.criteria import c3_disagreement
from core.detector import CRITERIA, DETECTORS, Detector, DetectorSpec, ScoreContext, register_criterion, register_detector
from core.index import unpack_codes
from core.registry import Registry
from core.transforms import TRANSFORMS, bit_depth, get_transform, mean_blur, median_filter

#: environment variable holding the deployment secret of the random denoiser (any string)
SECRET_ENV = "UMCD_DETECTOR_SECRET"
DEFAULT_SECRET = "umcd-public-default"  # used when no secret is set: reproducible, but then the draws are public

# ---------------------------------------------------------------------------- deterministic transforms


def gaussian_blur(x: torch.Tensor, sigma: float = 1.0, size: int = 5) -> torch.Tensor:
    """Separable Gaussian blur (std ``sigma`` pixels, ``size`` taps, reflect padding): (n, C, H, W) -> same."""
    r = size // 2
    k = torch.exp(-0.5 * (torch.arange(size, dtype=x.dtype, device=x.device) - r) ** 2 / sigma**2)
    k = k / k.sum()
    c = x.shape[1]
    xp = F.pad(x, (r, r, r, r), mode="reflect")
    xp = F.conv2d(xp, k.view(1, 1, 1, size).expand(c, 1, 1, size), groups=c)
    return F.conv2d(xp, k.view(1, 1, size, 1).expand(c, 1, size, 1), groups=c)


def down_up(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Average-pool by ``factor`` then bilinear upsampling back: a low-pass that removes the finest scale."""
    h, w = x.shape[-2:]
    small = F.avg_pool2d(x, factor)
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translates every image by (dy, dx) pixels with replicate padding (differentiable)."""
    p = max(abs(dy), abs(dx))
    if p == 0:
        return x
    h, w = x.shape[-2:]
    xp = F.pad(x, (p, p, p, p), mode="replicate")
    return xp[..., p - dy : p - dy + h, p - dx : p - dx + w]


TRANSFORMS.register("gaussblur1")(lambda: (lambda x: gaussian_blur(x, 1.0, 5)))
TRANSFORMS.register("downup2")(lambda: (lambda x: down_up(x, 2)))
TRANSFORMS.register("shift1")(lambda: (lambda x: mean_blur(shift(x, 1, 1), 3)))

# ---------------------------------------------------------------------------- the random denoiser family


@dataclass(frozen=True)
class Member:
    """One denoiser of the family: ``apply(x, noise)`` with noise (n, C, H, W) ~ N(0, 1) (ignored by most)."""

    name: str
    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    uses_noise: bool = False


def _noisy_blur(sigma_255: float, size: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda x, z: mean_blur((x + z * (sigma_255 / 255.0)).clamp(0, 1), size)


#: the family: kernel type and size, and additive noise before smoothing
FAMILY: tuple[Member, ...] = (
    Member("meanblur3", lambda x, z: mean_blur(x, 3)),
    Member("meanblur5", lambda x, z: mean_blur(x, 5)),
    Member("gaussblur0.8", lambda x, z: gaussian_blur(x, 0.8, 5)),
    Member("gaussblur1.2", lambda x, z: gaussian_blur(x, 1.2, 5)),
    Member("median3", lambda x, z: median_filter(x, 3)),
    Member("downup2", lambda x, z: down_up(x, 2)),
    Member("noise8+meanblur3", _noisy_blur(8.0, 3), uses_noise=True),
    Member("noise16+gaussblur1", lambda x, z: gaussian_blur((x + z * (16 / 255.0)).clamp(0, 1), 1.0, 5), uses_noise=True),
    Member("shift+meanblur3", lambda x, z: mean_blur(shift(x, 1, -1), 3)),
    # straight-through rounding: the same forward value, an identity gradient for the attacker's EOT (BPDA)
    Member("bitdepth4+meanblur3", lambda x, z: mean_blur(x + (bit_depth(x, 4) - x).detach(), 3)),
)


def apply_members(x: torch.Tensor, members: Sequence[int], noise: torch.Tensor | None, family=FAMILY) -> torch.Tensor:
    """Applies family[members[i]] to image i, batched by member: x (n, C, H, W) -> (n, C, H, W)."""
    idx = torch.as_tensor(list(members), device=x.device)
    out = torch.empty_like(x) if not x.requires_grad else None
    parts, where = [], []
    for m in torch.unique(idx).tolist():
        sel = torch.nonzero(idx == m).flatten()
        z = noise[sel] if noise is not None else torch.zeros_like(x[sel])
        y = family[m].apply(x[sel], z)
        if out is not None:
            out[sel] = y
        else:
            parts.append(y)
            where.append(sel)
    if out is not None:
        return out
    order = torch.argsort(torch.cat(where))
    return torch.cat(parts)[order]


def image_digests(x: torch.Tensor, secret: str | bytes) -> list[bytes]:
    """Per image, BLAKE2b(key=secret) of its 8-bit pixels: 16 bytes each. x (n, C, H, W) in [0, 1]."""
    key = secret.encode() if isinstance(secret, str) else bytes(secret)
    key = hashlib.blake2b(key, digest_size=32).digest()  # any length of secret -> a valid 32-byte key
    pixels = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [hashlib.blake2b(p.tobytes(), key=key, digest_size=16).digest() for p in pixels]


class RandomDenoiser:
    """t(x) = a member of `FAMILY` drawn per image from a keyed hash of the image (see the module docstring).

    Callable on (n, C, H, W) in [0, 1] like any transform. ``sample(x, generator)`` is the
    attacker's view: members and noise drawn from a torch.Generator (for EOT).
    """

    differentiable = True  # every member passes a useful gradient (median routes it, bit depth is straight-through)

    def __init__(self, secret: str | bytes | None = None, family: Sequence[Member] = FAMILY) -> None:
        if secret is None:
            secret = os.environ.get(SECRET_ENV) or DEFAULT_SECRET
        self._secret = secret
        self.family = tuple(family)
        self.__name__ = "random-denoise"

    def draws(self, x: torch.Tensor) -> tuple[list[int], torch.Tensor | None]:
        """(member index per image, noise (n, C, H, W) or None) for the defense's draw on x."""
        digests = image_digests(x, self._secret)
        members = [int.from_bytes(d[:8], "little") % len(self.family) for d in digests]
        noise = None
        noisy = [i for i, m in enumerate(members) if self.family[m].uses_noise]
        if noisy:  # per-image generators (seeded by the digest) keep an image's draw independent of its batch
            noise = torch.zeros(x.shape, dtype=x.dtype)
            for i in noisy:
                g = torch.Generator().manual_seed(int.from_bytes(digests[i][8:], "little") & (2**63 - 1))
                noise[i] = torch.randn(x.shape[1:], generator=g)
            noise = noise.to(x.device)
        return members, noise

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        members, noise = self.draws(x)
        return apply_members(x, members, noise, self.family)

    def sample(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """An independent draw per image from ``generator`` (the attacker's EOT view of the family)."""
        n = x.shape[0]
        members = torch.randint(len(self.family), (n,), generator=generator, device=generator.device).tolist()
        noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
        return apply_members(x, members, noise, self.family)

    def __repr__(self) -> str:
        return f"RandomDenoiser(family={[m.name for m in self.family]}, secret=***)"


def family_sampler(family: Sequence[Member] = FAMILY) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """The attacker's EOT transform for a family: (x, generator) -> a random member per image."""
    return RandomDenoiser("attacker-does-not-know-the-secret", family).sample


TRANSFORMS.register("random-denoise")(lambda secret=None: RandomDenoiser(secret))

# ---------------------------------------------------------------------------- criteria


def _c3_at(j: int):
    def fn(ctx: ScoreContext) -> np.ndarray:
        return c3_disagreement(ctx.f, ctx.f_t[j]).cpu().numpy().astype(np.float64)

    return fn


#: c3@j: continuous Hamming disagreement between f(x) and f(t_j(x)), t_j the spec's j-th transform
for _j in range(1, 8):
    register_criterion(f"c3@{_j}", "high")(_c3_at(_j))


@register_criterion("c1soft", "high")
def _c1soft(ctx: ScoreContext) -> np.ndarray:
    """Mean continuous Hamming distance (K - f(x)·h_j)/2 from f(x) to the codes h_j of its top-k neighbours."""
    ids = ctx.ids
    valid = ids >= 0
    out = np.full(len(ids), ctx.bits / 2.0)
    if not valid.any():
        return out
    codes = unpack_codes(ctx.index.reconstruct(ids[valid]), ctx.bits)  # (m, K)
    f = ctx.f.detach().cpu().numpy().astype(np.float64)
    rows = np.repeat(np.arange(len(ids)), valid.sum(1))  # ids[valid] is row-major
    d = 0.5 * (ctx.bits - (f[rows] * codes).sum(1))
    sums = np.bincount(rows, weights=d, minlength=len(ids))
    cnt = valid.sum(1)
    return np.where(cnt > 0, sums / np.maximum(cnt, 1), out)


# ---------------------------------------------------------------------------- intermediate features


def pooled_features(stages: Sequence[torch.Tensor], grid: int = 4) -> list[torch.Tensor]:
    """Per stage, activations average-pooled to grid x grid, flattened and L2-normalised: [(n, D_s)]."""
    out = []
    for a in stages:
        if a.dim() == 4:
            a = F.adaptive_avg_pool2d(a, min(grid, a.shape[-1]))
        out.append(F.normalize(a.flatten(1), dim=1))
    return out


def feature_disagreement(feats_x: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor]) -> torch.Tensor:
    """(S, n): per stage, ||φ_s(x) - φ_s(t(x))||_2 of the pooled, normalised features (in [0, 2])."""
    return torch.stack([(a - b).norm(dim=1) for a, b in zip(feats_x, feats_t)])


FEATURE_TRANSFORM = "meanblur3"  # the t(·) of the feature criteria: the paper's 3x3 mean blur


def feature_views(model: torch.nn.Module, x: torch.Tensor, transform=None) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """One forward pass over [x, t(x)]: (f(x) (n, K), f(t(x)) (n, K), pooled features of x, of t(x)).

    Differentiable (the adaptive attack uses it as a penalty); t defaults to `FEATURE_TRANSFORM`.
    """
    fwf = getattr(model, "forward_with_features", None)
    if fwf is None:
        raise TypeError("feature criteria need a model with forward_with_features(x) -> (f, [stage activations])")
    t = get_transform(FEATURE_TRANSFORM) if transform is None else transform
    n = x.shape[0]
    f, stages = fwf(torch.cat([x, t(x)]))
    feats = pooled_features(stages)
    return f[:n], f[n:], [a[:n] for a in feats], [a[n:] for a in feats]


def _feature_pass(ctx: ScoreContext, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(C3 from the feature pass (n,), stage disagreements (S, n)) under t = the mean blur (kind "blur") or the
    secret random denoiser (kind "random"), computed once per ScoreContext and kind."""
    cache = ctx.__dict__.setdefault("_umcd_feature_pass", {})
    if kind not in cache:
        t = get_transform(FEATURE_TRANSFORM) if kind == "blur" else RandomDenoiser()
        with torch.no_grad():
            f, f_t, fx, ft = feature_views(ctx.model, ctx.images.to(ctx.f.device, torch.float32), t)
        cache[kind] = (c3_disagreement(f, f_t), feature_disagreement(fx, ft))
    return cache[kind]


@register_criterion("c3f", "high")
def _c3f(ctx: ScoreContext) -> np.ndarray:
    """C3 (x vs the 3x3 mean blur) read from the feature pass (no spec transform needed)."""
    return _feature_pass(ctx, "blur")[0].cpu().numpy().astype(np.float64)


def _feat_at(s: int, kind: str):
    def fn(ctx: ScoreContext) -> np.ndarray:
        dis = _feature_pass(ctx, kind)[1]
        if s >= len(dis):
            raise ValueError(f"feature criterion at stage {s} needs a backbone with more than {s} stages, it has {len(dis)}")
        return dis[s].cpu().numpy().astype(np.float64)

    return fn


#: feat@s: ||φ_s(x) - φ_s(t(x))|| of pooled, L2-normalised activations of backbone stage s, t the 3x3 mean blur;
#: featr@s: the same with t the secret random denoiser (`RandomDenoiser`)
for _s in range(4):
    register_criterion(f"feat@{_s}", "high")(_feat_at(_s, "blur"))
    register_criterion(f"featr@{_s}", "high")(_feat_at(_s, "random"))

FEATURE_CRITERIA = tuple(f"feat@{s}" for s in range(4)) + tuple(f"featr@{s}" for s in range(4)) + ("c3f",)
#: criteria that need a pass over x alone through forward_with_features (trust@in reads pixels: no pass)
QUERY_FEATURE_CRITERIA = tuple(f"fknn@{s}" for s in range(4)) + tuple(f"trust@{s}" for s in range(4))

# ---------------------------------------------------------------------------- detector specs

#: the deterministic transform family of umcd-multi (the paper's blur first)
MULTI_TRANSFORMS = ("meanblur3", "median3", "downup2", "gaussblur1", "shift1", "bitdepth4")

EXTENSIONS: tuple[DetectorSpec, ...] = (
    DetectorSpec(
        "umcd-multi",
        ("c1", "c2", "c3") + tuple(f"c3@{j}" for j in range(1, len(MULTI_TRANSFORMS))),
        MULTI_TRANSFORMS,
        "C1, C2 and C3 under six transforms (mean blur, median, down-up, Gaussian blur, shifted blur, "
        "bit depth), combined by the joint min-p calibration",
    ),
    DetectorSpec(
        "umcd-rand",
        ("c1", "c2", "c3", "c3@1"),
        ("meanblur3", "random-denoise"),
        "the paper's rule plus C3 under a denoiser drawn per image from a 10-member family by a keyed hash "
        f"with the deployment secret (${SECRET_ENV})",
    ),
    DetectorSpec(
        "umcd-feat",
        ("c1", "c2", "c3", "feat@1", "feat@3"),
        ("meanblur3",),
        "C1, C2, C3 and the blur consistency of intermediate features (backbone stages 1 and 3)",
    ),
    DetectorSpec(
        "umcd-nbr",
        ("c1soft", "c2", "c3"),
        ("meanblur3",),
        "C1 replaced by the continuous agreement of f(x) with its top-k neighbours' codes, C2, C3",
    ),
    DetectorSpec(
        "umcd-rand-feat",
        ("c1", "c2", "c3", "c3@1", "featr@1", "featr@3"),
        ("meanblur3", "random-denoise"),
        "umcd-rand plus the consistency of intermediate features (stages 1 and 3) under the secret random denoiser",
    ),
)
for _spec in EXTENSIONS:
    register_detector(_spec)


# ---------------------------------------------------------------------------- feature-space neighbours (needs a reference)


INPUT_STAGE = -1  #: the input image itself, average-pooled to INPUT_GRID x INPUT_GRID per channel
INPUT_GRID = 8


def stage_features(x: torch.Tensor, stage_outputs: Sequence[torch.Tensor], stages: Sequence[int]) -> dict[int, torch.Tensor]:
    """{stage: (n, D) L2-normalised features}: pooled backbone activations (`pooled_features`) or, for
    INPUT_STAGE, the image average-pooled to INPUT_GRID x INPUT_GRID (an input-space view the network cannot bend)."""
    pooled = pooled_features(stage_outputs)
    out = {}
    for st in stages:
        if st == INPUT_STAGE:
            out[st] = F.normalize(F.adaptive_avg_pool2d(x, min(INPUT_GRID, x.shape[-1])).flatten(1), dim=1)
        else:
            out[st] = pooled[st]
    return out


class FeatureReference:
    """Pooled, L2-normalised early-stage features of benign reference images (the database) and their codes.

    features[s]: (m, D_s) float32 for each stage in ``stages``; codes: (m, K) ±1; ids: (m,) int64.
    Memory: 4·sum_s D_s bytes per image (input 8x8x3 and stages 0 and 1 of smallcnn: 192 + 256 + 512
    floats = 3.75 KiB, about 480x the 8 bytes of a 64-bit code).
    """

    def __init__(self, stages: Sequence[int], features: Sequence[torch.Tensor], codes: torch.Tensor, ids: np.ndarray) -> None:
        self.stages = tuple(int(s) for s in stages)
        self.features = [f.float() for f in features]
        self.codes = codes.float()
        self.ids = np.asarray(ids, dtype=np.int64)

    @classmethod
    @torch.no_grad()
    def build(cls, model: torch.nn.Module, images: torch.Tensor, ids=None, stages: Sequence[int] = (INPUT_STAGE, 0, 1), batch_size: int = 256) -> "FeatureReference":
        """Encodes ``images`` (m, 3, H, W) in [0, 1] (default ids 0..m-1)."""
        feats: list[list[torch.Tensor]] = [[] for _ in stages]
        codes = []
        dev = next(model.parameters()).device
        for i in range(0, len(images), batch_size):
            xb = images[i : i + batch_size].to(dev, torch.float32)
            f, st = model.forward_with_features(xb)
            pooled = stage_features(xb, st, stages)
            for j, s in enumerate(stages):
                feats[j].append(pooled[s].cpu())
            codes.append(sign_codes_of(f).cpu())
        ids = np.arange(len(images)) if ids is None else ids
        return cls(stages, [torch.cat(f) for f in feats], torch.cat(codes), ids)

    def __len__(self) -> int:
        return len(self.ids)

    def save(self, path) -> None:
        """Writes the reference as safetensors (features per stage, codes, ids; stages in the metadata)."""
        import json
        from pathlib import Path

        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"features.{s}": f.contiguous() for s, f in zip(self.stages, self.features)}
        tensors["codes"] = self.codes.to(torch.int8).contiguous()
        tensors["ids"] = torch.from_numpy(self.ids.copy())
        tmp = path.with_suffix(path.suffix + ".tmp")
        save_file(tensors, str(tmp), metadata={"stages": json.dumps(list(self.stages))})
        tmp.replace(path)

    @classmethod
    def load(cls, path) -> "FeatureReference":
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            stages = json.loads(f.metadata()["stages"])
            feats = [f.get_tensor(f"features.{s}") for s in stages]
            codes, ids = f.get_tensor("codes").float(), f.get_tensor("ids").numpy()
        return cls(stages, feats, codes, ids)

    @property
    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.features)

    def nbytes_for(self, stages: Sequence[int]) -> int:
        """Bytes of the features of the given stages (what a detector reading only those needs)."""
        return sum(f.numel() * f.element_size() for s, f in zip(self.stages, self.features) if s in stages)

    def neighbour_codes(self, feats: torch.Tensor, stage: int, k: int) -> torch.Tensor:
        """Codes (n, k, K) of the k nearest reference images to feats (n, D) in stage ``stage`` (cosine)."""
        ref = self.features[self.stages.index(stage)].to(feats.device)
        nn_ = (feats @ ref.T).topk(min(k, len(ref)), dim=1).indices
        return self.codes.to(feats.device)[nn_]


def sign_codes_of(f: torch.Tensor) -> torch.Tensor:
    return torch.where(f >= 0, torch.ones_like(f), -torch.ones_like(f))


FKNN_K = 10


def _query_features(ctx: ScoreContext, stage: int) -> torch.Tensor:
    """Features of x alone at one stage, cached on ctx: the input stage needs no forward pass, the backbone
    stages share one forward_with_features pass over x."""
    cache = ctx.__dict__.setdefault("_umcd_query_features", {})
    x = ctx.images.to(ctx.f.device, torch.float32)
    if stage == INPUT_STAGE:
        if stage not in cache:
            cache[stage] = stage_features(x, [], [INPUT_STAGE])[INPUT_STAGE]
        return cache[stage]
    if "stages" not in cache:
        with torch.no_grad():
            _, st = ctx.model.forward_with_features(x)
        cache["stages"] = pooled_features(st)
    return cache["stages"][stage]


def required_stages(criteria: Sequence[str]) -> tuple[int, ...]:
    """The FeatureReference stages a detector's criteria read (fknn@s, trust@s, trust@in), in reference order."""
    need = set()
    for c in criteria:
        if c == "trust@in":
            need.add(INPUT_STAGE)
        elif c.startswith(("fknn@", "trust@")):
            need.add(int(c.split("@")[1]))
    return tuple(sorted(need))


def _fknn_at(s: int):
    def fn(ctx: ScoreContext) -> np.ndarray:
        ref: FeatureReference | None = getattr(ctx, "feature_reference", None)
        if ref is None:
            raise LookupError("fknn criteria need a FeatureReference: score with core.extensions.ReferenceDetector")
        codes = ref.neighbour_codes(_query_features(ctx, s), s, FKNN_K)  # (n, k, K)
        q = ctx.codes.to(codes.device).unsqueeze(1)
        return (0.5 * (ctx.bits - (codes * q).sum(-1))).mean(1).cpu().numpy().astype(np.float64)

    return fn


#: fknn@s: mean Hamming distance from h(x) to the codes of the FKNN_K reference images nearest to x in the
#: pooled feature space of backbone stage s — C1 with neighbours found by early features instead of codes
for _s in range(4):
    register_criterion(f"fknn@{_s}", "high")(_fknn_at(_s))

def trust_ratio(feats: torch.Tensor, codes: torch.Tensor, ref_feats: torch.Tensor, ref_codes: torch.Tensor) -> torch.Tensor:
    """Trust-score ratio d(x, nearest reference sharing x's code) / d(x, nearest reference not sharing it): (n,).

    feats (n, D) and ref_feats (m, D) L2-normalised (distance sqrt(2 - 2 cos)); codes (n, K) and
    ref_codes (m, K) ±1; "sharing" means within K/8 bits (TRUST_RADIUS_FRAC). Differentiable in feats
    (through the two minima). A query whose code no reference shares gets d_same = 4 (> any distance).
    Jiang et al., "To trust or not to trust a classifier" (NeurIPS 2018), with codes for classes.
    """
    bits = codes.shape[1]
    near = 0.5 * (bits - codes @ ref_codes.T) <= bits * TRUST_RADIUS_FRAC
    d = (2 - 2 * feats @ ref_feats.T).clamp_min(1e-8).sqrt()
    d_same = d.masked_fill(~near, 4.0).min(1).values
    d_other = d.masked_fill(near, 4.0).min(1).values
    return d_same / d_other.clamp_min(1e-6)


TRUST_RADIUS_FRAC = 0.125


def _trust_at(s: int):
    def fn(ctx: ScoreContext) -> np.ndarray:
        ref: FeatureReference | None = getattr(ctx, "feature_reference", None)
        if ref is None:
            raise LookupError("trust criteria need a FeatureReference: score with core.extensions.ReferenceDetector")
        feats = _query_features(ctx, s)
        r = ref.features[ref.stages.index(s)].to(feats.device)
        ratio = trust_ratio(feats, ctx.codes.to(feats.device).float(), r, ref.codes.to(feats.device))
        return ratio.cpu().numpy().astype(np.float64)

    return fn


#: trust@s: the trust-score ratio in the pooled feature space of backbone stage s (high: x looks, at that stage,
#: more like database images of another code than like those of its own); trust@in: in input space (INPUT_STAGE)
for _s in range(4):
    register_criterion(f"trust@{_s}", "high")(_trust_at(_s))
register_criterion("trust@in", "high")(_trust_at(INPUT_STAGE))

def reference_path(artifacts, version: str):
    """Where a model version's FeatureReference lives: ``<artifacts>/references/<version>.safetensors``."""
    from pathlib import Path

    return Path(artifacts) / "references" / f"{version}.safetensors"


#: detectors that need a FeatureReference (kept out of DETECTORS: `Detector(model, index)` alone cannot run them)
REFERENCE_DETECTORS: Registry[DetectorSpec] = Registry("reference detector")
REFERENCE_DETECTORS.register("umcd-fknn")(lambda: DetectorSpec(
    "umcd-fknn",
    ("c1", "c2", "c3", "fknn@0", "fknn@1"),
    ("meanblur3",),
    "the paper's rule plus C1 in the feature space of backbone stages 0 and 1: do the database images that look "
    "like x at the first layers share its code? (needs a FeatureReference of the database)",
))

REFERENCE_DETECTORS.register("umcd-trust")(lambda: DetectorSpec(
    "umcd-trust",
    ("c1", "c2", "c3", "trust@0", "trust@1"),
    ("meanblur3",),
    "the paper's rule plus the trust-score ratio in the feature space of backbone stages 0 and 1: is x nearer, at "
    "the first layers, to database images of its own code than to any other? (needs a FeatureReference)",
))
REFERENCE_DETECTORS.register("umcd-trust-input")(lambda: DetectorSpec(
    "umcd-trust-input",
    ("c1", "c2", "c3", "trust@in"),
    ("meanblur3",),
    "the paper's rule plus the trust-score ratio in input space (images average-pooled to 8x8): is x nearer, in "
    "pixels, to database images of its own code than to any other? (needs a FeatureReference; no extra pass)",
))


class ReferenceDetector(Detector):
    """A `Detector` whose criteria may read a `FeatureReference` (``ctx.feature_reference``).

    Same constructor as `Detector` plus ``reference``; ``detector`` names a spec of REFERENCE_DETECTORS
    (or of DETECTORS). Calibrate and score exactly as a `Detector`.
    """

    def __init__(self, model, index, reference: FeatureReference, calibration=None, transform=None, *,
                 detector: str = "umcd-fknn", top_k: int = 10, device=None) -> None:
        super().__init__(model, index, calibration, None, detector="umcd", top_k=top_k, device=device)
        spec = REFERENCE_DETECTORS.create(detector) if detector in REFERENCE_DETECTORS else DETECTORS.create(detector)
        if transform is not None and spec.transforms[:1] != (transform,):
            spec = DetectorSpec(spec.name, spec.criteria, (transform, *spec.transforms[1:]), spec.description)
        self.spec = spec
        self.criteria = [CRITERIA.create(c) for c in spec.criteria]
        self.transforms = [get_transform(t) for t in spec.transforms]
        self.reference = reference

    def context(self, images):
        ctx, timings = super().context(images)
        ctx.feature_reference = self.reference  # type: ignore[attr-defined]
        return ctx, timings


def make_detector(name: str, model, index, *, reference: FeatureReference | None = None, **kw) -> Detector:
    """A Detector for any registered name: ReferenceDetector (needs ``reference``) for REFERENCE_DETECTORS."""
    if name in REFERENCE_DETECTORS:
        if reference is None:
            raise ValueError(f"detector {name!r} needs a FeatureReference of the database")
        return ReferenceDetector(model, index, reference, detector=name, **kw)
    return Detector(model, index, detector=name, **kw)
