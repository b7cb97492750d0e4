"""The benchmark end to end on a tiny run: the run folder, the tables' structure, the protocol and determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.baselines import ABLATION_DETECTORS, TABLE1_DETECTORS
from core.evaluation import PAPER_TABLE1_CIFAR10, auc_score, run_benchmark, target_labels_for, targets_check

# A tiny run: a 16-bit model trained for one epoch, a handful of images, a few attack steps.
TINY = dict(
    n_images=6, n_cw=4, n_sweep=4, n_benign=40, epochs=1, bits=16, steps=3, cw_steps=5, white_box_steps=3,
    lambda1s=(0.0, 0.0075), lambda2s=(0.3,), threads=1,
)
TINY_CLI = [
    "--n-images", "6", "--n-cw", "4", "--n-sweep", "4", "--n-benign", "40", "--epochs", "1", "--bits", "16",
    "--steps", "3", "--cw-steps", "5", "--white-box-steps", "3", "--lambda1s", "0,0.0075", "--lambda2s", "0.3",
    "--seed", "0", "--threads", "1", "--quiet",
]
PNGS = ["table1_miss_rate.png", "roc_table1.png", "roc_criteria.png", "hist_c1.png", "hist_c2.png", "hist_c3.png",
        "fig5_white_box.png"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    results = run_benchmark("digits", seed=0, out_dir=out, progress=False, **TINY)
    return out, results


def _comparable(results: dict) -> dict:
    """The results without wall-clock times and run identity (the checkpoint's hash covers its training time)."""
    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if k not in ("seconds", "train_seconds", "version")}
        if isinstance(o, list):
            return [strip(v) for v in o]
        return o

    return strip({k: v for k, v in results.items() if k not in ("timings", "run", "figures")})


def test_run_folder_holds_report_results_and_figures(tiny_run):
    out, results = tiny_run
    assert (out / "report.md").is_file() and (out / "results.json").is_file()
    for name in PNGS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert sorted(results["figures"]) == sorted(PNGS)
    assert json.loads((out / "results.json").read_text())["table1"] == results["table1"]


def test_table1_has_three_attacks_by_six_detectors_with_the_paper_row(tiny_run):
    _, r = tiny_run
    t1 = r["table1"]
    assert t1["attacks"] == ["pgd", "dhta", "cw"] and t1["fpr"] == 0.05
    assert t1["detectors"][:6] == list(TABLE1_DETECTORS) and "lid-unsup" in t1["detectors"]
    assert t1["supervised"]["lid"] is True and not any(t1["supervised"][d] for d in t1["detectors"] if d != "lid")
    for d in t1["detectors"]:
        assert set(t1["miss_rate"][d]) == set(t1["attacks"]) == set(t1["heldout_fpr"][d])
        for v in t1["miss_rate_all"][d].values():
            assert 0.0 <= v <= 100.0
    assert t1["paper_cifar10"]["umcd"] == dict(zip(t1["attacks"], PAPER_TABLE1_CIFAR10["umcd"]))
    for a in ("pgd", "cw"):
        assert "map_after" in r["attacks"][a]
    assert "t_map" in r["attacks"]["dhta"] and "t_map_clean" in r["attacks"]["dhta"]


def test_table2_table4_and_the_sweep_have_their_rows(tiny_run):
    _, r = tiny_run
    t2 = r["table2"]
    assert t2["detectors"] == list(ABLATION_DETECTORS) and t2["attacks"] == ["pgd32", "dhta32"] and t2["eps"] == 32
    assert r["attacks"]["pgd32"]["eps"] == 32 and r["attacks"]["dhta"]["eps"] == 8
    t4 = r["table4"]
    assert set(t4["rows"]) == {"meanblur", "umcd"} and t4["fprs"] == ["0.1", "0.2"]
    assert t4["lambda1"] == {"umcd": 0.0075, "meanblur": 0.0}
    assert [(p["lambda1"], p["lambda2"]) for p in r["sweep"]] == [(0.0, 0.3), (0.0075, 0.3)]
    for p in r["sweep"]:
        assert set(p["auc"]) == {"c1", "c2", "c3", "combined"}
        assert set(p["detection"]) == {"meanblur", "umcd"}
    report = (tiny_run[0] / "report.md").read_text()
    for needle in ("## Table 1", "SUPERVISED", "paper CIFAR-10", "7.50 / 0.40 / 0.15", "## Table 2", "## Table 4",
                   "Fig. 5", "## AUC", "Held-out benign FPR"):
        assert needle in report, needle


def test_attacked_images_come_only_from_the_held_out_half(tiny_run):
    _, r = tiny_run
    cal = set(r["split"]["calibration_query_indices"])
    held = set(r["split"]["heldout_query_indices"])
    assert cal and held and not cal & held
    for key, idx in r["split"]["attacked_query_indices"].items():
        assert set(idx) <= held, key
    assert r["counts"]["attacked"]["pgd"] == 6 and r["counts"]["attacked"]["cw"] == 4


def test_every_detector_is_calibrated_on_the_calibration_half_at_most_at_its_target(tiny_run):
    # (within one sample of the target on a trained model: test_baselines; this one-epoch toy model's
    # scores tie so much that a threshold can only reach fewer samples)
    _, r = tiny_run
    assert set(r["calibration"]) >= {*TABLE1_DETECTORS, *ABLATION_DETECTORS} - {"lid"}
    for det, by_fpr in r["calibration"].items():
        assert set(by_fpr) == {"0.05", "0.1", "0.2"}, det
        for f, c in by_fpr.items():
            assert c["calibration_fpr"] <= c["target_fpr"] + 1e-12, (det, f)


def test_the_command_reproduces_the_same_tables_for_the_same_seed(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from umcd.cli import app

    res = CliRunner().invoke(app, ["evaluate", "--out", str(tmp_path / "again"), *TINY_CLI])
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert _comparable(again) == _comparable(tiny_run[1])


def test_auc_score_counts_ties_as_one_half():
    assert auc_score(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    assert auc_score(np.array([1.0, 1.0]), np.array([1.0])) == 0.5
    assert auc_score(np.array([0.0, 2.0]), np.array([1.0])) == 0.5
    assert np.isnan(auc_score(np.array([1.0]), np.array([])))


def test_targets_check_reads_the_issue_targets_off_the_tables():
    t1 = {"attacks": ["pgd"], "detectors": ["meanblur", "umcd"],
          "miss_rate": {"umcd": {"pgd": 0.5}, "meanblur": {"pgd": 0.4}}}
    out = targets_check({"table1": t1, "table4": {"rows": {"umcd": {"0.1": {"successful": 0.96}}}}})
    assert out["miss_rate_at_most_1pct"] == {"pgd": True}
    assert out["not_worse_than_any_baseline"] == {"pgd": False}
    assert out["white_box_detection_at_fpr_0.1_at_least_0.95"] is True


def _write_list_dataset(root, n_train: int = 40, n_test: int = 30, n_db: int = 60, labels: int = 4) -> None:
    """A multi-label list dataset of 32x32 PNGs: one coloured quadrant per label on a noisy background."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = np.array([[230, 40, 40], [40, 230, 40], [40, 40, 230], [230, 230, 40]], dtype=np.float64)
    (root / "img").mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test), ("database", n_db)):
        lines = []
        for i in range(n):
            y = rng.random(labels) < 0.4
            y[rng.integers(labels)] = True
            arr = rng.normal(110, 20, (32, 32, 3))
            for c in np.flatnonzero(y):
                r, q = divmod(int(c), 2)
                quadrant = arr[r * 16 : (r + 1) * 16, q * 16 : (q + 1) * 16]
                quadrant[:] = 0.5 * quadrant + 0.5 * colours[c]
            path = f"img/{split}{i}.png"
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(root / path)
            lines.append(path + " " + " ".join(str(int(v)) for v in y))
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")


def test_the_benchmark_runs_on_a_multi_label_list_dataset(tmp_path):
    _write_list_dataset(tmp_path / "data")
    r = run_benchmark(
        "list", seed=0, out_dir=tmp_path / "run", progress=False, figures=False, data_root=tmp_path / "data",
        **{**TINY, "n_benign": None, "n_images": 5, "n_cw": 3, "n_sweep": 3},
    )
    assert r["dataset"]["multi_label"] is True and r["counts"]["calibration"] == 15
    assert set(r["table1"]["miss_rate"]) == {*TABLE1_DETECTORS, "lid-unsup"}
    assert (tmp_path / "run" / "report.md").is_file()


def test_multi_label_targets_share_no_label_with_their_query():
    from core.datasets import DatasetSplits, ImageSet

    db = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 1, 0]], dtype=np.int8)
    sp = DatasetSplits("list", query=ImageSet(db), train=ImageSet(db), database=ImageSet(db), num_classes=3, seed=0,
                       multi_label=True)
    queries = np.array([[1, 0, 0], [0, 0, 1], [1, 1, 0]], dtype=np.int8)
    for seed in range(5):
        t = target_labels_for(sp, queries, np.random.default_rng(seed))
        assert ((t.astype(int) * queries).sum(1) == 0).all() and (t.sum(1) > 0).all()
    single = DatasetSplits("s", query=ImageSet(db), train=ImageSet(db), database=ImageSet(db), num_classes=3, seed=0)
    t = target_labels_for(single, np.eye(3, dtype=np.int8), np.random.default_rng(0))
    assert (t.sum(1) == 1).all() and (t.argmax(1) != np.arange(3)).all()


def test_a_checkpoint_is_evaluated_on_its_own_dataset(tiny_run, tmp_path):
    out, first = tiny_run
    with pytest.raises(ValueError, match="trained on 'digits'"):
        run_benchmark("cifar10", out_dir=tmp_path / "x", progress=False, checkpoint=out / "model.safetensors", **TINY)
    again = run_benchmark("digits", seed=0, out_dir=tmp_path / "ck", progress=False, figures=False,
                          checkpoint=out / "model.safetensors", **TINY)
    assert again["model"]["source"] == "checkpoint" and again["model"]["map"] == pytest.approx(first["model"]["map"])
    assert again["table1"]["miss_rate"] == first["table1"]["miss_rate"]
