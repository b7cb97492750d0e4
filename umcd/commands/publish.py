"""`umcd publish [CHECKPOINT]`: make a checkpoint the fleet's active model, as the `train` task does after training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from umcd.settings import get_settings


def register(app: typer.Typer) -> None:
    app.command("publish")(publish)


def publish(
    checkpoint: Optional[Path] = typer.Argument(
        None, exists=True, dir_okay=False,
        help="checkpoint to publish (default: the one `umcd train` writes for UMCD_DATASET, UMCD_BITS, UMCD_BACKBONE)"),
    seed_fraction: float = typer.Option(0.5, min=0.0, max=1.0,
                                        help="share of the dataset's database split seeded as trusted images (once)"),
    target_fpr: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="calibration target (default UMCD_TARGET_FPR)"),
    detector: Optional[str] = typer.Option(None, help="detector to calibrate and serve (default UMCD_DETECTOR)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Publish a checkpoint to the fleet's audit store and artifacts (UMCD_DATABASE_URL, UMCD_ARTIFACTS; the store
    is migrated first): seed the database once, encode its images, calibrate the detector, and make it the active
    model version; detection workers switch to it within UMCD_MODEL_POLL_INTERVAL_S."""
    from rich.console import Console
    from sqlalchemy.exc import SQLAlchemyError

    from core.detector import DETECTORS
    from core.pipeline import checkpoint_path
    from db.migrate import upgrade
    from umcd.settings import redact_url
    from workers.publish import publish as publish_checkpoint

    s = get_settings()
    path = checkpoint or checkpoint_path(s.artifacts, s.dataset, s.bits, s.backbone)
    if not Path(path).is_file():
        raise typer.BadParameter(f"no checkpoint at {path}: run `umcd train` first, or name one")
    if not 0.0 < (target_fpr if target_fpr is not None else s.target_fpr) < 1.0:
        raise typer.BadParameter("the target FPR must lie strictly between 0 and 1")
    known = DETECTORS.names()
    if (detector or s.detector) not in known:  # before anything is written
        raise typer.BadParameter(f"unknown detector {detector or s.detector!r}; known: {', '.join(known)}",
                                 param_hint="--detector" if detector else "UMCD_DETECTOR")
    err = Console(stderr=True)
    mismatch = fleet_detector_mismatch(s.artifacts, detector or s.detector)
    if mismatch:
        err.print(f"[yellow]warning:[/] {mismatch}", markup=True, highlight=False)
    err.print(f"publishing {path} to {redact_url(s.db_url)}")
    try:
        upgrade(s.db_url)  # a fresh store gets its tables; a current one is left as it is (safe beside running workers)
    except SQLAlchemyError as exc:  # an unreachable server, refused credentials: one line, nothing written
        err.print(f"[red]cannot reach the audit store at {redact_url(s.db_url)}[/]: {type(exc).__name__}")
        raise typer.Exit(1) from None
    result = publish_checkpoint(path, settings=s, seed_fraction=seed_fraction, target_fpr=target_fpr,
                                detector=detector, progress=lambda message: err.print(message, markup=False))
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        Console().print(f"model [bold]{result.model_version}[/] is active: detector {result.detector}, calibration "
                        f"{result.calibration_id} (held-out FPR {result.heldout_fpr:.3f}), {result.n_active} active images")


def fleet_detector_mismatch(artifacts: Path, detector: str) -> str | None:
    """Why the local fleet recorded under ``artifacts`` (``umcd fleet up``) will not serve ``detector``'s
    calibration, or None: its detection workers serve the ``UMCD_DETECTOR`` its ``up`` was given (default umcd),
    and a calibration of another detector is not theirs (they keep serving their own detector's active
    calibration of the version, if there is one, else their previous model)."""
    from umcd.fleet import Fleet, read_env_file

    fleet = Fleet(artifacts)
    if not (fleet.env_path.is_file() and fleet.state_path.is_file()):
        return None
    served = read_env_file(fleet.env_path).get("UMCD_DETECTOR") or "umcd"
    if served == detector:
        return None
    return (f"the fleet recorded in {fleet.root} serves detector {served} (UMCD_DETECTOR of its `umcd fleet up`), "
            f"not {detector}: its workers will not serve this calibration. Publish with --detector {served}, or "
            f"bring the fleet up again with UMCD_DETECTOR={detector}")
