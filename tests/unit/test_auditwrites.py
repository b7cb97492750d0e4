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
