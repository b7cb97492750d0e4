"""The audit store on SQLite: idempotent writes, atomic insertions, the index log, migrations, audit queries, CLI."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest
import typer
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner

from db import repo
from db.migrate import current_revision, downgrade, head_revision, upgrade
from db.models import Base, DbImage, ImageCode, IndexLog, ModelVersion, Request, Verdict
from db.session import create_engine_for, dispose_engine, make_engine, normalize_url, session_scope
from umcd.settings import get_settings, redact_url

ROOT = Path(__file__).resolve().parents[2]
CODE_A = bytes(range(8))  # a packed 64-bit code
CODE_B = bytes(range(8, 16))


@pytest.fixture
def url(tmp_path):
    """A fresh, migrated SQLite audit store."""
    u = f"sqlite:///{tmp_path / 'audit.db'}"
    upgrade(u)
    yield u
    dispose_engine(u)


@pytest.fixture
def engine(url):
    return make_engine(url)


def _count(engine, model) -> int:
    with session_scope(engine) as s:
        return s.execute(select(func.count()).select_from(model)).scalar_one()


def _verdict(request_id: str, verdict: str = "benign", **extra) -> dict:
    fields = dict(request_id=request_id, kind="query", verdict=verdict, c1=1.0, c2=5.0, c3=2.0)
    fields.update(extra)
    return fields


# --------------------------------------------------------------------------- requests and verdicts


def test_write_verdict_twice_keeps_one_row_and_the_first_verdict(engine):
    with session_scope(engine) as s:
        assert repo.write_verdict(s, **_verdict("r-1", "adversarial", fired=["c1"])) is True
    with session_scope(engine) as s:
        assert repo.write_verdict(s, **_verdict("r-1", "benign")) is False
    with session_scope(engine) as s:
        row = repo.get_verdict(s, "r-1")
        assert row.verdict == "adversarial" and row.fired == ["c1"]
    assert _count(engine, Verdict) == 1


def test_write_verdict_rejects_unknown_fields_and_values_outside_the_contract(engine):
    with session_scope(engine) as s:
        with pytest.raises(TypeError, match="unknown verdict fields"):
            repo.write_verdict(s, **_verdict("r-1"), colour="red")
        with pytest.raises(ValueError, match="verdict must be one of"):
            repo.write_verdict(s, **_verdict("r-1", "maybe"))
        with pytest.raises(ValueError, match="kind must be one of"):
            repo.write_verdict(s, **_verdict("r-1", kind="delete"))
        with pytest.raises(ValueError, match="longer than 64"):
            repo.write_verdict(s, **_verdict("x" * 65))
    assert _count(engine, Verdict) == 0


def test_verdict_fields_from_result_maps_the_contract_result_onto_columns(engine):
    result = {
        "request_id": "r-7", "kind": "insert", "verdict": "benign", "reasons": [], "fired": [],
        "scores": {"c1": 3.5, "c2": 12.0, "c3": 1.25, "combined": 0.2},
        "thresholds": {"c1": 9.0, "c2": 4.0, "c3": 6.0},
        "topk": {"ids": [4, 2], "distances": [3, 5]}, "image_id": 42, "model_version": "0123456789ab",
        "calibration_id": 3, "detector": "umcd", "batch_size": 16, "worker": "gpu0@host",
        "latency_ms": {"queue": 1.0, "model": 2.0, "search": 0.5, "total": 4.0},
    }
    with session_scope(engine) as s:
        assert repo.write_verdict(s, **repo.verdict_fields_from_result(result))
    with session_scope(engine) as s:
        row = repo.get_verdict(s, "r-7")
    assert (row.c1, row.c2, row.c3, row.combined) == (3.5, 12.0, 1.25, 0.2)
    assert (row.latency_queue_ms, row.latency_model_ms, row.latency_search_ms, row.latency_total_ms) == (1.0, 2.0, 0.5, 4.0)
    assert row.topk == {"ids": [4, 2], "distances": [3, 5]} and row.thresholds["c2"] == 4.0
    assert (row.image_id, row.calibration_id, row.batch_size, row.worker) == (42, 3, 16, "gpu0@host")
    assert row.created_at.tzinfo is not None


def test_record_request_is_idempotent_and_keeps_the_ref_kind_and_utc_times(engine):
    with session_scope(engine) as s:
        assert repo.record_request(
            s, "r-1", "insert", client="sdk", source="cam-3", label=7, image_bytes=1234,
            image_ref={"redis_key": "umcd:img:r-1"}, submitted_at=1_700_000_000.5,
        )
        assert not repo.record_request(s, "r-1", "insert", client="other")
    with session_scope(engine) as s:
        row = s.get(Request, "r-1")
    assert (row.client, row.source, row.label, row.image_bytes, row.image_ref) == ("sdk", "cam-3", 7, 1234, "redis_key")
    assert row.submitted_at == datetime.fromtimestamp(1_700_000_000.5, tz=timezone.utc)
    assert row.received_at.tzinfo is not None
    assert _count(engine, Request) == 1


def test_threads_writing_the_same_request_ids_leave_exactly_one_row_each(engine):
    ids = [f"req-{i}" for i in range(40)]
    inserted = []
    errors = []
    barrier = threading.Barrier(4)

    def writer(worker: int) -> None:
        try:
            barrier.wait()
            order = ids if worker % 2 == 0 else list(reversed(ids))
            for rid in order:
                with session_scope(engine) as s:
                    repo.record_request(s, rid, "query")
                    inserted.append(repo.write_verdict(s, **_verdict(rid, worker=f"w{worker}")))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(inserted) == len(ids) and len(inserted) == 4 * len(ids)
    with session_scope(engine) as s:
        assert repo.count_verdicts_per_request(s) == {rid: 1 for rid in ids}
        assert repo.duplicates(s) == {"verdicts": [], "db_images": [], "index_log": []}


# --------------------------------------------------------------------------- database images and the index log


def test_insert_database_image_writes_image_code_and_add_log_row(engine):
    with session_scope(engine) as s:
        image_id = repo.insert_database_image(s, "ins-1", CODE_A, "mv1", source="cam", label=3, image_path="/img/1.png")
    with session_scope(engine) as s:
        image = repo.get_image(s, image_id)
        assert (image.request_id, image.status, image.label, image.image_path) == ("ins-1", "active", 3, "/img/1.png")
        assert s.get(ImageCode, (image_id, "mv1")).code == CODE_A
        assert repo.read_index_log(s, 0, "mv1") == [(1, "add", image_id, CODE_A)]


def test_redelivered_insertion_returns_the_same_id_and_writes_no_second_log_row(engine):
    with session_scope(engine) as s:
        first = repo.insert_database_image(s, "ins-1", CODE_A, "mv1")
    with session_scope(engine) as s:
        again = repo.insert_database_image(s, "ins-1", CODE_B, "mv1")
    assert again == first
    assert (_count(engine, DbImage), _count(engine, ImageCode), _count(engine, IndexLog)) == (1, 1, 1)
    with session_scope(engine) as s:
        assert s.get(ImageCode, (first, "mv1")).code == CODE_A


def test_insertion_that_fails_midway_leaves_no_image_code_or_log_row(engine):
    with pytest.raises(IntegrityError):
        with session_scope(engine) as s:
            # db_images is written first; the code row then violates NOT NULL (no model version)
            repo.insert_database_image(s, "ins-1", CODE_A, None)
    assert (_count(engine, DbImage), _count(engine, ImageCode), _count(engine, IndexLog)) == (0, 0, 0)
    with pytest.raises(RuntimeError):
        with session_scope(engine) as s:
            repo.insert_database_image(s, "ins-2", CODE_A, "mv1")
            raise RuntimeError("worker died before commit")
    assert (_count(engine, DbImage), _count(engine, ImageCode), _count(engine, IndexLog)) == (0, 0, 0)
    with session_scope(engine) as s:  # the redelivery then succeeds
        assert repo.insert_database_image(s, "ins-2", CODE_A, "mv1") >= 1
    assert (_count(engine, DbImage), _count(engine, ImageCode), _count(engine, IndexLog)) == (1, 1, 1)


def test_quarantined_insertion_is_stored_but_stays_out_of_the_index_log(engine):
    with session_scope(engine) as s:
        image_id = repo.insert_database_image(s, "ins-1", CODE_A, "mv1", status="quarantined", reasons=["c2"])
    with session_scope(engine) as s:
        assert repo.get_image(s, image_id).reasons == ["c2"]
        assert repo.read_index_log(s, 0, "mv1") == []
        assert repo.active_image_codes(s, "mv1") == []


def test_read_index_log_returns_only_rows_past_the_watermark_of_that_version_in_order(engine):
    with session_scope(engine) as s:
        ids = [repo.insert_database_image(s, f"ins-{i}", bytes([i]) * 8, "mv1") for i in range(5)]
        repo.insert_database_image(s, "other", CODE_B, "mv0")
        repo.remove_image(s, ids[1])
    with session_scope(engine) as s:
        rows = repo.read_index_log(s, 0, "mv1")
        assert [r[0] for r in rows] == sorted(r[0] for r in rows)
        assert [(op, i) for _, op, i, _ in rows] == [("add", i) for i in ids] + [("remove", ids[1])]
        watermark = rows[2][0]
        assert repo.read_index_log(s, watermark, "mv1") == rows[3:]
        assert repo.read_index_log(s, watermark, "mv1", limit=2) == rows[3:5]
        assert repo.read_index_log(s, rows[-1][0], "mv1") == []
        assert repo.max_log_seq(s, "mv1") == rows[-1][0]
        assert repo.max_log_seq(s) == max(rows[-1][0], repo.max_log_seq(s, "mv0"))
        assert rows[-1][3] is None  # a remove carries no code


def test_remove_logs_one_remove_per_model_version_and_is_idempotent(engine):
    with session_scope(engine) as s:
        image_id = repo.insert_database_image(s, "ins-1", CODE_A, "mv1")
        assert repo.add_image_codes_bulk(s, "mv2", [(image_id, CODE_B)]) == 1
    with session_scope(engine) as s:
        assert repo.remove_image(s, image_id, reasons=["operator"]) is True
    with session_scope(engine) as s:
        assert repo.remove_image(s, image_id) is False
        assert repo.get_image(s, image_id).status == "removed"
        for version in ("mv1", "mv2"):
            assert [r[1] for r in repo.read_index_log(s, 0, version)] == ["add", "remove"]
        with pytest.raises(KeyError):
            repo.remove_image(s, 999)


def test_quarantine_then_remove_takes_the_image_out_of_the_index_once(engine):
    with session_scope(engine) as s:
        image_id = repo.insert_database_image(s, "ins-1", CODE_A, "mv1")
        assert repo.quarantine_image(s, image_id, ["rescreen: c3"]) is True
        assert repo.quarantine_image(s, image_id, ["again"]) is False
        assert repo.remove_image(s, image_id) is True
    with session_scope(engine) as s:
        image = repo.get_image(s, image_id)
        assert image.status == "removed" and image.reasons == ["rescreen: c3"]
        assert [r[1] for r in repo.read_index_log(s, 0, "mv1")] == ["add", "remove"]
        assert repo.image_counts(s) == {"active": 0, "quarantined": 0, "removed": 1}


def test_reencoding_adds_codes_once_and_logs_only_active_images(engine):
    with session_scope(engine) as s:
        a = repo.insert_database_image(s, "a", CODE_A, "mv1", image_path="/a.png")
        b = repo.insert_database_image(s, "b", CODE_A, "mv1", image_path="/b.png")
        c = repo.insert_database_image(s, "c", CODE_A, "mv1", image_path="/c.png")
        repo.remove_image(s, c)
    with session_scope(engine) as s:
        assert repo.images_without_code(s, "mv2") == [(a, "/a.png"), (b, "/b.png")]
        assert repo.add_image_codes_bulk(s, "mv2", [(a, CODE_B), (b, CODE_B), (c, CODE_B)]) == 3
    with session_scope(engine) as s:
        assert repo.add_image_codes_bulk(s, "mv2", [(a, CODE_A)]) == 0  # kept, not replaced
        assert repo.images_without_code(s, "mv2") == []
        assert [(op, i) for _, op, i, _ in repo.read_index_log(s, 0, "mv2")] == [("add", a), ("add", b)]
        assert repo.active_image_codes(s, "mv2") == [(a, CODE_B), (b, CODE_B)]


def test_bulk_seeding_returns_ids_in_input_order_with_codes_and_log_rows(engine):
    codes = [bytes([i % 256]) * 8 for i in range(1200)]  # more than one chunk
    labels = [i % 10 for i in range(1200)]
    with session_scope(engine) as s:
        ids = repo.add_database_images(s, codes, "mv1", source="digits", labels=labels)
    assert len(ids) == 1200 and len(set(ids)) == 1200
    with session_scope(engine) as s:
        assert repo.active_image_codes(s, "mv1") == sorted(zip(ids, codes))
        assert repo.get_image(s, ids[17]).label == 7
        log = repo.read_index_log(s, 0, "mv1", limit=5000)
        assert [(i, c) for _, _, i, c in log] == list(zip(ids, codes))


# --------------------------------------------------------------------------- model versions, calibrations, runs


def _mv_fields(**extra):
    fields = dict(checkpoint_path="/ckpt/m.pt", checkpoint_sha256="ab" * 32, backbone="smallcnn", bits=64, dataset="digits")
    fields.update(extra)
    return fields


def test_publishing_keeps_exactly_one_active_model_version(engine):
    with session_scope(engine) as s:
        assert repo.active_model_version(s) is None
        first = repo.publish_model_version(s, "aaaaaaaaaaaa", **_mv_fields(map_score=0.8))
        published_at = first.published_at
    with session_scope(engine) as s:
        repo.add_model_version(s, "bbbbbbbbbbbb", **_mv_fields())
        assert repo.active_model_version(s).version == "aaaaaaaaaaaa"
        repo.publish_model_version(s, "bbbbbbbbbbbb")
    with session_scope(engine) as s:
        assert repo.active_model_version(s).version == "bbbbbbbbbbbb"
        repo.publish_model_version(s, "aaaaaaaaaaaa")  # rollback to the previous version
    with session_scope(engine) as s:
        active = repo.active_model_version(s)
        assert active.version == "aaaaaaaaaaaa" and active.published_at == published_at
        assert active.map_score == 0.8
        assert s.execute(select(func.count()).where(ModelVersion.is_active.is_(True))).scalar_one() == 1
        with pytest.raises(KeyError):
            repo.publish_model_version(s, "cccccccccccc")


def test_active_calibration_is_the_last_activated_one_per_detector(engine):
    with session_scope(engine) as s:
        first = repo.add_calibration(s, "mv1", "umcd", "meanblur3", 0.05, 500, {"c1": 9.5, "c2": 3.0, "c3": 6.0})
        second = repo.add_calibration(s, "mv1", "umcd", "meanblur3", 0.01, 500, {"c1": 11.0, "c2": 2.0, "c3": 8.0})
        repo.add_calibration(s, "mv1", "umcd", "meanblur3", 0.10, 500, {"c1": 1, "c2": 1, "c3": 1}, activate=False)
        other = repo.add_calibration(s, "mv1", "c1only", "none", 0.05, 500, {"c1": 9.5})
    with session_scope(engine) as s:
        assert repo.active_calibration(s, "mv1", "umcd").id == second.id
        assert repo.active_calibration(s, "mv1", "c1only").id == other.id
        assert repo.active_calibration(s, "mv1").id == other.id  # newest active of any detector
        assert repo.active_calibration(s, "mv2") is None
        assert repo.get_calibration(s, first.id).is_active is False
        assert repo.get_calibration(s, second.id).thresholds == {"c1": 11.0, "c2": 2.0, "c3": 8.0}


def test_attack_sets_eval_and_train_runs_are_recorded_and_finished(engine):
    from db.models import AttackSet, EvalRun, TrainRun

    with session_scope(engine) as s:
        attack_id = repo.record_attack_set(s, "pgd-8", "pgd", {"eps": 8 / 255}, "/sets/pgd.npz", 100, 0.93, "mv1")
        eval_id = repo.start_eval_run(s, "digits", {"n_images": 200})
        train_id = repo.start_train_run(s, "digits", {"bits": 64})
    with session_scope(engine) as s:
        repo.finish_eval_run(s, eval_id, {"auroc": 0.97}, report_dir="/reports/1")
        repo.finish_train_run(s, train_id, model_version="aaaaaaaaaaaa", results={"map": 0.9})
        with pytest.raises(KeyError):
            repo.finish_eval_run(s, 999)
    with session_scope(engine) as s:
        attack = s.get(AttackSet, attack_id)
        assert (attack.attack, attack.n_images, attack.success_rate, attack.params) == ("pgd", 100, 0.93, {"eps": 8 / 255})
        run = s.get(EvalRun, eval_id)
        assert (run.status, run.results, run.report_dir) == ("done", {"auroc": 0.97}, "/reports/1")
        assert run.finished_at >= run.created_at
        train = s.get(TrainRun, train_id)
        assert (train.status, train.model_version) == ("done", "aaaaaaaaaaaa")


# --------------------------------------------------------------------------- audit queries


def fill_store(engine) -> None:
    """Six requests: 2 benign, 3 adversarial (c1 / c2+c3 / c3), 1 invalid; one query still pending."""
    rows = [  # written in this order, stamped at 12:00:second (newest: q-2, i-3, q-3, i-2, i-1, q-1)
        ("q-1", "query", "benign", [], 10),
        ("q-2", "query", "adversarial", ["c1"], 50),
        ("q-3", "query", "adversarial", ["c2", "c3"], 40),
        ("i-1", "insert", "benign", [], 20),
        ("i-2", "insert", "adversarial", ["c3"], 30),
        ("i-3", "insert", "invalid_input", [], 45),
    ]
    with session_scope(engine) as s:
        for rid, kind, verdict, fired, second in rows:
            repo.record_request(s, rid, kind, client="test")
            image_id = repo.insert_database_image(s, rid, CODE_A, "mv1") if (kind, verdict) == ("insert", "benign") else None
            reasons = ["not an image"] if verdict == "invalid_input" else [f"{c} fired" for c in fired]
            repo.write_verdict(
                s, request_id=rid, kind=kind, verdict=verdict, fired=fired, reasons=reasons, c1=2.0, c2=7.5,
                c3=1.0, model_version="mv1", latency_total_ms=3.0, worker="w0", image_id=image_id,
                created_at=datetime(2026, 1, 1, 12, 0, second, tzinfo=timezone.utc),
            )
        repo.record_request(s, "q-pending", "query")


def test_rejections_by_criterion_counts_extension_criteria_as_other(engine):
    """Extension detectors fire criteria of their own (umcd-trust-input's trust@in, ...): counted under
    ``other``, once per verdict, also beside c1..c3 and when a name merely contains "c1"."""
    cases = [("x-1", ["trust@in"]), ("x-2", ["c1", "trust@in"]), ("x-3", ["c1@median"]), ("x-4", ["c1", "c3"]),
             ("x-5", ["c2"])]
    with session_scope(engine) as s:
        for rid, fired in cases:
            repo.record_request(s, rid, "query")
            repo.write_verdict(s, request_id=rid, kind="query", verdict="adversarial", fired=fired)
    with session_scope(engine) as s:
        assert repo.rejections_by_criterion(s) == {"c1": 2, "c2": 1, "c3": 1, "other": 3, "adversarial": 5,
                                                   "invalid_input": 0}


def test_audit_queries_summarise_a_filled_store(engine):
    fill_store(engine)
    with session_scope(engine) as s:
        last = repo.last_verdicts(s, 3)
        assert [r["request_id"] for r in last] == ["q-2", "i-3", "q-3"]
        assert [r["request_id"] for r in repo.last_verdicts(s, 10, kind="insert")] == ["i-3", "i-2", "i-1"]
        assert repo.verdict_counts(s) == {"benign": 2, "adversarial": 3, "invalid_input": 1}
        assert repo.verdict_counts(s, kind="query") == {"benign": 1, "adversarial": 2, "invalid_input": 0}
        assert repo.rejections_by_criterion(s) == {"c1": 1, "c2": 1, "c3": 2, "other": 0, "adversarial": 3,
                                                   "invalid_input": 1}
        assert repo.rejections_by_criterion(s, kind="insert") == {"c1": 0, "c2": 0, "c3": 1, "other": 0,
                                                                  "adversarial": 1, "invalid_input": 1}
        per_request = repo.count_verdicts_per_request(s)
        assert per_request.pop("q-pending") == 0 and set(per_request.values()) == {1} and len(per_request) == 6
        assert repo.duplicates(s) == {"verdicts": [], "db_images": [], "index_log": []}


def test_request_record_joins_request_verdict_and_image(engine):
    fill_store(engine)
    with session_scope(engine) as s:
        record = repo.request_record(s, "i-1")
        assert record["request"]["kind"] == "insert" and record["request"]["client"] == "test"
        assert record["verdict"]["verdict"] == "benign"
        assert record["image"]["id"] == record["verdict"]["image_id"]
        pending = repo.request_record(s, "q-pending")
        assert pending["verdict"] is None and pending["image"] is None
        assert repo.request_record(s, "nope") is None
        repo.write_verdict(s, **_verdict("orphan"))  # a verdict whose request row is missing
        assert repo.request_record(s, "orphan")["request"] is None
        assert repo.count_verdicts_per_request(s)["orphan"] == 1


def test_duplicates_reports_a_repeated_index_log_add(engine):
    with session_scope(engine) as s:
        image_id = repo.insert_database_image(s, "ins-1", CODE_A, "mv1")
        s.add(IndexLog(op="add", image_id=image_id, model_version="mv1", code=CODE_A))
    with session_scope(engine) as s:
        assert repo.duplicates(s)["index_log"] == [(image_id, "mv1", 2)]


# --------------------------------------------------------------------------- migrations and engines


def test_migrated_sqlite_schema_matches_the_models(url, engine):
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    assert current_revision(url) == head_revision()
    upgrade(url)  # a second upgrade is a no-op
    downgrade(url, "base")
    assert set(inspect(create_engine_for(url)).get_table_names()) == {"alembic_version"}
    upgrade(url)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_concurrent_upgrades_of_one_fresh_sqlite_file_all_succeed(tmp_path):
    u = f"sqlite:///{tmp_path / 'sub' / 'audit.db'}"
    errors = []

    def run():
        try:
            upgrade(u)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and current_revision(u) == head_revision()


def test_python_dash_m_db_migrate_reads_umcd_database_url(tmp_path):
    u = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {**os.environ, "UMCD_DATABASE_URL": u, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "db.migrate"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"at revision {head_revision()}" in proc.stdout
    assert current_revision(u) == head_revision()


def test_sqlite_engine_uses_wal_busy_timeout_and_foreign_keys(engine):
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() >= 5000
    with pytest.raises(IntegrityError):
        with session_scope(engine) as s:
            s.add(ImageCode(image_id=12345, model_version="mv1", code=CODE_A))  # no such image


def test_make_engine_caches_per_url_and_rewrites_plain_postgresql_urls(url):
    assert make_engine(url) is make_engine(url)
    assert normalize_url("postgresql://u:p@127.0.0.1:5432/d").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u:p@127.0.0.1:5432/d").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://u:p@127.0.0.1/d").drivername == "postgresql+psycopg"


def test_redact_url_and_engine_logs_never_show_the_password(caplog):
    secret = "s3cr3t-pa55"
    pg = f"postgresql://umcd:{secret}@127.0.0.1:5432/umcd"
    assert secret not in redact_url(pg) and "umcd:***@127.0.0.1:5432" in redact_url(pg)
    assert redact_url("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"
    failover = f"redis://:{secret}@h1:6379/0;redis://:{secret}@h2:6379/0"  # a broker's failover list
    assert secret not in redact_url(failover) and redact_url(failover).count(":***@") == 2
    query = redact_url(f"redis://h:6379/0?password={secret}&socket_timeout=5&sentinel_password={secret}")
    assert secret not in query and "socket_timeout=5" in query
    assert secret not in redact_url(f"postgresql://u@h/db?sslpassword={secret}")
    with caplog.at_level(logging.DEBUG, logger="db"):
        engine = create_engine_for(pg)  # no connection is made
    assert "127.0.0.1" in caplog.text and secret not in caplog.text
    assert secret not in repr(engine) and secret not in str(engine.url)
    engine.dispose()


# --------------------------------------------------------------------------- the `umcd audit` and `umcd db` commands


@pytest.fixture
def cli():
    """A typer app with only the audit and db commands (other command modules are not needed)."""
    from umcd.commands import audit

    app = typer.Typer()
    audit.register(app)
    runner = CliRunner()
    return lambda *args, **kw: runner.invoke(app, list(args), catch_exceptions=False, **kw)


def test_audit_cli_prints_last_verdicts_as_json_and_as_a_table(cli, url, engine):
    fill_store(engine)
    out = cli("audit", "last", "--n", "2", "--json", "--url", url)
    assert out.exit_code == 0
    rows = json.loads(out.stdout)
    assert [r["request_id"] for r in rows] == ["q-2", "i-3"]
    assert rows[0]["fired"] == ["c1"] and rows[0]["created_at"].startswith("2026-01-01T12:00:50")
    table = cli("audit", "last", "--url", url)
    assert table.exit_code == 0
    for rid in ("q-1", "q-2", "q-3", "i-1", "i-2", "i-3"):
        assert rid in table.stdout
    assert "adversarial" in table.stdout and "c2,c3" in table.stdout


def test_audit_cli_reads_the_database_url_from_settings(cli, url, engine, monkeypatch):
    fill_store(engine)
    monkeypatch.setenv("UMCD_DATABASE_URL", url)
    get_settings.cache_clear()
    try:
        out = cli("audit", "rejections", "--json")
    finally:
        get_settings.cache_clear()
    assert out.exit_code == 0
    assert json.loads(out.stdout) == {"c1": 1, "c2": 1, "c3": 2, "other": 0, "adversarial": 3,
                                       "invalid_input": 1}


def test_audit_cli_rejections_show_and_counts(cli, url, engine):
    fill_store(engine)
    table = cli("audit", "rejections", "--url", url)
    assert table.exit_code == 0 and "C3 denoising disagreement" in table.stdout and "66.7%" in table.stdout
    shown = cli("audit", "show", "i-2", "--json", "--url", url)
    assert shown.exit_code == 0
    record = json.loads(shown.stdout)
    assert record["verdict"]["fired"] == ["c3"] and record["request"]["kind"] == "insert"
    shown_table = cli("audit", "show", "i-2", "--url", url)
    assert shown_table.exit_code == 0 and "i-2" in shown_table.stdout and "adversarial" in shown_table.stdout
    missing = cli("audit", "show", "nope", "--url", url)
    assert missing.exit_code == 1 and "no request 'nope'" in missing.stderr
    counts = json.loads(cli("audit", "counts", "--json", "--url", url).stdout)
    assert counts["verdicts"]["query"] == {"benign": 1, "adversarial": 2, "invalid_input": 0}
    assert counts["requests_without_verdict"] == 1 and counts["images"]["active"] == 1
    assert counts["duplicates"] == {"verdicts": [], "db_images": [], "index_log": []}
    counts_table = cli("audit", "counts", "--url", url)
    assert counts_table.exit_code == 0 and "duplicates: none" in counts_table.stdout


def test_audit_cli_explains_a_missing_or_unmigrated_store(cli, tmp_path):
    missing = cli("audit", "last", "--url", f"sqlite:///{tmp_path / 'none.db'}")
    assert missing.exit_code == 1 and "no audit store" in missing.stderr
    assert not (tmp_path / "none.db").exists()
    empty = tmp_path / "empty.db"
    empty.touch()
    unmigrated = cli("audit", "counts", "--url", f"sqlite:///{empty}")
    assert unmigrated.exit_code == 1 and "umcd db upgrade" in unmigrated.stderr
    dispose_engine(f"sqlite:///{empty}")


def test_audit_cli_refuses_an_unknown_kind(cli, url, engine):
    fill_store(engine)
    for command in ("last", "rejections"):
        out = cli("audit", command, "--kind", "queries", "--url", url)
        assert out.exit_code == 2 and "use query or insert" in out.stderr, (command, out.stderr)
    assert cli("audit", "last", "--kind", "insert", "--json", "--url", url).exit_code == 0


def test_db_current_on_a_missing_sqlite_file_says_so_and_creates_nothing(cli, tmp_path):
    path = tmp_path / "none.db"
    out = cli("db", "current", "--url", f"sqlite:///{path}")
    assert out.exit_code == 0 and "no audit store yet" in out.stdout
    assert not path.exists()
    assert cli("audit", "last", "--url", f"sqlite:///{path}").exit_code == 1  # still "no audit store", not "no tables"


def test_db_upgrade_command_migrates_a_fresh_store(cli, tmp_path):
    u = f"sqlite:///{tmp_path / 'new' / 'audit.db'}"
    out = cli("db", "upgrade", "--url", u)
    assert out.exit_code == 0 and f"at revision {head_revision()}" in out.stdout
    current = cli("db", "current", "--url", u)
    assert current.exit_code == 0 and f"at revision {head_revision()} (head {head_revision()})" in current.stdout
