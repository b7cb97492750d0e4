"""`umcd evaluate`: the detection benchmark (Tables 1, 2, 4, ROC/AUC, Figs. 4-5) written as a run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from umcd.settings import get_settings


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)


def _floats(text: Optional[str]) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise typer.BadParameter(f"expected comma-separated numbers, got {text!r}") from exc


def evaluate(
    dataset: str = typer.Option(None, help="digits (default), cifar10, folder or list"),
    data_root: Optional[Path] = typer.Option(None, help="local dataset root (not needed for digits)"),
    checkpoint: Optional[Path] = typer.Option(None, help="evaluate this checkpoint instead of training a model"),
    n_images: int = typer.Option(300, help="images attacked per gray-box attack"),
    n_cw: int = typer.Option(150, help="images attacked by CW (500 Adam steps each)"),
    n_sweep: int = typer.Option(100, help="images attacked per white-box sweep point"),
    n_benign: Optional[int] = typer.Option(None, help="cap on benign images per query half (default: all)"),
    seed: int = typer.Option(None, help="split, training, target and attack seed"),
    epochs: int = typer.Option(30, help="training epochs (when no checkpoint is given)"),
    bits: int = typer.Option(None, help="code length K (when training)"),
    backbone: str = typer.Option(None, help="backbone (when training)"),
    label_smoothing: Optional[float] = typer.Option(None, help="CSQ label smoothing (default: core.training's)"),
    steps: int = typer.Option(100, help="PGD/DHTA steps"),
    cw_steps: int = typer.Option(500, help="CW Adam steps"),
    white_box_steps: int = typer.Option(100, help="white-box (Eq. 13) steps"),
    lambda1s: Optional[str] = typer.Option(None, help="white-box lambda1 sweep, comma-separated"),
    lambda2s: Optional[str] = typer.Option(None, help="white-box lambda2 values, comma-separated"),
    target_fpr: float = typer.Option(None, help="FPR of Tables 1 and 2"),
    top_k: int = typer.Option(None, help="neighbours for C1"),
    name: Optional[str] = typer.Option(None, help="run folder name (default: UTC timestamp)"),
    out: Optional[Path] = typer.Option(None, help="run folder (default: <artifacts>/runs/<name>)"),
    device: str = typer.Option(None, help="auto, cpu or cuda"),
    threads: Optional[int] = typer.Option(
        None, help="torch CPU threads for the run (default: 1 on CPU, torch's setting on GPU; 0: torch's setting)"
    ),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
) -> None:
    """Benchmark UMCD against LID, feature squeezing, FS-Adaptive and MeanBlur under gray- and white-box attacks."""
    import time

    from rich.console import Console

    from core.evaluation import run_benchmark

    s = get_settings()
    con = Console()
    overrides = {
        "data_root": data_root or s.data_root, "checkpoint": checkpoint, "n_cw": n_cw, "n_sweep": n_sweep,
        "n_benign": n_benign, "epochs": epochs, "bits": bits or s.bits, "backbone": backbone or s.backbone,
        "label_smoothing": label_smoothing, "steps": steps, "cw_steps": cw_steps, "white_box_steps": white_box_steps,
        "target_fpr": target_fpr or s.target_fpr, "top_k": top_k or s.top_k, "device": device or s.device,
        "threads": threads,
    }
    for key, text in (("lambda1s", lambda1s), ("lambda2s", lambda2s)):
        vals = _floats(text)
        if vals is not None:
            overrides[key] = vals
    run_name = name
    out_dir = out
    if out_dir is None and run_name is not None:
        out_dir = Path(s.artifacts) / "runs" / run_name
    if out_dir is None:
        from datetime import datetime, timezone

        run_name = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        out_dir = Path(s.artifacts) / "runs" / run_name
    t0 = time.perf_counter()
    results = run_benchmark(
        dataset or s.dataset, n_images=n_images, seed=s.seed if seed is None else seed, out_dir=out_dir,
        name=run_name or Path(out_dir).name, progress=not quiet, **overrides,
    )
    report = Path(results["run"]["dir"]) / "report.md"
    con.print(_summary(results))
    con.print(f"[bold green]done[/] in {time.perf_counter() - t0:.0f} s: {report}")


def _summary(results: dict):
    from rich.table import Table

    t1 = results["table1"]
    table = Table(title=f"Table 1 on {results['dataset']['name']}: miss rate (%) at {t1['fpr']:g} FPR")
    table.add_column("detector")
    for a in t1["attacks"]:
        table.add_column(a, justify="right")
    for d in t1["detectors"]:
        label = t1["labels"][d] + (" (SUPERVISED)" if t1["supervised"][d] else "")
        table.add_row(label, *("–" if v is None else f"{v:.2f}" for v in (t1["miss_rate"][d][a] for a in t1["attacks"])))
    return table
