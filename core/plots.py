"""Benchmark figures (matplotlib, Agg backend, PNG): ROC curves, score histograms (Fig. 4), white-box sweep (Fig. 5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, suptitle: str | None = None) -> Path:
    """Lay out, write (PNG, 110 dpi) and close a figure; returns the path."""
    if suptitle is not None:
        fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def roc_points(benign: np.ndarray, adversarial: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the rule `score > t` over every threshold; scores are higher-is-more-suspicious."""
    b = np.asarray(benign, dtype=np.float64)
    a = np.asarray(adversarial, dtype=np.float64)
    thr = np.unique(np.concatenate([b, a, [np.inf]]))[::-1]
    fpr = np.array([(b >= t).mean() if len(b) else 0.0 for t in thr])
    tpr = np.array([(a >= t).mean() if len(a) else 0.0 for t in thr])
    return np.concatenate([[0.0], fpr, [1.0]]), np.concatenate([[0.0], tpr, [1.0]])


def roc_figure(path: Path, curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray, float]]], title: str) -> Path:
    """One panel per attack; curves[attack][detector] = (benign scores, adversarial scores, auc)."""
    plt = _plt()
    n = max(1, len(curves))
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.0 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, (attack, dets) in zip(axes.flat, curves.items()):
        for det, (b, a, auc) in dets.items():
            fpr, tpr = roc_points(b, a)
            ax.plot(fpr, tpr, label=f"{det} (AUC {auc:.3f})", lw=1.4)
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("false positive rate (benign, held out)")
        ax.set_ylabel("true positive rate")
        ax.set_title(attack, fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path, suptitle=title)


def histogram_figure(
    path: Path, criterion: str, benign: np.ndarray, attacks: dict[str, np.ndarray], threshold: float | None,
    log: bool = False,
) -> Path:
    """Fig. 4 style: the benign distribution of one criterion against each attack's, with the 5%-FPR threshold."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    allv = np.concatenate([np.asarray(benign, float)] + [np.asarray(v, float) for v in attacks.values()])
    allv = allv[np.isfinite(allv)]
    if log:
        lo = max(float(np.min(allv[allv > 0])) if (allv > 0).any() else 1e-6, 1e-6)
        hi = max(float(np.max(allv)), lo * 10)
        bins = np.logspace(np.log10(lo), np.log10(hi), 40)
        clip = lambda v: np.clip(np.asarray(v, float), lo, hi)  # noqa: E731
        ax.set_xscale("log")
    else:
        bins = np.linspace(float(np.min(allv)), float(np.max(allv)) + 1e-9, 40) if len(allv) else 10
        clip = lambda v: np.asarray(v, float)  # noqa: E731
    frac = lambda v: np.full(len(v), 1.0 / max(len(v), 1))  # noqa: E731 - each sample counts 1/n: bins of any width compare
    ax.hist(clip(benign), bins=bins, weights=frac(benign), alpha=0.45, label=f"benign (n={len(benign)})", color="tab:green")
    for name, v in attacks.items():
        if len(v) == 0:
            continue
        ax.hist(clip(v), bins=bins, weights=frac(v), histtype="step", lw=1.5, label=f"{name} (n={len(v)})")
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold if not log else max(threshold, bins[0]), color="k", ls="--", lw=1, label="threshold (5% FPR)")
    ax.set_xlabel(criterion + (" (log scale; values below the axis are drawn at its left end)" if log else ""))
    ax.set_ylabel("fraction of images")
    ax.legend(fontsize=7)
    return _save(fig, path)


def sweep_figure(path: Path, sweep: list[dict], fpr: float, title: str) -> Path:
    """Fig. 5: per lambda2, bars of detection rate (ours, MeanBlur) and attack success over lambda1; AUC lines."""
    plt = _plt()
    lambda2s = sorted({p["lambda2"] for p in sweep})
    fig, axes = plt.subplots(1, len(lambda2s), figsize=(6.2 * len(lambda2s), 4.2), squeeze=False)
    key = f"{fpr:g}"
    for ax, l2 in zip(axes[0], lambda2s):
        pts = sorted((p for p in sweep if p["lambda2"] == l2), key=lambda p: p["lambda1"])
        x = np.arange(len(pts))
        w = 0.27
        ax.bar(x - w, [p["success_rate"] for p in pts], w, label="attack success", color="tab:blue")
        ax.bar(x, [p["detection"]["umcd"][key]["all"] for p in pts], w, label=f"UMCD detection (FPR {fpr:g})", color="gold")
        ax.bar(x + w, [p["detection"]["meanblur"][key]["all"] for p in pts], w, label=f"MeanBlur detection (FPR {fpr:g})", color="tab:gray")
        for crit, col in (("c1", "tab:red"), ("c2", "tab:green"), ("c3", "tab:purple")):
            ax.plot(x, [p["auc"][crit] for p in pts], marker="o", color=col, label=f"AUC {crit.upper()}")
        ax.set_xticks(x, [f"{p['lambda1']:g}" for p in pts])
        ax.set_xlabel("λ1")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"λ2 = {l2:g}", fontsize=10)
        ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path, suptitle=title)


def miss_rate_figure(path: Path, table: dict[str, dict[str, float]], attacks: list[str], title: str) -> Path:
    """Grouped bars of Table 1: miss rate (%) per detector and attack."""
    plt = _plt()
    dets = list(table)
    fig, ax = plt.subplots(figsize=(1.4 + 1.3 * len(dets), 3.8))
    x = np.arange(len(dets))
    w = 0.8 / max(1, len(attacks))
    for j, a in enumerate(attacks):
        vals = [table[d].get(a, np.nan) for d in dets]
        ax.bar(x + (j - (len(attacks) - 1) / 2) * w, vals, w, label=a)
    ax.set_xticks(x, dets, rotation=15, fontsize=8)
    ax.set_ylabel("miss rate at 5% FPR (%)")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)
