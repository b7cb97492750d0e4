"""The CUDA paths against the CPU ones: transforms, the Detector, training and the GPU index backend.

(A GPU batch scored as its images one by one: tests/unit/test_core_detection.py, on both devices.)

Skipped where torch sees no GPU (CI, the development machine); `deploy/gpu-check.sh` runs them on a GPU
machine. The CPU results are the reference: a model, a calibration and an index serve both devices, and
the scores may differ only by float rounding (different kernels sum in a different order).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from core.detector import Detector
from core.index import HammingIndex, gpu_available, hamming_distances
from core.pipeline import build_index
from core.transforms import TRANSFORMS, get_transform

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

#: score tolerance between devices: float32 sums over K = 64 outputs in another order
SCORE_ATOL = 1e-3


@cuda
@pytest.mark.parametrize("name", TRANSFORMS.names())
def test_each_transform_gives_on_the_gpu_what_it_gives_on_the_cpu(name, digits_splits):
    x = digits_splits.query.get(np.arange(64))
    t = get_transform(name)
    on_cpu, on_gpu = t(x), t(x.cuda())
    assert on_gpu.is_cuda and on_gpu.shape == on_cpu.shape
    differ = (on_gpu.cpu() - on_cpu).abs() > 1e-5
    # bit-depth reduction rounds: a value a rounding error from a step's midpoint may land on the other
    # side; no more than one value in a thousand
    assert differ.float().mean().item() <= (1e-3 if name.startswith("bitdepth") else 0.0), name


@cuda
def test_the_detector_on_the_gpu_scores_and_decides_as_on_the_cpu(trained_digits, digits_splits):
    model, _ = trained_digits
    index = build_index(model, digits_splits.database)
    on_cpu = Detector(model, index, top_k=10)
    on_cpu.calibrate(digits_splits.query.get(np.arange(500)), 0.05)
    on_gpu = Detector(copy.deepcopy(model).cuda(), index, on_cpu.calibration, top_k=10)
    assert on_gpu.device.type == "cuda" and on_gpu.max_forward == Detector.MAX_FORWARD["cuda"]
    x = digits_splits.query.get(np.arange(500, 1000))
    a, b = on_cpu.score_batch(x), on_gpu.score_batch(x)
    # codes: equal wherever the output is not within rounding of zero
    near_zero = np.abs(a.f) < 1e-4
    assert np.array_equal(a.codes[~near_zero], b.codes[~near_zero])
    assert near_zero.mean() < 1e-3
    for name in ("c1", "c2", "c3"):
        np.testing.assert_allclose(b.scores[name], a.scores[name], atol=SCORE_ATOL, err_msg=name)
    # verdicts: equal unless a score lies within the tolerance of its threshold
    near = np.zeros(len(x), dtype=bool)
    for name, thr in on_cpu.calibration.thresholds.items():
        near |= np.abs(a.scores[name] - thr) <= SCORE_ATOL
    same = np.array(a.verdicts) == np.array(b.verdicts)
    assert same[~near].all() and near.mean() < 0.01
    assert {"model", "search", "criteria"} <= set(b.timings)


@cuda
def test_training_on_the_gpu_gives_a_checkpoint_that_loads_on_the_cpu(digits_splits, tmp_path):
    from core.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
    from core.training import train_csq

    torch.manual_seed(0)
    model, centers, losses = train_csq(digits_splits.train, digits_splits.num_classes, bits=16, epochs=3,
                                       device="cuda", progress=False)
    assert next(model.parameters()).is_cuda
    assert losses[-1] < losses[0]
    meta = CheckpointMeta(backbone="smallcnn", bits=16, dataset="digits", split_seed=0,
                          num_classes=digits_splits.num_classes, epochs=3)
    path = tmp_path / "gpu.safetensors"
    save_checkpoint(path, model, centers, meta)
    loaded = load_checkpoint(path, "cpu")
    x = digits_splits.query.get(np.arange(64))
    with torch.no_grad():
        np.testing.assert_allclose(loaded.model(x).numpy(), model(x.cuda()).cpu().numpy(), atol=1e-4)


@pytest.mark.skipif(not gpu_available(), reason="needs faiss with GPU support and a GPU")
def test_the_gpu_index_agrees_with_the_cpu_index():
    rng = np.random.default_rng(0)
    codes = np.where(rng.random((5000, 64)) < 0.5, 1, -1).astype(np.int8)
    ids = rng.permutation(10**6)[:5000].astype(np.int64)
    cpu, gpu = HammingIndex(64, "cpu"), HammingIndex(64, "gpu")
    assert gpu.backend == "gpu"
    for index in (cpu, gpu):
        index.add(codes, ids)
        index.remove(ids[:100])
    queries = codes[50:250]
    (i_cpu, d_cpu), (i_gpu, d_gpu) = cpu.search(queries, 10), gpu.search(queries, 10)
    assert np.array_equal(d_cpu, d_gpu)
    truth = hamming_distances(queries, codes[100:])
    position = {int(v): j for j, v in enumerate(ids[100:])}
    for r in range(len(queries)):
        # ties at the k-th distance may be cut another way: below it the id sets agree, and every id
        # found lies at the distance reported
        below = d_cpu[r] < d_cpu[r].max()
        assert set(i_cpu[r][below]) == set(i_gpu[r][below])
        assert [truth[r, position[int(i)]] for i in i_gpu[r]] == d_gpu[r].tolist()


@pytest.mark.skipif(gpu_available(), reason="faiss sees a GPU here: no fallback")
def test_a_gpu_index_asked_for_without_faiss_gpu_falls_back_to_the_cpu_and_says_so_once(caplog, monkeypatch):
    import core.index

    monkeypatch.setattr(core.index, "_fallback_logged", False)
    rng = np.random.default_rng(1)
    codes = np.where(rng.random((300, 32)) < 0.5, 1, -1).astype(np.int8)
    with caplog.at_level("WARNING", logger="core.index"):
        first, second = HammingIndex(32, "gpu"), HammingIndex(32, "gpu")
    assert first.backend == second.backend == "cpu"
    warnings = [r.getMessage() for r in caplog.records if r.name == "core.index"]
    assert len(warnings) == 1 and "stays on the CPU" in warnings[0]
    first.add(codes, np.arange(300))
    ids, d = first.search(codes[:20], 5)
    np.testing.assert_array_equal(d, np.sort(hamming_distances(codes[:20], codes), axis=1)[:, :5])
    assert (ids[:, 0] == np.arange(20)).all()
