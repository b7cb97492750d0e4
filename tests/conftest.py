"""Shared pytest fixtures: real Redis and PostgreSQL servers and fresh migrated audit databases."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `from tests.servers import ...` works however pytest is launched
    sys.path.insert(0, str(ROOT))

from tests.servers import PostgresServer, RedisServer, postgres_bin_dir, redis_server_binary  # noqa: E402


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One real ``redis-server`` (AOF on, no password) on a free loopback port for the whole session."""
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed: run `make services` (apt-get install redis-server)")
    server = RedisServer(dir=tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL cluster on a free loopback port for the whole session (role/db ``umcd``)."""
    if postgres_bin_dir() is None:
        pytest.skip("PostgreSQL is not installed: run `make services` (apt-get install postgresql)")
    server = PostgresServer()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def _migrated_postgres_template(postgres_server):
    """Name of a database on ``postgres_server`` migrated to head once; per-test databases copy it."""
    from db.migrate import upgrade

    name = "umcd_migrated_template"
    url = postgres_server.create_database(name)
    upgrade(url)  # its engine is disposed: the template has no open connection left
    return name


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)],
)
def db_url(request, tmp_path):
    """A fresh, migrated (``alembic upgrade head``) audit database URL for one test.

    ``sqlite``: a file in the test's tmp dir. ``postgresql``: a new database on the shared
    ``postgres_server`` (started on first use), copied from a template migrated once per session,
    dropped after the test. Override the dialects of one
    test with ``@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)``.
    """
    from db.migrate import upgrade
    from db.session import dispose_engine

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'audit.db'}"
        upgrade(url)
        try:
            yield url
        finally:
            dispose_engine(url)
        return

    server: PostgresServer = request.getfixturevalue("postgres_server")
    template = request.getfixturevalue("_migrated_postgres_template")
    name = f"t_{uuid.uuid4().hex[:16]}"
    url = server.create_database(name, template=template)
    try:
        upgrade(url)  # a no-op at head; kept so that the fixture's promise never depends on the template
        yield url
    finally:
        dispose_engine(url)
        server.drop_database(name)
