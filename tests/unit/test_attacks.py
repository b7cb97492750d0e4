"""Unit tests of core.attacks on a tiny, briefly trained hashing model."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import core.attacks as attacks
from core.attacks import (
    AttackResult,
    adaptive_loss_terms,
    anchor_code,
    anchor_codes_for_labels,
    get_attack,
    hamming,
    list_attacks,
    sign_codes,
    straight_through,
)

BITS = 16
CLASSES = 4
SIZE = 16

# Few steps keep the file fast; the full paper budgets stay the attacks' defaults.
FAST = {
    "pgd_untargeted": {"steps": 15},
    "dhta": {"steps": 15},
    "cw": {"steps": 50},
    "adaptive": {"steps": 15},
    "mimicry": {"steps": 15},
}
LINF_ATTACKS = ["pgd_untargeted", "dhta", "adaptive", "mimicry"]


class TinyHash(nn.Module):
    """Conv-conv-pool, a linear hash layer and tanh: (n, 3, 16, 16) in [0, 1] -> (n, BITS) in (-1, 1)."""

    def __init__(self, bits: int = BITS) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5))
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.25))
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.hash = nn.Linear(128, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.hash(self.features((x - self.mean) / self.std)))


def blobs(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, 16, 16) noisy images in [0, 1] with a faint coloured quadrant per class, and (n,) labels."""
    labels = torch.arange(n) % CLASSES
    x = 0.3 + 0.4 * torch.rand(n, 3, SIZE, SIZE, generator=generator)
    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])
    h = SIZE // 2
    for i, c in enumerate(labels.tolist()):
        r, q = divmod(c, 2)
        patch = x[i, :, r * h : (r + 1) * h, q * h : (q + 1) * h]
        x[i, :, r * h : (r + 1) * h, q * h : (q + 1) * h] = 0.85 * patch + 0.15 * colours[c].view(3, 1, 1)
    return x.clamp(0, 1), labels


@pytest.fixture(scope="module")
def setup():
    """A tiny model trained for ~0.3 s towards random ±1 class centres (CSQ-like), and 8 test images."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = TinyHash()
    centres = torch.where(torch.randn(CLASSES, BITS, generator=gen) >= 0, 1.0, -1.0)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(40):
        x, y = blobs(32, gen)
        loss = (model(x) - 0.7 * centres[y]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    images, labels = blobs(8, torch.Generator().manual_seed(1))
    db_images, db_labels = blobs(40, torch.Generator().manual_seed(2))
    with torch.no_grad():
        db_outputs = model(db_images)
    db_codes = sign_codes(db_outputs)
    target_labels = (labels + 1) % CLASSES
    anchors = anchor_codes_for_labels(db_codes, db_labels, target_labels, n_anchor=5, seed=0)
    # Mimicry copies the output of one benign database image of the target class.
    idx = torch.stack([torch.nonzero(db_labels == t).flatten()[0] for t in target_labels])
    return {
        "model": model,
        "images": images,
        "labels": labels,
        "anchors": anchors,
        "target_outputs": db_outputs[idx],
    }


def targets_for(attack, setup):
    if attack.target_kind == "codes":
        return setup["anchors"]
    if attack.target_kind == "outputs":
        return setup["target_outputs"]
    return None


def run(name, setup, seed=0, **overrides):
    attack = get_attack(name, **{**FAST[name], **overrides})
    return attack, attack.run(setup["model"], setup["images"], targets=targets_for(attack, setup), seed=seed)


def clean_codes(setup):
    with torch.no_grad():
        return sign_codes(setup["model"](setup["images"]))


def quantise(x: torch.Tensor) -> torch.Tensor:
    """Bit-depth reduction to 4 levels: forward is a transform, gradient is zero everywhere."""
    return torch.round(x * 3) / 3


# --------------------------------------------------------------------------- codes and anchors


def test_sign_codes_map_zero_to_plus_one_and_hamming_counts_differing_bits():
    codes = sign_codes(torch.tensor([[0.0, -0.2, 0.3, -1.0]]))
    assert codes.tolist() == [[1.0, -1.0, 1.0, -1.0]]
    other = torch.tensor([[1.0, 1.0, -1.0, -1.0], [-1.0, 1.0, -1.0, 1.0]])
    assert hamming(codes, other).tolist() == [2, 4]
    assert hamming(codes, codes).tolist() == [0]
    assert hamming(codes, other).dtype == torch.int64


def test_anchor_code_is_componentwise_majority_with_ties_to_plus_one():
    codes = torch.tensor(
        [
            [1, 1, -1, -1, 1],
            [1, -1, -1, 1, -1],
            [-1, -1, -1, 1, 1],
            [1, 1, 1, -1, -1],
        ],
        dtype=torch.float32,
    )
    # column sums: 2, 0, -2, 0, 0 -> +1, tie +1, -1, tie +1, tie +1
    assert anchor_code(codes).tolist() == [1.0, 1.0, -1.0, 1.0, 1.0]
    assert anchor_code(codes[:3]).tolist() == [1.0, -1.0, -1.0, 1.0, 1.0]
    assert anchor_code(torch.tensor([[-1, -1]])).tolist() == [-1.0, -1.0]
    batched = torch.stack([codes[:3], -codes[:3]])
    assert anchor_code(batched).tolist() == [[1.0, -1.0, -1.0, 1.0, 1.0], [-1.0, 1.0, 1.0, -1.0, -1.0]]


def test_anchor_codes_for_labels_vote_only_among_images_of_the_target_class():
    db_codes = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0], [-1.0, 1.0]])
    db_labels = torch.tensor([0, 0, 1, 1, 1])
    anchors = anchor_codes_for_labels(db_codes, db_labels, torch.tensor([0, 1]), n_anchor=9)
    assert anchors.tolist() == [[1.0, 1.0], [-1.0, -1.0]]
    multi_hot = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1], [0, 1]])
    anchors = anchor_codes_for_labels(db_codes, multi_hot, torch.tensor([[0, 1]]), n_anchor=9)
    assert anchors.tolist() == [[-1.0, -1.0]]
    with pytest.raises(ValueError, match="no database image"):
        anchor_codes_for_labels(db_codes, db_labels, torch.tensor([7]))


def test_adaptive_loss_terms_follow_eq_13_definitions():
    f = torch.tensor([[0.5, -0.25, 0.0]])
    f_t = torch.tensor([[0.5, 0.25, 1.0]])
    h_t = torch.tensor([[1.0, 1.0, -1.0]])
    l1, l2, l3 = adaptive_loss_terms(f, f_t, h_t)
    assert l1.item() == pytest.approx((3 - (0.5 - 0.25 - 0.0)) / 2)
    assert l2.item() == pytest.approx(-(0.5 + 0.75 + 1.0))  # sign(0) = +1
    assert l3.item() == pytest.approx((3 - (0.25 - 0.0625 + 0.0)) / 2)


def test_straight_through_forwards_the_transform_and_backpropagates_identity():
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    y = straight_through(quantise)(x)
    assert torch.equal(y, quantise(x))
    w = torch.randn_like(x)
    (g,) = torch.autograd.grad((y * w).sum(), x)
    assert torch.allclose(g, w)
    assert attacks.has_useful_gradient(attacks.mean_blur, x)
    assert not attacks.has_useful_gradient(quantise, x)


# --------------------------------------------------------------------------- registry and API


def test_registry_holds_every_attack_and_rejects_unknown_names():
    assert set(list_attacks()) >= {"pgd_untargeted", "dhta", "cw", "adaptive", "mimicry"}
    assert get_attack("dhta").name == "dhta"
    with pytest.raises(KeyError, match="unknown attack"):
        get_attack("no_such_attack")
    with pytest.raises(TypeError):
        get_attack("pgd_untargeted", no_such_param=1)


@pytest.mark.parametrize("name", list_attacks())
def test_every_registered_attack_returns_a_well_formed_result(name, setup):
    attack, res = run(name, setup)
    n = setup["images"].shape[0]
    assert isinstance(res, AttackResult)
    assert res.adv.shape == setup["images"].shape and res.adv.dtype == torch.float32
    assert float(res.adv.min()) >= 0.0 and float(res.adv.max()) <= 1.0
    assert res.success.shape == (n,) and res.success.dtype == torch.bool
    for codes in (res.codes_before, res.codes_after):
        assert codes.shape == (n, BITS) and bool((codes.abs() == 1).all())
    assert torch.equal(res.codes_before, clean_codes(setup))
    assert torch.equal(res.hamming_to_source, hamming(res.codes_after, res.codes_before))
    if attack.targeted:
        assert torch.equal(res.hamming_to_target, hamming(res.codes_after, res.target_codes))
        expected = res.hamming_to_target <= res.params["threshold_bits_effective"]
    else:
        assert res.hamming_to_target is None and res.target_codes is None
        expected = res.hamming_to_source >= res.params["threshold_bits_effective"]
    assert torch.equal(res.success, expected)
    assert res.success_rate == pytest.approx(float(expected.float().mean()))
    assert res.linf.shape == (n,) and res.l2.shape == (n,)
    assert res.params["attack"] == name and res.params["bits"] == BITS and res.params["n"] == n
    json.dumps(res.params)  # stored with attack sets: must be JSON


def test_targeted_attacks_require_targets_and_untargeted_attacks_refuse_them(setup):
    model, images = setup["model"], setup["images"]
    with pytest.raises(ValueError, match="targeted"):
        get_attack("dhta", steps=1).run(model, images, seed=0)
    with pytest.raises(ValueError, match="untargeted"):
        get_attack("pgd_untargeted", steps=1).run(model, images, targets=setup["anchors"], seed=0)
    with pytest.raises(ValueError, match="±1"):
        get_attack("dhta", steps=1).run(model, images, targets=setup["target_outputs"], seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        get_attack("pgd_untargeted", steps=1).run(model, images * 2, seed=0)
    with pytest.raises(ValueError, match="eps"):
        get_attack("pgd_untargeted", steps=1).run(model, images, eps=-1, seed=0)


# --------------------------------------------------------------------------- attack behaviour


@pytest.mark.parametrize("name", ["pgd_untargeted", "cw"])
def test_untargeted_attacks_raise_hamming_distance_to_the_clean_code(name, setup):
    _, res = run(name, setup)
    assert float(res.hamming_to_source.float().mean()) >= BITS / 4
    assert res.success_rate > 0


@pytest.mark.parametrize("name", ["dhta", "adaptive", "mimicry"])
def test_targeted_attacks_lower_hamming_distance_to_the_target(name, setup):
    _, res = run(name, setup)
    before = hamming(res.codes_before, res.target_codes).float().mean()
    after = res.hamming_to_target.float().mean()
    assert float(after) < float(before) - 1.0
    assert res.success_rate > 0


@pytest.mark.parametrize("name", LINF_ATTACKS)
@pytest.mark.parametrize("eps", [2.0, 8.0])
def test_linf_attacks_stay_within_eps_and_the_pixel_range(name, eps, setup):
    attack = get_attack(name, **FAST[name], random_start=True)
    res = attack.run(setup["model"], setup["images"], targets=targets_for(attack, setup), eps=eps, seed=3)
    delta = (res.adv - setup["images"]).abs().amax()
    assert float(delta) <= eps / 255 + 1e-6
    assert float(res.adv.min()) >= 0.0 and float(res.adv.max()) <= 1.0
    assert res.params["eps"] == eps and res.params["linf_max_255"] <= eps + 1e-4


def test_cw_given_an_eps_also_stays_within_that_linf_ball(setup):
    res = get_attack("cw", steps=20).run(setup["model"], setup["images"], eps=4, seed=0)
    assert float((res.adv - setup["images"]).abs().amax()) <= 4 / 255 + 1e-6


@pytest.mark.parametrize("name", list_attacks())
def test_attacks_leave_inputs_and_model_state_untouched(name, setup):
    model = setup["model"]
    images = setup["images"].clone()
    targets = targets_for(get_attack(name), setup)
    targets_copy = None if targets is None else targets.clone()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    try:
        attack = get_attack(name, steps=3)
        attack.run(model, images, targets=targets, seed=0)
        assert model.training
    finally:
        model.eval()
    assert torch.equal(images, setup["images"])
    assert targets is None or torch.equal(targets, targets_copy)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", LINF_ATTACKS)
def test_same_seed_gives_identical_adversarials(name, setup):
    _, a = run(name, setup, seed=7, random_start=True, steps=5)
    _, b = run(name, setup, seed=7, random_start=True, steps=5)
    _, c = run(name, setup, seed=8, random_start=True, steps=5)
    assert torch.equal(a.adv, b.adv)
    assert not torch.equal(a.adv, c.adv)


def test_cw_is_deterministic_and_keeps_the_lowest_distortion_success(setup):
    _, short = run("cw", setup, steps=20)
    _, again = run("cw", setup, steps=20)
    _, long = run("cw", setup, steps=40)
    assert torch.equal(short.adv, again.adv)
    # The 40-step run sees the same first 20 iterates, so its best success is never worse.
    both = short.success & long.success
    assert bool(both.any())
    assert bool((long.l2[both] <= short.l2[both] + 1e-6).all())


def test_chunked_run_matches_the_whole_batch(setup):
    _, whole = run("dhta", setup, steps=5)
    attack = get_attack("dhta", steps=5)
    chunked = attack.run(setup["model"], setup["images"], targets=setup["anchors"], seed=0, batch_size=3)
    assert torch.allclose(chunked.adv, whole.adv, atol=1e-6)
    assert torch.equal(chunked.codes_after, whole.codes_after)
    assert chunked.params["batch_size"] == 3


def test_attack_runs_when_called_under_no_grad(setup):
    with torch.no_grad():
        _, res = run("pgd_untargeted", setup, steps=5)
    assert float((res.adv - setup["images"]).abs().amax()) > 0


def test_threshold_bits_sets_the_success_rule(setup):
    _, lenient = run("dhta", setup, steps=2, threshold_bits=BITS)
    assert lenient.success.all() and lenient.params["threshold_bits_effective"] == BITS
    _, strict = run("pgd_untargeted", setup, steps=2, threshold_bits=BITS + 1)
    assert not strict.success.any()
    _, default = run("pgd_untargeted", setup, steps=2)
    assert default.params["threshold_bits_effective"] == BITS / 2


# --------------------------------------------------------------------------- adaptive attackers


def test_adaptive_uses_bpda_for_a_gradient_free_transform_and_still_reduces_the_targeted_loss(setup):
    model, images, anchors = setup["model"], setup["images"], setup["anchors"]
    attack = get_attack("adaptive", steps=15, transform=quantise)
    res = attack.run(model, images, targets=anchors, seed=0)
    assert res.params["bpda_used"] is True
    with torch.no_grad():
        l1_before = adaptive_loss_terms(model(images), model(quantise(images)), anchors)[0]
        l1_after = adaptive_loss_terms(model(res.adv), model(quantise(res.adv)), anchors)[0]
    assert float(l1_after.mean()) < float(l1_before.mean()) - 1.0
    assert float(res.hamming_to_target.float().mean()) < float(hamming(res.codes_before, anchors).float().mean())


def test_adaptive_differentiates_the_mean_blur_unless_bpda_is_forced(setup):
    model, images, anchors = setup["model"], setup["images"], setup["anchors"]
    _, res = run("adaptive", setup, steps=2)
    assert res.params["bpda_used"] is False and res.params["transform"] == "meanblur3"
    forced = get_attack("adaptive", steps=2, bpda=True).run(model, images, targets=anchors, seed=0)
    assert forced.params["bpda_used"] is True
    with pytest.raises(ValueError, match="no gradient"):
        get_attack("adaptive", steps=2, transform=quantise, bpda=False).run(model, images, targets=anchors, seed=0)


@pytest.mark.parametrize(("transform", "bpda_used"), [("bitdepth4", True), ("median3", False), ("meanblur3", False)])
def test_adaptive_resolves_detector_transforms_by_name_and_picks_bpda_when_needed(transform, bpda_used, setup):
    attack = get_attack("adaptive", steps=2, transform=transform)
    res = attack.run(setup["model"], setup["images"], targets=setup["anchors"], seed=0)
    assert res.params["bpda_used"] is bpda_used and res.params["transform"] == transform


def test_mimicry_with_blur_consistency_and_eot_approaches_the_target_output(setup):
    def noisy_blur(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return attacks.mean_blur((x + (noise - 0.5) * 4 / 255).clamp(0, 1))

    model, images, target = setup["model"], setup["images"], setup["target_outputs"]
    attack = get_attack("mimicry", steps=15, lambda3=1.0, eot_transform=noisy_blur, eot_samples=2)
    res = attack.run(model, images, targets=target, seed=0)
    again = attack.run(model, images, targets=target, seed=0)
    assert torch.equal(res.adv, again.adv)
    with torch.no_grad():
        before = (model(images) - target).pow(2).sum(1).mean()
        after = (model(res.adv) - target).pow(2).sum(1).mean()
    assert float(after) < 0.5 * float(before)
    assert res.params["eot_samples"] == 2 and res.params["lambda3"] == 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list_attacks())
def test_attacks_run_on_the_images_device(name, setup):
    model = setup["model"].cuda()
    try:
        attack = get_attack(name, steps=3)
        targets = targets_for(attack, setup)
        res = attack.run(model, setup["images"].cuda(), targets=None if targets is None else targets.cuda(), seed=0)
        assert res.adv.is_cuda and res.success.is_cuda and res.codes_after.is_cuda
    finally:
        setup["model"].cpu()
