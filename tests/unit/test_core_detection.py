"""Detection core: index, criteria, calibration and the batched Detector."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from core.calibration import Calibration
from core.criteria import c1_mean_hamming, c2_quantization, c3_disagreement
from core.detector import DETECTORS, Detector
from core.index import HammingIndex, hamming_distances, pack_codes, unpack_codes
from core.pipeline import build_index, calibrate_detector
from core.transforms import TRANSFORMS, get_transform


def test_index_agrees_with_brute_force_hamming_search():
    rng = np.random.default_rng(0)
    db = rng.choice([-1.0, 1.0], (2000, 64))
    q = rng.choice([-1.0, 1.0], (50, 64))
    ids = rng.permutation(10_000)[:2000].astype(np.int64)
    index = HammingIndex(64)
    index.add(db, ids)
    got_ids, got_d = index.search(q, 15)
    bf = hamming_distances(q, db)
    order = np.lexsort((np.broadcast_to(ids, bf.shape), bf), axis=-1)[:, :15]
    assert np.array_equal(got_d, np.take_along_axis(bf, order, 1))
    # returned ids carry exactly the distances the brute force gives them
    pos = {int(v): j for j, v in enumerate(ids)}
    for r in range(len(q)):
        assert [bf[r, pos[int(i)]] for i in got_ids[r]] == got_d[r].tolist()


def test_index_remove_save_load_and_padding(tmp_path):
    codes = np.array([[1, 1, 1, 1, 1, 1, 1, 1], [-1, 1, 1, 1, 1, 1, 1, 1], [-1, -1, -1, -1, -1, -1, -1, -1]])
    index = HammingIndex(8)
    index.add(codes, [10, 11, 12])
    assert index.remove([11, 99]) == 1
    ids, d = index.search(codes[:1], 4)
    assert ids[0].tolist() == [10, 12, -1, -1] and d[0].tolist() == [0, 8, 9, 9]
    index.save(tmp_path / "i.faiss")
    again = HammingIndex.load(tmp_path / "i.faiss")
    assert sorted(again.ids().tolist()) == [10, 12]
    assert np.array_equal(again.search(codes, 2)[1], index.search(codes, 2)[1])
    assert np.array_equal(unpack_codes(pack_codes(codes), 8), codes)


def test_index_refuses_an_id_twice_in_one_add():
    idx = HammingIndex(16)
    codes = np.where(np.random.default_rng(0).random((3, 16)) > 0.5, 1, -1)
    with pytest.raises(ValueError, match="ids must be unique: 1 repeated"):
        idx.add(codes, [5, 7, 5])
    assert len(idx) == 0
    idx.add(codes, [5, 7, 9])
    assert sorted(idx.ids().tolist()) == [5, 7, 9]


def test_index_is_safe_under_concurrent_add_and_search():
    import threading

    rng = np.random.default_rng(1)
    index = HammingIndex(32)
    errors = []

    def adder(base):
        try:
            for i in range(50):
                index.add(rng.choice([-1.0, 1.0], (4, 32)), np.arange(4) + base + 4 * i)
        except Exception as exc:  # pragma: no cover - failure path
            errors.append(exc)

    def searcher():
        try:
            for _ in range(100):
                ids, d = index.search(rng.choice([-1.0, 1.0], (3, 32)), 5)
                assert ids.shape == (3, 5)
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=adder, args=(b,)) for b in (0, 10_000)] + [
        threading.Thread(target=searcher) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(index) == 400


def test_c1_is_zero_when_the_code_equals_its_neighbours():
    assert c1_mean_hamming(np.zeros((3, 5), np.int32), 64).tolist() == [0, 0, 0]
    d = np.array([[0, 2, 4, 65, 65]])  # 65 > K marks missing neighbours
    assert c1_mean_hamming(d, 64).tolist() == [2.0]
    assert c1_mean_hamming(np.full((1, 3), 65), 64).tolist() == [32.0]


def test_c2_is_zero_when_outputs_are_binary_and_grows_towards_zero_outputs():
    h = torch.tensor([[1.0, -1, 1, -1]])
    assert c2_quantization(h).item() == 0
    assert c2_quantization(torch.tensor([[0.5, -0.5, 0.9, -0.1]])).item() == pytest.approx(0.5 + 0.5 + 0.1 + 0.9)


def test_c3_is_zero_with_the_identity_transform_on_binary_outputs_and_k_for_opposite():
    f = torch.tensor([[1.0, -1, 1, -1, 1, 1, -1, -1]])
    ident = get_transform("identity")
    assert c3_disagreement(f, ident(f)).item() == 0
    assert c3_disagreement(f, -f).item() == 8
    assert c3_disagreement(f, torch.zeros_like(f)).item() == 4


def test_transforms_keep_shape_and_range():
    x = torch.rand(2, 3, 16, 16)
    for name in TRANSFORMS.names():
        y = get_transform(name)(x)
        assert y.shape == x.shape, name
        assert y.min() >= -1e-6 and y.max() <= 1 + 1e-6, name
    flat = torch.full((1, 3, 8, 8), 0.3)
    for name in ("identity", "meanblur3", "meanblur5", "median2", "median3", "nlm"):  # smoothing filters
        assert torch.allclose(get_transform(name)(flat), flat, atol=1e-5), name


@pytest.mark.parametrize("size", [3, 5])
@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (5, 3, 9, 11), (3, 7, 6)])
def test_mean_blur_equals_the_box_filter_over_the_reflect_padded_image(size, shape):
    """The separable matrix form against avg_pool2d over F.pad(mode='reflect') (the filter's definition), in
    float64 to rounding and in float32 to float rounding; differentiable; odd sizes only."""
    import torch.nn.functional as F

    from core.transforms import mean_blur

    x = torch.from_numpy(np.random.default_rng(size).random(shape))
    p = size // 2
    batched = x if x.dim() == 4 else x[None]
    expected = F.avg_pool2d(F.pad(batched, (p, p, p, p), mode="reflect"), size, stride=1).reshape(x.shape)
    torch.testing.assert_close(mean_blur(x, size), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(mean_blur(x.float(), size), expected.float(), rtol=0, atol=1e-6)
    assert torch.autograd.gradcheck(lambda t: mean_blur(t, size), (x[..., :6, :6].clone().requires_grad_(),))
    with pytest.raises(ValueError, match="odd size"):
        mean_blur(x, size + 1)
    with pytest.raises(ValueError, match="more than"):
        mean_blur(x[..., :p, :], size)


def test_mean_blur_matrices_cached_under_inference_mode_still_serve_gradients():
    """The first blur of a size may run in a worker under inference mode; an attack's later blur needs gradients."""
    from core.transforms import _box_matrix, mean_blur

    _box_matrix.cache_clear()
    x = torch.rand(2, 3, 12, 10)
    with torch.inference_mode():
        mean_blur(x)
    leaf = x.clone().requires_grad_()
    mean_blur(leaf).sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    with pytest.raises(TypeError, match="floating-point"):
        mean_blur((x * 255).to(torch.uint8))  # 1/3 in an integer matrix would be 0: refused, not all zeros


def test_models_run_channels_last_and_give_the_plain_layouts_outputs(tmp_path):
    """A model's convolution weights are channels-last (faster on CPUs), also once saved and loaded; its
    outputs are the contiguous-layout model's to float rounding, with the same signs (the same codes)."""
    import copy

    from core.checkpoint import load_checkpoint, save_untrained_checkpoint

    path = save_untrained_checkpoint(tmp_path / "m.safetensors", bits=64)
    model = load_checkpoint(path).model
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    assert all(m.weight.is_contiguous() for m in plain.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for n in (1, 2, 64):
            a, b = model(x[:n]), plain(x[:n])
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
            far = b.abs() > 1e-4  # signs can only differ where rounding could cross zero
            assert far.float().mean() > 0.99 and torch.equal((a >= 0)[far], (b >= 0)[far])


@pytest.mark.parametrize("size", [2, 3, 4, 5])
def test_median_filter_equals_scipys_and_the_2x2_one_is_feature_squeezings(size):
    """Feature squeezing's reference filters with scipy.ndimage.median_filter(size=2, mode='reflect'): its window
    sits up-left of the pixel and it takes the upper middle value; odd sizes are centred, mirrored at the border."""
    ndimage = pytest.importorskip("scipy.ndimage")
    from core.transforms import median_filter

    x = np.random.default_rng(size).random((2, 3, 9, 11)).astype(np.float32)
    mode = "reflect" if size % 2 == 0 else "mirror"
    expected = ndimage.median_filter(x, size=(1, 1, size, size), mode=mode)
    np.testing.assert_array_equal(median_filter(torch.from_numpy(x), size).numpy(), expected)
    if size == 2:
        square = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
        assert median_filter(square, 2).tolist() == [[[[1.0, 2.0], [3.0, 3.0]]]]


def test_a_calibration_set_too_small_for_its_target_is_fitted_with_a_warning():
    """Three criteria, each firing at least beyond its most extreme benign value: ~3/(n+1) whatever the target."""
    from core.calibration import CalibrationWarning

    rng = np.random.default_rng(1)
    directions = {"a": "high", "b": "low", "c": "high"}
    small = {k: rng.normal(size=19) for k in directions}
    with pytest.warns(CalibrationWarning, match="19 benign samples are too few"):
        cal = Calibration.fit(small, directions, 0.05)
    assert cal.expected_fpr > 0.05 and set(cal.ranks.values()) == {0}
    large = {k: rng.normal(size=500) for k in directions}
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        assert Calibration.fit(large, directions, 0.05).expected_fpr <= 0.05


def test_joint_calibration_hits_the_target_for_the_combined_rule_not_per_criterion():
    rng = np.random.default_rng(0)
    n = 1000
    scores = {"a": rng.normal(size=n), "b": rng.normal(size=n), "c": rng.normal(size=n)}
    cal = Calibration.fit(scores, {"a": "high", "b": "low", "c": "high"}, 0.05)
    assert cal.expected_fpr == pytest.approx(0.05, abs=1 / n)  # each sample judged against the others
    # counted against itself too, each criterion looks one rank stricter: up to 3/n lower in-sample
    assert 0.05 - 3 / n - 1e-12 <= cal.calibration_fpr < cal.expected_fpr
    per_criterion = cal.fired(scores).mean(0)
    assert np.all(per_criterion < 0.05)  # each criterion alone is stricter than the target
    # the combined score reproduces the any-fires rule exactly
    assert np.array_equal(cal.combined_score(scores) > cal.combined_threshold, cal.reject(scores))


def test_per_criterion_ranks_fill_the_target_that_ties_leave_under_one_shared_rank():
    """C1-like ties: most benign values are 0, so one shared rank overshoots or undershoots in big steps;
    raising each criterion's own rank lands the combined rule (leave-one-out) exactly on the allowed count."""
    n = 100
    idx = np.arange(n)
    c1 = np.where(idx < 4, 1.0, 0.0)  # four tied suspicious values, the rest tied at 0
    c2 = ((idx - 10) % n).astype(float)  # "low": samples 10, 11, 12, ... most suspicious
    c3 = -((idx - 20) % n).astype(float)  # "high": samples 20, 21, 22, ... most suspicious
    scores = {"c1": c1, "c2": c2, "c3": c3}
    cal = Calibration.fit(scores, {"c1": "high", "c2": "low", "c3": "high"}, 0.05)
    loo = cal._counts(scores) - 1  # each sample against the other 99
    # one shared rank: m = 1 fires 4 samples (m = 2 would fire 6 > 5); C1's tie group of 4 never fits
    assert cal.rank == 1 and (loo <= cal.rank).any(1).sum() == 4
    assert cal.ranks == {"c1": 1, "c2": 2, "c3": 1}  # C2 takes one more sample; C3 then would overshoot
    assert (loo <= cal.criterion_ranks()).any(1).sum() == 5 and cal.expected_fpr == pytest.approx(0.05)
    assert cal.reject(scores).sum() == 3 and cal.calibration_fpr == pytest.approx(0.03)  # in-sample
    rng = np.random.default_rng(3)
    assert np.all(cal.criterion_ranks() >= cal.rank)
    assert np.array_equal(cal.combined_score(scores) > cal.combined_threshold, cal.reject(scores))
    new = {k: rng.permutation(v) + rng.normal(0, 0.5, n) for k, v in scores.items()}
    assert np.array_equal(cal.combined_score(new) > cal.combined_threshold, cal.reject(new))


def test_a_calibration_saved_before_per_criterion_ranks_still_loads_with_the_shared_rank():
    rng = np.random.default_rng(4)
    scores = {"c1": rng.random(200), "c2": rng.random(200)}
    cal = Calibration.fit(scores, {"c1": "high", "c2": "low"}, 0.1)
    old = json.loads(cal.to_json())
    del old["ranks"]
    for k, d in zip(cal.names, cal.directions):  # what the shared rank alone gave
        sus = np.sort(np.asarray(scores[k]) * (1 if d == "high" else -1))[::-1]
        old["thresholds"][k] = float(sus[cal.rank] * (1 if d == "high" else -1))
    legacy = Calibration.from_json(json.dumps(old))
    assert np.array_equal(legacy.criterion_ranks(), [cal.rank, cal.rank])
    assert np.array_equal(legacy.combined_score(scores) > legacy.combined_threshold, legacy.reject(scores))


def test_the_per_batch_decision_counts_and_fires_as_the_definition_says_on_every_path():
    """`decide` (a few values by bisection, larger batches vectorised) against the definitions computed
    directly: count = benign values at least as suspicious, p = (count + 1) / (n + 1), fired beyond the
    threshold; on both directions, heavy ties, values equal to benign ones, and a NaN."""
    rng = np.random.default_rng(3)
    checked = {"small": 0, "vectorised": 0}
    for trial in range(120):
        n = int(rng.integers(40, 200))
        benign = {"a": rng.integers(0, 4, n).astype(float), "b": rng.normal(size=n), "c": rng.integers(0, 3, n) * 0.5}
        directions = {"a": "high", "b": "low", "c": "high"}
        cal = Calibration.fit(benign, directions, 0.1)
        for m in (1, 2, cal.SMALL_BATCH, cal.SMALL_BATCH + 1, 17):
            scores = {"a": rng.integers(-1, 6, m).astype(float),
                      "b": np.where(rng.random(m) < 0.5, rng.choice(benign["b"], m), rng.normal(size=m)),
                      "c": rng.integers(0, 4, m) * 0.5}
            if trial % 10 == 0:
                scores["b"][-1] = np.nan  # a NaN goes the vectorised way, whatever the size
            combined, fired = cal.decide(scores)
            counts = np.stack([(benign[k][None, :] >= scores[k][:, None]).sum(1) if directions[k] == "high"
                               else (benign[k][None, :] <= scores[k][:, None]).sum(1) for k in cal.names], 1)
            if trial % 10 == 0:
                counts[-1, 1] = n  # np.searchsorted orders NaN last: a "low" NaN counts every benign value
            scale = (cal.rank + 1.0) / (cal.criterion_ranks() + 1.0) / (n + 1.0)
            np.testing.assert_array_equal(combined, -np.log10(((counts + 1.0) * scale).min(1)))
            expected_fired = np.stack([scores[k] > cal.thresholds[k] if directions[k] == "high"
                                       else scores[k] < cal.thresholds[k] for k in cal.names], 1)
            np.testing.assert_array_equal(fired, expected_fired)
            np.testing.assert_array_equal(combined, cal.combined_score(scores))
            np.testing.assert_array_equal(fired, cal.fired(scores))
            small = m <= cal.SMALL_BATCH and not np.isnan(scores["b"]).any()
            assert (cal._decide_small(scores) is not None) == small
            checked["small" if small else "vectorised"] += 1
    assert min(checked.values()) >= 100


def test_the_decision_is_the_same_for_one_value_and_for_many_whatever_the_calibration_holds():
    """Both paths read the same benign values: a NaN among them (stored last), float32 arrays or integers
    in a hand-built calibration, and lists changed after first use give one answer per value whatever
    the batch size; columns of unequal lengths are refused on both."""
    rng = np.random.default_rng(5)
    benign = {"a": rng.normal(size=60), "b": rng.normal(size=60)}
    cal = Calibration.fit(benign, {"a": "high", "b": "low"}, 0.1)
    data = json.loads(cal.to_json())
    data["benign"]["b"][-5:] = [float("nan")] * 5  # NaN sorts last, as np.sort leaves it
    variants = {"nan": Calibration(**data)}
    f32 = json.loads(cal.to_json())
    f32["benign"] = {k: np.asarray(v, dtype=np.float32) for k, v in f32["benign"].items()}
    variants["float32"] = Calibration(**f32)
    ints = json.loads(cal.to_json())
    ints["benign"] = {k: sorted(int(round(10 * x)) for x in v) for k, v in ints["benign"].items()}
    variants["ints"] = Calibration(**ints)
    variants["changed"] = Calibration(**json.loads(cal.to_json()))
    variants["changed"].decide({"a": np.zeros(1), "b": np.zeros(1)})
    variants["changed"].benign["b"] = sorted(x + 1.0 for x in variants["changed"].benign["b"])
    # beyond the benign values too, both sides (a row unsuspicious on both criteria takes its score from
    # the top of the lists, where the NaNs are)
    queries = {"a": np.r_[rng.normal(size=7), -5.0, 5.0], "b": np.r_[rng.normal(size=7), 5.0, -5.0]}
    for name, c in variants.items():
        whole = c.decide(queries)
        for j in range(9):
            one = c.decide({k: v[j : j + 1] for k, v in queries.items()})
            np.testing.assert_array_equal(one[0], whole[0][j : j + 1], err_msg=name)
            np.testing.assert_array_equal(one[1], whole[1][j : j + 1], err_msg=name)
    for c in (cal, variants["nan"]):
        with pytest.raises(ValueError):
            c.decide({"a": np.zeros(1), "b": np.zeros(2)})


def test_a_criterion_reads_the_outputs_its_context_holds_now():
    """ScoreContext.host converts a field once, and again when the field is replaced."""
    import dataclasses

    from core.detector import ScoreContext

    f = torch.tensor([[0.5, -0.25]])
    ctx = ScoreContext(torch.zeros(1, 3, 4, 4), f, [f * 2], torch.sign(f), np.zeros((1, 1), np.int64),
                       np.zeros((1, 1), np.int32), 2, None, None)
    assert ctx.host("f").tolist() == [[0.5, -0.25]] and ctx.host("f_t0").tolist() == [[1.0, -0.5]]
    assert ctx.host("f") is ctx.host("f")  # converted once
    halved = dataclasses.replace(ctx, f=f / 2)
    assert halved.host("f").tolist() == [[0.25, -0.125]]
    ctx.f = f * 4
    assert ctx.host("f").tolist() == [[2.0, -1.0]]
    assert ctx.host("codes").tolist() == [[1.0, -1.0]]


def test_calibration_saved_and_reloaded_gives_the_same_verdicts(tmp_path):
    rng = np.random.default_rng(2)
    scores = {"c1": rng.integers(0, 10, 300).astype(float), "c2": rng.random(300), "c3": rng.random(300) * 5}
    cal = Calibration.fit(scores, {"c1": "high", "c2": "low", "c3": "high"}, 0.1, checkpoint_sha256="ab" * 32)
    new = {k: rng.permutation(v) * 1.1 for k, v in scores.items()}
    again = Calibration.load(cal.save(tmp_path / "cal.json"))
    assert np.array_equal(again.fired(new), cal.fired(new))
    assert np.array_equal(again.combined_score(new), cal.combined_score(new))
    assert again.meta["checkpoint_sha256"] == "ab" * 32 and again.n_samples == 300 and again.target_fpr == 0.1


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_detector_batched_results_equal_one_by_one(tiny_model, digits_splits, device):
    index = build_index(tiny_model, digits_splits.database.subset(np.arange(100)))
    det = Detector(tiny_model.to(device), index, top_k=5)
    assert det.device.type == device
    det.calibrate(digits_splits.query.get(np.arange(60)), 0.1)
    x = digits_splits.query.get(np.arange(60, 76))
    batch = det.score_batch(x)
    singles = [det.score_batch(x[i : i + 1]) for i in range(len(x))]
    assert batch.verdicts == [s.verdicts[0] for s in singles]
    for k in ("c1", "c2", "c3"):
        assert np.allclose(batch.scores[k], [s.scores[k][0] for s in singles], atol=1e-4)
    assert np.array_equal(batch.codes, np.concatenate([s.codes for s in singles]))
    assert np.array_equal(batch.distances, np.concatenate([s.distances for s in singles]))
    rec = batch.record(0)
    assert set(rec) >= {"verdict", "fired", "scores", "thresholds", "topk", "code"}


def test_records_of_a_batch_equal_the_record_of_each_image(tiny_model, digits_splits):
    """records() converts per batch what record(i) converts per image: the same dicts, also when the
    index holds fewer codes than top_k (FAISS pads with id -1, which no record lists)."""
    for n_db, k in ((100, 5), (3, 5)):
        index = build_index(tiny_model, digits_splits.database.subset(np.arange(n_db)))
        det = Detector(tiny_model, index, top_k=k)
        det.calibrate(digits_splits.query.get(np.arange(60)), 0.2)
        batch = det.score_batch(digits_splits.query.get(np.arange(60, 92)))
        records = batch.records()
        assert records == [batch.record(i) for i in range(len(batch))]
        assert all(len(r["topk"]["ids"]) == min(n_db, k) for r in records)
        assert [r["verdict"] for r in records] == batch.verdicts
    assert {r["verdict"] for r in records} == {"benign", "adversarial"}  # both branches compared


def test_every_registered_detector_variant_scores_and_calibrates(tiny_model, digits_splits):
    index = build_index(tiny_model, digits_splits.database.subset(np.arange(50)))
    x = digits_splits.query.get(np.arange(40))
    for name in DETECTORS.names():
        det = Detector(tiny_model, index, detector=name, top_k=3)
        cal = det.calibrate(x, 0.1)
        assert cal.calibration_fpr <= 0.1
        out = det.score_batch(x[:5])
        assert out.fired.shape == (5, len(det.spec.criteria))


def test_heldout_benign_fpr_on_digits_is_near_the_target(trained_digits, digits_splits):
    model, _ = trained_digits
    det = Detector(model, build_index(model, digits_splits.database), top_k=10)
    rep = calibrate_detector(det, digits_splits, target_fpr=0.05, seed=0)
    assert rep.n_calibration == 500 and rep.n_heldout == 500
    assert 0.03 <= rep.heldout_fpr <= 0.07


def test_a_batch_cut_into_forward_chunks_scores_as_one_pass(tiny_model, digits_splits):
    index = build_index(tiny_model, digits_splits.database.subset(np.arange(60)))
    det = Detector(tiny_model, index, top_k=5)
    det.calibrate(digits_splits.query.get(np.arange(40)), 0.1)
    x = digits_splits.query.get(np.arange(40, 53))  # 13 images: chunks of 2 x-images (+ their t(x)) and a rest
    whole = det.score_batch(x)
    det.max_forward = 4
    chunked = det.score_batch(x)
    assert chunked.verdicts == whole.verdicts
    assert np.array_equal(chunked.codes, whole.codes) and np.array_equal(chunked.ids, whole.ids)
    for k in ("c1", "c2", "c3"):
        np.testing.assert_allclose(chunked.scores[k], whole.scores[k], atol=1e-4)
