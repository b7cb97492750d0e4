"""The fleet end to end: real redis-server, two Celery detection workers, SDK and HTTP gateway, SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.fleet_helpers import (
    BITS,
    Worker,
    digits_query_pngs,
    digits_splits,
    png,
    total_verdicts,
    trained_checkpoint,
    verdict_rows,
)
from tests.fleet_helpers import start_worker as _start_worker
from tests.fleet_helpers import stop_worker as _stop_worker
from tests.fleet_helpers import wait_ready as _wait_ready

N_QUERIES, N_INSERTS = 300, 100
WORKERS = ("w1", "w2")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


# --------------------------------------------------------------------------- images


@pytest.fixture(scope="session")
def digits():
    return digits_splits()


@pytest.fixture(scope="session")
def query_pngs(digits) -> list[bytes]:
    """PNG bytes of every image of the digits query split (in split order)."""
    return digits_query_pngs()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A small CSQ model (16 bits, 3 epochs on digits): seconds to train; accuracy is not the point."""
    return trained_checkpoint(tmp_path_factory)


# --------------------------------------------------------------------------- the fleet


@dataclass
class Fleet:
    dialect: str
    db_url: str
    settings: object
    client: object
    gateway: object
    published: object
    workers: dict[str, Worker]
    artifacts: Path
    measured: dict = field(default_factory=dict)

    def send(self, task: str, worker: str, image: bytes, request_id: str | None = None, **extra) -> str:
        """Send one request to one worker's own queue (inline image); returns its request id."""
        import base64

        rid = request_id or uuid.uuid4().hex
        kwargs = {"request_id": rid, "image": {"inline": base64.b64encode(image).decode()},
                  "submitted_at": time.time(), "client": "test", **extra}
        self.client.app.send_task(task, kwargs=kwargs, task_id=rid, queue=self.workers[worker].queue)
        return rid

    def result(self, rid: str, timeout: float = 60.0):
        got = self.client.wait([rid], timeout=timeout)
        assert rid in got, f"no result for {rid} within {timeout} s\n{self.logs()}"
        return got[rid]

    def logs(self, n: int = 30) -> str:
        out = []
        for w in self.workers.values():
            lines = w.log.read_text(errors="replace").splitlines()[-n:] if w.log.exists() else []
            out.append(f"--- {w.name} (rc={w.proc.poll()}) ---\n" + "\n".join(lines))
        return "\n".join(out)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql")])
def fleet(request, redis_server, checkpoint, tmp_path_factory):
    """A published model, two detection workers (w1, w2), an SDK client and a gateway on one audit store."""
    import redis as redis_lib
    from fastapi.testclient import TestClient

    from db.migrate import upgrade
    from db.session import dispose_engine
    from producers.gateway import create_app
    from producers.sdk import Client
    from umcd.settings import Settings
    from workers.publish import publish

    dialect = request.param
    artifacts = tmp_path_factory.mktemp(f"fleet-{dialect}")
    pg_name = None
    if dialect == "sqlite":
        db_url = f"sqlite:///{artifacts / 'audit.db'}"
        redis_db = 1
    else:
        server = request.getfixturevalue("postgres_server")
        pg_name = f"fleet_{uuid.uuid4().hex[:12]}"
        db_url = server.create_database(pg_name)
        redis_db = 2
    broker = redis_server.url_for(redis_db)
    redis_lib.Redis.from_url(broker).flushdb()
    upgrade(db_url)
    settings = Settings(artifacts=artifacts, database_url=db_url, broker_url=broker, result_backend=broker,
                        bits=BITS, rate_limit_per_minute=100_000)
    published = publish(checkpoint, settings=settings, seed_fraction=0.5)
    workers: dict[str, Worker] = {}
    client = Client(settings)
    gateway = None
    try:
        for name in WORKERS:
            workers[name] = _start_worker(name, settings, artifacts)
        _wait_ready(client, workers)
        gateway = TestClient(create_app(settings, client=client))
        yield Fleet(dialect, db_url, settings, client, gateway, published, workers, artifacts)
    finally:
        for w in workers.values():
            _stop_worker(w)
        if gateway is not None:
            gateway.close()
        client.close()
        dispose_engine(db_url)
        if pg_name is not None:
            request.getfixturevalue("postgres_server").drop_database(pg_name)


# --------------------------------------------------------------------------- helpers


def gateway_post(fleet: Fleet, path: str, image: bytes, **fields) -> str:
    r = fleet.gateway.post(path, files={"file": ("image.png", image, "image/png")},
                           data={k: str(v) for k, v in fields.items()})
    assert r.status_code == 202, r.text
    return r.json()["request_id"]


# --------------------------------------------------------------------------- tests


def test_400_requests_through_the_sdk_and_the_gateway_get_exactly_400_results_and_400_verdict_rows(
        fleet, query_pngs):
    before = total_verdicts(fleet.db_url)
    queries, inserts = query_pngs[:N_QUERIES], query_pngs[N_QUERIES : N_QUERIES + N_INSERTS]
    t0 = time.perf_counter()
    sdk_q = fleet.client.submit_queries(queries[:200], client="sdk")
    sdk_i = fleet.client.submit_inserts(inserts[:80], source="sdk-test", label=3, client="sdk")
    gw_q = [gateway_post(fleet, "/v1/query", img) for img in queries[200:]]
    gw_i = [gateway_post(fleet, "/v1/insert", img, source="gw-test", label=4) for img in inserts[80:]]
    query_ids, insert_ids = sdk_q + gw_q, sdk_i + gw_i
    all_ids = query_ids + insert_ids
    assert len(set(all_ids)) == N_QUERIES + N_INSERTS

    results = fleet.client.wait(all_ids, timeout=240)
    elapsed = time.perf_counter() - t0
    assert len(results) == 400, fleet.logs()
    verdicts = Counter(r.verdict for r in results.values())
    assert set(verdicts) <= {"benign", "adversarial"}, verdicts  # every image is a valid digit
    assert verdicts["benign"] > 0

    rows = verdict_rows(fleet.db_url, all_ids)
    assert all(len(r) == 1 for r in rows.values()), {k: len(v) for k, v in rows.items() if len(v) != 1}
    assert total_verdicts(fleet.db_url) - before == 400
    flat = [r[0] for r in rows.values()]
    assert max(r["batch_size"] for r in flat) > 1, "no batch held more than one image"
    for row in flat:
        assert row["model_version"] == fleet.published.model_version
        assert row["calibration_id"] == fleet.published.calibration_id
        assert row["detector"] == "umcd"
        assert row["worker"].split("@")[0] in WORKERS
        assert row["latency_total_ms"] >= row["latency_model_ms"] >= 0 and row["latency_queue_ms"] >= 0
        assert row["c1"] is not None and row["c2"] is not None and row["c3"] is not None

    # queries: benign ones carry their neighbours, rejected ones their reasons against the thresholds
    for rid in query_ids:
        r = results[rid]
        assert r.kind == "query" and r.image_id is None
        if r.verdict == "benign":
            assert r.fired == [] and len(r.topk["ids"]) == len(r.topk["distances"]) > 0
        else:
            assert r.fired and r.topk is None and len(r.reasons) == len(r.fired)
            assert all(f"threshold {r.thresholds[c]:.4g}" in reason for c, reason in zip(r.fired, r.reasons))

    # insertions: benign ones are in the database and the index log, adversarial ones quarantined
    from sqlalchemy import select

    from db.models import DbImage, IndexLog
    from db.session import session_scope

    with session_scope(fleet.db_url) as s:
        images = {row.request_id: row for row in s.scalars(select(DbImage).where(DbImage.request_id.in_(insert_ids)))}
        logged = set(s.scalars(select(IndexLog.image_id).where(
            IndexLog.op == "add", IndexLog.model_version == fleet.published.model_version)))
    assert set(images) == set(insert_ids)
    for rid in insert_ids:
        r, image = results[rid], images[rid]
        assert Path(image.image_path).is_file()
        if r.verdict == "benign":
            assert image.status == "active" and r.image_id == image.id and image.id in logged
        else:
            assert image.status == "quarantined" and image.reasons and image.id not in logged
    sources = Counter(images[rid].source for rid in insert_ids)
    assert sources == {"sdk-test": 80, "gw-test": 20}

    # the gateway answers with the same Result
    status = fleet.gateway.get(f"/v1/requests/{gw_q[0]}").json()
    assert status["status"] == "done" and status["result"]["verdict"] == results[gw_q[0]].verdict

    sizes = Counter(r["batch_size"] for r in flat)
    served = Counter(r["worker"].split("@")[0] for r in flat)
    fleet.measured["load"] = {"requests": 400, "seconds": round(elapsed, 2), "verdicts": dict(verdicts),
                              "batch_sizes": dict(sorted(sizes.items())), "served_by": dict(served)}
    print(f"\n[{fleet.dialect}] {fleet.measured['load']}")


def _rare_code_candidates(fleet: Fleet, digits, query_pngs, k: int = 10) -> list[int]:
    """Query-split images whose code has fewer than k-1 exact copies among the active codes."""
    import torch

    from core.checkpoint import load_checkpoint
    from core.index import pack_codes
    from core.models import sign_codes
    from db import repo
    from db.session import session_scope

    model = load_checkpoint(fleet.published.checkpoint).model
    with torch.no_grad():
        codes = pack_codes(sign_codes(model(digits.query.get())))
    with session_scope(fleet.db_url) as s:
        active = Counter(code for _, code in repo.active_image_codes(s, fleet.published.model_version))
    used = set(range(N_QUERIES + N_INSERTS))
    return [i for i in range(len(query_pngs)) if i not in used and active[codes[i].tobytes()] < k - 1]


def test_an_image_inserted_through_one_worker_is_found_by_a_query_served_by_the_other(fleet, digits, query_pngs):
    candidates = _rare_code_candidates(fleet, digits, query_pngs)
    assert candidates, "no query image with a rare code"
    for i in candidates[:8]:
        inserted = fleet.result(fleet.send("umcd.screen", "w1", query_pngs[i], source="pin"))
        assert inserted.worker.startswith("w1@")
        if inserted.verdict == "benign":
            break
    else:
        pytest.fail("none of the candidate insertions was accepted")
    t_inserted = time.perf_counter()
    found_after = None
    for attempt in range(100):
        answer = fleet.result(fleet.send("umcd.detect", "w2", query_pngs[i]))
        assert answer.worker.startswith("w2@")
        if answer.verdict == "benign" and inserted.image_id in answer.topk["ids"]:
            found_after = time.perf_counter() - t_inserted
            break
        time.sleep(0.02)
    assert found_after is not None, f"image {inserted.image_id} never found through w2\n{fleet.logs()}"
    position = answer.topk["ids"].index(inserted.image_id)
    assert answer.topk["distances"][position] == 0
    rows = verdict_rows(fleet.db_url, [inserted.request_id, answer.request_id])
    assert rows[inserted.request_id][0]["worker"].startswith("w1@")
    assert rows[answer.request_id][0]["worker"].startswith("w2@")

    m = fleet.workers["w2"].metrics()
    n = m.get("umcd_replica_visibility_seconds_count", 0.0)
    fleet.measured["visibility"] = {
        "found_through_w2_after_s": round(found_after, 3), "query_attempts": attempt + 1,
        "w2_log_rows_applied": int(n),
        "w2_mean_visibility_s": round(m["umcd_replica_visibility_seconds_sum"] / n, 3) if n else None,
        "w2_index_size": m.get("umcd_index_size"),
    }
    print(f"\n[{fleet.dialect}] cross-worker visibility: {fleet.measured['visibility']}")
    assert m["umcd_index_size"] >= 1 and f'umcd_model_info{{version="{fleet.published.model_version}"}}' in m


def _bomb_png(side: int = 5000) -> bytes:
    """A small PNG whose header says side x side pixels (past the worker's pixel limit)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_bad_inputs_get_invalid_input_with_a_reason_and_the_worker_goes_on_serving(fleet, query_pngs):
    good = query_pngs[-1]
    rng = np.random.default_rng(0)
    bad = {
        "corrupt": good[: len(good) // 2],
        "not_an_image": b"<html><body>this is not an image</body></html>",
        "one_pixel": png(np.zeros((1, 1, 3), np.uint8)),
        "too_many_pixels": _bomb_png(),
        "too_many_bytes": png(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)),  # > 256 KiB
    }
    assert len(bad["too_many_bytes"]) > 256 * 1024
    ids = {}
    for name, data in bad.items():
        if name == "too_many_bytes":  # travels as a redis_key reference (over the inline limit)
            ids[name] = fleet.client.submit_query(data)
        else:
            ids[name] = fleet.send("umcd.detect", "w1", data)
    results = fleet.client.wait(list(ids.values()), timeout=60)
    assert len(results) == len(bad), fleet.logs()
    expected_words = {"corrupt": "truncated", "not_an_image": "not an image", "one_pixel": "too small",
                      "too_many_pixels": "decompression bomb", "too_many_bytes": "too large"}
    rows = verdict_rows(fleet.db_url, ids.values())
    for name, rid in ids.items():
        r = results[rid]
        assert r.verdict == "invalid_input", (name, r)
        assert len(r.reasons) == 1 and expected_words[name] in r.reasons[0].lower(), (name, r.reasons)
        assert r.scores is None and r.batch_size == 0
        (row,) = rows[rid]
        assert row["verdict"] == "invalid_input" and row["reasons"] == r.reasons
    after = fleet.result(fleet.send("umcd.detect", "w1", good))
    assert after.verdict in ("benign", "adversarial") and after.worker.startswith("w1@")
    assert fleet.workers["w1"].proc.poll() is None
    m = fleet.workers["w1"].metrics()
    assert m['umcd_requests_total{outcome="invalid_input",queue="detect"}'] >= 4


def test_a_redelivered_request_keeps_its_first_verdict_and_gets_no_second_row(fleet, query_pngs):
    rid = uuid.uuid4().hex
    first = fleet.result(fleet.send("umcd.screen", "w1", query_pngs[-2], request_id=rid, source="redelivery"))
    fleet.client.app.AsyncResult(rid).forget()
    again = fleet.result(fleet.send("umcd.screen", "w2", query_pngs[-2], request_id=rid, source="redelivery"))
    assert again.verdict == first.verdict and again.image_id == first.image_id
    assert again.worker == first.worker  # the stored verdict, made by w1
    (row,) = verdict_rows(fleet.db_url, [rid])[rid]
    assert row["worker"] == first.worker

    from sqlalchemy import func, select

    from db.models import DbImage
    from db.session import session_scope

    with session_scope(fleet.db_url) as s:
        assert s.execute(select(func.count()).select_from(DbImage).where(DbImage.request_id == rid)).scalar() == 1


def test_an_attack_set_is_stored_as_uint8_pngs_with_a_row_and_its_images_get_verdicts(fleet):
    from db.models import AttackSet
    from db.session import session_scope
    from workers.attacksets import generate_attack_set

    out = generate_attack_set("pgd_untargeted", n_images=6, eps=16, seed=1, steps=10, settings=fleet.settings)
    folder = Path(out["path"])
    files = sorted(folder.glob("*.png"))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert folder.parent == (fleet.artifacts / "attacks").resolve() and folder.name == str(out["attack_set_id"])
    assert len(files) == len(manifest["images"]) == out["n_images"] == 6
    with session_scope(fleet.db_url) as s:
        row = s.get(AttackSet, out["attack_set_id"])
        assert row.path == str(folder) and row.attack == "pgd_untargeted" and row.n_images == 6
        assert row.model_version == fleet.published.model_version
        assert row.success_rate == out["success_rate"] == pytest.approx(
            np.mean([m["success"] for m in manifest["images"]]))
    ids = fleet.client.submit_queries(files)  # uploaded as an attacker would: uint8 PNG files
    results = fleet.client.wait(ids, timeout=60)
    assert len(results) == 6 and {r.verdict for r in results.values()} <= {"benign", "adversarial"}


def test_workers_switch_to_a_newly_published_model_without_a_restart(fleet, query_pngs):
    from core.checkpoint import load_checkpoint, save_checkpoint
    from db import repo
    from db.session import session_scope
    from workers.publish import publish

    ckpt = load_checkpoint(fleet.published.checkpoint)
    ckpt.meta.extra = {**ckpt.meta.extra, "republished": uuid.uuid4().hex}  # same weights, a new version
    path = fleet.artifacts / "republished.safetensors"
    save_checkpoint(path, ckpt.model, ckpt.centers, ckpt.meta)
    new = publish(path, settings=fleet.settings, seed_fraction=0.5)
    assert new.model_version != fleet.published.model_version
    assert new.n_seeded == 0  # the database was seeded once; every active image was re-encoded instead
    with session_scope(fleet.db_url) as s:
        assert repo.active_model_version(s).version == new.model_version
        assert repo.images_without_code(s, new.model_version) == []
        n_active = repo.image_counts(s)["active"]
    switched = {}
    deadline = time.monotonic() + 60
    while len(switched) < len(WORKERS) and time.monotonic() < deadline:
        for name in WORKERS:
            if name not in switched:
                r = fleet.result(fleet.send("umcd.detect", name, query_pngs[0]))
                if r.model_version == new.model_version:
                    switched[name] = r
        time.sleep(0.1)
    assert set(switched) == set(WORKERS), fleet.logs()
    for r in switched.values():
        assert r.calibration_id == new.calibration_id
    for w in fleet.workers.values():
        assert w.proc.poll() is None
        m = w.metrics()
        assert m[f'umcd_model_info{{version="{new.model_version}"}}'] == 1
        assert m["umcd_index_size"] == n_active
    fleet.measured["republish_s"] = round(new.seconds, 2)
    out = fleet.artifacts / "measured.json"
    out.write_text(json.dumps(fleet.measured, indent=1))
    print(f"\n[{fleet.dialect}] measured: {json.dumps(fleet.measured)}")
