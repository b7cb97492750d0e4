"""Load: 10,000 requests sent as fast as the SDK can, through two detection workers: 0 errors, 0 lost, figures in JSON."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from db.repo import as_datetime
from producers.sdk import DEFAULT_BATCH_SIZE
from tests.fleet_helpers import FleetRun, verdict_audit, wait_for_verdicts

pytestmark = [pytest.mark.load, pytest.mark.integration, pytest.mark.timeout(420)]

N_REQUESTS = 10_000
#: every 10th request is an insertion; the others are queries
INSERT_EVERY = 10
PRODUCER_THREADS = 2
#: the fleet's fastest path: the SDK's batch messages (umcd.detect_batch / umcd.screen_batch), each image
#: still its own request id, verdict row and Result; one image per message runs ~3x slower here
BATCH = True


def _percentiles(values, qs=(50, 90, 99, 99.9)) -> dict[str, float]:
    a = np.asarray([v for v in values if v is not None], dtype=float)
    out = {f"p{q:g}": round(float(np.percentile(a, q)), 1) for q in qs}
    out["max"] = round(float(a.max()), 1)
    out["mean"] = round(float(a.mean()), 1)
    return out


def _produce(fleet: FleetRun, images: list[bytes], start: int, stop: int, out: list[list[str]]) -> None:
    """Send requests ``start..stop-1`` as fast as the broker takes them, in chunks of 100 over one connection."""
    from producers.sdk import Client

    ids: list[str] = []
    with Client(fleet.settings) as client:
        for chunk in range(start, stop, 100):
            idx = range(chunk, min(chunk + 100, stop))
            queries = [images[i % len(images)] for i in idx if i % INSERT_EVERY]
            inserts = [images[i % len(images)] for i in idx if i % INSERT_EVERY == 0]
            ids += client.submit_queries(queries, client="load", batch=BATCH)
            if inserts:
                ids += client.submit_inserts(inserts, source="load", client="load", batch=BATCH)
    out.append(ids)


def test_10000_requests_at_full_speed_end_with_10000_verdict_rows_and_no_error(
        redis_server, chaos_checkpoint, query_pngs, tmp_path, figures):
    import redis as redis_lib

    broker = redis_server.url_for(7)
    redis_lib.Redis.from_url(broker).flushdb()
    fleet = FleetRun(tmp_path, db_url=f"sqlite:///{tmp_path / 'audit.db'}", broker_url=broker,
                     checkpoint=chaos_checkpoint, concurrency=64, prefetch_multiplier=2,
                     worker_env={"UMCD_BATCH_MAX_SIZE": "64"})
    with fleet:
        fleet.start(("w1", "w2"))
        parts: list[list[str]] = []
        bounds = np.linspace(0, N_REQUESTS, PRODUCER_THREADS + 1).astype(int)
        producers = [threading.Thread(target=_produce, args=(fleet, query_pngs, int(a), int(b), parts))
                     for a, b in zip(bounds[:-1], bounds[1:])]
        t0 = time.time()
        for p in producers:
            p.start()
        for p in producers:
            p.join(120)
        sent_s = time.time() - t0
        ids = [rid for part in parts for rid in part]
        assert len(ids) == N_REQUESTS, f"the producers sent {len(ids)} of {N_REQUESTS}"

        rows = wait_for_verdicts(fleet.db_url, ids, timeout=300, settle=1.0)
        results = fleet.client.wait(ids, timeout=60)
        audit = verdict_audit(fleet.db_url, ids)
        flat = [r[0] for r in rows.values() if r]
        done = sorted(as_datetime(r["created_at"]).timestamp() for r in flat)
        errors = [rid for rid in ids if rid not in results or results[rid].verdict not in ("benign", "adversarial")]
        # held throughput: verdicts per second between the 10th and the 90th percentile of completions
        lo, hi = done[len(done) // 10], done[(len(done) * 9) // 10]
        held = (len(done) * 8 // 10) / (hi - lo) if hi > lo else None
        sizes = np.array([r["batch_size"] for r in flat])
        figures.update({
            "requests_sent": len(ids), "verdict_rows": audit["verdict_rows"], "lost": len(audit["lost"]),
            "duplicated": len(audit["duplicated"]), "store_duplicates": audit["store_duplicates"],
            "errors": len(errors), "verdicts": audit["verdicts"], "workers": 2,
            "producer_send_s": round(sent_s, 1),
            "wall_s": round(done[-1] - t0, 1),
            "overall_throughput_per_s": round(len(done) / (done[-1] - t0), 1),
            "held_throughput_per_s": round(held, 1) if held else None,
            "latency_total_ms": _percentiles(r["latency_total_ms"] for r in flat),
            "latency_queue_ms": _percentiles(r["latency_queue_ms"] for r in flat),
            "latency_in_worker_ms": _percentiles(r["latency_total_ms"] - r["latency_queue_ms"] for r in flat),
            "submission": f"batch messages of up to {DEFAULT_BATCH_SIZE} images" if BATCH else "one image per message",
            "latency_model_ms_per_batch": _percentiles(r["latency_model_ms"] for r in flat),
            "batch_size": {"mean": round(float(sizes.mean()), 1), "max": int(sizes.max())},
            "served_by": {w: int(sum(1 for r in flat if r["worker"].startswith(w + "@"))) for w in fleet.workers},
        })
        assert not audit["lost"], f"{len(audit['lost'])} requests without a verdict row\n{fleet.logs()}"
        assert not audit["duplicated"] and not any(audit["store_duplicates"].values()), audit["store_duplicates"]
        assert audit["verdict_rows"] == N_REQUESTS
        assert errors == [], f"{len(errors)} requests without a successful result, e.g. {errors[:3]}"
        assert all(w.alive() for w in fleet.workers.values()), fleet.logs()
