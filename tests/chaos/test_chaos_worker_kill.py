"""Chaos: SIGKILL a detection worker three times mid-batch under load; every request keeps exactly one verdict."""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter

import pytest

from tests.fleet_helpers import FleetRun, SteadyLoad, index_consistency, verdict_audit, wait_for_verdicts

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.timeout(420)]

N_REQUESTS = 2_000
RATE_PER_S = 50.0
INSERT_EVERY = 5  # 400 insertions, 1,600 queries
KILLS = 3
#: seconds after which the broker hands an unacknowledged message of a dead worker to another one
#: (the ledger re-sends a message nobody started within twice this)
VISIBILITY_TIMEOUT_S = 6

_RECEIVED = re.compile(r"Task (umcd\.(?:detect|screen))\[([0-9a-f]{32})\] received")
_RESENT = re.compile(r"re-sent (\d+) message\(s\) the broker lost")


def _resent(fleet: FleetRun) -> int:
    """Messages the workers' ledger sweeps have re-sent so far (from their logs)."""
    return sum(int(n) for n in _RESENT.findall(fleet.all_logs()))


def _batches(worker) -> float:
    """Batches this worker has run (its umcd_batch_size histogram count), or -1 when it does not answer."""
    try:
        return worker.metrics(timeout=1.0).get("umcd_batch_size_count", 0.0)
    except OSError:
        return -1.0


def _kill_mid_batch(fleet: FleetRun, name: str, load: SteadyLoad, timeout: float = 90.0) -> dict:
    """Wait until ``name`` is up and running batches again, then SIGKILL it right after a batch count tick."""
    worker = fleet.workers[name]
    deadline = time.monotonic() + timeout
    last = _batches(worker)
    while time.monotonic() < deadline:
        now = _batches(worker)
        if last >= 1 and now > last:  # it has just finished a batch and has more reserved: kill now
            break
        last = now
        time.sleep(0.02)
    else:
        raise TimeoutError(f"{name} ran no batch in {timeout:.0f} s\n{fleet.logs()}")
    unacked = fleet.client.redis.hlen("unacked")  # delivered and not yet acknowledged, fleet-wide
    fleet.kill_worker(name)
    return {"at_request": load.progress(), "batches_run_by_victim": int(now), "unacked_in_broker": int(unacked)}


@pytest.fixture(scope="module")
def kill_fleet(redis_server, postgres_server, chaos_checkpoint, tmp_path_factory):
    """Two detection workers on PostgreSQL whose broker redelivers a dead worker's messages in seconds."""
    import redis as redis_lib

    broker = redis_server.url_for(8)
    redis_lib.Redis.from_url(broker).flushdb()
    db_name = f"chaos_kill_{uuid.uuid4().hex[:10]}"
    db_url = postgres_server.create_database(db_name)
    fleet = FleetRun(tmp_path_factory.mktemp("kill"), db_url=db_url, broker_url=broker, checkpoint=chaos_checkpoint,
                     worker_app="tests.chaos.redelivery_app",
                     worker_env={"UMCD_TEST_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S)})
    try:
        yield fleet.start(("w1", "w2"))
    finally:
        fleet.close()
        postgres_server.drop_database(db_name)


def test_a_message_lost_between_broker_pop_and_worker_is_sent_again_from_the_ledger(kill_fleet, query_pngs):
    """A worker killed right after BRPOP takes the message with it (kombu lists it as unacknowledged
    only after the pop): the request ledger re-sends it and the request gets its one verdict."""
    from workers.ledger import LEDGER_KEY, listed

    fleet = kill_fleet
    control = fleet.client.app.control
    control.cancel_consumer("detect", reply=True, timeout=5)
    try:
        rid = fleet.client.submit_query(query_pngs[0], client="ledger-test")
        assert rid in listed(fleet.client.redis)
        popped = fleet.client.redis.rpop("detect")  # what the dying worker's BRPOP took
        assert popped is not None and rid.encode() in popped
        assert fleet.client.redis.llen("detect") == 0 and fleet.client.redis.hlen("unacked") == 0
    finally:
        control.add_consumer("detect", reply=True, timeout=5)
    rows = wait_for_verdicts(fleet.db_url, [rid], timeout=4 * VISIBILITY_TIMEOUT_S + 30)
    assert len(rows[rid]) == 1, f"the popped message was never answered\n{fleet.logs()}"
    assert rows[rid][0]["verdict"] in ("benign", "adversarial")
    result = fleet.client.wait([rid], timeout=30)
    assert result[rid].verdict == rows[rid][0]["verdict"]
    deadline = time.monotonic() + 10
    while rid in listed(fleet.client.redis) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fleet.client.redis.zscore(LEDGER_KEY, rid) is None  # struck off once answered
    assert "re-sent 1 message(s) the broker lost" in fleet.all_logs()


def test_sigkill_of_a_worker_mid_batch_three_times_loses_and_duplicates_nothing(kill_fleet, query_pngs, figures):
    fleet = kill_fleet
    db_url = fleet.db_url
    load = SteadyLoad(fleet.settings, query_pngs, N_REQUESTS, RATE_PER_S, insert_every=INSERT_EVERY)
    try:
        version = fleet.published.model_version
        resent_before = _resent(fleet)
        load.start()
        kills = []
        for k in range(KILLS):
            kills.append(_kill_mid_batch(fleet, "w1", load))
            fleet.start_worker("w1")  # w2 carries the load while w1 starts again
        load.join(120)
        assert load.error is None, load.error
        assert not load.refused, load.refused[:3]
        assert all(k["at_request"] < N_REQUESTS for k in kills), f"a kill came after the load ended: {kills}"
        fleet.wait_ready(timeout=120)

        ids = load.ids
        wait_for_verdicts(db_url, ids, timeout=180, settle=VISIBILITY_TIMEOUT_S + 2)
        audit = verdict_audit(db_url, ids)

        # messages that reached more than one worker incarnation: the kills did interrupt work
        received = Counter(m.group(2) for m in _RECEIVED.finditer(fleet.all_logs()))
        redelivered = sum(1 for rid in ids if received[rid] > 1)

        # the index: database images, index_log and replicas agree (no half-done insertion)
        consistency = index_consistency(db_url, version)
        sizes = {}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            sizes = {n: w.metrics().get("umcd_index_size") for n, w in fleet.workers.items()}
            if all(s == consistency["active_images"] for s in sizes.values()):
                break
            time.sleep(0.2)
        results = fleet.client.wait([r["request_id"] for r in load.sent if r["kind"] == "insert"], timeout=30)
        accepted = {r.image_id for r in results.values() if r.verdict == "benign"}

        figures.update({
            "requests_sent": len(ids), "queries": sum(r["kind"] == "query" for r in load.sent),
            "insertions": sum(r["kind"] == "insert" for r in load.sent), "kills": kills,
            "verdict_rows": audit["verdict_rows"], "lost": len(audit["lost"]),
            "duplicated": len(audit["duplicated"]), "store_duplicates": audit["store_duplicates"],
            "redelivered_after_kill": redelivered, "verdicts": audit["verdicts"],
            "resent_from_ledger": _resent(fleet) - resent_before,
            "audit_store": "postgresql", "index": {k: v if isinstance(v, int) else len(v)
                                                   for k, v in consistency.items() if k != "active_ids"},
            "replica_sizes": sizes,
        })
        assert not audit["lost"], f"{len(audit['lost'])} requests have no verdict row\n{fleet.logs()}"
        assert not audit["duplicated"], audit["duplicated"][:5]
        assert not any(audit["store_duplicates"].values()), audit["store_duplicates"]
        assert audit["verdict_rows"] == N_REQUESTS
        assert redelivered > 0, "no message was redelivered: the kills interrupted nothing"
        for key in ("active_without_add", "log_without_image", "log_not_active", "replica_vs_active",
                    "code_mismatch"):
            assert consistency[key] == [], (key, consistency[key][:10])
        assert all(s == consistency["active_images"] for s in sizes.values()), (sizes, consistency["active_images"])
        benign_inserts = [r for r in results.values() if r.verdict == "benign"]
        assert len(results) == len(accepted) + sum(r.verdict != "benign" for r in results.values())
        assert benign_inserts and len(accepted) == len(benign_inserts)  # one image per accepted insertion
        assert accepted <= set(consistency["active_ids"])
    finally:
        load.stopping.set()
        load.join(30)


def test_sigkill_mid_batch_of_pixel_array_messages_loses_and_duplicates_nothing_and_frees_every_array(
        kill_fleet, query_pngs, figures):
    """Pixel arrays in flight when a worker dies: its messages come back with their arrays (an array goes
    only once its message is answered), every request gets one verdict row, and no array is left behind."""
    import io

    import numpy as np
    from PIL import Image

    from producers.sdk import DEFAULT_BATCH_SIZE

    fleet = kill_fleet
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in query_pngs[:400]])
    pixels = np.concatenate([pixels] * 4)  # 1,600 images: 7 messages of up to 256 (the SDK's default)
    ids = [f"chaos-array-{uuid.uuid4().hex[:8]}-{i}" for i in range(len(pixels))]

    class Sent:  # what _kill_mid_batch reads of a load
        @staticmethod
        def progress() -> int:
            return len(ids)

    resent_before = _resent(fleet)
    assert fleet.client.submit_queries(pixels, request_ids=ids, client="chaos-array") == ids
    kill = _kill_mid_batch(fleet, "w1", Sent)
    fleet.start_worker("w1")
    fleet.wait_ready(timeout=120)
    wait_for_verdicts(fleet.db_url, ids, timeout=180, settle=VISIBILITY_TIMEOUT_S + 2)
    audit = verdict_audit(fleet.db_url, ids)
    received = Counter(m.group(1) for m in re.finditer(r"Task umcd\.detect_batch\[([0-9a-f]{32})\] received",
                                                       fleet.all_logs()))
    deadline = time.monotonic() + 30
    while (left := list(fleet.client.redis.scan_iter("umcd:img:*"))) and time.monotonic() < deadline:
        time.sleep(0.2)
    figures.update({"requests_sent": len(ids), "messages": -(-len(ids) // DEFAULT_BATCH_SIZE), "kill": kill,
                    "verdict_rows": audit["verdict_rows"], "lost": len(audit["lost"]),
                    "duplicated": len(audit["duplicated"]), "verdicts": audit["verdicts"],
                    "batch_messages_received_more_than_once": sum(n > 1 for n in received.values()),
                    "resent_from_ledger": _resent(fleet) - resent_before, "arrays_left": len(left)})
    assert not audit["lost"], f"{len(audit['lost'])} requests have no verdict row\n{fleet.logs()}"
    assert not audit["duplicated"], audit["duplicated"][:5]
    assert audit["verdict_rows"] == len(ids) and "invalid_input" not in audit["verdicts"]
    assert any(n > 1 for n in received.values()), "no batch message was redelivered: the kill interrupted nothing"
    assert left == [], f"{len(left)} pixel arrays were never deleted"
