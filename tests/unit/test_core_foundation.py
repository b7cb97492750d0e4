"""Foundation: centres, mAP, checkpoints, datasets, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.centers import bernoulli_centers, centers_for_labels, hadamard_centers, make_centers, pairwise_hamming
from core.checkpoint import CheckpointMeta, UnsafeCheckpoint, load_checkpoint, save_checkpoint
from core.datasets import DatasetNotFound, load_dataset
from core.metrics import brute_force_map, mean_average_precision
from core.models import create_model, encode, sign_codes


@pytest.mark.parametrize("bits", [16, 32, 64, 128])
def test_hadamard_centres_are_exactly_half_k_apart(bits):
    c = hadamard_centers(10, bits)
    d = pairwise_hamming(c)
    off = d[~np.eye(len(c), dtype=bool)]
    assert set(np.unique(c)) == {-1.0, 1.0}
    assert np.all(off == bits / 2)


def test_hadamard_and_negated_rows_used_when_classes_exceed_bits():
    c = hadamard_centers(20, 16)
    d = pairwise_hamming(c)
    assert len(np.unique(c, axis=0)) == 20
    assert d[~np.eye(20, dtype=bool)].min() == 8


@pytest.mark.parametrize("bits,classes,min_d", [(48, 30, 16), (64, 200, 20), (24, 12, 6)])
def test_bernoulli_centres_meet_their_minimum_distance(bits, classes, min_d):
    c = bernoulli_centers(classes, bits, min_distance=min_d, seed=3)
    d = pairwise_hamming(c)
    assert c.shape == (classes, bits)
    assert d[~np.eye(classes, dtype=bool)].min() >= min_d


def test_bernoulli_centres_refuse_an_impossible_distance():
    with pytest.raises(RuntimeError, match="could not draw"):
        bernoulli_centers(50, 16, min_distance=15, seed=0, max_tries=500)


def test_make_centres_falls_back_to_bernoulli_beyond_two_k_classes():
    c = make_centers(40, 16, seed=1)
    assert c.shape == (40, 16)
    assert pairwise_hamming(c)[~np.eye(40, dtype=bool)].min() >= 4


def test_multi_label_centre_is_the_sign_of_the_sum_of_its_classes():
    centers = torch.tensor([[1.0, 1, 1, -1], [1, -1, 1, 1], [1, 1, -1, 1]])
    labels = torch.tensor([[1, 0, 0], [1, 1, 1]])
    out = centers_for_labels(labels, centers)
    assert out[0].tolist() == [1, 1, 1, -1]
    assert out[1].tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("topk", [None, 1, 10, 57])
def test_map_equals_brute_force_reference_on_random_codes_with_ties(topk):
    rng = np.random.default_rng(7)
    k = 8  # few bits: many equal distances
    db = rng.choice([-1.0, 1.0], (300, k))
    q = rng.choice([-1.0, 1.0], (40, k))
    ql = (rng.random((40, 4)) < 0.4).astype(np.int8)
    dl = (rng.random((300, 4)) < 0.4).astype(np.int8)
    ours = mean_average_precision(q, ql, db, dl, topk)
    ref = brute_force_map(q, ql, db, dl, topk)
    assert ours == pytest.approx(ref, abs=1e-12)


def test_map_is_one_for_perfect_single_label_codes():
    codes = hadamard_centers(4, 16)
    labels = np.eye(4, dtype=np.int8)
    db = np.repeat(codes, 5, 0)
    dl = np.repeat(labels, 5, 0)
    assert mean_average_precision(codes, labels, db, dl) == 1.0


def test_checkpoint_round_trip_reproduces_codes_bit_for_bit(tmp_path):
    torch.manual_seed(1)
    model = create_model("smallcnn", 32).eval()
    x = torch.rand(20, 3, 32, 32)
    meta = CheckpointMeta(backbone="smallcnn", bits=32, dataset="digits", split_seed=0, num_classes=10)
    path = tmp_path / "m.safetensors"
    sha = save_checkpoint(path, model, torch.from_numpy(hadamard_centers(10, 32)), meta)
    loaded = load_checkpoint(path)
    assert loaded.sha256 == sha and loaded.version == sha[:12]
    assert loaded.meta == meta
    a = encode(model, x)
    b = encode(loaded.model, x)
    assert torch.equal(a, b)
    assert torch.equal(sign_codes(a), sign_codes(b))


def test_a_pickle_checkpoint_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # unpickling would create the marker file
            return (marker.touch, ())

    path = tmp_path / "evil.pt"
    torch.save({"tensors": {}, "meta": "{}", "x": Evil()}, path)
    with pytest.raises(UnsafeCheckpoint):
        load_checkpoint(path)
    assert not marker.exists(), "the pickle's code ran"


def test_missing_dataset_path_gives_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFound, match=str(missing / "cifar-10-batches-py")):
        load_dataset("cifar10", missing)
    with pytest.raises(DatasetNotFound, match="--data-root"):
        load_dataset("cifar10", None)
    with pytest.raises(DatasetNotFound, match="train.txt"):
        load_dataset("list", tmp_path)
    with pytest.raises(DatasetNotFound, match="class sub-folders"):
        load_dataset("folder", missing)


def test_digits_splits_are_disjoint_seeded_and_32x32x3(digits_splits):
    s = digits_splits
    assert s.query.get([0]).shape == (1, 3, 32, 32)
    assert len(s.query) == 1000 and len(s.database) == 797
    q = {bytes(x.numpy().tobytes()) for x in s.query.images}
    d = {bytes(x.numpy().tobytes()) for x in s.database.images}
    assert not q & d  # queries are never in the database (nor in training)
    again = load_dataset("digits", seed=0)
    assert torch.equal(again.query.images, s.query.images)
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.query.images, s.query.images)


def test_folder_and_list_datasets_load_from_local_files(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    s = load_dataset("folder", root, query_per_class=2, train_per_class=5)
    assert (len(s.query), len(s.train), len(s.database)) == (4, 10, 10)
    assert s.query.get().shape == (4, 3, 32, 32)
    lst = tmp_path / "list"
    lst.mkdir()
    files = sorted((root / "cat").glob("*.png"))
    for split in ("train", "test", "database"):
        (lst / f"{split}.txt").write_text("".join(f"{p} 1 0 1\n" for p in files[:3]))
    m = load_dataset("list", lst)
    assert m.multi_label and m.num_classes == 3 and m.database.get().shape == (3, 3, 32, 32)


def test_training_on_digits_retrieves_well(trained_digits, digits_splits):
    from core.training import evaluate_retrieval

    model, centers = trained_digits
    assert centers.shape == (10, 64)
    assert evaluate_retrieval(model, digits_splits) >= 0.95
