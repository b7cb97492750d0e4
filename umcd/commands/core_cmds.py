"""`umcd train`, `umcd calibrate` and `umcd detect`: the science on its own, no broker, no database."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from umcd.settings import get_settings


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("calibrate")(calibrate)
    app.command("detect")(detect)


def _console():
    from rich.console import Console

    return Console()


def train(
    dataset: str = typer.Option(None, help="digits (default), cifar10, folder or list"),
    bits: int = typer.Option(None, help="code length K: 16, 32, 64 or 128"),
    backbone: str = typer.Option(None, help="smallcnn (default), resnet18, resnet50"),
    epochs: int = typer.Option(30, help="training epochs"),
    seed: int = typer.Option(None, help="split and training seed"),
    data_root: Optional[Path] = typer.Option(None, help="local dataset root (not needed for digits)"),
    weights: Optional[Path] = typer.Option(None, help="local backbone weights (resnets)"),
    out: Optional[Path] = typer.Option(None, help="checkpoint path (default: artifacts/models/...)"),
    topk: int = typer.Option(0, help="mAP@R cut-off R (0: all)"),
    device: str = typer.Option(None, help="auto, cpu or cuda"),
) -> None:
    """Train a CSQ deep-hashing model, print its mAP and write a checkpoint."""
    import time

    from core.checkpoint import CheckpointMeta, save_checkpoint
    from core.datasets import load_dataset
    from core.pipeline import checkpoint_path
    from core.training import train_and_evaluate

    s = get_settings()
    dataset = dataset or s.dataset
    bits = bits or s.bits
    backbone = backbone or s.backbone
    seed = s.seed if seed is None else seed
    con = _console()
    splits = load_dataset(dataset, data_root or s.data_root, seed=seed)
    con.print(f"[bold]dataset[/] {splits.describe()}")
    t0 = time.perf_counter()
    r = train_and_evaluate(
        splits, bits=bits, backbone=backbone, weights_path=weights, epochs=epochs, seed=seed,
        device=device or s.device, topk=topk or None,
    )
    meta = CheckpointMeta(
        backbone=backbone, bits=bits, dataset=dataset, split_seed=seed, num_classes=splits.num_classes,
        image_size=splits.query.image_size, map_score=r.map_score, map_topk=topk or None, epochs=epochs,
        train_seconds=r.seconds, extra={"database_includes_train": splits.database_includes_train},
    )
    path = out or checkpoint_path(s.artifacts, dataset, bits, backbone)
    sha = save_checkpoint(path, r.model.cpu(), r.centers, meta)
    label = f"mAP@{topk}" if topk else "mAP@all"
    con.print(
        f"[bold green]{label} = {r.map_score:.4f}[/] on {len(splits.query)} queries; trained in {r.seconds:.1f} s "
        f"(total {time.perf_counter() - t0:.1f} s)"
    )
    con.print(f"checkpoint: {path} (version {sha[:12]})")


def calibrate(
    checkpoint: Optional[Path] = typer.Option(None, help="checkpoint (default: the one `umcd train` wrote)"),
    target_fpr: float = typer.Option(None, help="target false positive rate of the combined rule"),
    detector: str = typer.Option(None, help="detector variant (umcd, umcd-c3, ...)"),
    top_k: int = typer.Option(None, help="neighbours for C1"),
    data_root: Optional[Path] = typer.Option(None),
    seed: int = typer.Option(None),
    out: Optional[Path] = typer.Option(None, help="calibration JSON path"),
) -> None:
    """Fit thresholds on one benign half of the query split; report the FPR on the other half."""
    from core.checkpoint import load_checkpoint
    from core.datasets import load_dataset
    from core.pipeline import calibrate_detector, calibration_path, checkpoint_path, detector_for_checkpoint

    s = get_settings()
    ckpt_path = checkpoint or checkpoint_path(s.artifacts, s.dataset, s.bits, s.backbone)
    ckpt = load_checkpoint(ckpt_path)
    seed = s.seed if seed is None else seed
    splits = load_dataset(ckpt.meta.dataset, data_root or s.data_root, seed=ckpt.meta.split_seed)
    det = detector_for_checkpoint(
        ckpt, splits, detector=detector or s.detector, transform=None, top_k=top_k or s.top_k
    )
    rep = calibrate_detector(
        det, splits, target_fpr=target_fpr or s.target_fpr, seed=seed,
        checkpoint_sha256=ckpt.sha256, model_version=ckpt.version,
    )
    path = out or calibration_path(s.artifacts, ckpt.version, det.spec.name)
    rep.calibration.save(path)
    con = _console()
    con.print(
        f"[bold]calibrated[/] {det.spec.name} on {rep.n_calibration} benign images at target FPR "
        f"{rep.calibration.target_fpr:.3f}: calibration FPR {rep.calibration.calibration_fpr:.3f}, "
        f"held-out FPR [bold]{rep.heldout_fpr:.3f}[/] on {rep.n_heldout} images"
    )
    con.print(
        f"the other way round (fitted on the held-out half, measured on the first): {rep.swapped_fpr:.3f}; "
        f"cross-fit FPR (every benign image held out once) [bold]{rep.crossfit_fpr:.3f}[/] "
        f"on {rep.n_calibration + rep.n_heldout} images"
    )
    con.print(f"thresholds: {json.dumps({k: round(v, 4) for k, v in rep.calibration.thresholds.items()})}")
    expected = rep.calibration.expected_fpr
    if expected is not None and expected > rep.calibration.target_fpr:
        con.print(f"[bold yellow]warning:[/] too few benign images for this target: the rule flags {expected:.3f} "
                  "of the calibration images even at its strictest (leave-one-out)")
    con.print(f"calibration: {path}")


def detect(
    images: list[Path] = typer.Argument(..., exists=True, dir_okay=False, help="image files"),
    checkpoint: Optional[Path] = typer.Option(None),
    calibration: Optional[Path] = typer.Option(None),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    data_root: Optional[Path] = typer.Option(None),
) -> None:
    """Score image files with a calibrated detector against the dataset's database."""
    from core.calibration import Calibration
    from core.checkpoint import load_checkpoint
    from core.datasets import load_dataset
    from core.pipeline import calibration_path, checkpoint_path, detector_for_checkpoint
    from workers.imaging import InvalidImage, decode_image

    import numpy as np
    import torch

    s = get_settings()
    ckpt = load_checkpoint(checkpoint or checkpoint_path(s.artifacts, s.dataset, s.bits, s.backbone))
    cal_path = calibration or calibration_path(s.artifacts, ckpt.version, s.detector)
    if not Path(cal_path).is_file():
        raise typer.BadParameter(f"no calibration at {cal_path}: run `umcd calibrate` first")
    cal = Calibration.load(cal_path)
    if cal.meta.get("checkpoint_sha256") not in (None, ckpt.sha256):
        raise typer.BadParameter(f"{cal_path} was fitted for another checkpoint")
    splits = load_dataset(ckpt.meta.dataset, data_root or s.data_root, seed=ckpt.meta.split_seed)
    det = detector_for_checkpoint(ckpt, splits, detector=cal.meta.get("detector", "umcd"), top_k=cal.meta.get("top_k", s.top_k))
    det.calibration = cal
    rows, good, arrays = [], [], []
    size = ckpt.meta.image_size
    for p in images:
        try:
            arr = decode_image(
                Path(p).read_bytes(), max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels,
                min_side=s.min_image_side, formats=s.image_formats, size=(size, size),
            )
            good.append(str(p))
            arrays.append(arr)
        except (InvalidImage, OSError) as exc:
            rows.append({"image": str(p), "verdict": "invalid_input", "reasons": [str(exc)]})
    if arrays:
        out = det.score_batch(torch.from_numpy(np.stack(arrays)))
        for p, rec in zip(good, out.records()):
            rec.pop("code")
            rows.append({"image": p, **rec, "reasons": [f"{c} fired" for c in rec["fired"]]})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    t = Table(title=f"UMCD verdicts (model {ckpt.version}, detector {det.spec.name})")
    for col in ("image", "verdict", "c1", "c2", "c3", "combined", "fired"):
        t.add_column(col)
    for r in rows:
        sc = r.get("scores") or {}
        t.add_row(
            r["image"], r["verdict"], *(f"{sc[k]:.3f}" if k in sc else "-" for k in ("c1", "c2", "c3", "combined")),
            ",".join(r.get("fired", [])) or ("; ".join(r.get("reasons", [])) if r["verdict"] == "invalid_input" else "-"),
        )
    _console().print(t)
