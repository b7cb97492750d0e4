"""The request ledger against a real Redis: what the SDK lists, what a sweep re-sends, what it leaves alone."""

from __future__ import annotations

import base64
import json

import pytest
import redis as redis_lib

from producers import sdk
from producers.sdk import BrokerUnavailable, Client
from tests.servers import free_port
from umcd.settings import Settings
from workers import ledger

pytestmark = [pytest.mark.chaos]

LEDGER_DB = 11


@pytest.fixture()
def broker(redis_server):
    url = redis_server.url_for(LEDGER_DB)
    client = redis_lib.Redis.from_url(url)
    client.flushdb()
    yield url, client
    client.flushdb()
    client.close()


@pytest.fixture()
def client(broker, tmp_path):
    url, _ = broker
    with Client(Settings(broker_url=url, result_backend=url, artifacts=tmp_path)) as c:
        yield c


def _queued(r, queue: str) -> list[dict]:
    return [json.loads(raw) for raw in r.lrange(queue, 0, -1)]


def test_the_producer_and_worker_sides_name_the_same_keys_and_tasks():
    assert (sdk.LEDGER_KEY, sdk.LEDGER_PAYLOAD_PREFIX, sdk.LEDGER_TASKS) == (
        ledger.LEDGER_KEY, ledger.PAYLOAD_PREFIX, ledger.LEDGER_TASKS)


def test_the_sdk_lists_every_message_with_its_task_kwargs_and_queue_before_sending(client, broker):
    _, r = broker
    rid = client.submit_query(b"img", client="c1")
    batch_ids = client.submit_inserts([b"a", b"b"], source="s", batch=True)
    listed = ledger.listed(r)
    assert rid in listed and len(listed) == 2  # one single message, one batch message
    single = json.loads(r.get(ledger.PAYLOAD_PREFIX + rid))
    assert single["task"] == "umcd.detect" and single["kwargs"]["request_id"] == rid
    assert base64.b64decode(single["kwargs"]["image"]["inline"]) == b"img"
    (batch_id,) = set(listed) - {rid}
    batch = json.loads(r.get(ledger.PAYLOAD_PREFIX + batch_id))
    assert batch["task"] == "umcd.screen_batch" and batch["queue"] == "screen"
    assert [it["request_id"] for it in batch["kwargs"]["items"]] == batch_ids
    assert 0 < r.ttl(ledger.PAYLOAD_PREFIX + rid) <= client.settings.image_ref_ttl_s


def test_a_sweep_resends_only_stale_messages_with_their_task_id_and_kwargs(client, broker):
    _, r = broker
    stale = client.submit_query(b"old")
    fresh = client.submit_insert(b"new", source="s")
    r.delete("detect", "screen")  # both messages lost by the broker
    r.zadd(ledger.LEDGER_KEY, {stale: 1000.0})  # last seen long ago
    sent = ledger.sweep(r, client.app, after_s=60)
    assert sent == [stale]
    (message,) = _queued(r, "detect")
    assert message["headers"]["id"] == stale and message["headers"]["task"] == "umcd.detect"
    assert _queued(r, "screen") == []  # the fresh one is left alone
    assert ledger.listed(r)[stale] > 1000.0  # its clock restarted: not re-sent at the next sweep
    assert ledger.sweep(r, client.app, after_s=60) == []
    assert set(ledger.listed(r)) == {stale, fresh}


def test_struck_and_expired_entries_are_never_resent(client, broker):
    _, r = broker
    done = client.submit_query(b"done")
    expired = client.submit_query(b"gone")
    r.delete("detect")
    ledger.strike(r, done)
    ledger.touch(r, done)  # a late touch does not put a struck message back
    r.delete(ledger.PAYLOAD_PREFIX + expired)
    r.zadd(ledger.LEDGER_KEY, {expired: 1.0})
    assert ledger.sweep(r, client.app, after_s=60) == []
    assert ledger.listed(r) == {} and _queued(r, "detect") == []


@pytest.mark.parametrize("payload", [b"[1, 2]", b"null", b'"text"', b'{"task": 7, "kwargs": {}}',
                                     b'{"task": "umcd.detect", "kwargs": []}', b"\xff not json"])
def test_an_unreadable_entry_is_dropped_and_the_sweep_still_resends_the_others(client, broker, payload):
    _, r = broker
    lost = client.submit_query(b"lost")
    r.delete("detect")
    r.set(ledger.PAYLOAD_PREFIX + "broken", payload)
    r.zadd(ledger.LEDGER_KEY, {"broken": 1.0, lost: 2.0})  # the bad one is the oldest: swept first
    assert ledger.sweep(r, client.app, after_s=60) == [lost]
    assert [m["headers"]["id"] for m in _queued(r, "detect")] == [lost]
    assert set(ledger.listed(r)) == {lost}


def test_one_worker_at_a_time_sweeps(client, broker):
    _, r = broker
    rid = client.submit_query(b"x")
    r.delete("detect")
    r.zadd(ledger.LEDGER_KEY, {rid: 1.0})
    first = ledger.Redriver(client.app, r, after_s=60, interval_s=30, name="a")
    second = ledger.Redriver(client.app, r, after_s=60, interval_s=30, name="b")
    assert first.sweep_once() == [rid]
    r.zadd(ledger.LEDGER_KEY, {rid: 1.0})
    assert second.sweep_once() == []  # the lock of the first sweep holds for its interval
    assert len(_queued(r, "detect")) == 1


def test_a_message_whose_publish_fails_is_taken_off_the_ledger(tmp_path, broker):
    """Listed first, then the publish fails: the caller gets BrokerUnavailable and nothing stays listed."""
    from umcd.celeryconf import make_celery

    _, r = broker
    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings = Settings(broker_url=dead, result_backend=dead, artifacts=tmp_path)
    policy = {"max_retries": 0, "interval_start": 0, "interval_step": 0.05, "interval_max": 0.05}
    with Client(settings, app=make_celery(settings), redis_client=r, retry_policy=policy) as c:
        with pytest.raises(BrokerUnavailable, match="could not send"):
            c.submit_query(b"x")
    assert ledger.listed(r) == {} and r.keys(ledger.PAYLOAD_PREFIX + "*") == []


def test_the_redrive_delay_is_twice_the_visibility_timeout():
    from umcd.celeryconf import VISIBILITY_TIMEOUT_S, make_celery

    app = make_celery(Settings(broker_url="redis://127.0.0.1:1/0"))
    assert ledger.redrive_after_s(app) == 2 * VISIBILITY_TIMEOUT_S
