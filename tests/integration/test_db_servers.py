"""The shared test servers: Redis and PostgreSQL on loopback, password-protected, surviving restarts."""

from __future__ import annotations

import socket

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from db import repo
from db.migrate import upgrade
from db.session import create_engine_for, session_scope
from tests.servers import (
    PostgresServer,
    RedisServer,
    free_port,
    port_is_open,
    postgres_bin_dir,
    redis_server_binary,
    wait_for_port,
)

pytestmark = pytest.mark.integration


def test_free_port_is_bindable_and_wait_for_port_sees_a_listener():
    port = free_port()
    assert not port_is_open(port)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        wait_for_port(port, timeout=5)
    with pytest.raises(TimeoutError):
        wait_for_port(port, timeout=0.2)


def test_shared_redis_server_answers_on_loopback(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    assert client.ping() is True
    assert redis_server.url.startswith("redis://127.0.0.1:")
    client.close()


@pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not installed")
def test_redis_server_keeps_aof_data_across_restart_and_kill_and_enforces_its_password(tmp_path):
    with RedisServer(password="pw-123", dir=tmp_path / "redis") as server:
        port = server.port
        client = redis.Redis.from_url(server.url)
        client.set("k", "v1")
        server.restart()
        assert server.port == port and client.get("k") == b"v1"
        client.set("k", "v2")
        client.execute_command("BGREWRITEAOF")  # make the write durable before the crash
        server.kill()
        assert not port_is_open(port)
        server.start()
        # the pooled socket died with the killed server; whether redis-py retries a reset on it is not what this
        # tests (one full run saw "Connection reset by peer" here), so read over a fresh connection
        client.connection_pool.disconnect()
        assert client.get("k") == b"v2"
        no_retry = Retry(NoBackoff(), 0)  # redis-py otherwise retries a failed AUTH for seconds
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, retry=no_retry).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, password="wrong-password", retry=no_retry).ping()
        client.close()
    assert not port_is_open(port)


def test_shared_postgres_server_needs_the_password_and_listens_on_loopback_only(postgres_server):
    engine = create_engine_for(postgres_server.url)
    with engine.connect() as conn:
        assert conn.execute(text("SHOW listen_addresses")).scalar() == "127.0.0.1"
        assert conn.execute(text("SELECT current_user")).scalar() == "umcd"
    engine.dispose()
    wrong = create_engine_for(postgres_server.url.replace(postgres_server.password, "not-the-password"))
    with pytest.raises(OperationalError, match="password authentication failed"):
        wrong.connect()
    wrong.dispose()


@pytest.mark.skipif(postgres_bin_dir() is None, reason="PostgreSQL is not installed")
def test_postgres_restart_and_crash_keep_committed_rows_and_a_pooled_engine_reconnects():
    with PostgresServer() as server:
        upgrade(server.url)
        engine = create_engine_for(server.url)
        with session_scope(engine) as s:
            repo.write_verdict(s, request_id="before-restart", kind="query", verdict="benign")
        port = server.port
        server.restart()
        assert server.port == port
        with session_scope(engine) as s:  # the pooled connection is dead; pre-ping replaces it
            repo.write_verdict(s, request_id="after-restart", kind="query", verdict="benign")
        server.kill()
        assert not port_is_open(port)
        server.start()
        with session_scope(engine) as s:
            assert repo.verdict_counts(s)["benign"] == 2
        engine.dispose()
    assert not port_is_open(port)
