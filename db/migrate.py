"""Run the audit store's Alembic migrations from Python (`upgrade(url)`) or as `python -m db.migrate`."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from db.session import create_engine_for, normalize_url, sqlite_sidecar
from umcd.settings import redact_url

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Key of the PostgreSQL advisory lock that serialises concurrent `upgrade` calls.
_PG_MIGRATION_LOCK = zlib.crc32(b"umcd.db.migrate")


def alembic_config(url: str | URL | None = None) -> Config:
    """An Alembic ``Config`` built in code (no ini file), pointing at the packaged migrations."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")
    if url is not None:
        cfg.attributes["url"] = normalize_url(url).render_as_string(hide_password=False)
    return cfg


def head_revision() -> str:
    """The newest revision in ``db/migrations/versions``."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(url: str | URL) -> str | None:
    """The revision the database at ``url`` is at (None: never migrated)."""
    engine = create_engine_for(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


@contextlib.contextmanager
def _sqlite_file_lock(url: URL) -> Iterator[None]:
    lock_path = sqlite_sidecar(url, ".migrate-lock")
    if lock_path is None:
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_on_connection(conn: Connection, revision: str, downgrade: bool) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = conn
    if downgrade:
        command.downgrade(cfg, revision)
    else:
        command.upgrade(cfg, revision)


def upgrade(url: str | URL, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision`` (default: the newest).

    Safe to call from many processes at once: PostgreSQL serialises the callers with an advisory
    lock held by the migration's transaction (its DDL is transactional), SQLite with a lock file
    beside the database file. A database already at ``revision`` is left untouched.
    """
    _migrate(url, revision, downgrade=False)


def downgrade(url: str | URL, revision: str) -> None:
    """Migrate the database at ``url`` down to ``revision`` (``"base"``: drop every table)."""
    _migrate(url, revision, downgrade=True)


def _migrate(url: str | URL, revision: str, downgrade: bool) -> None:
    parsed = normalize_url(url)
    log.info(
        "%s %s to %s",
        "downgrading" if downgrade else "upgrading",
        redact_url(parsed.render_as_string(hide_password=False)),
        revision,
    )
    engine = create_engine_for(parsed, poolclass=NullPool)
    try:
        if engine.dialect.name == "postgresql":
            with engine.begin() as conn:
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
                _run_on_connection(conn, revision, downgrade)
        else:
            with _sqlite_file_lock(parsed), engine.begin() as conn:
                _run_on_connection(conn, revision, downgrade)
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    """``python -m db.migrate [REVISION] [--url URL]``: migrate UMCD_DATABASE_URL (or the SQLite default)."""
    parser = argparse.ArgumentParser(prog="python -m db.migrate", description=main.__doc__)
    parser.add_argument("revision", nargs="?", default="head", help="target revision (default: head)")
    parser.add_argument("--url", default=None, help="database URL (default: UMCD_DATABASE_URL or the SQLite file)")
    args = parser.parse_args(argv)
    url = args.url
    if url is None:
        from umcd.settings import get_settings

        url = get_settings().db_url
    upgrade(url, args.revision)
    print(f"{redact_url(str(url))}: at revision {current_revision(url)}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
