"""Unit tests of the detector extensions (core.extensions), the consistent-mimicry attack and the adaptive benchmark."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import core.extensions as ext
from core.adaptive_eval import AdaptiveConfig, AttackPlan, Outcome, adapted_attack, run_adaptive_benchmark, strongest
from core.attacks import get_attack
from core.criteria import c1_mean_hamming
from core.detector import CRITERIA, DETECTORS, Detector, ScoreContext
from core.models import sign_codes
from core.pipeline import build_index

EXTENSIONS = [spec.name for spec in ext.EXTENSIONS]


@pytest.fixture(scope="module")
def small_setup():
    """An untrained 16-bit smallcnn, a 120-image index and 200 benign digits images at 16x16 (fast, real code paths)."""
    from core.datasets import load_dataset
    from core.models import create_model

    torch.manual_seed(0)
    model = create_model("smallcnn", 16).eval()
    splits = load_dataset("digits", seed=0, image_size=16)
    index = build_index(model, splits.database.subset(np.arange(120)))
    return model, index, splits.query.get(np.arange(200)), splits


# ----------------------------------------------------------------------------- registry and calibration


def test_every_extension_is_registered_with_its_criteria_and_transforms():
    for name in EXTENSIONS:
        spec = DETECTORS.create(name)
        assert all(c in CRITERIA for c in spec.criteria), name
        assert spec.description
    assert {"umcd-multi", "umcd-rand", "umcd-feat", "umcd-nbr", "umcd-rand-feat"} <= set(EXTENSIONS)


@pytest.mark.parametrize("name", EXTENSIONS)
def test_extension_calibrates_to_its_target_fpr_on_benign_images_and_scores_batches(small_setup, name):
    model, index, benign, _ = small_setup
    det = Detector(model, index, detector=name, top_k=5)
    cal = det.calibrate(benign, 0.1)
    assert cal.names == list(det.spec.criteria)
    assert 0.05 < cal.calibration_fpr <= 0.1  # joint rank: at most the target, within the discreteness of ties
    again = det.score_batch(benign)
    assert again.adversarial.mean() == pytest.approx(cal.calibration_fpr)  # the same images get the same verdicts
    out = det.score_batch(benign[:7])
    assert out.fired.shape == (7, len(det.spec.criteria))
    rec = out.record(0)
    assert set(rec["scores"]) == set(det.spec.criteria) | {"combined"}
    json.dumps(rec)


@pytest.mark.parametrize("name", ext.REFERENCE_DETECTORS.names())
def test_reference_detector_calibrates_to_its_target_fpr_and_scores_with_a_reference(small_setup, name):
    model, index, benign, splits = small_setup
    reference = ext.FeatureReference.build(model, splits.database.get(np.arange(120)))
    assert len(reference) == 120 and reference.nbytes == 120 * 4 * sum(f.shape[1] for f in reference.features)
    det = ext.make_detector(name, model, index, reference=reference, top_k=5)
    assert isinstance(det, ext.ReferenceDetector) and det.spec.name == name
    cal = det.calibrate(benign, 0.1)
    assert 0.05 < cal.calibration_fpr <= 0.1
    out = det.score_batch(benign[:6])
    assert set(out.scores) == set(det.spec.criteria)
    assert name not in DETECTORS  # Detector(model, index) alone cannot run it
    with pytest.raises(ValueError, match="needs a FeatureReference"):
        ext.make_detector(name, model, index)


def test_feature_reference_round_trips_through_safetensors(small_setup, tmp_path):
    model, _, _, splits = small_setup
    ref = ext.FeatureReference.build(model, splits.database.get(np.arange(20)), ids=np.arange(100, 120))
    ref.save(tmp_path / "ref.safetensors")
    again = ext.FeatureReference.load(tmp_path / "ref.safetensors")
    assert again.stages == ref.stages == (ext.INPUT_STAGE, 0, 1)
    assert all(torch.equal(a, b) for a, b in zip(again.features, ref.features))
    assert torch.equal(again.codes, ref.codes) and np.array_equal(again.ids, ref.ids)


def test_trust_ratio_is_low_near_own_code_and_high_near_another():
    ref_feats = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    ref_codes = torch.tensor([[1.0] * 8, [-1.0] * 8])
    q = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [1.0, 0.1]]), dim=1)  # both look like reference 0
    codes = torch.tensor([[1.0] * 8, [-1.0] * 8])  # the second claims reference 1's code
    ratio = ext.trust_ratio(q, codes, ref_feats, ref_codes)
    assert ratio[0] < 0.2 and ratio[1] > 5
    assert float(ratio[0] * ratio[1]) == pytest.approx(1.0, rel=1e-4)  # the two distances swap


def test_fknn_of_a_reference_image_counts_its_own_code_first(small_setup):
    model, index, _, splits = small_setup
    images = splits.database.get(np.arange(30))
    reference = ext.FeatureReference.build(model, images)
    _, st = model.forward_with_features(images)
    codes = reference.neighbour_codes(ext.pooled_features(st)[0].detach(), 0, 1)
    assert torch.equal(codes[:, 0], reference.codes)  # each image is its own nearest neighbour


def test_extension_works_through_the_worker_constructor_with_the_default_transform(small_setup):
    model, index, benign, _ = small_setup
    det = Detector(model, index, None, "meanblur3", detector="umcd-rand", top_k=5)
    assert det.spec.transforms == ("meanblur3", "random-denoise")
    assert isinstance(det.transforms[1], ext.RandomDenoiser)
    det.calibrate(benign[:100], 0.1)
    assert det.score_batch(benign[100:110]).names == ["c1", "c2", "c3", "c3@1"]


# ----------------------------------------------------------------------------- the random denoiser


def test_random_denoiser_is_reproducible_for_a_secret_and_independent_of_the_batch(small_setup):
    _, _, benign, _ = small_setup
    x = benign[:40]
    a, b = ext.RandomDenoiser("secret-1"), ext.RandomDenoiser("secret-1")
    assert torch.equal(a(x), b(x))
    one_by_one = torch.cat([a(x[i : i + 1]) for i in range(len(x))])
    assert torch.allclose(a(x), one_by_one, atol=1e-6)
    members, _ = a.draws(x)
    assert len(set(members)) > 3  # 40 images spread over the 10-member family


def test_random_denoiser_draws_differ_across_secrets(small_setup):
    _, _, benign, _ = small_setup
    x = benign[:40]
    m1, _ = ext.RandomDenoiser("secret-1").draws(x)
    m2, _ = ext.RandomDenoiser("secret-2").draws(x)
    assert m1 != m2
    assert not torch.equal(ext.RandomDenoiser("secret-1")(x), ext.RandomDenoiser("secret-2")(x))


def test_detector_reads_the_deployment_secret_from_the_environment(small_setup, monkeypatch):
    model, index, benign, _ = small_setup
    x = benign[:30]

    def c3_random(secret: str) -> np.ndarray:
        monkeypatch.setenv(ext.SECRET_ENV, secret)
        return Detector(model, index, detector="umcd-rand", top_k=5).raw_scores(x)["c3@1"]

    assert np.array_equal(c3_random("alpha"), c3_random("alpha"))
    assert not np.array_equal(c3_random("alpha"), c3_random("beta"))


def test_attacker_sample_draws_members_from_its_generator():
    x = torch.rand(6, 3, 16, 16)
    sample = ext.family_sampler()
    y1 = sample(x, torch.Generator().manual_seed(3))
    y2 = sample(x, torch.Generator().manual_seed(3))
    y3 = sample(x, torch.Generator().manual_seed(4))
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    assert y1.shape == x.shape


# ----------------------------------------------------------------------------- transforms and criteria


@pytest.mark.parametrize("name", ["gaussblur1", "downup2", "shift1", "random-denoise"])
def test_new_transforms_keep_a_constant_image_constant(name):
    from core.transforms import get_transform

    x = torch.full((2, 3, 16, 16), 0.25)
    assert torch.allclose(get_transform(name)(x), x, atol=1e-6)


def test_feature_disagreement_is_zero_for_the_identity_and_grows_with_noise(small_setup):
    model, _, benign, _ = small_setup
    x = benign[:8]
    _, _, fx, ft = ext.feature_views(model, x, lambda z: z)
    assert ext.feature_disagreement(fx, ft).abs().max() < 1e-5
    _, _, fx, fn = ext.feature_views(model, x, lambda z: (z + 0.3 * torch.randn_like(z)).clamp(0, 1))
    assert (ext.feature_disagreement(fx, fn) > 1e-3).all()


def test_c1soft_equals_c1_for_saturated_outputs(small_setup):
    model, index, benign, _ = small_setup
    x = benign[:10]
    codes = sign_codes(model(x).detach())
    ids, dist = index.search(codes, 5)
    ctx = ScoreContext(x, codes, [], codes, ids, dist, index.bits, model, index)
    soft = CRITERIA.create("c1soft").fn(ctx)
    assert np.allclose(soft, c1_mean_hamming(dist, index.bits))


# ----------------------------------------------------------------------------- the consistent-mimicry attack


def test_eot_attack_runs_against_the_random_family_within_eps_and_reproducibly(small_setup):
    model, _, benign, _ = small_setup
    x = benign[:3]
    targets = model(benign[150:153]).detach()
    kw = dict(steps=3, transforms=("meanblur3",), c3_thresholds=[4.0], eot_transform=ext.family_sampler(),
              eot_samples=10, eot_c3_threshold=4.0, feature_terms=[(1, 0, 0.1), (3, -1, 0.1)])
    r1 = get_attack("consistent_mimicry", **kw).run(model, x, targets=targets, eps=8, seed=5)
    r2 = get_attack("consistent_mimicry", **kw).run(model, x, targets=targets, eps=8, seed=5)
    assert torch.equal(r1.adv, r2.adv)
    assert r1.params["eot_samples"] == 10 and r1.params["success_rule"]
    assert float((r1.adv - x).abs().max()) <= 8 / 255 + 1e-6
    assert r1.success.shape == (3,)


def test_consistent_mimicry_lowers_the_hinge_to_the_target_code(small_setup):
    model, _, benign, _ = small_setup
    x = benign[:6]
    targets = model(benign[150:156]).detach()
    code = sign_codes(targets)
    before = (sign_codes(model(x)) != code).sum(1)
    res = get_attack("consistent_mimicry", steps=20, step_size=2.0).run(model, x, targets=targets, eps=32, seed=0)
    after = (res.codes_after != code).sum(1)
    assert (after <= before).all() and after.sum() < before.sum()


def test_consistent_mimicry_rejects_inconsistent_arguments():
    with pytest.raises(ValueError, match="one threshold per transform"):
        get_attack("consistent_mimicry", transforms=("meanblur3",), c3_thresholds=[1.0, 2.0])
    with pytest.raises(ValueError, match="needs an eot_transform"):
        get_attack("consistent_mimicry", eot_c3_threshold=1.0)
    with pytest.raises(ValueError, match="feature term"):
        get_attack("consistent_mimicry", feature_terms=[(1, -1, 0.1)])


# ----------------------------------------------------------------------------- the adaptive benchmark


def test_adapted_attack_reads_the_detectors_transforms_thresholds_and_randomness(small_setup):
    model, index, benign, _ = small_setup
    cfg = AdaptiveConfig(steps=2)
    det = Detector(model, index, detector="umcd-rand-feat", top_k=5)
    det.calibrate(benign[:100], 0.1)
    h = adapted_attack(det, 4.0, cfg).hyperparams
    thr = det.calibration.thresholds
    assert h["transforms"] == ["meanblur3"] and h["c3_thresholds"] == [thr["c3"]]
    assert h["eot_samples"] == 10 and h["eot_c3_threshold"] == thr["c3@1"]
    assert h["feature_terms"] == [[1, -1, thr["featr@1"]], [3, -1, thr["featr@3"]]]
    det = Detector(model, index, detector="umcd-feat", top_k=5)
    det.calibrate(benign[:100], 0.1)
    h = adapted_attack(det, 4.0, cfg).hyperparams
    assert h["transforms"] == ["meanblur3"] and h["eot_samples"] == 0
    assert [t[:2] for t in h["feature_terms"]] == [[1, 0], [3, 0]]
    ref = ext.FeatureReference.build(model, benign[100:160])
    det = ext.make_detector("umcd-fknn", model, index, reference=ref, top_k=5)
    det.calibrate(benign[:100], 0.1)
    h = adapted_attack(det, 4.0, cfg).hyperparams
    assert h["penalty"].startswith("fknn-pull") and h["lambda_penalty"] == 16.0
    det = ext.make_detector("umcd-trust-input", model, index, reference=ref, top_k=5)
    det.calibrate(benign[:100], 0.1)
    assert adapted_attack(det, 4.0, cfg).hyperparams["penalty"] == "trust(stages=[-1])"


def test_attack_plans_skip_a_detector_whose_adapted_attack_repeats_an_earlier_one(small_setup):
    from core.adaptive_eval import attack_plans

    model, index, benign, _ = small_setup
    cfg = AdaptiveConfig(detectors=("umcd", "umcd-nbr", "umcd-multi"), weights=(4.0, 16.0))
    dets = {}
    for name in cfg.detectors:
        dets[name] = Detector(model, index, detector=name, top_k=5)
        dets[name].calibrate(benign[:100], 0.1)
    keys = [p.key for p in attack_plans(cfg, dets)]
    assert "adapted[umcd](w=16)" in keys and "adapted[umcd-multi](w=4)" in keys
    assert not any("umcd-nbr" in k for k in keys)  # c1soft is attacked like C1: landing on the target
    assert keys[:4] == ["eq13(l2=0.3)", "eq13(l2=3)", "mimicry(l3=0)", "mimicry(l3=1)"]


def test_nearest_targets_pick_the_closest_reference_image_of_another_code(small_setup):
    from core.adaptive_eval import nearest_targets

    model, _, _, splits = small_setup
    reference = ext.FeatureReference.build(model, splits.database.get())
    x = splits.query.get(np.arange(5))
    outputs, ids = nearest_targets(model, splits, x, reference, ext.INPUT_STAGE)
    assert torch.allclose(outputs, model(splits.database.get(ids)).detach(), atol=1e-5)
    src_codes = sign_codes(model(x).detach())
    ham = 0.5 * (16 - src_codes @ reference.codes.T)
    other = ham > 2  # K/8 = 2 bits
    q = ext.stage_features(x, [], [ext.INPUT_STAGE])[ext.INPUT_STAGE]
    d = ((q[:, None] - reference.features[0][None]) ** 2).sum(-1)
    for i in range(len(x)):
        if other[i].any():  # the nearest image of another code
            assert ids[i] == int(d[i].masked_fill(~other[i], np.inf).argmin())
        else:  # the untrained model gives many sources no other code: the most different one
            assert ham[i, ids[i]] == ham[i].max()


def test_attack_step_grows_with_eps_so_large_budgets_are_reachable():
    from core.adaptive_eval import build_attack, step_size_for

    assert step_size_for(8, 40) == 1.0 and step_size_for(32, 25) == pytest.approx(3.2)
    cfg = AdaptiveConfig(steps=40)
    plan = AttackPlan("eq13(l2=0.3)", "eq13", "umcd", 0.3, {"lambda1": 0.0075, "lambda2": 0.3})
    assert build_attack(plan, {}, cfg, 25, 32.0).hyperparams["step_size"] == pytest.approx(3.2)
    assert build_attack(plan, {}, cfg).hyperparams["step_size"] == 1.0


def _outcome(key: str, success, rejected) -> Outcome:
    success = np.asarray(success, bool)
    return Outcome(AttackPlan(key, "consistent", "d", 1.0), 8.0, success, {"d": {0.1: np.asarray(rejected, bool)}}, 0.0, 1, {})


def test_strongest_attack_minimises_tpr_among_attacks_with_enough_successes():
    few = _outcome("few", [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0])  # TPR 0 but one success only
    weak = _outcome("weak", [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0])  # TPR 1
    strong = _outcome("strong", [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0])  # TPR 1/3
    assert strongest([few, weak, strong], "d", 0.1, min_successes=3).plan.key == "strong"
    # nothing has enough successes: the most undetected successes wins
    assert strongest([few, weak], "d", 0.1, min_successes=10).plan.key == "few"


def test_outcome_head_restricts_every_per_image_array():
    o = _outcome("k", [1, 1, 0, 1], [0, 1, 0, 1]).head(2)
    assert o.success.tolist() == [True, True] and o.rejected["d"][0.1].tolist() == [False, True]
    assert o.tpr("d", 0.1) == 0.5


def test_adaptive_benchmark_writes_its_table_json_and_plot(small_setup, tmp_path):
    model, _, _, splits = small_setup
    small = type(splits)(splits.name, splits.query.subset(np.arange(0, 1000, 10)), splits.train,
                         splits.database.subset(np.arange(0, 797, 4)), splits.num_classes, splits.seed)
    cfg = AdaptiveConfig(detectors=("umcd", "umcd-rand", "umcd-trust-input"), n_images=4, n_sweep_images=2, steps=1, eot_samples=2,
                         weights=(4.0,), eq13_lambda2=(0.3,), mimicry_lambda3=(0.0,), eps_sweep=(16.0,),
                         timing_repeats=1, min_successes=1)
    res = run_adaptive_benchmark(model, small, config=cfg, out_dir=tmp_path, progress=False)
    assert [r["detector"] for r in res["table"]] == ["umcd", "umcd-rand", "umcd-trust-input"]
    assert set(res["cross"]) == {"eq13(l2=0.3)", "mimicry(l3=0)", "adapted[umcd](w=4)", "adapted[umcd-rand](w=4)",
                                 "adapted[umcd-trust-input](w=4)", "adapted[umcd-trust-input](w=4,near)"}
    info = res["detectors"]["umcd-trust-input"]
    assert info["forward_passes"] == 2  # pixels need no pass; x and t(x) as the paper's rule
    assert info["reference_bytes_per_image"] == 4 * 3 * 8 * 8  # the input stage alone: 8x8x3 float32
    row = res["table"][1]
    assert row["forward_passes"] == 3 and row["time_ratio"] > 0 and 0 <= row["map"] <= 1
    assert set(res["eps_curve"]["umcd"]) == {"8.0", "16.0"}
    for f in ("report.md", "results.json", "detection_vs_eps.png"):
        assert (tmp_path / f).stat().st_size > 0
    assert "Table \"adaptive\"" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["benchmark"] == "adaptive"
