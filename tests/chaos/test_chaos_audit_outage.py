"""Chaos: PostgreSQL stops for 20 s under load; verdict writes retry with back-off and every request ends with one row."""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest

from tests.fleet_helpers import FleetRun, SteadyLoad, index_consistency, verdict_audit, wait_for_verdicts
from tests.servers import PostgresServer, postgres_bin_dir

pytestmark = [
    pytest.mark.chaos, pytest.mark.integration, pytest.mark.timeout(360),
    pytest.mark.skipif(postgres_bin_dir() is None, reason="PostgreSQL is not installed: run `make services`"),
]

N_REQUESTS = 700
RATE_PER_S = 20.0
OUTAGE_S = 20.0

#: Celery's line for each retry it schedules (the task raised Retry: a new message, then the ack)
_RETRY = re.compile(r"Task umcd\.\w+\[([0-9a-f]{32})\] retry: Retry in")


def test_a_20_s_postgresql_outage_under_load_loses_nothing_and_acks_nothing_unstored(
        redis_server, chaos_checkpoint, query_pngs, tmp_path, figures):
    import redis as redis_lib

    broker = redis_server.url_for(9)
    redis_lib.Redis.from_url(broker).flushdb()
    pg = PostgresServer()  # its own cluster (under /tmp: the postgres user must reach it)
    # the production worker app: a message comes back only through Celery's retry, never a fast redelivery
    fleet = FleetRun(tmp_path, db_url=pg.url, broker_url=broker, checkpoint=chaos_checkpoint)
    load = SteadyLoad(fleet.settings, query_pngs, N_REQUESTS, RATE_PER_S, insert_every=5)
    try:
        fleet.start(("w1", "w2"))
        load.start()
        while load.progress() < 5 * RATE_PER_S and load.is_alive():
            time.sleep(0.05)
        t_down = time.monotonic()
        pg.stop(mode="fast")
        sent_at_stop = load.progress()
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - t_down)))
        pg.start()
        t_up = time.monotonic()
        load.join(120)
        assert load.error is None and not load.refused, (load.error, load.refused[:2])

        ids = load.ids
        during = [r["request_id"] for r in load.sent if t_down <= r["at"] <= t_up]
        rows = wait_for_verdicts(fleet.db_url, ids, timeout=150, settle=2.0)
        audit = verdict_audit(fleet.db_url, ids)
        results = fleet.client.wait(ids, timeout=60)
        errors = [rid for rid in ids if rid not in results or results[rid].verdict not in ("benign", "adversarial")]
        retries = Counter(m.group(1) for m in _RETRY.finditer(fleet.all_logs()))
        consistency = index_consistency(fleet.db_url, fleet.published.model_version)
        sizes = {}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            sizes = {n: w.metrics().get("umcd_index_size") for n, w in fleet.workers.items()}
            if all(s == consistency["active_images"] for s in sizes.values()):
                break
            time.sleep(0.2)
        waited = sorted(r[0]["latency_total_ms"] / 1000.0 for rid, r in rows.items() if rid in during and r)
        figures.update({
            "requests_sent": len(ids), "sent_during_outage": len(during), "sent_before_outage": sent_at_stop,
            "outage_s": round(t_up - t_down, 1), "verdict_rows": audit["verdict_rows"], "lost": len(audit["lost"]),
            "duplicated": len(audit["duplicated"]), "store_duplicates": audit["store_duplicates"],
            "errors": len(errors), "requests_retried": len(retries),
            "most_retries_of_one_request": max(retries.values(), default=0), "verdicts": audit["verdicts"],
            "outage_requests_answer_s": {"median": round(waited[len(waited) // 2], 1) if waited else None,
                                         "max": round(waited[-1], 1) if waited else None},
            "index": {k: v if isinstance(v, int) else len(v) for k, v in consistency.items() if k != "active_ids"},
            "replica_sizes": sizes, "audit_store": "postgresql",
        })
        assert during, "no request was sent while PostgreSQL was down"
        assert retries, "no verdict write was retried: the outage did not hit the workers"
        assert not audit["lost"], f"{len(audit['lost'])} requests have no verdict row\n{fleet.logs()}"
        assert not audit["duplicated"] and not any(audit["store_duplicates"].values()), audit["store_duplicates"]
        assert audit["verdict_rows"] == N_REQUESTS
        # a task that gave up would be acknowledged without its verdict stored: none did
        assert errors == [], f"{len(errors)} requests failed instead of retrying, e.g. {errors[:3]}"
        for key in ("active_without_add", "log_without_image", "log_not_active", "replica_vs_active",
                    "code_mismatch"):
            assert consistency[key] == [], (key, consistency[key][:10])
        assert all(s == consistency["active_images"] for s in sizes.values()), sizes
        assert all(w.alive() for w in fleet.workers.values()), fleet.logs()
    finally:
        load.stopping.set()
        load.join(30)
        fleet.close()
        pg.cleanup()
