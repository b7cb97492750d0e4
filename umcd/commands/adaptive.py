"""`umcd evaluate-adaptive`: every detector against the strongest white-box attack adapted to it (core.adaptive_eval)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from umcd.settings import get_settings


def register(app: typer.Typer) -> None:
    app.command("evaluate-adaptive")(evaluate_adaptive)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def evaluate_adaptive(
    dataset: str = typer.Option(None, help="digits (default), cifar10, folder or list"),
    checkpoint: Optional[Path] = typer.Option(None, help="checkpoint (default: the one `umcd train` writes; trained if missing)"),
    detectors: str = typer.Option(None, help="comma-separated detector names (default: the paper's rule and every extension)"),
    n_images: int = typer.Option(100, help="attacked held-out queries at the main eps"),
    n_sweep_images: int = typer.Option(50, help="attacked queries at each other eps"),
    eps: float = typer.Option(8.0, help="main eps, 1/255 units"),
    eps_sweep: str = typer.Option("4,16,32", help="other eps values, 1/255 units"),
    steps: int = typer.Option(50, help="PGD steps of every attack at the main eps"),
    sweep_steps: int = typer.Option(25, help="PGD steps at the other eps values"),
    eot_samples: int = typer.Option(10, help="EOT draws per step against randomised detectors"),
    weights: str = typer.Option("4,16", help="loss-weight grid of the adapted attacks"),
    seed: int = typer.Option(None, help="split, source and attack seed"),
    data_root: Optional[Path] = typer.Option(None, help="local dataset root (not needed for digits)"),
    out: Optional[Path] = typer.Option(None, help="run folder (default: artifacts/runs/adaptive-<dataset>-<time>)"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """Adaptive benchmark: TPR at FPR 0.05/0.1 against the strongest adapted attack, success, held-out FPR, mAP, cost."""
    import torch  # noqa: F401  (heavy imports stay inside the command)
    from rich.console import Console

    from core.adaptive_eval import DEFAULT_DETECTORS, AdaptiveConfig, markdown_table, run_adaptive_benchmark
    from core.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
    from core.datasets import load_dataset
    from core.pipeline import checkpoint_path
    from core.training import train_and_evaluate

    s = get_settings()
    con = Console()
    dataset = dataset or s.dataset
    seed = s.seed if seed is None else seed
    path = checkpoint or checkpoint_path(s.artifacts, dataset, s.bits, s.backbone)
    if path.is_file():
        ckpt = load_checkpoint(path)
        splits = load_dataset(ckpt.meta.dataset, data_root or s.data_root, seed=ckpt.meta.split_seed)
        model, version = ckpt.model, ckpt.version
    else:
        con.print(f"[yellow]no checkpoint at {path}: training one ({dataset}, {s.bits} bits, 30 epochs)[/]")
        splits = load_dataset(dataset, data_root or s.data_root, seed=seed)
        r = train_and_evaluate(splits, bits=s.bits, backbone=s.backbone, epochs=30, seed=seed, device="cpu")
        meta = CheckpointMeta(backbone=s.backbone, bits=s.bits, dataset=dataset, split_seed=seed,
                              num_classes=splits.num_classes, image_size=splits.query.image_size,
                              map_score=r.map_score, epochs=30, train_seconds=r.seconds)
        sha = save_checkpoint(path, r.model.cpu(), r.centers, meta)
        model, version = r.model.cpu(), sha[:12]
    cfg = AdaptiveConfig(
        detectors=tuple(d.strip() for d in detectors.split(",")) if detectors else DEFAULT_DETECTORS,
        n_images=n_images,
        n_sweep_images=n_sweep_images,
        eps_main=eps,
        eps_sweep=_floats(eps_sweep),
        steps=steps,
        sweep_steps=sweep_steps,
        eot_samples=eot_samples,
        weights=_floats(weights),
        seed=seed,
        top_k=s.top_k,
    )
    out = out or Path(s.artifacts) / "runs" / f"adaptive-{splits.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    con.print(f"[bold]adaptive benchmark[/] {splits.describe()}; model {version}; run folder {out}")
    results = run_adaptive_benchmark(
        model, splits, config=cfg, out_dir=out, progress=progress, meta={"model_version": version, "checkpoint": str(path)},
        log=lambda line: con.print(line, highlight=False, markup=False),
    )
    con.print(markdown_table(results), markup=False, highlight=False)
    con.print(f"finished in {results['seconds'] / 60:.1f} min; report: {out / 'report.md'}")
    con.print(json.dumps({"report": str(out / "report.md"), "results": str(out / "results.json")}))
