"""Batch submissions end to end: real redis-server, a real detection worker, SQLite audit store."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from core.checkpoint import save_untrained_checkpoint
from tests.fleet_helpers import png
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
BITS = 16
REDIS_DB = 12
INLINE_LIMIT = 4096
WORKER_ENV = {
    "UMCD_BATCH_MAX_WAIT_MS": "20",
    "UMCD_REPLICA_SYNC_INTERVAL_MS": "100",
    "UMCD_MODEL_POLL_INTERVAL_S": "0.3",
    "UMCD_DEVICE": "cpu",
    "UMCD_LOG_LEVEL": "INFO",
    "OMP_NUM_THREADS": "1",
}

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def digit_pngs() -> list[bytes]:
    """PNG bytes of the digits query split (1,000 images of 32x32)."""
    from core.datasets import load_dataset

    x = load_dataset("digits", seed=0).query.get().mul(255).round().byte().permute(0, 2, 3, 1).numpy()
    return [png(a) for a in x]


@dataclass
class BatchFleet:
    settings: object
    client: object
    db_url: str
    published: object
    proc: subprocess.Popen
    log: Path
    early_ids: list[str]

    def logs(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def rows(self, request_ids) -> dict[str, list[dict]]:
        """request id -> its verdict rows (a list, to see duplicates)."""
        from sqlalchemy import select

        from db.models import Verdict
        from db.repo import row_dict
        from db.session import session_scope

        out: dict[str, list[dict]] = {rid: [] for rid in request_ids}
        with session_scope(self.db_url) as s:
            for row in s.scalars(select(Verdict).where(Verdict.request_id.in_(list(out)))):
                out[row.request_id].append(row_dict(row))
        return out


@pytest.fixture(scope="module")
def fleet(redis_server, digit_pngs, tmp_path_factory):
    """One detection worker started before any model exists, a batch sent then, and the model published after."""
    import redis as redis_lib

    from db.migrate import upgrade
    from db.session import dispose_engine
    from producers.sdk import Client
    from umcd.commands.worker import worker_argv
    from umcd.settings import Settings
    from workers.publish import publish

    artifacts = tmp_path_factory.mktemp("batch-fleet")
    db_url = f"sqlite:///{artifacts / 'audit.db'}"
    broker = redis_server.url_for(REDIS_DB)
    redis_lib.Redis.from_url(broker).flushdb()
    upgrade(db_url)
    settings = Settings(artifacts=artifacts, database_url=db_url, broker_url=broker, result_backend=broker,
                        bits=BITS, inline_image_limit=INLINE_LIMIT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("UMCD_")}
    env.update(WORKER_ENV)
    env.update({"UMCD_BROKER_URL": broker, "UMCD_RESULT_BACKEND": broker, "UMCD_DATABASE_URL": db_url,
                "UMCD_ARTIFACTS": str(artifacts), "UMCD_METRICS_PORT": str(free_port()),
                "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")})
    log = artifacts / "worker.log"
    argv = worker_argv("detect", concurrency=8, prefetch_multiplier=4, name="batch1@%h", events=False,
                       extra=["--without-gossip", "--without-mingle"])
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    client = Client(settings)
    try:
        early_ids = client.submit_queries(digit_pngs[:5], batch=True)  # no model yet: the items must wait
        deadline = time.monotonic() + 120
        while "retrying them" not in log.read_text(errors="replace"):  # the worker sent them on for later
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        published = publish(save_untrained_checkpoint(artifacts / "untrained.safetensors", BITS), settings=settings,
                            seed_fraction=0.5)
        yield BatchFleet(settings, client, db_url, published, proc, log, early_ids)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        client.close()
        dispose_engine(db_url)


def test_a_batch_sent_before_any_model_was_published_is_answered_once_one_is(fleet):
    results = fleet.client.wait(fleet.early_ids, timeout=90)
    assert set(results) == set(fleet.early_ids), fleet.logs()
    assert {r.model_version for r in results.values()} == {fleet.published.model_version}
    assert all(len(rows) == 1 for rows in fleet.rows(fleet.early_ids).values())
    assert "NoModel" in fleet.log.read_text()  # the fixture saw them sent on for later, not failed


def test_batch_queries_get_one_result_and_one_verdict_row_each_from_shared_model_batches(fleet, digit_pngs):
    rng = np.random.default_rng(0)
    large = png(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))  # over the inline limit, in the blob all the same
    assert len(large) > INLINE_LIMIT
    images = list(digit_pngs[10:130])
    images[7] = b"this is not an image"
    images[50] = large
    ids = fleet.client.submit_queries(images, client="batch-test", batch=True, batch_size=40)
    assert len(set(ids)) == 120
    results = fleet.client.wait(ids, timeout=120)
    assert set(results) == set(ids), fleet.logs()
    assert results[ids[7]].verdict == "invalid_input" and "not an image" in results[ids[7]].reasons[0]
    assert results[ids[50]].verdict in ("benign", "adversarial")
    for i, rid in enumerate(ids):
        r = results[rid]
        assert r.request_id == rid and r.kind == "query"
        if i != 7:
            assert r.verdict in ("benign", "adversarial") and r.model_version == fleet.published.model_version
            assert r.scores is not None and r.latency_ms["total"] >= r.latency_ms["model"] > 0
    rows = fleet.rows(ids)
    assert all(len(v) == 1 for v in rows.values())
    assert {rid: v[0]["verdict"] for rid, v in rows.items()} == {rid: r.verdict for rid, r in results.items()}
    assert max(v[0]["batch_size"] for v in rows.values()) > 1  # the images of a message share model batches
    assert {v[0]["worker"].split("@")[0] for v in rows.values()} == {"batch1"}
    # the messages' own states in the result backend name the task and worker but hold no copy of their images
    import json

    import redis as redis_lib

    backend = redis_lib.Redis.from_url(fleet.settings.broker_url)
    metas = [json.loads(backend.get(key)) for key in backend.scan_iter("celery-task-meta-*")]
    messages = [m for m in metas if m.get("name") == "umcd.detect_batch" and m["status"] == "SUCCESS"]
    assert all(m["worker"].startswith("batch1@") and isinstance(m["kwargs"], str) for m in messages)
    assert sum("<40 images>" in m["kwargs"] for m in messages) >= 3  # this test's 120 images in messages of 40
    middle = base64.b64encode(images[3]).decode()[200:264]
    assert not any(middle in json.dumps(m) for m in metas)
    # the files travelled in one blob per message, which the worker deleted once the message was answered
    ours = {m["task_id"] for m in messages if "batch-test" in m["kwargs"]}
    assert len(ours) == 3 and _array_keys_left(fleet, {f"umcd:img:{m}" for m in ours}) == set()
    from sqlalchemy import select

    from db.models import Request
    from db.session import session_scope

    with session_scope(fleet.db_url) as s:
        refs = {r.request_id: (r.image_ref, r.image_bytes) for r in s.scalars(select(Request).where(
            Request.request_id.in_(ids)))}
    assert refs == {rid: ("part", len(image)) for rid, image in zip(ids, images)}


def test_a_redelivered_batch_keeps_the_first_verdicts_and_writes_no_second_row(fleet, digit_pngs):
    ids = [f"again-{uuid.uuid4().hex[:8]}-{i}" for i in range(6)]
    first = fleet.client.wait(fleet.client.submit_queries(digit_pngs[200:206], request_ids=ids, batch=True),
                              timeout=60)
    assert set(first) == set(ids), fleet.logs()
    for rid in ids:
        fleet.client.app.AsyncResult(rid).forget()
    # the same request ids again, now with other images: the stored verdicts stand
    again = fleet.client.wait(fleet.client.submit_queries(digit_pngs[300:306], request_ids=ids, batch=True),
                              timeout=60)
    assert {rid: r.to_dict()["scores"] for rid, r in again.items()} == \
        {rid: r.to_dict()["scores"] for rid, r in first.items()}
    assert all(len(v) == 1 for v in fleet.rows(ids).values())


def test_batch_insertions_join_the_index_when_benign_and_are_quarantined_otherwise(fleet, digit_pngs):
    from sqlalchemy import select

    from db.models import DbImage, IndexLog
    from db.session import session_scope

    ids = fleet.client.submit_inserts(digit_pngs[150:170], source="batch-insert", label=2, batch=True,
                                      batch_size=8)
    results = fleet.client.wait(ids, timeout=90)
    assert set(results) == set(ids), fleet.logs()
    with session_scope(fleet.db_url) as s:
        images = {row.request_id: row for row in s.scalars(select(DbImage).where(DbImage.request_id.in_(ids)))}
        logged = set(s.scalars(select(IndexLog.image_id).where(IndexLog.op == "add")))
    assert set(images) == set(ids)
    for rid in ids:
        r, image = results[rid], images[rid]
        assert r.kind == "insert" and image.source == "batch-insert" and image.label == 2
        if r.verdict == "benign":
            assert image.status == "active" and r.image_id == image.id and image.id in logged
        else:
            assert image.status == "quarantined" and image.id not in logged
    assert Counter(r.verdict for r in results.values())["benign"] > 0


def test_items_without_a_valid_request_id_are_dropped_and_the_others_answered(fleet, digit_pngs):
    image = {"inline": base64.b64encode(digit_pngs[0]).decode()}
    rid, batch_id = f"ok-{uuid.uuid4().hex}", f"batch-{uuid.uuid4().hex}"
    items = [{"image": image}, {"request_id": "spaces are not allowed", "image": image},
             {"request_id": rid, "image": image}]
    summary = fleet.client.app.send_task("umcd.detect_batch", kwargs={"items": items, "submitted_at": time.time()},
                                         task_id=batch_id, queue="detect").get(timeout=60)
    assert summary == {"items": 3, "stored": 1, "verdicts": {fleet.client.result(rid).verdict: 1}, "failed": 0,
                       "retrying": 0, "rejected": 2}
    assert len(fleet.rows([rid])[rid]) == 1


def test_a_request_id_twice_in_one_batch_gets_one_verdict_row_and_answers_with_it(fleet, digit_pngs):
    rid = f"twice-{uuid.uuid4().hex}"
    items = [{"request_id": rid, "image": {"inline": base64.b64encode(digit_pngs[k]).decode()}} for k in (1, 2)]
    summary = fleet.client.app.send_task("umcd.detect_batch", kwargs={"items": items, "submitted_at": time.time()},
                                         task_id=f"batch-{uuid.uuid4().hex}", queue="detect").get(timeout=60)
    assert summary["stored"] == 2 and summary["failed"] == 0
    (row,) = fleet.rows([rid])[rid]
    stored = fleet.client.result(rid)
    assert stored.verdict == row["verdict"] and stored.scores["c1"] == pytest.approx(row["c1"])


def _pixels(pngs: list[bytes]) -> np.ndarray:
    import io

    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in pngs])


def _array_keys_left(fleet, keys: set[str], timeout: float = 15.0) -> set[str]:
    """Which of ``keys`` are still in Redis once the worker had ``timeout`` s to delete them."""
    import redis as redis_lib

    raw = redis_lib.Redis.from_url(fleet.settings.broker_url)
    deadline = time.monotonic() + timeout
    while (left := {k for k in keys if raw.exists(k)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_a_pixel_array_scores_as_the_pngs_of_its_pixels_and_is_deleted_once_answered(fleet, digit_pngs):
    pngs = list(digit_pngs[60:100])
    png_ids = fleet.client.submit_queries(pngs, batch=True, batch_size=16)
    array_ids = fleet.client.submit_queries(_pixels(pngs), client="arrays", batch_size=16)
    by_png, by_array = fleet.client.wait(png_ids, timeout=90), fleet.client.wait(array_ids, timeout=90)
    assert set(by_png) == set(png_ids) and set(by_array) == set(array_ids), fleet.logs()
    for p, a in zip(png_ids, array_ids):
        assert by_array[a].verdict in ("benign", "adversarial") and by_array[a].verdict == by_png[p].verdict
        assert by_array[a].scores == pytest.approx(by_png[p].scores, rel=1e-5, abs=1e-6)
        assert by_array[a].topk["ids"] == by_png[p].topk["ids"]
    rows = fleet.rows(array_ids)
    assert all(len(v) == 1 for v in rows.values())
    from sqlalchemy import select

    from db.models import Request
    from db.session import session_scope

    with session_scope(fleet.db_url) as s:
        requests = list(s.scalars(select(Request).where(Request.request_id.in_(array_ids))))
    assert {(r.image_ref, r.image_bytes, r.client) for r in requests} == {("array", 32 * 32 * 3, "arrays")}
    # each message's array was deleted once its items were answered (not left for its hour of TTL)
    import redis as redis_lib

    raw = redis_lib.Redis.from_url(fleet.settings.broker_url)
    metas = [json.loads(raw.get(k)) for k in raw.scan_iter("celery-task-meta-*")]
    messages = {m["task_id"] for m in metas if m.get("name") == "umcd.detect_batch" and "arrays" in m["kwargs"]}
    assert len(messages) == 3  # 40 images in messages of 16
    assert _array_keys_left(fleet, {f"umcd:img:{m}" for m in messages}) == set()


def test_a_missing_array_or_an_index_past_its_end_answers_invalid_input_and_the_rest_is_scored(fleet, digit_pngs):
    import io

    import redis as redis_lib

    raw = redis_lib.Redis.from_url(fleet.settings.broker_url)
    buf = io.BytesIO()
    np.save(buf, _pixels(digit_pngs[:3]))
    message = f"batch-{uuid.uuid4().hex}"
    key, gone = f"umcd:img:{message}", f"umcd:img:never-{uuid.uuid4().hex}"  # the SDK keys an array by its message
    raw.set(key, buf.getvalue(), ex=600)
    ids = [f"arr-{uuid.uuid4().hex[:8]}-{i}" for i in range(5)]
    refs = [{"redis_key": key, "index": 0}, {"redis_key": key, "index": 2}, {"redis_key": key, "index": 3},
            {"redis_key": gone, "index": 0}, {"redis_key": gone, "index": 1}]
    items = [{"request_id": rid, "image": {"array": ref}} for rid, ref in zip(ids, refs)]
    summary = fleet.client.app.send_task("umcd.detect_batch", kwargs={"items": items, "submitted_at": time.time()},
                                         task_id=message, queue="detect").get(timeout=60)
    assert summary["stored"] == 5 and summary["failed"] == 0 and summary["verdicts"].get("invalid_input") == 3
    results = fleet.client.wait(ids, timeout=30)
    assert [results[rid].verdict != "invalid_input" for rid in ids] == [True, True, False, False, False]
    assert "index 3 of a pixel array of 3 images" in results[ids[2]].reasons[0]
    assert "missing from Redis" in results[ids[3]].reasons[0]
    assert all(len(v) == 1 for v in fleet.rows(ids).values())
    assert _array_keys_left(fleet, {key}) == set()


def test_insertions_from_a_pixel_array_store_a_png_of_their_pixels(fleet, digit_pngs):
    from PIL import Image
    from sqlalchemy import select

    from db.models import DbImage
    from db.session import session_scope

    pixels = _pixels(digit_pngs[170:176])
    ids = fleet.client.submit_inserts(pixels, source="array-insert", label=4)
    results = fleet.client.wait(ids, timeout=90)
    assert set(results) == set(ids), fleet.logs()
    with session_scope(fleet.db_url) as s:
        stored = {row.request_id: row.image_path for row in s.scalars(select(DbImage).where(DbImage.request_id.in_(ids)))}
    assert set(stored) == set(ids)
    for rid, image in zip(ids, pixels):  # the bytes kept for re-encoding at the next publish are these pixels
        assert np.array_equal(np.asarray(Image.open(stored[rid]).convert("RGB")), image)


def test_a_message_redelivered_after_its_array_was_deleted_answers_from_the_audit_store(fleet, digit_pngs):
    ids = [f"redo-{uuid.uuid4().hex[:8]}-{i}" for i in range(4)]
    first = fleet.client.wait(fleet.client.submit_queries(_pixels(digit_pngs[180:184]), request_ids=ids), timeout=60)
    assert set(first) == set(ids), fleet.logs()
    # the same items again, their array gone (as when a worker died between deleting it and its ack)
    items = [{"request_id": rid, "image": {"array": {"redis_key": f"umcd:img:gone-{ids[0]}", "index": j}}}
             for j, rid in enumerate(ids)]
    for rid in ids:
        fleet.client.app.AsyncResult(rid).forget()
    summary = fleet.client.app.send_task("umcd.detect_batch", kwargs={"items": items, "submitted_at": time.time()},
                                         task_id=f"batch-{uuid.uuid4().hex}", queue="detect").get(timeout=60)
    assert summary["stored"] == 4 and "invalid_input" not in summary["verdicts"]
    again = fleet.client.wait(ids, timeout=30)
    assert {rid: r.to_dict()["scores"] for rid, r in again.items()} == \
        {rid: r.to_dict()["scores"] for rid, r in first.items()}
    assert all(len(v) == 1 for v in fleet.rows(ids).values())


def test_a_message_of_more_than_1024_images_fails_each_one_and_its_array_is_deleted(fleet, digit_pngs):
    """Each item fails with the reason, except an id answered before, whose Result such a message (anyone's,
    naming ids it knows) must not overwrite."""
    import io

    import redis as redis_lib

    (victim,) = fleet.client.submit_queries(digit_pngs[:1])
    before = fleet.client.wait([victim], timeout=60)[victim]
    assert before.verdict in ("benign", "adversarial")
    raw = redis_lib.Redis.from_url(fleet.settings.broker_url)
    buf = io.BytesIO()
    np.save(buf, _pixels(digit_pngs[:1]))
    message = f"batch-{uuid.uuid4().hex}"
    key = f"umcd:img:{message}"  # the SDK's key of a message's array
    raw.set(key, buf.getvalue(), ex=600)
    ids = [f"big-{uuid.uuid4().hex[:8]}-{i}" for i in range(1024)] + [victim]
    items = [{"request_id": rid, "image": {"array": {"redis_key": key, "index": 0}}} for rid in ids]
    summary = fleet.client.app.send_task("umcd.detect_batch", kwargs={"items": items, "submitted_at": time.time()},
                                         task_id=message, queue="detect").get(timeout=60)
    assert summary["failed"] == summary["stored"] == 1024
    results = fleet.client.wait([ids[0], ids[-2]], timeout=30)
    assert len(results) == 2
    assert all(r.verdict == "error" and "at most 1024 images" in r.reasons[0] for r in results.values())
    assert fleet.client.wait([victim], timeout=30)[victim].to_dict() == before.to_dict()
    assert _array_keys_left(fleet, {key}) == set()
    assert fleet.rows(ids[:5]) == {rid: [] for rid in ids[:5]}  # nothing was scored


def test_an_image_stored_under_its_own_key_is_deleted_once_answered_and_no_other(fleet, digit_pngs):
    """An image too large to travel inline waits in Redis under a key of its request's own; once the request is
    answered nobody reads it again (a redelivery answers from the audit store), so the worker deletes it instead
    of leaving it for its whole TTL (a day). A crafted reference to another request's key deletes nothing."""
    import redis as redis_lib

    raw = redis_lib.Redis.from_url(fleet.settings.broker_url)
    large = png(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert len(large) > INLINE_LIMIT
    keys: list[str] = []
    real_ref = fleet.client.image_ref

    def image_ref(request_id, data):  # the keys the SDK stores images under
        ref = real_ref(request_id, data)
        keys.extend([ref["redis_key"]] if "redis_key" in ref else [])
        return ref

    fleet.client.image_ref = image_ref
    try:
        single = fleet.client.submit_query(large)
        inline_batch = fleet.client._submit_inline_batches("umcd.detect", [digit_pngs[1], large], [None, None], {},
                                                           None, 16)  # the batch form of a broker that is not Redis
    finally:
        del fleet.client.image_ref
    assert len(keys) == 2 and keys[0].startswith(f"umcd:img:{single}:")
    other = f"umcd:img:someone-else-{uuid.uuid4().hex[:8]}:0123456789abcdef"
    raw.set(other, large, ex=300)
    crafted = f"crafted-{uuid.uuid4().hex[:8]}"
    fleet.client.app.send_task("umcd.detect", task_id=crafted, kwargs={
        "request_id": crafted, "image": {"redis_key": other}, "submitted_at": time.time()})
    ids = [single, *inline_batch, crafted]
    results = fleet.client.wait(ids, timeout=60)
    assert set(results) == set(ids) and all(r.verdict in ("benign", "adversarial") for r in results.values())
    deadline = time.monotonic() + 10
    while (left := [k for k in keys if raw.exists(k)]) and time.monotonic() < deadline:  # a batch's go at its end
        time.sleep(0.1)
    assert left == [] and raw.exists(other)  # another request's image stays, whoever names it
    assert 0 < raw.ttl(other) and fleet.client.settings.image_ref_ttl_s == 24 * 3600
