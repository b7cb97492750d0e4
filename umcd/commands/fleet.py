"""`umcd fleet up|down|status`: the whole fleet as local processes, without Docker."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def _artifacts(artifacts: Path | None) -> Path:
    if artifacts is not None:
        return artifacts
    from umcd.settings import get_settings

    return get_settings().artifacts


def register(app: typer.Typer) -> None:
    """Add the ``fleet`` command group (up, down, status) to the ``umcd`` app."""
    fleet_app = typer.Typer(
        help="Run the fleet (Redis, PostgreSQL, workers, gateway, Flower) as local processes, without Docker.",
        no_args_is_help=True,
    )

    @fleet_app.command("up")
    def up(
        workers: int = typer.Option(1, "--workers", "-w", min=0, help="Detection workers (queues detect, screen)."),
        no_postgres: bool = typer.Option(False, "--no-postgres", help="SQLite audit store instead of PostgreSQL."),
        artifacts: Path | None = typer.Option(None, "--artifacts", help="Artifacts folder (default: UMCD_ARTIFACTS)."),
        cpu_worker: bool = typer.Option(True, "--cpu-worker/--no-cpu-worker", help="Worker for train, attack, eval."),
        gateway: bool = typer.Option(True, "--gateway/--no-gateway", help="The HTTP upload gateway."),
        flower: bool = typer.Option(True, "--flower/--no-flower", help="Flower, with basic auth."),
        migrate: bool = typer.Option(True, "--migrate/--no-migrate", help="Run `python -m db.migrate` first."),
        celery_app: str = typer.Option("workers.app", "--celery-app", help="Module of the Celery app."),
        gateway_app: str = typer.Option("producers.gateway:app", "--gateway-app", help="ASGI app of the gateway."),
        migrate_module: str = typer.Option("db.migrate", "--migrate-module", help="Module run for migrations."),
        ready_timeout: float = typer.Option(180.0, "--ready-timeout", min=1.0, help="Seconds to wait for answers."),
        pin: bool = typer.Option(True, "--pin/--no-pin", help="Pin each detection worker to its own share of "
                                                               "the CPUs (UMCD_WORKER_CPUS)."),
    ) -> None:
        """Start every service on free loopback ports; print their URLs (credentials redacted)."""
        from rich.console import Console
        from rich.markup import escape

        from umcd.fleet import Fleet, FleetError

        console = Console()
        fleet = Fleet(
            _artifacts(artifacts), workers=workers, postgres=not no_postgres, migrate=migrate,
            cpu_worker=cpu_worker, gateway=gateway, flower=flower, celery_app=celery_app,
            gateway_app=gateway_app, migrate_module=migrate_module, ready_timeout_s=ready_timeout,
            progress=lambda message: console.print(f"[dim]{escape(message)}[/dim]"), pin_workers=pin,
        )
        try:
            state = fleet.up()
        except FleetError as exc:
            console.print(f"[red]fleet up failed:[/red] {exc}", markup=False, highlight=False)
            raise typer.Exit(1) from None
        _print_table(console, "UMCD fleet is up", [
            (r.name, str(r.pid), escape(r.url), escape(r.log)) for r in state.services
        ], ("service", "pid", "url", "log"))
        console.print(f"audit store: {state.database}")
        console.print(f"secrets and client URLs: {fleet.env_path} (mode 600)")
        console.print(f"state: {fleet.state_path}    stop with: umcd fleet down --artifacts {fleet.artifacts}")

    @fleet_app.command("down")
    def down(
        artifacts: Path | None = typer.Option(None, "--artifacts", help="Artifacts folder (default: UMCD_ARTIFACTS)."),
        grace: float = typer.Option(15.0, "--grace", min=0.0, help="Seconds between SIGTERM and SIGKILL."),
    ) -> None:
        """Stop every process the fleet started (by its recorded pid) and remove its state."""
        from rich.console import Console

        from umcd.fleet import Fleet

        console = Console()
        fleet = Fleet(_artifacts(artifacts), stop_grace_s=grace)
        if fleet.read_state() is None:
            console.print(f"no fleet recorded in {fleet.state_path}")
            return
        stopped = fleet.down()
        console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")

    @fleet_app.command("restart")
    def restart(
        name: str = typer.Argument(..., help="the service: a detection worker (detect0, ...), cpu, gateway or flower"),
        artifacts: Path | None = typer.Option(None, "--artifacts", help="Artifacts folder (default: UMCD_ARTIFACTS)."),
        grace: float = typer.Option(15.0, "--grace", min=0.0, help="Seconds between SIGTERM and SIGKILL."),
    ) -> None:
        """Start one service again as `up` did (stopping it first if it still runs) and wait until it answers."""
        from rich.console import Console
        from rich.markup import escape

        from umcd.fleet import Fleet, FleetError

        console = Console()
        fleet = Fleet(_artifacts(artifacts), stop_grace_s=grace)
        try:
            record = fleet.restart(name)
        except FleetError as exc:
            console.print(f"[red]{escape(str(exc))}[/red]")
            raise typer.Exit(1) from None
        console.print(f"{record.name} restarted: pid {record.pid}, {escape(record.url)}, log {escape(record.log)}")

    @fleet_app.command("status")
    def status(
        artifacts: Path | None = typer.Option(None, "--artifacts", help="Artifacts folder (default: UMCD_ARTIFACTS)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """Each recorded service: running or not, healthy or not, URL and log. Exit 1 if any is down."""
        from dataclasses import asdict

        from rich.console import Console
        import shlex

        from rich.markup import escape

        from umcd.fleet import Fleet

        console = Console()
        fleet = Fleet(_artifacts(artifacts))
        rows = fleet.status()
        if as_json:
            typer.echo(json.dumps([asdict(r) for r in rows], indent=2))
        elif not rows:
            console.print(f"no fleet recorded in {fleet.state_path}")
        else:
            def health(row) -> str:
                if not row.alive:
                    return "[red]stopped[/red]"
                return {True: "[green]healthy[/green]", False: "[red]unhealthy[/red]", None: "running"}[row.healthy]

            workers = [r for r in rows if r.kind == "worker" and r.name != "cpu"]
            _print_table(console, "UMCD fleet", [
                (r.name, str(r.pid), health(r), escape(r.model or ("-" if r not in workers else "none")),
                 escape(r.url), escape(r.log)) for r in rows
            ], ("service", "pid", "state", "serves", "url", "log"))
            _print_active_model(console, fleet, [r for r in workers if r.alive])
        if rows and not all(r.alive and r.healthy is not False for r in rows):
            stopped = [r.name for r in rows if not r.alive]
            if stopped and not as_json:  # a service started again by hand is not the fleet's: say how to restart
                where = shlex.quote(str(fleet.artifacts))
                console.print(f"[yellow]stopped: {', '.join(stopped)}.[/yellow] Start a worker, the gateway or Flower "
                              f"again with `umcd fleet restart NAME --artifacts {where}`; for Redis or PostgreSQL, "
                              f"`umcd fleet down --artifacts {where}` and `umcd fleet up` with the options it was started "
                              "with (queued messages, in Redis's append-only file, the audit store and the models are "
                              "kept). Processes started by hand are not the fleet's to see or stop.")
            raise typer.Exit(1)

    app.add_typer(fleet_app, name="fleet")


def _print_active_model(console, fleet, workers: list) -> None:
    """The audit store's active model and the calibration the fleet's detector serves, and which live detection
    workers serve another version (switching, or unable to serve it: their log says why)."""
    from rich.markup import escape

    from umcd.fleet import read_env_file

    stored = read_env_file(fleet.env_path) if fleet.env_path.exists() else {}
    url = stored.get("UMCD_DATABASE_URL")
    if not url:
        return
    detector = stored.get("UMCD_DETECTOR") or "umcd"
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        console.print("active model: none (the audit store is not created yet)")  # never create an empty one here
        return
    try:
        from db import repo
        from db.session import dispose_engine, session_scope

        try:
            with session_scope(url) as s:
                mv = repo.active_model_version(s)
                version = mv.version if mv is not None else None
                cal = repo.active_calibration(s, version, detector) if version is not None else None
                calibration = (cal.id, cal.target_fpr) if cal is not None else None
        finally:
            dispose_engine(url)
    except Exception as exc:  # noqa: BLE001 - the store is down or not migrated: status still shows the processes
        console.print(f"active model: unknown (audit store: {escape(type(exc).__name__)})")
        return
    if version is None:
        console.print("active model: none published yet (`umcd publish` or the train task)")
        return
    line = f"active model: [bold]{escape(version)}[/bold]"
    line += (f", calibration {calibration[0]} of detector {escape(detector)} (target FPR {calibration[1]:g})"
             if calibration else f"; [yellow]no active calibration of detector {escape(detector)}[/yellow]: its "
             "workers keep serving what they served")
    console.print(line)
    behind = [w.name for w in workers if w.model != version]
    if behind:
        console.print(f"[yellow]not serving it yet: {', '.join(behind)}[/yellow] (workers switch within "
                      "UMCD_MODEL_POLL_INTERVAL_S; one that cannot serve it logs why and keeps its model)")


def _print_table(console, title: str, rows: list[tuple[str, ...]], columns: tuple[str, ...]) -> None:
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)
