"""The worker's kombu patch: one synchronous Redis client per channel and connection pool."""

from __future__ import annotations

import pytest


@pytest.fixture()
def channel(redis_server):
    import workers.app  # noqa: F401  (installs the patch)
    from kombu import Connection

    with Connection(redis_server.url_for(14)) as conn:
        yield conn.default_channel


def test_a_channel_reuses_its_client_until_its_pool_is_replaced(channel):
    first = channel._create_client()
    assert channel._create_client() is first  # no new client (and callback tables) per publish
    with channel.conn_or_acquire() as client:
        assert client is first and client.ping()
    channel._disconnect_pools()  # what kombu does after a fork or a lost connection
    fresh = channel._create_client()
    assert fresh is not first and fresh.connection_pool is channel.pool and fresh.ping()


def test_asynchronous_clients_are_left_to_kombu(channel):
    assert channel._create_client(asynchronous=True) is not channel._create_client(asynchronous=True)


def test_a_collected_connection_raises_a_connection_error_that_kombu_handles(channel):
    import redis

    channel._disconnect_pools()
    client = channel.connection.client
    channel.connection.client = None  # what Celery's collect() leaves when Redis went away
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            channel._create_client()
    finally:
        channel.connection.client = client
