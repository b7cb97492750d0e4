"""Targeted DHTA (Bai et al. [6]): drive h(x') to the majority-vote anchor code of a target class."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import positive_int
from .base import register_attack
from .pgd import LinfPGDAttack


def anchor_code(codes: Tensor) -> Tensor:
    """Component-wise majority vote of ±1 codes: sign of the sum, ties -> +1.

    codes: (..., m, K) in {-1, +1} (m codes of target-class images). Returns (..., K) in {-1, +1},
    same dtype as ``codes`` (float32 when ``codes`` is an integer tensor).
    """
    if codes.dim() < 2 or codes.shape[-2] == 0:
        raise ValueError(f"codes must be (..., m, K) with m >= 1, got {tuple(codes.shape)}")
    dtype = codes.dtype if codes.is_floating_point() else torch.float32
    total = codes.to(dtype).sum(-2)
    one = torch.ones((), dtype=dtype, device=codes.device)
    return torch.where(total >= 0, one, -one)


def _same_class(db_labels: Tensor, target: Tensor) -> Tensor:
    """(N,) bool: database rows sharing the target's label (int labels) or any label (multi-hot)."""
    if db_labels.dim() == 1:
        return db_labels == target
    return (db_labels.float() @ target.float().reshape(-1)) > 0


def anchor_codes_for_labels(
    db_codes: Tensor,
    db_labels: Tensor,
    target_labels: Tensor,
    *,
    n_anchor: int = 9,
    seed: int = 0,
) -> Tensor:
    """One DHTA anchor code per query: majority vote of ``n_anchor`` random database codes of its target.

    db_codes: (N, K) in {-1, +1}. db_labels: (N,) int class ids, or (N, C) multi-hot (a database image
    belongs to the target when it shares a label with it, paper Eq. 3). target_labels: (n,) ints or
    (n, C) multi-hot. n_anchor: images voted per anchor (odd, so single-label votes have no ties;
    fewer are used when the class is smaller). Returns (n, K) float codes on ``db_codes``' device.
    """
    positive_int("n_anchor", n_anchor)
    generator = torch.Generator().manual_seed(int(seed))
    db_cpu, codes = db_labels.cpu(), db_codes.float()
    anchors = []
    for target in target_labels.cpu():
        members = torch.nonzero(_same_class(db_cpu, target)).flatten()
        if members.numel() == 0:
            raise ValueError(f"no database image has target label {target.tolist()}")
        pick = members[torch.randperm(members.numel(), generator=generator)[:n_anchor]]
        anchors.append(anchor_code(codes[pick.to(codes.device)]))
    return torch.stack(anchors)


@register_attack("dhta")
class DHTA(LinfPGDAttack):
    """Minimises D_h(h(x'), h_a) s.t. ||x' - x||_inf <= eps (paper Eq. 5) for anchor codes h_a.

    ``targets`` are (n, K) ±1 anchor codes (`anchor_code`, `anchor_codes_for_labels`). Each signed
    step minimises -f(x')·h_a, the tanh relaxation of the Hamming distance. Budget as the paper's
    §4.1: eps = 8/255, step 1/255, 100 steps.

    Success: Hamming(h(x'), h_a) <= threshold_bits, default K/8 (8 bits at K = 64): the code lies in
    the anchor's neighbourhood, well inside the ~K/2 gap between CSQ class centres, so a top-k query
    with it returns the target class. ``AttackResult.codes_after`` and ``target_codes`` with the
    target labels are the inputs of the targeted mAP (t-mAP).
    """

    targeted = True
    default_eps = 8.0
    target_kind = "codes"
    default_threshold_frac = 0.125

    def pgd_loss(self, model: nn.Module, source_codes: Tensor, targets: Tensor | None):
        assert targets is not None

        def loss(x_adv: Tensor) -> Tensor:
            return -(model(x_adv) * targets).sum(1)

        return loss
