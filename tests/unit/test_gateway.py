"""The HTTP gateway against a real Celery app and a real redis-server: queues, limits, auth, status."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from producers.gateway import FORM_OVERHEAD_BYTES, TokenBucketLimiter, create_app
from producers.sdk import Client
from tests.servers import free_port
from umcd.settings import Settings

GATEWAY_DB = 5
MAX_IMAGE = 64 * 1024
INLINE_LIMIT = 4 * 1024


def _png(side: int = 16, noise: bool = False) -> bytes:
    import numpy as np

    if noise:
        arr = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
        image = Image.fromarray(arr)
    else:
        image = Image.new("RGB", (side, side), (10, 200, 30))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def broker(redis_server):
    """A flushed Redis database for this test: (url, redis-py client)."""
    url = redis_server.url_for(GATEWAY_DB)
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url, client
    client.flushdb()
    client.close()


def _settings(broker_url: str, tmp_path, **overrides) -> Settings:
    values = {
        "broker_url": broker_url,
        "result_backend": broker_url,
        "artifacts": tmp_path,
        "max_image_bytes": MAX_IMAGE,
        "inline_image_limit": INLINE_LIMIT,
        "rate_limit_per_minute": 10_000,
        **overrides,
    }
    return Settings(**values)


@pytest.fixture()
def make_gateway(broker, tmp_path):
    """Build a TestClient for a gateway with settings overrides; the SDK client is closed after."""
    url, _ = broker
    made = []

    def make(**overrides) -> tuple[TestClient, Client]:
        settings = _settings(url, tmp_path, **overrides)
        sdk = Client(settings)
        made.append(sdk)
        return TestClient(create_app(settings, client=sdk)), sdk

    yield make
    for sdk in made:
        sdk.close()


def _queued(client: redis.Redis, queue: str) -> list[dict]:
    """The Celery messages waiting on ``queue`` (kombu's Redis transport keeps a list per queue)."""
    return [json.loads(raw) for raw in client.lrange(queue, 0, -1)]


def _kwargs(message: dict) -> dict:
    assert message["content-type"] == "application/json"
    assert message["content-encoding"] == "utf-8"
    args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert args == []
    return kwargs


# --------------------------------------------------------------------------- routing and content


def test_query_upload_is_queued_on_detect_as_json(make_gateway, broker):
    gateway, _ = make_gateway()
    image = _png()
    response = gateway.post("/v1/query", files={"file": ("a.png", image, "image/png")},
                            data={"request_id": "q-1"})
    assert response.status_code == 202
    assert response.json() == {"request_id": "q-1"}

    _, r = broker
    messages = _queued(r, "detect")
    assert len(messages) == 1 and _queued(r, "screen") == []
    message = messages[0]
    assert message["headers"]["task"] == "umcd.detect"
    assert message["headers"]["id"] == "q-1"
    kwargs = _kwargs(message)
    assert kwargs["request_id"] == "q-1"
    assert base64.b64decode(kwargs["image"]["inline"]) == image
    assert kwargs["client"].startswith("ip:")
    assert isinstance(kwargs["submitted_at"], float)


def test_insert_upload_is_queued_on_screen_with_source_and_label(make_gateway, broker):
    gateway, _ = make_gateway()
    response = gateway.post("/v1/insert", files={"file": ("b.png", _png(), "image/png")},
                            data={"source": "camera-7", "label": "3"})
    assert response.status_code == 202
    rid = response.json()["request_id"]
    assert len(rid) == 32 and int(rid, 16) >= 0  # generated: uuid4 hex

    _, r = broker
    (message,) = _queued(r, "screen")
    assert _queued(r, "detect") == []
    assert message["headers"]["task"] == "umcd.screen"
    assert message["headers"]["id"] == rid
    kwargs = _kwargs(message)
    assert kwargs["source"] == "camera-7" and kwargs["label"] == 3


def test_image_over_the_inline_limit_travels_by_redis_key_with_a_ttl(make_gateway, broker):
    gateway, _ = make_gateway(image_ref_ttl_s=120)
    image = _png(64, noise=True)
    assert INLINE_LIMIT < len(image) <= MAX_IMAGE
    response = gateway.post("/v1/query", files={"file": ("big.png", image, "image/png")},
                            data={"request_id": "big-1"})
    assert response.status_code == 202
    _, r = broker
    (message,) = _queued(r, "detect")
    key = _kwargs(message)["image"]["redis_key"]
    assert key.startswith("umcd:img:big-1:") and len(key) == len("umcd:img:big-1:") + 16  # the message's own key
    assert r.get(key) == image
    assert 0 < r.ttl(key) <= 120


# --------------------------------------------------------------------------- size cap


def test_upload_declared_over_the_cap_is_refused_with_413(make_gateway, broker):
    gateway, _ = make_gateway()
    response = gateway.post("/v1/query", files={"file": ("x.png", b"\0" * (MAX_IMAGE + FORM_OVERHEAD_BYTES + 1))})
    assert response.status_code == 413
    assert f"limited to {MAX_IMAGE} bytes" in response.json()["detail"]
    assert _queued(broker[1], "detect") == []


def test_image_just_over_the_limit_is_refused_with_413(make_gateway, broker):
    gateway, _ = make_gateway()
    response = gateway.post("/v1/query", files={"file": ("x.png", b"\0" * (MAX_IMAGE + 1))})
    assert response.status_code == 413
    assert "upload too large" in response.json()["detail"]
    assert _queued(broker[1], "detect") == []
    ok = gateway.post("/v1/query", files={"file": ("x.png", b"\0" * MAX_IMAGE)})
    assert ok.status_code == 202  # the worker, not the gateway, judges the content


def test_chunked_upload_is_cut_off_while_reading(broker, tmp_path):
    """Without Content-Length the body is counted as it streams: reading stops at the cap."""
    app = create_app(_settings(broker[0], tmp_path))
    boundary = "xyzzy"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()
    chunk = b"\0" * 16 * 1024
    total_chunks = 200  # 3.2 MB, far beyond the 128 KiB body cap
    pulled = 0
    sent: list[dict] = []

    async def receive():
        nonlocal pulled
        pulled += 1
        if pulled == 1:
            return {"type": "http.request", "body": head, "more_body": True}
        return {"type": "http.request", "body": chunk, "more_body": pulled <= total_chunks}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/query", "raw_path": b"/v1/query", "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 5555), "server": ("testserver", 80),
        "headers": [(b"host", b"testserver"),
                    (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
                    (b"transfer-encoding", b"chunked")],
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert start["status"] == 413
    assert b"upload too large" in body
    cap_chunks = (MAX_IMAGE + FORM_OVERHEAD_BYTES) // len(chunk) + 2
    assert pulled <= cap_chunks + 1 < total_chunks
    assert _queued(broker[1], "detect") == []


# --------------------------------------------------------------------------- rate limit and auth


def test_rate_limit_answers_429_with_retry_after(make_gateway):
    gateway, _ = make_gateway(rate_limit_per_minute=2)
    codes = [gateway.get("/v1/requests/some-id").status_code for _ in range(2)]
    limited = gateway.get("/v1/requests/some-id")
    assert codes == [200, 200]
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) >= 1
    assert "rate limit" in limited.json()["detail"]
    assert gateway.get("/healthz").status_code == 200  # health checks are not limited


def test_rate_limit_buckets_are_per_client_address(broker, tmp_path):
    settings = _settings(broker[0], tmp_path, rate_limit_per_minute=1)
    with Client(settings) as sdk:
        app = create_app(settings, client=sdk)
        first = TestClient(app, client=("10.0.0.1", 1000))
        second = TestClient(app, client=("10.0.0.2", 1000))
        assert first.get("/v1/requests/a").status_code == 200
        assert first.get("/v1/requests/a").status_code == 429
        assert second.get("/v1/requests/a").status_code == 200


def test_token_bucket_refills_at_the_configured_rate():
    now = [0.0]
    limiter = TokenBucketLimiter(per_minute=60, burst=2, clock=lambda: now[0])
    assert limiter.take("a") == 0.0 and limiter.take("a") == 0.0
    assert limiter.take("a") == pytest.approx(1.0)  # empty: one token per second
    assert limiter.take("b") == 0.0  # another identity has its own bucket
    now[0] = 1.5
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0.0
    now[0] = 100.0
    assert limiter.take("a") == 0.0 and limiter.take("a") == 0.0  # refill capped at the burst
    assert limiter.take("a") > 0.0


def test_token_bucket_forgets_least_recently_used_identities():
    limiter = TokenBucketLimiter(per_minute=1, burst=1, max_identities=2, clock=lambda: 0.0)
    for identity in ("a", "b", "c"):
        assert limiter.take(identity) == 0.0
    assert limiter.take("c") > 0.0
    assert limiter.take("a") == 0.0  # "a" was dropped, so it starts with a full bucket


def test_api_key_is_required_when_configured(make_gateway, broker):
    gateway, _ = make_gateway(api_key="s3cret-key")
    files = {"file": ("a.png", _png(), "image/png")}
    missing = gateway.post("/v1/query", files=files)
    wrong = gateway.post("/v1/query", files=files, headers={"X-API-Key": "s3cret-kez"})
    right = gateway.post("/v1/query", files=files, headers={"X-API-Key": "s3cret-key"})
    assert missing.status_code == 401 and wrong.status_code == 401
    assert missing.headers["WWW-Authenticate"] == "ApiKey"
    assert right.status_code == 202
    assert gateway.get("/v1/requests/x").status_code == 401
    assert gateway.get("/healthz").status_code == 200
    assert gateway.get("/openapi.json").status_code == 200
    (message,) = _queued(broker[1], "detect")
    assert _kwargs(message)["client"].startswith("key:")


def test_without_a_configured_key_no_key_is_needed(make_gateway):
    gateway, _ = make_gateway()
    assert gateway.post("/v1/query", files={"file": ("a.png", _png())}).status_code == 202


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad", ["has space", "x" * 65, "semi;colon", "slash/id", "ünïcode"])
def test_bad_request_ids_are_refused_with_422(make_gateway, broker, bad):
    gateway, _ = make_gateway()
    response = gateway.post("/v1/query", files={"file": ("a.png", _png())}, data={"request_id": bad})
    assert response.status_code == 422
    assert "request id" in response.json()["detail"]
    assert _queued(broker[1], "detect") == []


def test_bad_request_id_in_the_status_path_is_422(make_gateway):
    gateway, _ = make_gateway()
    assert gateway.get("/v1/requests/bad%20id").status_code == 422
    assert gateway.get("/v1/requests/" + "x" * 65).status_code == 422


def test_non_integer_label_is_422(make_gateway):
    gateway, _ = make_gateway()
    response = gateway.post("/v1/insert", files={"file": ("a.png", _png())}, data={"label": "cat"})
    assert response.status_code == 422 and "label" in response.json()["detail"]


def test_missing_file_field_is_422_and_non_multipart_is_415(make_gateway):
    gateway, _ = make_gateway()
    missing = gateway.post("/v1/query", data={"request_id": "q-1"}, files={"other": ("a.png", b"x")})
    assert missing.status_code == 422 and "'file'" in missing.json()["detail"]
    assert gateway.post("/v1/query", content=b"raw", headers={"content-type": "image/png"}).status_code == 415


# --------------------------------------------------------------------------- status and docs


def test_request_status_goes_from_pending_to_done_with_the_result(make_gateway):
    gateway, sdk = make_gateway()
    assert gateway.get("/v1/requests/r-1").json() == {"request_id": "r-1", "status": "pending", "result": None,
                                                      "source": None}

    # what a worker does when it finishes: the task's return value lands in the result backend
    result = {"request_id": "r-1", "kind": "query", "verdict": "adversarial", "reasons": ["c2 below T2"],
              "fired": ["c2"], "scores": {"c1": 3.0, "c2": 0.1, "c3": 1.0, "combined": 0.9},
              "thresholds": {"c1": 10.0, "c2": 0.5, "c3": 4.0}, "topk": None, "image_id": None,
              "model_version": "m1", "calibration_id": 1, "detector": "umcd", "batch_size": 4,
              "latency_ms": {"queue": 1.0, "model": 2.0, "search": 0.5, "total": 4.0}, "worker": "w1"}
    sdk.app.backend.store_result("r-1", result, "SUCCESS")
    done = gateway.get("/v1/requests/r-1").json()
    assert done["status"] == "done" and done["source"] == "result_backend"
    assert done["result"] == result

    sdk.app.backend.store_result("r-2", None, "STARTED")
    assert gateway.get("/v1/requests/r-2").json()["status"] == "running"

    sdk.app.backend.mark_as_failure("r-3", ValueError("boom"))
    failed = gateway.get("/v1/requests/r-3").json()
    assert failed["status"] == "failed"
    assert failed["result"]["verdict"] == "error" and "boom" in failed["result"]["reasons"][0]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_request_the_result_backend_forgot_is_read_from_the_audit_store(make_gateway, db_url):
    from db.repo import verdict_fields_from_result, write_verdict
    from db.session import session_scope

    result = {"request_id": "old-1", "kind": "insert", "verdict": "benign", "reasons": [], "fired": [],
              "scores": {"c1": 2.0, "c2": 0.7, "c3": 1.5, "combined": 0.2},
              "thresholds": {"c1": 10.0, "c2": 0.5, "c3": 4.0}, "topk": {"ids": [4, 2], "distances": [1, 3]},
              "image_id": 17, "model_version": "m2", "calibration_id": 3, "detector": "umcd", "batch_size": 8,
              "latency_ms": {"queue": 1.0, "model": 2.0, "search": 0.5, "total": 4.0}, "worker": "w2"}
    with session_scope(db_url) as session:
        write_verdict(session, **verdict_fields_from_result(result))
    gateway, _ = make_gateway(database_url=db_url)
    answer = gateway.get("/v1/requests/old-1").json()
    assert answer["status"] == "done" and answer["source"] == "audit"
    assert answer["result"] == result
    assert gateway.get("/v1/requests/never-1").json()["status"] == "pending"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_audit_store_fallback_gives_no_neighbours_of_a_rejected_request(make_gateway, db_url):
    """The row keeps the top-k of rejections for the audit; a client gets them only for a benign verdict,
    from the audit store as from the worker."""
    from db.repo import verdict_fields_from_result, write_verdict
    from db.session import session_scope

    rejected = {"request_id": "adv-1", "kind": "query", "verdict": "adversarial", "reasons": ["c1 fired"],
                "fired": ["c1"], "scores": {"c1": 30.0, "c2": 0.7, "c3": 1.5, "combined": 2.5},
                "thresholds": {"c1": 10.0, "c2": 0.5, "c3": 4.0}, "topk": {"ids": [11, 22], "distances": [9, 9]},
                "image_id": None, "model_version": "m2", "calibration_id": 3, "detector": "umcd", "batch_size": 8,
                "latency_ms": {"queue": 1.0, "model": 2.0, "search": 0.5, "total": 4.0}, "worker": "w2"}
    with session_scope(db_url) as session:
        write_verdict(session, **verdict_fields_from_result(rejected))
    gateway, _ = make_gateway(database_url=db_url)
    answer = gateway.get("/v1/requests/adv-1").json()
    assert answer["source"] == "audit" and answer["result"]["verdict"] == "adversarial"
    assert answer["result"]["topk"] is None
    assert answer["result"] == {**rejected, "topk": None}


def test_metadata_the_audit_store_cannot_hold_is_refused_with_422_before_sending(make_gateway, broker):
    gateway, _ = make_gateway()
    image = _png(16)
    for data, word in (({"label": str(2**31)}, "label"), ({"label": "-99999999999999999999"}, "label"),
                       ({"source": "s" * 257}, "source")):
        response = gateway.post("/v1/insert", files={"file": ("a.png", image, "image/png")}, data=data)
        assert response.status_code == 422 and word in response.json()["detail"], response.text
    assert gateway.post("/v1/insert", files={"file": ("a.png", image, "image/png")},
                        data={"label": str(2**31 - 1)}).status_code == 202
    _, r = broker
    assert len(_queued(r, "screen")) == 1  # only the last one was sent


def test_a_request_id_of_dots_alone_is_refused(make_gateway):
    gateway, _ = make_gateway()
    for rid in (".", "..", "..."):
        response = gateway.post("/v1/query", files={"file": ("a.png", _png(16), "image/png")},
                                data={"request_id": rid})
        assert response.status_code == 422 and "not only dots" in response.json()["detail"]
    assert gateway.post("/v1/query", files={"file": ("a.png", _png(16), "image/png")},
                        data={"request_id": ".a."}).status_code == 202


def test_the_multipart_media_type_is_matched_without_regard_to_case(make_gateway):
    gateway, _ = make_gateway()
    request = gateway.build_request("POST", "/v1/query", files={"file": ("a.png", _png(16), "image/png")})
    content_type = request.headers["content-type"].replace("multipart/form-data", "Multipart/Form-Data")
    response = gateway.post("/v1/query", content=request.read(), headers={"content-type": content_type})
    assert response.status_code == 202, response.text


def test_a_missing_sqlite_audit_store_is_not_created_by_status_reads(make_gateway, tmp_path):
    gateway, _ = make_gateway()  # database_url unset: artifacts/audit.db, which does not exist
    assert gateway.get("/v1/requests/r-9").json()["status"] == "pending"
    assert not (tmp_path / "audit.db").exists()


def test_broker_down_answers_503(tmp_path):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings = _settings(dead, tmp_path)
    with Client(settings, retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.1,
                                        "interval_max": 0.1}) as sdk:
        gateway = TestClient(create_app(settings, client=sdk))
        response = gateway.post("/v1/query", files={"file": ("a.png", _png())})
        assert response.status_code == 503
        assert response.headers["Retry-After"]
        assert gateway.get("/readyz").status_code == 503


def test_readyz_reports_a_live_broker(make_gateway):
    gateway, _ = make_gateway()
    assert gateway.get("/readyz").json() == {"broker": "ok"}


def test_openapi_documents_the_multipart_upload(make_gateway):
    gateway, _ = make_gateway()
    spec = gateway.get("/openapi.json").json()
    for path in ("/v1/query", "/v1/insert"):
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert "file" in schema["properties"] and schema["required"] == ["file"]
    assert "label" in spec["paths"]["/v1/insert"]["post"]["requestBody"]["content"][
        "multipart/form-data"]["schema"]["properties"]
    assert "/v1/requests/{request_id}" in spec["paths"]
    assert gateway.get("/docs").status_code == 200


def test_gateway_exports_prometheus_counters_by_route_and_status():
    from fastapi.testclient import TestClient

    from producers.gateway import create_app
    from umcd.settings import Settings

    app = create_app(Settings(broker_url="redis://127.0.0.1:1/0"), audit_fallback=False)
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        assert c.post("/v1/query", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
        body = c.get("/metrics").text
    assert 'umcd_gateway_requests_total{route="/healthz",status="200"} 1.0' in body
    assert 'umcd_gateway_requests_total{route="/v1/query",status="415"} 1.0' in body
    assert "umcd_gateway_latency_seconds_bucket" in body


@pytest.mark.parametrize("blank", ["", "   "])
def test_a_blank_api_key_setting_is_no_key_not_one_an_empty_header_matches(blank, monkeypatch):
    from umcd.settings import Settings

    monkeypatch.setenv("UMCD_API_KEY", blank)
    assert Settings().api_key is None  # the gateway then warns that it runs without a key
    monkeypatch.setenv("UMCD_API_KEY", "k3y")
    assert Settings().api_key.get_secret_value() == "k3y"
