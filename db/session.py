"""Engines (one per URL per process) and transactional sessions for the audit store."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine, create_engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from db import jsontext
from umcd.settings import redact_url

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
#: the longest a writer waiting for the SQLite write lock (:class:`SqliteWriteLock`) sleeps between tries
WRITE_LOCK_POLL_MAX_S = 0.001

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
    kwargs.setdefault("json_serializer", jsontext.dumps)  # what json.dumps writes, at a third of its cost
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


class SqliteWriteLock:
    """Write transactions on one SQLite file, one at a time across this machine's threads and processes.

    SQLite admits one writer at a time. A connection that finds the write lock taken is put to sleep by
    SQLite's busy handler in growing steps (1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50, then 100 ms) and
    retried; it does not learn when the lock is freed. Two detection workers each writing a batch every
    few milliseconds meet that: in the fleet bench (``perf trace``) one worker's writer slept 107 ms in
    those steps when both began writing at once, and 1.8 s of a 3 s window when strace slowed the
    workers; every sleep holds up the answers of the batch waiting to be written.

    Writers that hold this lock first meet SQLite's lock free, except when a writer outside it (a CLI
    command, a migration) holds it, and then SQLite's own busy handler waits as before. The lock is an
    exclusive ``flock`` on ``<database>.umcd-write.lock`` (taken with ``LOCK_NB`` and retried at most
    :data:`WRITE_LOCK_POLL_MAX_S` apart, so that a wait has a deadline) behind a thread lock of this
    process; the kernel drops a dead process's lock. A wait longer than ``timeout_s`` raises
    ``sqlalchemy.exc.TimeoutError`` (a transient error to the workers, as SQLite's "database is locked").
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._thread_lock = threading.Lock()
        self._fd: int | None = None

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        return self._fd

    @contextmanager
    def hold(self, timeout_s: float = SQLITE_BUSY_TIMEOUT_MS / 1000) -> Iterator[None]:
        deadline = time.monotonic() + timeout_s
        if not self._thread_lock.acquire(timeout=max(timeout_s, 0.0)):
            raise sa_exc.TimeoutError(f"another thread held the write lock of {self.path} for {timeout_s:g} s")
        try:
            fd = self._file()
            delay = 5e-5
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise sa_exc.TimeoutError(
                            f"another process held the write lock of {self.path} for {timeout_s:g} s") from None
                    time.sleep(delay)
                    delay = min(2 * delay, WRITE_LOCK_POLL_MAX_S)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()


_write_locks: dict[tuple[int, str], SqliteWriteLock] = {}
#: engine -> (pid, its write lock or None): naming the file resolves its path (~40 us), once per engine
_engine_write_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sqlite_sidecar(url: str | URL, suffix: str) -> Path | None:
    """``<database file><suffix>`` beside a SQLite database file (its lock files); ``None`` for other
    databases, in-memory SQLite and ``file:`` URIs."""
    parsed = normalize_url(url) if isinstance(url, str) else url
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:" or database.startswith("file:"):
        return None
    path = Path(database).expanduser().resolve()
    return path.with_name(path.name + suffix)


def write_lock(engine: Engine) -> SqliteWriteLock | None:
    """The :class:`SqliteWriteLock` of ``engine``'s database file for this process; ``None`` for other
    databases (PostgreSQL queues its writers itself; an in-memory SQLite has one connection)."""
    pid = os.getpid()
    cached = _engine_write_locks.get(engine)
    if cached is not None and cached[0] == pid:
        return cached[1]
    sidecar = sqlite_sidecar(engine.url, ".umcd-write.lock")
    lock = None
    if sidecar is not None:
        key = (pid, str(sidecar))  # a forked child opens its own file: a shared descriptor would share the lock
        lock = _write_locks.get(key)
        if lock is None:
            with _lock:
                lock = _write_locks.setdefault(key, SqliteWriteLock(sidecar))
    _engine_write_locks[engine] = (pid, lock)
    return lock


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """The ``sessionmaker`` bound to ``engine`` (objects stay readable after commit)."""
    maker = _sessionmakers.get(id(engine))
    if maker is None or maker.kw.get("bind") is not engine:
        maker = sessionmaker(bind=engine, expire_on_commit=False)
        _sessionmakers[id(engine)] = maker
    return maker


@contextmanager
def session_scope(engine: Engine | str | URL, *, write: bool = False) -> Iterator[Session]:
    """A session in one transaction: committed when the block ends, rolled back if it raises.

    ``engine`` may also be a URL, whose cached engine is used. ``write``: the block writes, often (a
    worker's verdicts); on a SQLite file it runs under the file's :class:`SqliteWriteLock`.
    """
    if not isinstance(engine, Engine):
        engine = make_engine(engine)
    lock = write_lock(engine) if write else None
    with lock.hold() if lock is not None else nullcontext():
        session = session_factory(engine)()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()
