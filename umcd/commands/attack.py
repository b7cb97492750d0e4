"""`umcd attack NAME`: an adversarial set against the active model, as the `attack` task makes it."""

from __future__ import annotations

import json
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("attack")(attack)


def _attack_names() -> list[str]:
    from core.attacks import list_attacks

    return sorted(list_attacks())


def attack(
    name: Optional[str] = typer.Argument(None, help="the attack (`umcd attack --list` names them)", metavar="NAME"),
    n_images: int = typer.Option(100, "--n-images", min=1, help="held-out query images to attack"),
    eps: Optional[float] = typer.Option(None, min=0.0, help="L-inf budget in 1/255 units (default: the attack's)"),
    seed: int = typer.Option(0, help="which images, and the targets of targeted attacks"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
    list_names: bool = typer.Option(False, "--list", help="print the attack names and exit"),
) -> None:
    """Attack held-out benign queries with the active model (UMCD_DATABASE_URL, UMCD_ARTIFACTS) and write the
    adversarial images as PNG files under artifacts/attacks/<id>/ with a manifest, for `umcd submit`."""
    if list_names:
        typer.echo("\n".join(_attack_names()))
        raise typer.Exit(0)
    names = _attack_names()
    if name is None:
        raise typer.BadParameter(f"name an attack: {', '.join(names)}", param_hint="NAME")
    if name not in names:
        raise typer.BadParameter(f"unknown attack {name!r}; known: {', '.join(names)}", param_hint="NAME")
    from rich.console import Console

    from umcd.commands.audit import _missing_file, _read
    from umcd.settings import get_settings, redact_url
    from workers.attacksets import generate_attack_set

    def active(session):
        from db import repo

        return repo.active_model_version(session) is not None

    url = get_settings().db_url
    if _missing_file(url):  # say so without creating an empty file
        Console(stderr=True).print(f"[red]no audit store at {redact_url(url)}[/]: publish a model first (`umcd publish`)")
        raise typer.Exit(1)
    if not _read(url, active):  # no store, no tables or an unreachable server: _read says which, exit 1
        Console(stderr=True).print("[red]no model is published in the audit store[/]: `umcd publish` (or the train task)")
        raise typer.Exit(1)
    result = generate_attack_set(name, n_images=n_images, eps=eps, seed=seed)
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
    else:
        Console().print(f"attack set {result['attack_set_id']}: {result['n_images']} images by {name} against model "
                        f"{result['model_version']}, success {result['success_rate']:.2f}; PNG files in {result['path']}")
