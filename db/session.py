"""Engines (one per URL per process) and transactional sessions for the audit store."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, create_engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from umcd.settings import redact_url

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000

_lock = threading.Lock()
_engines: dict[tuple[int, str], Engine] = {}
_sessionmakers: dict[int, sessionmaker[Session]] = {}


def normalize_url(url: str | URL) -> URL:
    """The SQLAlchemy URL to connect with: ``postgres://`` and ``postgresql://`` use psycopg 3."""
    parsed = make_url(url) if isinstance(url, str) else url
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _url_key(url: str | URL) -> str:
    return normalize_url(url).render_as_string(hide_password=False)


def _on_sqlite_connect(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
    finally:
        cursor.close()


def create_engine_for(url: str | URL, **kwargs) -> Engine:
    """A new engine (not cached) with the audit store's connection settings.

    SQLite: WAL journal, ``busy_timeout`` 30 s, foreign keys on, usable from any thread; the parent
    directory of a file database is created. PostgreSQL: psycopg 3 with ``pool_pre_ping`` so that a
    restarted server costs one reconnect, not an error.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        connect_args.update(kwargs.pop("connect_args", {}))
        engine = create_engine(parsed, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _on_sqlite_connect)
    else:
        kwargs.setdefault("pool_pre_ping", True)
        if "poolclass" not in kwargs:
            kwargs.setdefault("pool_size", 5)
            kwargs.setdefault("max_overflow", 10)
        engine = create_engine(parsed, **kwargs)
    log.debug("audit store engine for %s", redact_url(parsed.render_as_string(hide_password=False)))
    return engine


def make_engine(url: str | URL) -> Engine:
    """The engine of ``url`` for this process, created on first use and then cached.

    The cache is keyed by process id as well, so a forked child never reuses its parent's pool.
    """
    key = (os.getpid(), _url_key(url))
    engine = _engines.get(key)
    if engine is not None:
        return engine
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = create_engine_for(url)
            _engines[key] = engine
        return engine


def dispose_engine(url: str | URL) -> None:
    """Close the pooled connections of the cached engine of ``url`` and forget it."""
    key = (os.getpid(), _url_key(url))
    with _lock:
        engine = _engines.pop(key, None)
        if engine is not None:
            _sessionmakers.pop(id(engine), None)
    if engine is not None:
        engine.dispose()


def dispose_all() -> None:
    """Dispose every engine this process cached."""
    with _lock:
        engines = [e for (pid, _), e in _engines.items() if pid == os.getpid()]
        _engines.clear()
        _sessionmakers.clear()
    for engine in engines:
        engine.dispose()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """The ``sessionmaker`` bound to ``engine`` (objects stay readable after commit)."""
    maker = _sessionmakers.get(id(engine))
    if maker is None or maker.kw.get("bind") is not engine:
        maker = sessionmaker(bind=engine, expire_on_commit=False)
        _sessionmakers[id(engine)] = maker
    return maker


@contextmanager
def session_scope(engine: Engine | str | URL) -> Iterator[Session]:
    """A session in one transaction: committed when the block ends, rolled back if it raises.

    ``engine`` may also be a URL, whose cached engine is used.
    """
    if not isinstance(engine, Engine):
        engine = make_engine(engine)
    session = session_factory(engine)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
