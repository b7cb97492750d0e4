"""The audit store's write lock on SQLite files: one writer at a time across threads and processes."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import sqlalchemy.exc
from sqlalchemy import func, select

from db.migrate import upgrade
from db.models import Request
from db.session import SqliteWriteLock, create_engine_for, dispose_engine, make_engine, session_scope, write_lock

ROOT = Path(__file__).resolve().parents[2]

_TRY_LOCK = """
import sys
import sqlalchemy.exc
from db.session import make_engine, write_lock
lock = write_lock(make_engine(sys.argv[1]))
try:
    with lock.hold(timeout_s=float(sys.argv[2])):
        print("acquired")
except sqlalchemy.exc.TimeoutError as exc:
    print("timeout:", exc)
"""


@pytest.fixture()
def url(tmp_path):
    u = f"sqlite:///{tmp_path / 'audit.db'}"
    upgrade(u)
    yield u
    dispose_engine(u)


def _try_in_another_process(url: str, timeout_s: float) -> str:
    proc = subprocess.run([sys.executable, "-c", _TRY_LOCK, url, str(timeout_s)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_only_sqlite_files_get_a_write_lock(tmp_path):
    lock = write_lock(make_engine(f"sqlite:///{tmp_path / 'a.db'}"))
    assert isinstance(lock, SqliteWriteLock) and lock.path == (tmp_path / "a.db.umcd-write.lock").resolve()
    assert write_lock(make_engine(f"sqlite:///{tmp_path / 'a.db'}")) is lock  # one per file per process
    assert write_lock(create_engine_for("sqlite:///:memory:")) is None
    assert write_lock(create_engine_for("postgresql://u:p@127.0.0.1:1/d")) is None  # never connects


def test_a_write_scope_holds_off_writers_of_other_processes_until_it_ends(url):
    engine = make_engine(url)
    with session_scope(engine, write=True) as s:
        s.add(Request(request_id="held", kind="query"))
        s.flush()
        outcome = _try_in_another_process(url, 0.3)
        assert outcome.startswith("timeout:") and "another process held the write lock" in outcome
    assert _try_in_another_process(url, 5.0) == "acquired"
    with session_scope(engine) as s:
        assert s.execute(select(func.count()).select_from(Request)).scalar_one() == 1


def test_a_write_scope_holds_off_the_other_threads_of_its_process(url):
    engine = make_engine(url)
    seen: list[str] = []

    def other_writer() -> None:
        try:
            with write_lock(engine).hold(timeout_s=0.3):
                seen.append("acquired")
        except sqlalchemy.exc.TimeoutError as exc:
            seen.append(f"timeout: {exc}")

    with session_scope(engine, write=True) as s:
        s.add(Request(request_id="main", kind="query"))
        t = threading.Thread(target=other_writer)
        t.start()
        t.join(30)
    assert len(seen) == 1 and seen[0].startswith("timeout:") and "another thread held" in seen[0]
    other_writer()
    assert seen[-1] == "acquired"


def _forked_child(engine, parent_holds, result) -> None:
    parent_holds.wait(30)
    try:
        with write_lock(engine).hold(timeout_s=0.3):  # the parent's own engine object, inherited
            result.put("acquired")
    except sqlalchemy.exc.TimeoutError:
        result.put("timeout")


def test_a_forked_child_opens_its_own_lock_file(url):
    """A child forked after the parent used the lock must not share the parent's descriptor: ``flock``
    belongs to the open file, so a shared one would let both hold the lock at once."""
    engine = make_engine(url)
    lock = write_lock(engine)
    with lock.hold():
        pass  # the parent's descriptor is open now
    ctx = multiprocessing.get_context("fork")
    parent_holds, result = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_forked_child, args=(engine, parent_holds, result))
    child.start()
    try:
        with lock.hold():
            parent_holds.set()
            assert result.get(timeout=60) == "timeout"
    finally:
        child.join(60)
    assert child.exitcode == 0
