"""`umcd demo`: the whole mission end to end on embedded defaults (the README's first command)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(
    small: bool = typer.Option(False, "--small", help="fewer images and steps (the size CI runs)"),
    artifacts: Optional[Path] = typer.Option(None, help="folder of this run (default: artifacts/demo)"),
    epochs: Optional[int] = typer.Option(None, help="training epochs"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the summary here"),
) -> None:
    """Train, publish, fill the database, attack, query, and report, through the real fleet."""
    import json

    from umcd.demo import DemoConfig, DemoFolderInUse, run_demo
    from umcd.settings import get_settings

    folder = artifacts or (get_settings().artifacts / "demo")
    cfg = DemoConfig.small(folder) if small else DemoConfig(artifacts=folder)
    if epochs:
        cfg.epochs = epochs
    try:
        summary = run_demo(cfg)
    except DemoFolderInUse as exc:
        typer.echo(f"umcd demo: {exc}", err=True)
        raise typer.Exit(2) from None
    if json_out:
        json_out.write_text(json.dumps(summary, indent=1, default=str))
