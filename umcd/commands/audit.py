"""`umcd audit ...` reads the audit store (verdicts, rejections, one request); `umcd db upgrade` migrates it."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import typer

from umcd.settings import get_settings, redact_url

audit_app = typer.Typer(help="Read the audit store: recent verdicts, rejections, one request, counts.", no_args_is_help=True)
db_app = typer.Typer(help="The audit store's schema: run the Alembic migrations.", no_args_is_help=True)

URL_OPTION = typer.Option(None, "--url", help="database URL (default: UMCD_DATABASE_URL or the SQLite file in artifacts)")
JSON_OPTION = typer.Option(False, "--json", help="print JSON instead of a table")


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
    app.add_typer(db_app, name="db")


# --------------------------------------------------------------------------- helpers


def _url(url: str | None) -> str:
    return url or get_settings().db_url


def _console():
    """A rich console; when output is not a terminal (a pipe, a test) and COLUMNS is unset, 160 wide."""
    import os

    from rich.console import Console

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=160)
    return console


def _fail(message: str) -> None:
    typer.echo(message, err=True)
    raise typer.Exit(1)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, default=_json_default, indent=2, sort_keys=True))


def _missing_file(url: str) -> bool:
    """Whether ``url`` is an SQLite file that does not exist (opening it would create an empty one)."""
    from db.session import normalize_url

    parsed = normalize_url(url)
    return (parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:")
            and not Path(parsed.database).expanduser().exists())


def _check_kind(value: str | None) -> str | None:
    if value is not None and value not in ("query", "insert"):
        raise typer.BadParameter(f"{value!r}: use query or insert")
    return value


KIND_OPTION = typer.Option(None, help="only query or insert", callback=_check_kind)


def _read(url: str | None, fn):
    """Run ``fn(session)`` against the audit store, with a clear message if it is missing or unmigrated."""
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from db.session import session_scope

    url = _url(url)
    if _missing_file(url):
        _fail(f"no audit store at {redact_url(url)} (nothing recorded yet, or run `umcd db upgrade`)")
    try:
        with session_scope(url) as session:
            return fn(session)
    except (OperationalError, ProgrammingError) as exc:
        if "no such table" in str(exc) or "does not exist" in str(exc):
            _fail(f"the audit store at {redact_url(url)} has no tables: run `umcd db upgrade`")
        _fail(f"cannot read the audit store at {redact_url(url)}: {exc.orig!r}")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


_VERDICT_STYLE = {"benign": "green", "adversarial": "bold red", "invalid_input": "yellow"}


# --------------------------------------------------------------------------- umcd audit


@audit_app.command("last")
def last(
    n: int = typer.Option(20, "--n", "-n", min=1, help="how many verdicts"),
    kind: Optional[str] = KIND_OPTION,
    as_json: bool = JSON_OPTION,
    url: Optional[str] = URL_OPTION,
) -> None:
    """The newest verdicts: scores, criteria fired, model version, latency."""
    from db import repo

    rows = _read(url, lambda s: repo.last_verdicts(s, n=n, kind=kind))
    if as_json:
        _print_json(rows)
        return
    from rich.table import Table

    table = Table(title=f"last {len(rows)} verdicts (UTC)", title_justify="left")
    for name, justify, no_wrap in [
        ("time", "left", True), ("request", "left", True), ("kind", "left", True), ("verdict", "left", True),
        ("fired", "left", True), ("C1", "right", True), ("C2", "right", True), ("C3", "right", True),
        ("model", "left", False), ("ms", "right", True), ("worker", "left", False),
    ]:
        table.add_column(name, justify=justify, no_wrap=no_wrap, overflow="fold")
    for r in rows:
        style = _VERDICT_STYLE.get(r["verdict"], "")
        verdict = {"invalid_input": "invalid"}.get(r["verdict"], r["verdict"])
        table.add_row(
            r["created_at"].strftime("%m-%d %H:%M:%S"), r["request_id"], r["kind"], f"[{style}]{verdict}[/]", _fmt(r["fired"]),
            _fmt(r["c1"], 2), _fmt(r["c2"]), _fmt(r["c3"], 2), _fmt(r["model_version"]),
            _fmt(r["latency_total_ms"], 1), _fmt(r["worker"]),
        )
    _console().print(table)


@audit_app.command("rejections")
def rejections(
    kind: Optional[str] = KIND_OPTION,
    as_json: bool = JSON_OPTION,
    url: Optional[str] = URL_OPTION,
) -> None:
    """Rejections by criterion: how often C1, C2, C3 (and an extension's own criteria) fired among
    adversarial verdicts, and invalid inputs."""
    from db import repo

    counts = _read(url, lambda s: repo.rejections_by_criterion(s, kind=kind))
    if as_json:
        _print_json(counts)
        return
    from rich.table import Table

    adversarial = counts["adversarial"]
    table = Table(title="rejections by criterion", title_justify="left")
    table.add_column("rejected by")
    table.add_column("count", justify="right")
    table.add_column("share of adversarial", justify="right")
    labels = {"c1": "C1 retrieval distance", "c2": "C2 quantization loss", "c3": "C3 denoising disagreement",
              "other": "an extension detector's criteria (trust@in, ...)"}
    for criterion, label in labels.items():
        share = f"{counts[criterion] / adversarial:.1%}" if adversarial else "-"
        table.add_row(label, str(counts[criterion]), share)
    table.add_section()
    table.add_row("adversarial (any criterion)", str(adversarial), "")
    table.add_row("invalid input", str(counts["invalid_input"]), "")
    _console().print(table)


@audit_app.command("show")
def show(
    request_id: str = typer.Argument(..., help="the request id"),
    as_json: bool = JSON_OPTION,
    url: Optional[str] = URL_OPTION,
) -> None:
    """Everything stored about one request: the request, its verdict, and its database image."""
    from db import repo

    record = _read(url, lambda s: repo.request_record(s, request_id))
    if record is None:
        _fail(f"no request {request_id!r} in the audit store")
    if as_json:
        _print_json(record)
        return
    from rich.table import Table

    console = _console()
    for part in ("request", "verdict", "image"):
        values = record[part]
        table = Table(title=part, title_justify="left", show_header=False)
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        if values is None:
            table.add_row("-", "none")
        else:
            for key, value in values.items():
                if isinstance(value, (dict, list)):
                    value = json.dumps(value, default=_json_default)
                table.add_row(key, _fmt(value, 4))
        console.print(table)


@audit_app.command("counts")
def counts(
    as_json: bool = JSON_OPTION,
    url: Optional[str] = URL_OPTION,
) -> None:
    """Verdicts per kind, database images per status, and anything recorded twice (should be none)."""
    from db import repo

    def collect(session):
        per_request = repo.count_verdicts_per_request(session)
        return {
            "verdicts": {kind: repo.verdict_counts(session, kind=kind) for kind in ("query", "insert")},
            "requests": len(per_request),
            "requests_without_verdict": sum(1 for n in per_request.values() if n == 0),
            "images": repo.image_counts(session),
            "index_log_seq": repo.max_log_seq(session),
            "duplicates": repo.duplicates(session),
        }

    data = _read(url, collect)
    if as_json:
        _print_json(data)
        return
    from rich.table import Table

    console = _console()
    table = Table(title="verdicts", title_justify="left")
    table.add_column("kind")
    for verdict in ("benign", "adversarial", "invalid_input"):
        table.add_column(verdict, justify="right")
    table.add_column("total", justify="right")
    for kind, c in data["verdicts"].items():
        table.add_row(kind, *(str(v) for v in c.values()), str(sum(c.values())))
    console.print(table)
    console.print(
        f"requests: {data['requests']} ({data['requests_without_verdict']} without a verdict)   "
        f"images: " + ", ".join(f"{k} {v}" for k, v in data["images"].items())
        + f"   index log seq: {data['index_log_seq']}"
    )
    dup = data["duplicates"]
    if any(dup.values()):
        console.print(f"[bold red]duplicates[/]: {json.dumps(dup, default=_json_default)}")
    else:
        console.print("duplicates: none")


# --------------------------------------------------------------------------- umcd db


@db_app.command("upgrade")
def upgrade(
    revision: str = typer.Option("head", help="target Alembic revision"),
    url: Optional[str] = URL_OPTION,
) -> None:
    """Create or migrate the audit store's tables (safe to run from several processes at once)."""
    from db.migrate import current_revision
    from db.migrate import upgrade as run_upgrade

    url = _url(url)
    run_upgrade(url, revision)
    typer.echo(f"{redact_url(url)}: at revision {current_revision(url)}")


@db_app.command("current")
def current(url: Optional[str] = URL_OPTION) -> None:
    """Print the Alembic revision the audit store is at (``none``: never migrated)."""
    from db.migrate import current_revision, head_revision

    url = _url(url)
    if _missing_file(url):  # reading the revision would create an empty file
        typer.echo(f"{redact_url(url)}: no audit store yet (head {head_revision()}; `umcd db upgrade` creates it)")
        return
    rev = current_revision(url)
    typer.echo(f"{redact_url(url)}: at revision {rev or 'none'} (head {head_revision()})")
