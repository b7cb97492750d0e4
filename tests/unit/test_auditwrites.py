"""Multi-row request and verdict writes: the same rows as the one-row repository functions, idempotent on request id."""

from __future__ import annotations

import time

import pytest

from db import repo
from db.session import session_scope
from workers.auditwrites import record_requests, write_verdicts


def _request(rid: str, **extra) -> dict:
    return {"request_id": rid, "kind": "query", "client": "c", "source": None, "label": None, "image_bytes": 123,
            "image_ref": {"inline": "..."}, "submitted_at": time.time() - 0.5, "received_at": time.time(), **extra}


def _verdict(rid: str, verdict: str = "benign", **extra) -> dict:
    result = {"request_id": rid, "kind": "query", "verdict": verdict, "reasons": [] if verdict == "benign" else ["x"],
              "fired": [] if verdict == "benign" else ["c2"], "scores": {"c1": 1.5, "c2": 9.0, "c3": 0.25,
                                                                         "combined": 0.1},
              "thresholds": {"c1": 3.0, "c2": 2.0, "c3": 1.0}, "topk": {"ids": [4, 2], "distances": [0, 3]},
              "image_id": None, "model_version": "abc", "calibration_id": 1, "detector": "umcd", "batch_size": 2,
              "latency_ms": {"queue": 1.0, "model": 2.0, "search": 0.5, "total": 4.0}, "worker": "w@h"}
    fields = repo.verdict_fields_from_result(result)
    fields.update(extra)
    return fields


def test_bulk_rows_equal_the_rows_the_one_row_functions_write(db_url):
    with session_scope(db_url) as s:
        repo.record_request(s, **_request("one"))
        repo.write_verdict(s, **_verdict("one", "adversarial"))
        record_requests(s, [_request("bulk-a"), _request("bulk-b", image_ref="redis_key")])
        assert write_verdicts(s, [_verdict("bulk-a", "adversarial"), _verdict("bulk-b")]) == {"bulk-a", "bulk-b"}
    with session_scope(db_url) as s:
        ignore = {"id", "request_id", "created_at", "received_at", "submitted_at"}
        one = {k: v for k, v in repo.row_dict(repo.get_verdict(s, "one")).items() if k not in ignore}
        bulk = {k: v for k, v in repo.row_dict(repo.get_verdict(s, "bulk-a")).items() if k not in ignore}
        assert bulk == one
        assert repo.request_record(s, "bulk-b")["request"]["image_ref"] == "redis_key"
        assert repo.request_record(s, "bulk-a")["request"]["image_ref"] == "inline"


def test_a_second_bulk_write_keeps_the_first_verdicts_and_reports_only_new_request_ids(db_url):
    with session_scope(db_url) as s:
        record_requests(s, [_request("r1"), _request("r2")])
        assert write_verdicts(s, [_verdict("r1"), _verdict("r2")]) == {"r1", "r2"}
    with session_scope(db_url) as s:
        record_requests(s, [_request("r1", client="other"), _request("r3")])
        assert write_verdicts(s, [_verdict("r1", "adversarial"), _verdict("r3", "adversarial")]) == {"r3"}
    with session_scope(db_url) as s:
        assert repo.get_verdict(s, "r1").verdict == "benign"
        assert repo.request_record(s, "r1")["request"]["client"] == "c"
        assert repo.count_verdicts_per_request(s) == {"r1": 1, "r2": 1, "r3": 1}


def test_bad_verdicts_are_refused_before_anything_is_written(db_url):
    with session_scope(db_url) as s:
        with pytest.raises(ValueError, match="bad verdict"):
            write_verdicts(s, [_verdict("ok"), _verdict("bad", "maybe")])
        with pytest.raises(TypeError, match="unknown verdict fields"):
            write_verdicts(s, [_verdict("ok", colour="blue")])
        assert write_verdicts(s, []) == set()
    with session_scope(db_url) as s:
        assert repo.get_verdict(s, "ok") is None


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sqlite_rows_hold_the_same_bytes_as_sqlalchemys_own_insert_also_across_statements(db_url):
    """SQLite takes a text statement with each column's bind processor; the stored values must be those of
    SQLAlchemy's ``insert()`` (JSON, None as JSON null, datetimes in UTC), and so must RETURNING's ids
    when SQLite's variable limit splits the rows into several statements."""
    import sqlite3
    from datetime import datetime, timedelta, timezone

    from db.models import Request, Verdict
    from workers import auditwrites

    def fields(rid: str, n: int) -> tuple[dict, dict]:
        when = datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=timezone(timedelta(hours=2)))
        request = _request(rid, client="ünï", submitted_at=when if n % 2 else 1_700_000_000.25,
                           received_at=when.replace(tzinfo=None) if n % 2 else 1_700_000_001.5)
        verdict = _verdict(rid, "adversarial" if n % 3 else "benign", thresholds=None if n % 2 else {"c1": 1.0},
                           topk=None if n == 4 else {"ids": [n, 7], "distances": [0, 2]}, image_id=n or None,
                           extra_scores={"trust@in": 0.5 * n} if n % 2 else None, created_at=when)
        return request, verdict

    def columns(table) -> list[str]:
        return [c.key for c in table.columns if c.key not in ("id", "request_id")]

    with session_scope(db_url) as s:
        driver = s.connection().connection.driver_connection
        old = driver.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 50)  # 2 verdict rows per statement
        try:
            pairs = [fields(f"fast-{n}", n) for n in range(5)]
            record_requests(s, [r for r, _ in pairs])
            assert write_verdicts(s, [v for _, v in pairs]) == {f"fast-{n}" for n in range(5)}
            again = [fields(f"fast-{n}", n) for n in (1, 5, 3, 6)]  # two already there, two new
            assert write_verdicts(s, [v for _, v in again]) == {"fast-5", "fast-6"}
        finally:
            driver.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, old)
        # the same rows through SQLAlchemy's insert().on_conflict_do_nothing(), as PostgreSQL writes them
        pairs = [fields(f"orm-{n}", n) for n in range(5)]
        requests = []
        for request, _ in pairs:
            row = {k: request.get(k) for k in auditwrites._REQUEST_COLUMNS}
            row.update(image_ref="inline", submitted_at=repo.as_datetime(request["submitted_at"]),
                       received_at=repo.as_datetime(request["received_at"]))
            requests.append(row)
        auditwrites._generic_insert(s, Request.__table__, requests)
        verdicts = [{k: v.get(k) for k in auditwrites._VERDICT_COLUMNS} for _, v in pairs]
        assert set(auditwrites._generic_insert(s, Verdict.__table__, verdicts, returning="request_id")) == {
            f"orm-{n}" for n in range(5)}
    raw = sqlite3.connect(db_url.removeprefix("sqlite:///"))
    try:
        for table in (Verdict.__table__, Request.__table__):
            cols = ", ".join(columns(table))
            for n in range(5):
                fast = raw.execute(f"SELECT {cols} FROM {table.name} WHERE request_id = ?", (f"fast-{n}",)).fetchone()
                orm = raw.execute(f"SELECT {cols} FROM {table.name} WHERE request_id = ?", (f"orm-{n}",)).fetchone()
                assert fast == orm and fast is not None, (table.name, n)
        stored = dict(raw.execute("SELECT request_id, thresholds FROM verdicts WHERE request_id IN ('fast-1', 'fast-2')"))
        assert stored == {"fast-1": "null", "fast-2": '{"c1":1.0}'}  # None is JSON null, as SQLAlchemy stores it (orjson: compact)
        assert raw.execute("SELECT count(*) FROM verdicts").fetchone() == (12,)
    finally:
        raw.close()


def test_an_extension_detectors_other_scores_are_kept_in_the_row_and_come_back_in_its_result(db_url):
    from db.contract import result_from_verdict

    result = {"request_id": "ext-1", "kind": "query", "verdict": "adversarial", "reasons": ["trust@in fired"],
              "fired": ["trust@in"], "scores": {"c1": 1.5, "c2": 9.0, "c3": 0.25, "trust@in": 4.5, "combined": 2.0},
              "thresholds": {"c1": 3.0, "c2": 2.0, "c3": 1.0, "trust@in": 4.0}, "topk": None, "image_id": None,
              "model_version": "abc", "calibration_id": 1, "detector": "umcd-trust-input", "batch_size": 2,
              "latency_ms": {"queue": 1.0, "model": 2.0, "search": 0.5, "total": 4.0}, "worker": "w@h"}
    fields = repo.verdict_fields_from_result(result)
    assert fields["extra_scores"] == {"trust@in": 4.5}
    assert repo.verdict_fields_from_result({**result, "scores": {"c1": 1.0}})["extra_scores"] is None
    with session_scope(db_url) as s:
        record_requests(s, [_request("ext-1")])
        assert write_verdicts(s, [fields]) == {"ext-1"}
    with session_scope(db_url) as s:
        row = repo.row_dict(repo.get_verdict(s, "ext-1"))
    assert row["extra_scores"] == {"trust@in": 4.5}
    assert result_from_verdict(row)["scores"] == result["scores"]
