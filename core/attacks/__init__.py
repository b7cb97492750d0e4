"""Adversarial attacks on deep-hashing models behind one foolbox-style API (`get_attack(name).run(...)`)."""

from .base import ATTACKS, Attack, AttackResult, frozen, get_attack, list_attacks, project_linf, register_attack
from .bpda import attacker_view, has_useful_gradient, mean_blur, resolve_transform, straight_through
from .success import continuous_hamming, hamming, sign_codes, targeted_success, untargeted_success

# Importing the attack modules registers them.
from .pgd_untargeted import PGDUntargeted  # noqa: E402
from .dhta import DHTA, anchor_code, anchor_codes_for_labels  # noqa: E402
from .cw import CWUntargeted  # noqa: E402
from .adaptive import AdaptiveWhiteBox, adaptive_loss_terms  # noqa: E402
from .mimicry import OutputMimicry  # noqa: E402

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackResult",
    "AdaptiveWhiteBox",
    "CWUntargeted",
    "DHTA",
    "OutputMimicry",
    "PGDUntargeted",
    "adaptive_loss_terms",
    "anchor_code",
    "anchor_codes_for_labels",
    "attacker_view",
    "continuous_hamming",
    "frozen",
    "get_attack",
    "hamming",
    "has_useful_gradient",
    "list_attacks",
    "mean_blur",
    "project_linf",
    "register_attack",
    "resolve_transform",
    "sign_codes",
    "straight_through",
    "targeted_success",
    "untargeted_success",
]
