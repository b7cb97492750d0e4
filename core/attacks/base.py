"""The attack API: the abstract `Attack`, its `AttackResult`, and the attack registry."""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, TypeVar

import torch
from torch import Tensor, nn

from core.registry import Registry

from .success import hamming, sign_codes, targeted_success, untargeted_success

ATTACKS: Registry["Attack"] = Registry("attack")

A = TypeVar("A", bound=type["Attack"])


def register_attack(name: str) -> Callable[[A], A]:
    """Class decorator: registers an `Attack` subclass under ``name`` and sets its ``name``."""

    def deco(cls: A) -> A:
        cls.name = name
        ATTACKS.register(name)(cls)
        return cls

    return deco


def get_attack(name: str, **params: Any) -> "Attack":
    """Builds the attack registered as ``name`` with its hyper-parameters (keyword arguments)."""
    return ATTACKS.create(name, **params)


def list_attacks() -> list[str]:
    """Names of every registered attack, sorted."""
    return ATTACKS.names()


@dataclass
class AttackResult:
    """What one `Attack.run` produced; all tensors live on the images' device.

    adv: (n, 3, H, W) float in [0, 1], the adversarial images.
    success: (n,) bool, per-sample success under the attack's rule (see ``params["success_rule"]``).
    codes_before: (n, K) in {-1, +1}, h(x) of the clean images.
    codes_after: (n, K) in {-1, +1}, h(x') of the adversarial images.
    hamming_to_source: (n,) int64, Hamming(h(x'), h(x)) in bits.
    hamming_to_target: (n,) int64 Hamming(h(x'), target code) for targeted attacks, else None.
    target_codes: (n, K) in {-1, +1}, the target codes (targeted attacks), else None; with
        ``codes_after`` and the target labels these are the inputs of a targeted mAP (t-mAP).
    linf: (n,) max |x' - x| per sample, in [0, 1] pixel units.
    l2: (n,) ||x' - x||_2 per sample, in [0, 1] pixel units.
    params: JSON-serialisable dict: attack name, budgets, hyper-parameters, seed, threshold,
        norms summary (``linf_max_255``/``linf_mean_255`` in 1/255 units, ``l2_mean``/``l2_max``
        in [0, 1] pixel units).
    """

    adv: Tensor
    success: Tensor
    codes_before: Tensor
    codes_after: Tensor
    hamming_to_source: Tensor
    hamming_to_target: Tensor | None
    params: dict[str, Any]
    target_codes: Tensor | None = None
    linf: Tensor = field(default_factory=lambda: torch.empty(0))
    l2: Tensor = field(default_factory=lambda: torch.empty(0))

    @property
    def success_rate(self) -> float:
        """Fraction of samples that succeeded, in [0, 1] (0.0 for an empty batch)."""
        n = self.success.numel()
        return float(self.success.float().mean()) if n else 0.0

    def __len__(self) -> int:
        return int(self.adv.shape[0])


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Puts ``model`` in eval mode with no gradient to its parameters; restores both afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def project_linf(x_adv: Tensor, x: Tensor, eps: float | None) -> Tensor:
    """Projects x_adv onto {||x' - x||_inf <= eps} ∩ [0, 1]^D; eps in [0, 1] pixel units, None = box only."""
    if eps is not None:
        x_adv = x + (x_adv - x).clamp(-eps, eps)
    return x_adv.clamp(0.0, 1.0)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Tensor) and value.numel() == 1:
        return _jsonable(value.item())
    return getattr(value, "name", None) or getattr(value, "__name__", None) or type(value).__name__


class Attack(ABC):
    """One adversarial attack on a deep-hashing model, in the manner of foolbox.

    Construct with hyper-parameters (``get_attack(name, **params)``), then call `run`. The model is a
    ``torch.nn.Module`` mapping images (n, 3, H, W) in [0, 1] to outputs f(x): (n, K) in (-1, 1);
    the code is h(x) = sign(f(x)) with sign(0) = +1.

    Subclasses set ``targeted``, ``norm`` ("linf" or "l2"), ``default_eps`` (1/255 units, None for
    unbounded), ``target_kind`` ("codes": (n, K) ±1 targets, "outputs": (n, K) continuous targets,
    None: untargeted) and ``default_threshold_frac`` (the success threshold as a fraction of K),
    and implement `_perturb`.
    """

    name: ClassVar[str] = ""
    targeted: ClassVar[bool] = False
    norm: ClassVar[str] = "linf"
    default_eps: ClassVar[float | None] = 8.0
    target_kind: ClassVar[str | None] = None
    default_threshold_frac: ClassVar[float] = 0.5

    def __init__(self, *, threshold_bits: float | None = None) -> None:
        if threshold_bits is not None and threshold_bits < 0:
            raise ValueError("threshold_bits must be >= 0")
        self.threshold_bits = threshold_bits
        self.hyperparams: dict[str, Any] = {"threshold_bits": threshold_bits}
        self._run_notes: dict[str, Any] = {}

    # ----------------------------------------------------------------- public

    def threshold_for(self, bits: int) -> float:
        """Success threshold in bits for K = ``bits``: ``threshold_bits`` or ``default_threshold_frac * K``."""
        if self.threshold_bits is not None:
            return float(self.threshold_bits)
        return self.default_threshold_frac * bits

    def success_rule(self) -> str:
        """The success rule in words, recorded in ``AttackResult.params``."""
        if self.targeted:
            return "hamming(h(x'), target) <= threshold_bits"
        return "hamming(h(x'), h(x)) >= threshold_bits"

    def run(
        self,
        model: nn.Module,
        images: Tensor,
        *,
        targets: Tensor | None = None,
        eps: float | None = None,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> AttackResult:
        """Attacks ``images`` and reports per-sample success.

        model: images (n, 3, H, W) in [0, 1] -> (n, K) in (-1, 1). Put in eval mode and its parameters
            frozen for the duration; both are restored afterwards.
        images: (n, 3, H, W) float in [0, 1]; never modified. Everything runs on its device.
        targets: targeted attacks only, (n, K) or (K,) (broadcast to n): ±1 codes when
            ``target_kind == "codes"``, continuous outputs in [-1, 1] when ``"outputs"``.
        eps: L_inf budget in 1/255 units (8 means 8/255); None takes ``default_eps``.
        seed: seeds the torch.Generator that drives every random choice (random starts, EOT draws).
        batch_size: process at most this many images at once (None: the whole batch).
        """
        x_all = self._check_images(images)
        n = x_all.shape[0]
        eps_255 = self.default_eps if eps is None else float(eps)
        if eps_255 is not None and (not math.isfinite(eps_255) or eps_255 < 0):
            raise ValueError(f"eps must be a finite number >= 0 (1/255 units), got {eps}")
        eps_px = None if eps_255 is None else eps_255 / 255.0
        if batch_size is not None and batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        t_all = self._check_targets(targets, n, x_all)
        chunk = n if batch_size is None else batch_size

        generator = torch.Generator(device=x_all.device)
        generator.manual_seed(int(seed))

        self._run_notes: dict[str, Any] = {}
        advs, before, after = [], [], []
        with frozen(model):
            for start in range(0, max(n, 1), max(chunk, 1)):
                x = x_all[start : start + chunk]
                if x.shape[0] == 0:
                    break
                t = None if t_all is None else t_all[start : start + chunk]
                with torch.no_grad():
                    out = model(x)
                if out.dim() != 2 or out.shape[0] != x.shape[0]:
                    raise ValueError(f"model must map (n, 3, H, W) to (n, K), got {tuple(out.shape)}")
                codes0 = sign_codes(out)
                with torch.enable_grad():
                    adv = self._perturb(
                        model, x, source_codes=codes0, targets=t, eps=eps_px, generator=generator
                    )
                adv = project_linf(adv.detach(), x, eps_px if self.norm == "linf" else None)
                with torch.no_grad():
                    codes1 = sign_codes(model(adv))
                advs.append(adv)
                before.append(codes0)
                after.append(codes1)

        if not advs:
            raise ValueError("images is an empty batch")
        adv = torch.cat(advs)
        codes_before = torch.cat(before)
        codes_after = torch.cat(after)
        bits = codes_before.shape[1]
        threshold = self.threshold_for(bits)
        h_src = hamming(codes_after, codes_before)
        target_codes = None if t_all is None else sign_codes(t_all)
        h_tgt = None if target_codes is None else hamming(codes_after, target_codes)
        if self.targeted:
            assert h_tgt is not None
            success = targeted_success(h_tgt, threshold)
        else:
            success = untargeted_success(h_src, threshold)

        delta = (adv - x_all).flatten(1)
        linf = delta.abs().amax(1)
        l2 = delta.norm(dim=1)
        params: dict[str, Any] = {
            "attack": self.name,
            "targeted": self.targeted,
            "norm": self.norm,
            "eps": eps_255,
            "seed": int(seed),
            "batch_size": batch_size,
            "n": n,
            "bits": bits,
            **self.hyperparams,
            **self._run_notes,
            "threshold_bits_effective": threshold,
            "success_rule": self.success_rule(),
            "linf_max_255": float(linf.max()) * 255.0,
            "linf_mean_255": float(linf.mean()) * 255.0,
            "l2_mean": float(l2.mean()),
            "l2_max": float(l2.max()),
        }
        return AttackResult(
            adv=adv,
            success=success,
            codes_before=codes_before,
            codes_after=codes_after,
            hamming_to_source=h_src,
            hamming_to_target=h_tgt,
            params=_jsonable(params),
            target_codes=target_codes,
            linf=linf,
            l2=l2,
        )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in _jsonable(self.hyperparams).items())
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------ subclasses

    @abstractmethod
    def _perturb(
        self,
        model: nn.Module,
        x: Tensor,
        *,
        source_codes: Tensor,
        targets: Tensor | None,
        eps: float | None,
        generator: torch.Generator,
    ) -> Tensor:
        """Returns x' (n, 3, H, W); x (n, 3, H, W) in [0, 1] must stay untouched.

        source_codes: (n, K) ±1, h(x). targets: (n, K) as validated by `run` or None.
        eps: budget in [0, 1] pixel units (None = unbounded). Gradients are enabled; the model is
        frozen. `run` projects the result onto the eps ball and [0, 1] afterwards. Facts learnt
        while attacking (e.g. whether BPDA was used) go into ``self._run_notes`` and from there into
        ``AttackResult.params``.
        """

    # --------------------------------------------------------------- helpers

    @staticmethod
    def _check_images(images: Tensor) -> Tensor:
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (n, 3, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a float tensor in [0, 1], got {images.dtype}")
        x = images.detach().clone()
        if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
            raise ValueError("images must lie in [0, 1]")
        return x

    def _check_targets(self, targets: Tensor | None, n: int, x: Tensor) -> Tensor | None:
        if self.target_kind is None:
            if targets is not None:
                raise ValueError(f"{self.name} is untargeted; it takes no targets")
            return None
        if targets is None:
            raise ValueError(f"{self.name} is targeted: pass targets=(n, K)")
        t = targets.detach().to(device=x.device, dtype=x.dtype)
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2:
            raise ValueError(f"targets must be (n, K) or (K,), got {tuple(targets.shape)}")
        if t.shape[0] == 1 and n != 1:
            t = t.expand(n, -1)
        if t.shape[0] != n:
            raise ValueError(f"targets has {t.shape[0]} rows for {n} images")
        if self.target_kind == "codes" and not bool((t.abs() == 1).all()):
            raise ValueError("targets must be ±1 codes")
        if self.target_kind == "outputs" and bool((t.abs() > 1).any()):
            raise ValueError("target outputs must lie in [-1, 1]")
        return t.clone()
