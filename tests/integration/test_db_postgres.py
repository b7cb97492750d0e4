"""The audit store on a real PostgreSQL: migrations, idempotent writes under concurrency, the index log."""

from __future__ import annotations

import random
import threading
import time

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, select, text

from db import repo
from db.migrate import current_revision, downgrade, head_revision, upgrade
from db.models import Base, DbImage, ImageCode, IndexLog, ModelVersion, Verdict
from db.session import dispose_engine, make_engine, session_scope

pytestmark = pytest.mark.integration
on_postgresql = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)

CODE = bytes(range(8))


def _count(engine, model) -> int:
    with session_scope(engine) as s:
        return s.execute(select(func.count()).select_from(model)).scalar_one()


def _run_threads(n: int, target) -> list[BaseException]:
    """Run ``target(i)`` in ``n`` threads released together; return the exceptions they raised."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            barrier.wait()
            target(i)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return errors


@on_postgresql
def test_migrated_postgresql_schema_matches_the_models(db_url):
    engine = make_engine(db_url)
    assert engine.dialect.name == "postgresql"
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    assert current_revision(db_url) == head_revision()
    downgrade(db_url, "base")
    with engine.connect() as conn:
        tables = conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars().all()
    assert tables == ["alembic_version"]
    upgrade(db_url)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_concurrent_upgrades_of_one_fresh_postgresql_database_all_succeed(postgres_server):
    name = "t_concurrent_upgrade"
    url = postgres_server.create_database(name)
    try:
        errors = _run_threads(4, lambda i: upgrade(url))
        assert errors == []
        assert current_revision(url) == head_revision()
    finally:
        dispose_engine(url)
        postgres_server.drop_database(name)


@on_postgresql
def test_plain_postgresql_url_connects_through_psycopg_3(db_url):
    plain = db_url.replace("postgresql+psycopg://", "postgresql://")
    try:
        engine = make_engine(plain)
        assert engine.dialect.driver == "psycopg"
        assert current_revision(plain) == head_revision()
        with session_scope(engine) as s:
            assert repo.write_verdict(s, request_id="r-plain", kind="query", verdict="benign")
    finally:
        dispose_engine(plain)


@on_postgresql
def test_write_verdict_twice_keeps_one_row_and_the_first_verdict(db_url):
    engine = make_engine(db_url)
    with session_scope(engine) as s:
        assert repo.write_verdict(s, request_id="r-1", kind="insert", verdict="adversarial", fired=["c2"], c2=0.01)
    with session_scope(engine) as s:
        assert not repo.write_verdict(s, request_id="r-1", kind="insert", verdict="benign")
        assert repo.get_verdict(s, "r-1").fired == ["c2"]
    assert _count(engine, Verdict) == 1


def test_threads_writing_the_same_request_ids_leave_exactly_one_row_each_on_both_dialects(db_url):
    engine = make_engine(db_url)  # db_url runs this test on SQLite and on PostgreSQL
    ids = [f"req-{i}" for i in range(50)]
    inserted: list[bool] = []

    def writer(worker: int) -> None:
        order = ids[:]
        random.Random(worker).shuffle(order)
        for rid in order:
            with session_scope(engine) as s:
                repo.record_request(s, rid, "query", client=f"w{worker}")
                inserted.append(repo.write_verdict(s, request_id=rid, kind="query", verdict="benign", worker=f"w{worker}"))

    assert _run_threads(6, writer) == []
    assert sum(inserted) == len(ids) and len(inserted) == 6 * len(ids)
    with session_scope(engine) as s:
        assert repo.count_verdicts_per_request(s) == {rid: 1 for rid in ids}
        assert repo.duplicates(s) == {"verdicts": [], "db_images": [], "index_log": []}


@on_postgresql
def test_concurrent_redeliveries_of_an_insertion_create_one_image_and_one_log_row(db_url):
    engine = make_engine(db_url)
    ids = [f"ins-{i}" for i in range(20)]
    results: dict[str, set[int]] = {rid: set() for rid in ids}
    lock = threading.Lock()

    def worker(w: int) -> None:
        order = ids[:]
        random.Random(w).shuffle(order)
        for rid in order:
            with session_scope(engine) as s:  # the image, its code, its log row and the verdict: one transaction
                image_id = repo.insert_database_image(s, rid, CODE, "mv1", source="test")
                repo.write_verdict(s, request_id=rid, kind="insert", verdict="benign", image_id=image_id)
            with lock:
                results[rid].add(image_id)

    assert _run_threads(6, worker) == []
    assert all(len(v) == 1 for v in results.values())
    assert (_count(engine, DbImage), _count(engine, ImageCode), _count(engine, IndexLog), _count(engine, Verdict)) == (20, 20, 20, 20)
    with session_scope(engine) as s:
        log = repo.read_index_log(s, 0, "mv1")
        assert sorted(i for _, _, i, _ in log) == sorted(next(iter(v)) for v in results.values())
        assert repo.duplicates(s) == {"verdicts": [], "db_images": [], "index_log": []}
        for rid, image_ids in results.items():
            assert repo.get_verdict(s, rid).image_id == next(iter(image_ids))


def test_racing_removals_of_one_image_log_a_single_remove_on_both_dialects(db_url):
    engine = make_engine(db_url)
    with session_scope(engine) as s:
        image_ids = [repo.insert_database_image(s, f"ins-{i}", CODE, "mv1") for i in range(10)]
    changed: list[bool] = []

    def remover(w: int) -> None:
        for image_id in image_ids:
            with session_scope(engine) as s:
                if w % 2:
                    changed.append(repo.remove_image(s, image_id, reasons=[f"w{w}"]))
                else:
                    changed.append(repo.quarantine_image(s, image_id, reasons=[f"w{w}"]))

    assert _run_threads(4, remover) == []
    with session_scope(engine) as s:
        log = repo.read_index_log(s, 0, "mv1")
        removes = [i for _, op, i, _ in log if op == "remove"]
        assert sorted(removes) == sorted(image_ids)  # one remove per image, whoever won
        assert all(repo.get_image(s, i).status in ("quarantined", "removed") for i in image_ids)
    assert 10 <= sum(changed) <= 20  # each image leaves "active" once, and may go on to "removed" once


@on_postgresql
def test_a_replica_tailing_the_log_past_its_watermark_misses_no_row_of_concurrent_writers(db_url):
    """Writers hold their transactions open for a random while after taking a seq; the reader
    keeps only a watermark. Without ordered commits a late commit of a lower seq would be skipped."""
    engine = make_engine(db_url)
    written: list[int] = []
    lock = threading.Lock()
    done = threading.Event()
    seen: list[tuple[int, int]] = []

    def writer(w: int) -> None:
        rng = random.Random(w)
        for i in range(15):
            with session_scope(engine) as s:
                image_id = repo.insert_database_image(s, f"w{w}-{i}", CODE, "mv1")
                time.sleep(rng.uniform(0, 0.01))  # commit late
            with lock:
                written.append(image_id)

    def reader() -> None:
        watermark = 0
        while True:
            finished = done.is_set()
            with session_scope(engine) as s:
                rows = repo.read_index_log(s, watermark, "mv1", limit=7)
            seen.extend((seq, image_id) for seq, _, image_id, _ in rows)
            if rows:
                watermark = rows[-1][0]
            elif finished:
                return
            else:
                time.sleep(0.002)

    reader_thread = threading.Thread(target=reader)
    reader_thread.start()
    errors = _run_threads(4, writer)
    done.set()
    reader_thread.join(60)
    assert errors == []
    seqs = [seq for seq, _ in seen]
    assert seqs == sorted(set(seqs))
    assert sorted(image_id for _, image_id in seen) == sorted(written) and len(written) == 60


@on_postgresql
def test_concurrent_publishes_leave_exactly_one_active_model_version(db_url):
    engine = make_engine(db_url)
    fields = dict(checkpoint_path="/ckpt.pt", checkpoint_sha256="cd" * 32, backbone="smallcnn", bits=64, dataset="digits")

    def publisher(w: int) -> None:
        for _ in range(5):
            with session_scope(engine) as s:
                repo.publish_model_version(s, f"version-{w:06d}", **fields)

    assert _run_threads(4, publisher) == []
    with session_scope(engine) as s:
        assert s.execute(select(func.count()).where(ModelVersion.is_active.is_(True))).scalar_one() == 1
        assert repo.active_model_version(s).version.startswith("version-")
        assert s.execute(select(func.count()).select_from(ModelVersion)).scalar_one() == 4


def test_publishers_seeding_at_once_seed_the_database_once_on_both_dialects(db_url, tmp_path):
    """Each finds the store empty only if none has seeded yet: the count and the inserts run under one lock."""
    from core.checkpoint import load_checkpoint, save_untrained_checkpoint
    from core.datasets import load_dataset
    from workers.publish import seed_database

    ckpt = load_checkpoint(save_untrained_checkpoint(tmp_path / "untrained.safetensors", 16))
    splits = load_dataset("digits")
    engine = make_engine(db_url)
    seeded: list[int] = []

    def publisher(w: int) -> None:
        with session_scope(engine, write=True) as s:
            seeded.append(seed_database(s, ckpt, splits, tmp_path, fraction=0.05, source="seed", seed=0))

    assert _run_threads(3, publisher) == []
    n = round(len(splits.database) * 0.05)
    assert sorted(seeded) == [0, 0, n]
    with session_scope(engine) as s:
        assert s.execute(select(func.count()).select_from(DbImage).where(DbImage.source == "seed")).scalar_one() == n
        assert s.execute(select(func.count()).select_from(IndexLog)).scalar_one() == n


@on_postgresql
def test_audit_queries_and_index_log_on_postgresql(db_url):
    engine = make_engine(db_url)
    with session_scope(engine) as s:
        repo.record_request(s, "q-1", "query", submitted_at=1_700_000_000.0)
        repo.write_verdict(s, request_id="q-1", kind="query", verdict="adversarial", fired=["c1", "c3"])
        repo.record_request(s, "q-2", "query")
        repo.write_verdict(s, request_id="q-2", kind="query", verdict="invalid_input", reasons=["truncated"])
        repo.record_request(s, "i-1", "insert")
        image_id = repo.insert_database_image(s, "i-1", CODE, "mv1")
        repo.write_verdict(s, request_id="i-1", kind="insert", verdict="benign", image_id=image_id)
        repo.record_request(s, "q-3", "query")
    with session_scope(engine) as s:
        assert repo.rejections_by_criterion(s) == {"c1": 1, "c2": 0, "c3": 1, "other": 0, "adversarial": 1,
                                                   "invalid_input": 1}
        assert repo.verdict_counts(s) == {"benign": 1, "adversarial": 1, "invalid_input": 1}
        assert repo.count_verdicts_per_request(s) == {"q-1": 1, "q-2": 1, "i-1": 1, "q-3": 0}
        record = repo.request_record(s, "i-1")
        assert record["image"]["id"] == image_id == record["verdict"]["image_id"]
        assert repo.request_record(s, "q-1")["request"]["submitted_at"].timestamp() == 1_700_000_000.0
        assert [r["request_id"] for r in repo.last_verdicts(s, 2)] == ["i-1", "q-2"]
        assert repo.add_image_codes_bulk(s, "mv2", [(image_id, CODE[::-1])]) == 1
        assert repo.remove_image(s, image_id) is True
    with session_scope(engine) as s:
        assert [r[1] for r in repo.read_index_log(s, 0, "mv1")] == ["add", "remove"]
        assert [r[1] for r in repo.read_index_log(s, 0, "mv2")] == ["add", "remove"]
        assert repo.read_index_log(s, 0, "mv2")[0][3] == CODE[::-1]
        # an extension detector's own criterion (umcd-trust-input) counts as "other" on PostgreSQL's JSON text too
        repo.record_request(s, "q-4", "query")
        repo.write_verdict(s, request_id="q-4", kind="query", verdict="adversarial", fired=["c1", "trust@in"])
    with session_scope(engine) as s:
        assert repo.rejections_by_criterion(s) == {"c1": 2, "c2": 0, "c3": 1, "other": 1, "adversarial": 2,
                                                   "invalid_input": 1}
