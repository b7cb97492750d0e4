"""The fleet serves the detector UMCD_DETECTOR names (umcd-trust-input: real redis-server, a Celery worker, SQLite audit store)."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from tests.fleet_helpers import FleetRun, digits_query_pngs, trained_checkpoint, wait_for_verdicts

DETECTOR = "umcd-trust-input"
REDIS_DB = 14
N_QUERIES, N_INSERTS = 24, 4
#: the deployment secret given to the worker: it must never appear in its log
SECRET = f"trust-test-{secrets.token_hex(8)}"

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def fleet(redis_server, tmp_path_factory):
    """The small test model published with UMCD_DETECTOR=umcd-trust-input and one detection worker set alike."""
    import redis as redis_lib

    checkpoint = trained_checkpoint(tmp_path_factory)
    broker = redis_server.url_for(REDIS_DB)
    redis_lib.Redis.from_url(broker).flushdb()
    artifacts = tmp_path_factory.mktemp("fleet-detector-choice")
    run = FleetRun(artifacts, db_url=f"sqlite:///{artifacts / 'audit.db'}", broker_url=broker, checkpoint=checkpoint,
                   worker_env={"UMCD_DETECTOR": DETECTOR, "UMCD_DETECTOR_SECRET": SECRET}, concurrency=8,
                   detector=DETECTOR)
    with run:
        run.start(names=("w1",))
        yield run


def test_publish_builds_the_feature_reference_where_workers_look_for_it(fleet):
    from core.extensions import FeatureReference, reference_path
    from db import repo
    from db.session import session_scope

    published = fleet.published
    expected = reference_path(fleet.artifacts, published.model_version).resolve()
    assert published.detector == DETECTOR and published.reference_path == str(expected)
    assert expected.is_file() and len(FeatureReference.load(expected)) == published.n_reference > 0
    assert "trust@in" in published.thresholds
    with session_scope(fleet.db_url) as s:
        cal = repo.active_calibration(s, published.model_version, DETECTOR)
        assert cal.id == published.calibration_id and cal.meta["reference"] == str(expected)


def test_every_verdict_row_records_umcd_trust_input_and_its_input_space_trust_score(fleet):
    pngs = digits_query_pngs()
    client = fleet.client
    query_ids = client.submit_queries(pngs[:N_QUERIES], client="detector-choice")
    insert_ids = client.submit_inserts(pngs[N_QUERIES : N_QUERIES + N_INSERTS], source="detector-choice", label=1,
                                       client="detector-choice")
    invalid_id = fleet.send("umcd.detect", b"this is not an image")
    all_ids = query_ids + insert_ids + [invalid_id]

    results = client.wait(all_ids, timeout=180)
    assert set(results) == set(all_ids), fleet.logs()
    scored = [results[rid] for rid in query_ids + insert_ids]
    assert results[invalid_id].verdict == "invalid_input"
    assert sum(r.verdict == "benign" for r in scored) > 0
    for r in results.values():
        assert r.detector == DETECTOR and r.calibration_id == fleet.published.calibration_id
    for r in scored:
        assert r.verdict in ("benign", "adversarial"), r
        assert set(r.scores) >= {"c1", "c2", "c3", "trust@in"} and set(r.thresholds) == {"c1", "c2", "c3", "trust@in"}
        assert set(r.fired) <= set(r.thresholds) and (r.verdict == "adversarial") == bool(r.fired)
        if "trust@in" in r.fired:
            assert r.scores["trust@in"] > r.thresholds["trust@in"]

    rows = wait_for_verdicts(fleet.db_url, all_ids, timeout=60)
    assert all(len(r) == 1 for r in rows.values()), {k: len(v) for k, v in rows.items() if len(v) != 1}
    for rid, (row,) in rows.items():
        assert row["detector"] == DETECTOR, row
        assert row["model_version"] == fleet.published.model_version
        if rid != invalid_id:
            assert "trust@in" in row["thresholds"] and set(row["fired"]) <= set(row["thresholds"])
            assert row["fired"] == results[rid].fired
            assert row["extra_scores"] == {"trust@in": pytest.approx(results[rid].scores["trust@in"])}
    for rid in insert_ids:
        assert (rows[rid][0]["image_id"] is not None) == (results[rid].verdict == "benign")

    log = fleet.all_logs()
    assert f"({DETECTOR}, " in log  # "serving model <version> with calibration <id> (umcd-trust-input, ...)"
    assert SECRET not in log
    assert Path(fleet.published.reference_path).is_file()
