"""Baseline detectors: calibration at the target FPR, the squeezers, LID, and the benchmark registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.baselines import (
    ABLATION_DETECTORS,
    BENCHMARK_DETECTORS,
    TABLE1_DETECTORS,
    create_benchmark_detector,
    cross_mean_filter,
    fs_adaptive,
    image_entropy,
    lid_mle,
    reference_images,
    scalar_quantization,
)
from core.pipeline import build_index, calibration_halves


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: many small ops (NLM) crawl when two threads share two busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bench_setup(digits_splits, trained_digits):
    """The session's trained 64-bit model, its database index, LID references and 120 benign calibration images."""
    model, _ = trained_digits
    index = build_index(model, digits_splits.database)
    refs = reference_images(digits_splits.database.get(), 40, seed=0)
    cal_idx, held_idx = calibration_halves(len(digits_splits.query), 0)
    benign = digits_splits.query.get(cal_idx[:120])
    noise = 0.15 * torch.randn(30, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    noisy = (digits_splits.query.get(held_idx[:30]) + noise).clamp(0, 1)
    return model, index, refs, benign, noisy


def test_registry_holds_every_table_row():
    names = set(BENCHMARK_DETECTORS.names())
    assert set(TABLE1_DETECTORS) <= names and set(ABLATION_DETECTORS) <= names and "lid-unsup" in names


def _benign_counts(cal, scores: dict) -> np.ndarray:
    """(n, criteria): per sample and criterion, the benign values at least as suspicious as it."""
    return np.rint(cal.pvalues(scores) * (cal.n_samples + 1) - 1).astype(int)


def test_every_detector_hits_the_target_fpr_on_its_own_calibration_set(bench_setup):
    """Judged leave-one-out (each calibration sample against the others, as a new input would be):
    single-score detectors within one sample of the target; joint rules (per-criterion ranks refined
    from one shared rank) at most the target, and raising any one criterion to its next tie group would
    overshoot it."""
    model, index, refs, benign, noisy = bench_setup
    n = len(benign)
    for name in BENCHMARK_DETECTORS.names():
        det = create_benchmark_detector(name, model, index, references=refs, seed=0)
        raw = det.raw_scores(benign, batch_size=100)
        if det.supervised:
            det.fit(raw, det.raw_scores(noisy))
        for target_fpr in (0.05, 0.1, 0.2):
            cal = det.calibrate(raw, target_fpr)
            fired = det.reject(raw).mean()
            assert fired == pytest.approx(cal.calibration_fpr), name
            assert fired <= cal.expected_fpr <= target_fpr + 1e-12, f"{name}: FPR {cal.expected_fpr} above {target_fpr}"
            counts = _benign_counts(cal, det.decision_scores(raw))
            loo = counts - 1
            ranks = cal.criterion_ranks()
            assert np.array_equal((counts <= ranks[None, :]).any(1), det.reject(raw)), name
            fires = loo <= ranks[None, :]
            assert fires.any(1).mean() == pytest.approx(cal.expected_fpr), name
            if len(det.directions) == 1:
                assert target_fpr - cal.expected_fpr <= 1.0 / n + 1e-12, f"{name}: {cal.expected_fpr} at {target_fpr}"
            else:
                assert np.all(ranks >= cal.rank), name
                for i in range(len(ranks)):  # no criterion can take one more tie group
                    above = loo[:, i][loo[:, i] > ranks[i]]
                    if len(above):
                        grown = fires.any(1) | (loo[:, i] <= above.min())
                        assert grown.mean() > target_fpr, f"{name}: rank of criterion {i} is not the largest"
                assert target_fpr - cal.expected_fpr <= (len(det.directions) - 1) / n + 1e-12, name
        # scoring images directly and scoring their raw scores agree
        assert np.array_equal(det.reject(benign[:16]), det.reject({k: v[:16] for k, v in raw.items()})), name


def test_meanblur_scores_the_same_quantity_as_c3(bench_setup):
    model, index, refs, benign, _ = bench_setup
    mb = create_benchmark_detector("meanblur", model, index).raw_scores(benign[:32])
    c3 = create_benchmark_detector("umcd-c3", model, index).raw_scores(benign[:32])
    np.testing.assert_allclose(mb["squeeze"], c3["c3"], rtol=1e-5, atol=1e-5)


def test_squeezing_detectors_measure_continuous_hamming_disagreement(bench_setup):
    from core.transforms import median_filter

    model, index, _, benign, _ = bench_setup
    x = benign[:8]
    got = create_benchmark_detector("fs-median", model, index).raw_scores(x)["squeeze"]
    with torch.no_grad():
        f, ft = model(x), model(median_filter(x, 2))
    np.testing.assert_allclose(got, 0.5 * (f.shape[1] - (f * ft).sum(1)).numpy(), rtol=1e-5, atol=1e-5)


def test_supervised_lid_must_be_fitted_and_unsupervised_ones_cannot_be(bench_setup):
    model, index, refs, benign, noisy = bench_setup
    lid = create_benchmark_detector("lid", model, index, references=refs)
    assert lid.supervised
    raw = lid.raw_scores(benign[:20])
    with pytest.raises(RuntimeError, match="not fitted"):
        lid.decision_scores(raw)
    with pytest.raises(TypeError, match="unsupervised"):
        create_benchmark_detector("lid-unsup", model, index, references=refs).fit(raw, raw)
    with pytest.raises(ValueError, match="references"):
        create_benchmark_detector("lid", model, index)


def test_supervised_lid_separates_what_it_was_trained_on(bench_setup):
    model, index, refs, benign, noisy = bench_setup
    lid = create_benchmark_detector("lid", model, index, references=refs)
    b, a = lid.raw_scores(benign[:80]), lid.raw_scores(noisy)
    lid.fit(b, a)
    sb, sa = lid.decision_scores(b)["lid"], lid.decision_scores(a)["lid"]
    assert sa.mean() > sb.mean()
    assert set(b) == {"lid_l0", "lid_l1", "lid_l2", "lid_l3", "lid_f"}  # every smallcnn stage and f(x)


def test_lid_mle_matches_its_closed_form_and_skips_zero_distances():
    d = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 9.0]])
    k = 4
    r = np.array([1.0, 2.0, 3.0, 4.0])
    expected = -k / np.log(r / r[-1]).sum()
    assert lid_mle(d, k).item() == pytest.approx(expected)


def test_lid_grows_with_the_intrinsic_dimension_of_the_references():
    g = torch.Generator().manual_seed(0)
    lo = torch.zeros(400, 20)
    lo[:, :2] = torch.rand(400, 2, generator=g)
    hi = torch.rand(400, 20, generator=g)
    lid_lo = lid_mle(torch.cdist(lo[:50], lo[50:]), 20).mean().item()
    lid_hi = lid_mle(torch.cdist(hi[:50], hi[50:]), 20).mean().item()
    assert lid_lo < 4 < 8 < lid_hi


def test_image_entropy_is_zero_for_a_constant_image_and_eight_bits_for_all_levels():
    const = torch.full((1, 3, 16, 16), 0.5)
    levels = (torch.arange(256).float() / 255).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    ent = image_entropy(torch.cat([const, levels]))
    assert ent[0].item() == pytest.approx(0.0, abs=1e-9) and ent[1].item() == pytest.approx(8.0, abs=1e-6)


def test_fs_adaptive_quantizes_low_entropy_images_and_smooths_high_entropy_ones():
    g = torch.Generator().manual_seed(0)
    low = torch.zeros(1, 3, 16, 16)
    low[..., 4:12, 4:12] = 0.8  # two levels: entropy < 1 bit
    high = torch.rand(1, 3, 16, 16, generator=g)  # ~8 bits
    out = fs_adaptive(torch.cat([low, high]))
    # low entropy: interval 128 -> values {0, 128/255}
    np.testing.assert_allclose(np.unique(out[0].numpy()), [0.0, 128 / 255], atol=1e-6)
    # high entropy: interval 43 quantization with a cross mean filter inside a 3-pixel border
    q = scalar_quantization(high, 43)
    assert torch.equal(out[1, :, :3, :], q[0, :, :3, :])
    qf = cross_mean_filter(q)
    inner = out[1, :, 3:-3, 3:-3]
    closer = torch.where((qf - high).abs() < (q - high).abs(), qf, q)[0, :, 3:-3, 3:-3]
    assert torch.equal(inner, closer) and not torch.equal(inner, q[0, :, 3:-3, 3:-3])


def test_cross_mean_filter_averages_thirteen_taps():
    x = torch.zeros(1, 1, 13, 13)
    x[0, 0, 6, 6] = 13.0
    y = cross_mean_filter(x)
    # the 13 pixels of the cross around the spike (all interior) each get spike / 13; diagonals get nothing
    assert y[0, 0, 6, 6].item() == pytest.approx(1.0) and y[0, 0, 6, 9].item() == pytest.approx(1.0)
    assert y[0, 0, 5, 5].item() == 0.0 and y[0, 0, 6, 10].item() == 0.0
    assert math.isclose(float(y.sum()), 13.0, rel_tol=1e-6)
    # the 3-pixel border is left as it was
    x[0, 0, 0, 0] = 5.0
    assert cross_mean_filter(x)[0, 0, 0, 0].item() == 5.0
