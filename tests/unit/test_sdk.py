"""The SDK and `umcd submit` round trip through a real redis-server and a real solo Celery worker."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image

from producers.results import Result, new_request_id, validate_request_id
from producers.sdk import BrokerUnavailable, Client, ImageTooLarge
from tests.servers import free_port
from umcd.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SDK_DB = 6
INLINE_LIMIT = 2048
MAX_IMAGE = 256 * 1024

# A stand-in for the detection workers: same Celery configuration (make_celery), same image
# references and decoder, and a Result that echoes what it received.
ECHO_APP = textwrap.dedent('''
    import hashlib
    from umcd.celeryconf import make_celery, redis_from_url
    from umcd.settings import Settings
    from workers.batchtasks import store_item_results
    from workers.imaging import InvalidImage, blob_part, decode_image, part_ref_source, read_blob, resolve_image_ref

    settings = Settings()
    app = make_celery(settings, name="echo")
    images = redis_from_url(settings.broker_url)

    def _judge(kind, request_id, image, client, extra, data=None):
        if client == "explode":
            raise RuntimeError("the worker blew up on purpose")
        if data is None:
            data = resolve_image_ref(image, images, max_bytes=settings.max_image_bytes)
        try:
            decode_image(data, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels,
                         min_side=settings.min_image_side, formats=settings.image_formats)
            verdict, reasons = "benign", []
        except InvalidImage as exc:
            verdict, reasons = "invalid_input", [exc.reason]
        return {"request_id": request_id, "kind": kind, "verdict": verdict, "reasons": reasons,
                "fired": [], "scores": None, "thresholds": None, "topk": None, "image_id": None,
                "model_version": None, "calibration_id": None, "detector": "echo", "batch_size": 1,
                "latency_ms": {"queue": 0.0, "model": 0.0, "search": 0.0, "total": 0.0}, "worker": "echo",
                "ref_kind": next(iter(image)), "sha256": hashlib.sha256(data).hexdigest(),
                "client": client, **extra}

    @app.task(name="umcd.detect")
    def detect(request_id, image, client=None, submitted_at=None):
        return _judge("query", request_id, image, client, {})

    @app.task(name="umcd.screen")
    def screen(request_id, image, client=None, submitted_at=None, source=None, label=None):
        return _judge("insert", request_id, image, client, {"source": source, "label": label})

    @app.task(name="umcd.detect_batch", bind=True)
    def detect_batch(self, items, client=None, submitted_at=None):
        """Each item's Result stored under its own request id, as the detection workers do; files read from
        the message's blob once."""
        blobs, done = {}, []
        for item in items:
            part = part_ref_source(item["image"])
            data = None
            if part is not None:
                key, offset, length = part
                if key not in blobs:
                    blobs[key] = read_blob(key, images)
                data = bytes(blob_part(blobs[key], key, offset, length, settings.max_image_bytes))
            done.append((item["request_id"], _judge("query", item["request_id"], item["image"], client, {}, data)))
        store_item_results(self.backend, done)
        return {"items": len(items), "stored": len(done)}
''')


def _png(side: int, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def worker_env(redis_server, tmp_path_factory):
    """UMCD_* variables pointing at a flushed Redis database for this module."""
    url = redis_server.url_for(SDK_DB)
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return {
        "UMCD_BROKER_URL": url,
        "UMCD_RESULT_BACKEND": url,
        "UMCD_INLINE_IMAGE_LIMIT": str(INLINE_LIMIT),
        "UMCD_MAX_IMAGE_BYTES": str(MAX_IMAGE),
        "UMCD_IMAGE_REF_TTL_S": "300",
        "UMCD_ARTIFACTS": str(tmp_path_factory.mktemp("artifacts")),
    }


@pytest.fixture(scope="module")
def echo_worker(worker_env, tmp_path_factory):
    """A solo Celery worker consuming detect and screen with the echo app; stopped after the module."""
    app_dir = tmp_path_factory.mktemp("echo_app")
    (app_dir / "echo_app.py").write_text(ECHO_APP)
    log_path = app_dir / "worker.log"
    env = {**os.environ, **worker_env, "PYTHONPATH": f"{app_dir}{os.pathsep}{ROOT}"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "echo_app", "worker", "-P", "solo", "-Q", "detect,screen",
             "-n", f"echo-{os.getpid()}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat",
             "-l", "INFO"],
            cwd=app_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture()
def sdk(worker_env, echo_worker):
    settings = Settings(**{k.removeprefix("UMCD_").lower(): v for k, v in worker_env.items()})
    with Client(settings) as client:
        yield client


def _wait_one(sdk: Client, rid: str) -> Result:
    results = sdk.wait([rid], timeout=60)
    assert rid in results, "the echo worker did not answer within 60 s"
    return results[rid]


# --------------------------------------------------------------------------- round trips


def test_small_image_travels_inline_and_comes_back_with_a_verdict(sdk):
    image = _png(16)
    assert len(image) <= INLINE_LIMIT
    rid = sdk.submit_query(image)
    result = _wait_one(sdk, rid)
    assert result.request_id == rid and result.kind == "query" and result.verdict == "benign"
    assert result.raw["ref_kind"] == "inline"
    assert result.raw["sha256"] == hashlib.sha256(image).hexdigest()


def test_large_image_travels_by_redis_key_with_a_ttl(sdk):
    image = _png(64)
    assert INLINE_LIMIT < len(image) <= MAX_IMAGE
    rid = sdk.submit_query(image)
    result = _wait_one(sdk, rid)
    assert result.raw["ref_kind"] == "redis_key"
    assert result.raw["sha256"] == hashlib.sha256(image).hexdigest()
    keys = sdk.redis.keys(f"umcd:img:{rid}:*")  # a key of the message's own: umcd:img:<request id>:<random>
    assert len(keys) == 1 and 0 < sdk.redis.ttl(keys[0]) <= 300


def test_a_request_id_sent_again_never_replaces_the_stored_image_of_the_first(sdk):
    first, second = _png(64, seed=1), _png(64, seed=2)
    refs = [sdk.image_ref("same-id", data)["redis_key"] for data in (first, second)]
    assert refs[0] != refs[1] and all(ref.startswith("umcd:img:same-id:") for ref in refs)
    assert [sdk.redis.get(ref) for ref in refs] == [first, second]


def test_insert_from_a_path_carries_source_label_and_client(sdk, tmp_path):
    path = tmp_path / "cat.png"
    path.write_bytes(_png(20, seed=3))
    rid = sdk.submit_insert(path, source="camera-2", label=7, client="tests")
    result = _wait_one(sdk, rid)
    assert result.kind == "insert" and result.verdict == "benign"
    assert (result.raw["source"], result.raw["label"], result.raw["client"]) == ("camera-2", 7, "tests")


def test_new_request_ids_are_valid_unique_and_sort_in_the_order_they_were_made():
    """Time-ordered (UUID version 7) so that the audit store's request-id indexes take new rows at their end."""
    import uuid

    ids = [new_request_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids) and ids == sorted(ids)
    assert all(len(rid) == 32 and validate_request_id(rid) == rid for rid in ids)
    assert {uuid.UUID(hex=rid).version for rid in ids} == {7}
    later = new_request_id()
    time.sleep(0.002)
    assert new_request_id() > later > ids[-1]


def test_client_supplied_request_id_is_the_task_id(sdk):
    rid = f"mine:{new_request_id()[-8:]}.v1"  # the random end (the start is the time)
    assert sdk.submit_query(_png(16), request_id=rid) == rid
    assert _wait_one(sdk, rid).request_id == rid
    assert sdk.result(rid).verdict == "benign"
    assert sdk.state(rid) == "SUCCESS"


def test_batch_submit_and_wait_includes_invalid_input_verdicts(sdk):
    images = [_png(16, seed=1), _png(16, seed=2), b"<html>not an image</html>"]
    seen = []
    ids = sdk.submit_queries(images, on_sent=lambda i, rid: seen.append((i, rid)))
    assert seen == list(enumerate(ids)) and len(set(ids)) == 3
    results = sdk.wait(ids, timeout=60)
    assert [results[rid].verdict for rid in ids] == ["benign", "benign", "invalid_input"]
    assert "not an image" in results[ids[2]].reasons[0]


def test_batch_inserts_share_source_and_label(sdk):
    ids = sdk.submit_inserts([_png(16, seed=4), _png(16, seed=5)], request_ids=["ins-a", None],
                             source="bulk", label=1)
    assert ids[0] == "ins-a"
    results = sdk.wait(ids, timeout=60)
    assert {(r.kind, r.raw["source"], r.raw["label"]) for r in results.values()} == {("insert", "bulk", 1)}


def test_a_task_that_raises_gives_an_error_result(sdk):
    rid = sdk.submit_query(_png(16), client="explode")
    result = _wait_one(sdk, rid)
    assert result.verdict == "error"
    assert "blew up on purpose" in result.reasons[0]


def test_wait_returns_only_finished_requests_at_the_timeout(sdk):
    assert sdk.wait(["never-sent-1"], timeout=0.2) == {}
    assert sdk.result("never-sent-1") is None
    assert sdk.state("never-sent-1") == "PENDING"


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("bad", ["", "x" * 65, "white space", "semi;colon", "slash/x", "é", 12, None, ".", "..",
                                 "....", "x\n"])
def test_invalid_request_ids_are_refused(bad):
    with pytest.raises(ValueError, match="invalid request id"):
        validate_request_id(bad)


@pytest.mark.parametrize("good", ["a", "x" * 64, "A-b_c.d:e", new_request_id(), ".a", "..x..", "-", "." * 63 + "x"])
def test_valid_request_ids_pass_unchanged(good):
    assert validate_request_id(good) == good


def test_generated_request_ids_are_uuid4_hex():
    rid = new_request_id()
    assert len(rid) == 32 and int(rid, 16) >= 0 and rid != new_request_id()


def test_bad_inputs_are_refused_before_anything_is_sent(worker_env, tmp_path):
    settings = Settings(broker_url=worker_env["UMCD_BROKER_URL"], artifacts=tmp_path, max_image_bytes=100)
    with Client(settings) as client:
        with pytest.raises(ImageTooLarge):
            client.submit_query(b"\0" * 101)
        big = tmp_path / "big.png"
        big.write_bytes(b"\0" * 101)
        with pytest.raises(ImageTooLarge):
            client.submit_query(big)
        with pytest.raises(FileNotFoundError):
            client.submit_query(tmp_path / "missing.png")
        with pytest.raises(ValueError, match="invalid request id"):
            client.submit_queries([b"x", b"y"], request_ids=["ok", "not ok"])
        with pytest.raises(ValueError, match="label"):
            client.submit_insert(b"x", label="3")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            client.submit_query(12345)  # type: ignore[arg-type]


def test_broker_down_raises_broker_unavailable_after_retries(tmp_path):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings = Settings(broker_url=dead, result_backend=dead, artifacts=tmp_path, inline_image_limit=10)
    policy = {"max_retries": 1, "interval_start": 0, "interval_step": 0.05, "interval_max": 0.05}
    with Client(settings, retry_policy=policy) as client:
        with pytest.raises(BrokerUnavailable):
            client.submit_query(b"0123456789")  # inline: the publish fails
        with pytest.raises(BrokerUnavailable):
            client.submit_query(b"0123456789abc")  # by key: storing the image fails


def test_result_from_dict_keeps_unknown_keys_and_tolerates_missing_ones():
    result = Result.from_dict({"request_id": "r", "verdict": "benign", "extra": 1})
    assert result.verdict == "benign" and result.reasons == [] and result.raw["extra"] == 1
    assert result.to_dict() == {"request_id": "r", "verdict": "benign", "extra": 1}
    assert Result.from_dict("nonsense", "r2").verdict == "error"  # type: ignore[arg-type]
    assert Result.failed("r3", "boom").to_dict()["reasons"] == ["boom"]


def test_producer_modules_never_import_torch_faiss_or_core():
    code = ("import sys, producers.sdk, producers.gateway, producers.results, umcd.commands.submit, "
            "umcd.commands.gateway, umcd.celeryconf\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'faiss', 'core', 'torchvision')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- the CLI


def test_umcd_submit_query_prints_json_verdicts(worker_env, echo_worker, tmp_path, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from umcd.commands import submit
    from umcd.settings import get_settings

    app = typer.Typer()
    submit.register(app)

    for key, value in worker_env.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "a.png").write_bytes(_png(16, seed=8))
    (tmp_path / "b.png").write_bytes(_png(64, seed=9))
    (tmp_path / "notes.txt").write_text("skipped: not an image suffix")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["submit", "query", str(tmp_path), "--json", "--timeout", "60"])
        assert result.exit_code == 0, result.output
        rows = json.loads(result.stdout[result.stdout.index("["):])
        assert [Path(r["path"]).name for r in rows] == ["a.png", "b.png"]
        assert [r["result"]["verdict"] for r in rows] == ["benign", "benign"]
        # one batch message, its files read from its blob: each the bytes of its own file
        assert [r["result"]["ref_kind"] for r in rows] == ["part", "part"]
        assert [r["result"]["sha256"] for r in rows] == [
            hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in ("a.png", "b.png")]
        one_each = CliRunner().invoke(app, ["submit", "query", str(tmp_path), "--json", "--batch-size", "0"])
        assert one_each.exit_code == 0, one_each.output
        rows = json.loads(one_each.stdout[one_each.stdout.index("["):])
        assert [r["result"]["ref_kind"] for r in rows] == ["inline", "redis_key"]  # b.png is over the inline limit

        no_wait = CliRunner().invoke(app, ["submit", "insert", str(tmp_path / "a.png"), "--no-wait",
                                           "--source", "cli", "--label", "2"])
        assert no_wait.exit_code == 0, no_wait.output
        assert "a.png" in no_wait.stdout
    finally:
        get_settings.cache_clear()


# --------------------------------------------------------------------------- the shared configuration


def test_make_celery_routes_every_task_name_to_its_queue_and_accepts_only_json(tmp_path):
    from umcd.celeryconf import QUEUES, TASK_NAMES, FleetRedisBackend, make_celery

    settings = Settings(broker_url="redis://127.0.0.1:1/0", artifacts=tmp_path, worker_prefetch=7)
    app = make_celery(settings)
    assert set(TASK_NAMES.values()) == set(QUEUES) == {"detect", "screen", "train", "attack", "eval"}
    for name, queue in TASK_NAMES.items():
        assert name == f"umcd.{queue}"
        assert app.amqp.router.route({}, name)["queue"].name == queue
    conf = app.conf
    assert conf.accept_content == ["json"] and conf.task_serializer == conf.result_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 7
    assert conf.broker_transport_options["visibility_timeout"] > 0
    assert conf.worker_send_task_events and conf.task_send_sent_event and conf.result_extended
    assert conf.result_backend == "redis://127.0.0.1:1/0"  # defaults to the broker
    assert isinstance(app.backend, FleetRedisBackend)


def test_stored_task_states_keep_the_messages_reprs_not_their_images(tmp_path):
    """result_extended records name, worker, queue and retries; args and kwargs are the message's reprs
    (what events show), so a STARTED or SUCCESS state never holds a copy of the message's images."""
    from celery.app.task import Context

    from umcd.celeryconf import make_celery

    app = make_celery(Settings(broker_url="redis://127.0.0.1:1/0", artifacts=tmp_path))
    image = "iVBORw0KGgo" + "A" * 4000
    request = Context({"id": "m-1", "task": "umcd.detect_batch", "hostname": "w1@host", "retries": 2,
                       "delivery_info": {"routing_key": "detect"}, "argsrepr": "()",
                       "kwargsrepr": "{'items': '<64 images>'}"},
                      args=[], kwargs={"items": [{"request_id": "r-1", "image": {"inline": image}}]})
    for state, result in (("STARTED", {"pid": 1}), ("SUCCESS", {"items": 1})):
        meta = app.backend._get_result_meta(result, state, None, request, encode=True)
        assert (meta["name"], meta["worker"], meta["queue"], meta["retries"]) == \
            ("umcd.detect_batch", "w1@host", "detect", 2)
        assert app.backend.decode(meta["kwargs"]) == "{'items': '<64 images>'}"
        assert app.backend.decode(meta["args"]) == "()"
        stored = app.backend.encode({**meta, "task_id": "m-1"})
        assert "iVBORw0KGgo" not in stored and len(stored) < 1024
    # a request-less state (the per-item Results of a batch) is unchanged
    assert "kwargs" not in app.backend._get_result_meta({"x": 1}, "SUCCESS", None, None)
