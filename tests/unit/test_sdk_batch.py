"""Batch submissions on a real redis-server: how the SDK splits messages, and Results stored per request id."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image

from producers.sdk import BATCH_MESSAGE_BYTES, DEFAULT_BATCH_SIZE, Client
from umcd.settings import Settings

BATCH_DB = 11


def _png(side: int, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _png_files(folder, n: int) -> list:
    """n small PNG files 0.png ... in ``folder``."""
    paths = [folder / f"{i}.png" for i in range(n)]
    for i, path in enumerate(paths):
        path.write_bytes(_png(16, i))
    return paths


@pytest.fixture()
def broker(redis_server, tmp_path):
    """A flushed Redis database that no worker consumes, and a Client sending to it."""
    url = redis_server.url_for(BATCH_DB)
    raw = redis.Redis.from_url(url)
    raw.flushdb()
    settings = Settings(broker_url=url, result_backend=url, artifacts=tmp_path, inline_image_limit=64 * 1024,
                        max_image_bytes=512 * 1024)
    with Client(settings) as client:
        yield client, raw
    raw.flushdb()
    raw.close()


def _queued(raw: redis.Redis, queue: str) -> list[dict]:
    """The messages waiting in ``queue`` (oldest first): headers and decoded kwargs."""
    out = []
    for payload in reversed(raw.lrange(queue, 0, -1)):  # kombu LPUSHes: the oldest is last
        message = json.loads(payload)
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        out.append({"task": message["headers"]["task"], "id": message["headers"]["id"], "kwargs": kwargs,
                    "kwargsrepr": message["headers"].get("kwargsrepr")})
    return out


def test_batch_queries_travel_batch_size_images_to_a_message_in_order(broker):
    client, raw = broker
    images = [_png(8, seed=i) for i in range(10)]
    given = [f"q-{i}" for i in range(10)]
    seen: list[tuple[int, str]] = []
    ids = client.submit_queries(images, request_ids=given, client="bench", batch=True, batch_size=4,
                                on_sent=lambda i, rid: seen.append((i, rid)))
    assert ids == given
    assert seen == list(enumerate(given))
    messages = _queued(raw, "detect")
    assert [m["task"] for m in messages] == ["umcd.detect_batch"] * 3
    assert [len(m["kwargs"]["items"]) for m in messages] == [4, 4, 2]
    assert [it["request_id"] for m in messages for it in m["kwargs"]["items"]] == given
    assert len({m["id"] for m in messages}) == 3 and not set(given) & {m["id"] for m in messages}
    first = messages[0]["kwargs"]
    assert first["client"] == "bench" and isinstance(first["submitted_at"], float)
    # each message's files sit once in Redis, concatenated under a key of the message's own, and its items
    # point into that blob; nothing of the images travels in the message
    for message, chunk in zip(messages, (images[:4], images[4:8], images[8:])):
        key = f"umcd:img:{message['id']}"
        assert raw.get(key) == b"".join(chunk) and 0 < raw.ttl(key) <= client.settings.image_ref_ttl_s
        offset = 0
        for item, image in zip(message["kwargs"]["items"], chunk):
            assert item["image"] == {"part": {"redis_key": key, "offset": offset, "length": len(image)}}
            offset += len(image)
    # what events, logs and Flower show: no image data, the count instead
    assert "<4 images>" in messages[0]["kwargsrepr"] and "part" not in messages[0]["kwargsrepr"]


def test_a_single_message_shows_its_kwargs_without_the_image(broker):
    client, raw = broker
    client.submit_query(_png(8), request_id="one-1", client="cli")
    (message,) = _queued(raw, "detect")
    assert message["kwargs"]["image"]["inline"]  # the worker still gets the image
    assert "<image>" in message["kwargsrepr"] and "'cli'" in message["kwargsrepr"]
    assert "inline" not in message["kwargsrepr"]


def test_batch_insertions_go_to_the_screen_queue_with_their_source_and_label(broker):
    client, raw = broker
    ids = client.submit_inserts([_png(8, seed=i) for i in range(3)], source="catalogue", label=7, batch=True)
    (message,) = _queued(raw, "screen")
    assert message["task"] == "umcd.screen_batch"
    assert [it["request_id"] for it in message["kwargs"]["items"]] == ids
    assert message["kwargs"]["source"] == "catalogue" and message["kwargs"]["label"] == 7
    assert raw.llen("detect") == 0


def test_a_batch_message_is_closed_before_its_blob_passes_the_byte_limit(broker, monkeypatch):
    from producers import sdk

    client, raw = broker
    image = _png(140, seed=1)  # ~59 KB of noise
    monkeypatch.setattr(sdk, "BLOB_MESSAGE_BYTES", 5 * len(image) + 10)
    client.submit_queries([image] * 8, batch=True, batch_size=1024)
    messages = _queued(raw, "detect")
    assert [len(m["kwargs"]["items"]) for m in messages] == [5, 3]
    assert [raw.strlen(f"umcd:img:{m['id']}") for m in messages] == [5 * len(image), 3 * len(image)]
    # a file larger than a blob may hold travels under a key of its own, in the same message
    big = _png(200, seed=2)
    monkeypatch.setattr(sdk, "BLOB_MESSAGE_BYTES", len(big) - 1)
    ids = client.submit_queries([image, big, image], batch=True)
    (message,) = _queued(raw, "detect")[2:]
    refs = [it["image"] for it in message["kwargs"]["items"]]
    assert [it["request_id"] for it in message["kwargs"]["items"]] == ids
    assert "part" in refs[0] and "part" in refs[2] and refs[2]["part"]["offset"] == len(image)
    assert raw.get(refs[1]["redis_key"]) == big and raw.strlen(f"umcd:img:{message['id']}") == 2 * len(image)


def test_a_broker_other_than_redis_gets_inline_batches_closed_before_the_byte_limit(broker):
    """Without the broker's Redis there is no blob: images travel in the message, as before blobs."""
    client, raw = broker
    image = _png(140, seed=1)  # ~59 KB of noise: inline (under 64 KiB), ~78 KB once base64-encoded
    per_message = BATCH_MESSAGE_BYTES // len(base64.b64encode(image))
    n = per_message + 3
    client._submit_inline_batches("umcd.detect", [image] * n, [None] * n, {}, None, 1024)
    messages = _queued(raw, "detect")
    assert [len(m["kwargs"]["items"]) for m in messages] == [per_message, 3]
    assert base64.b64decode(messages[0]["kwargs"]["items"][0]["image"]["inline"]) == image


def test_bad_request_ids_and_batch_sizes_are_refused_before_anything_is_sent(broker):
    client, raw = broker
    with pytest.raises(ValueError, match="invalid request id"):
        client.submit_queries([_png(8), _png(8)], request_ids=["ok", "not ok"], batch=True)
    with pytest.raises(ValueError, match="batch_size"):
        client.submit_queries([_png(8)], batch=True, batch_size=0)
    assert raw.llen("detect") == 0


def test_results_stored_per_item_are_read_by_wait_as_results_and_errors(broker):
    from workers.batchtasks import store_item_results

    client, raw = broker
    good = {"request_id": "r-ok", "kind": "query", "verdict": "benign", "reasons": [], "fired": [],
            "scores": {"c1": 1.0, "c2": 2.0, "c3": 3.0}, "batch_size": 3, "worker": "w@h"}
    pubsub = raw.pubsub()
    pubsub.psubscribe("celery-task-meta-*")
    pubsub.get_message(timeout=1.0)  # the subscription's confirmation
    store_item_results(client.app.backend, [("r-ok", good), ("r-bad", ValueError("no such image"))])
    results = client.wait(["r-ok", "r-bad"], timeout=5)
    assert results["r-ok"].verdict == "benign" and results["r-ok"].to_dict() == good
    bad = results["r-bad"]
    assert bad.verdict == "error" and len(bad.reasons) == 1  # as a umcd.detect task that raised
    assert "ValueError" in bad.reasons[0] and "no such image" in bad.reasons[0]
    assert client.state("r-ok") == "SUCCESS" and client.state("r-bad") == "FAILURE"
    assert 0 < raw.ttl(client.app.backend.get_key_for_task("r-ok")) <= 24 * 3600
    stored = json.loads(raw.get(client.app.backend.get_key_for_task("r-ok")))  # the meta Celery itself writes
    assert set(stored) == {"status", "result", "traceback", "children", "date_done", "task_id"}
    assert stored["task_id"] == "r-ok" and stored["children"] == [] and stored["date_done"]
    published = []
    while (message := pubsub.get_message(timeout=1.0)) is not None:
        published.append(message["channel"].decode())
    assert published == ["celery-task-meta-r-ok", "celery-task-meta-r-bad"]  # what AsyncResult.get() listens to
    pubsub.close()


def test_result_keys_of_a_batch_are_the_backends_own_keys():
    """``store_item_results`` builds each key as the backend's prefix plus the id only where that is what the
    backend's own ``get_key_for_task`` makes (probed); any other backend's method is used as it is."""
    from types import SimpleNamespace

    from umcd.celeryconf import make_celery
    from workers.batchtasks import _task_keys

    backend = make_celery().backend
    ids = ["r-1", "a.b:c_d-9", "x" * 64]
    assert [_task_keys(backend, ids[0])(rid) for rid in ids] == [backend.get_key_for_task(rid) for rid in ids]
    odd = SimpleNamespace(get_key_for_task=lambda rid: f"meta:{rid[::-1]}:0".encode())  # not prefix + id
    keys = _task_keys(odd, ids[0])
    assert keys is odd.get_key_for_task and keys("r-1") == b"meta:1-r:0"


def test_results_stored_per_item_keep_celerys_encoding_for_nan_and_no_expiry(broker, monkeypatch):
    """A Result that plain JSON cannot hold (a NaN score) is encoded by Celery's own serializer, in the same
    script call as the others; a backend without an expiry stores keys without one."""
    from workers.batchtasks import store_item_results

    client, raw = broker
    backend = client.app.backend
    monkeypatch.setattr(backend, "expires", None)
    odd = {"request_id": "r-nan", "kind": "query", "verdict": "benign", "scores": {"c1": float("nan")}}
    plain = {"request_id": "r-plain", "kind": "query", "verdict": "benign", "scores": {"c1": 1.5}}
    store_item_results(backend, [("r-nan", odd), ("r-plain", plain)])
    nan_key, plain_key = backend.get_key_for_task("r-nan"), backend.get_key_for_task("r-plain")
    assert raw.ttl(nan_key) == -1 and raw.ttl(plain_key) == -1  # no expiry set
    stored = backend.decode(raw.get(nan_key))
    assert stored["status"] == "SUCCESS" and stored["task_id"] == "r-nan"
    assert stored["result"]["scores"]["c1"] != stored["result"]["scores"]["c1"]  # NaN came back as NaN
    assert b"NaN" in raw.get(nan_key)
    assert json.loads(raw.get(plain_key))["result"] == plain
    results = client.wait(["r-nan", "r-plain"], timeout=5)
    assert results["r-plain"].to_dict() == plain and results["r-nan"].verdict == "benign"
    raw.script_flush()  # a restarted Redis has forgotten the script: it is loaded again
    store_item_results(backend, [("r-again", dict(plain, request_id="r-again"))])
    assert client.wait(["r-again"], timeout=5)["r-again"].to_dict() == dict(plain, request_id="r-again")


def test_a_pixel_array_travels_as_one_npy_per_message_with_items_pointing_into_it(broker):
    client, raw = broker
    pixels = np.random.default_rng(3).integers(0, 256, (10, 12, 16, 3), dtype=np.uint8)
    given = [f"px-{i}" for i in range(10)]
    seen: list[tuple[int, str]] = []
    ids = client.submit_queries(pixels, request_ids=given, client="arrays", batch_size=4,
                                on_sent=lambda i, rid: seen.append((i, rid)))
    assert ids == given and seen == list(enumerate(given))
    messages = _queued(raw, "detect")
    assert [m["task"] for m in messages] == ["umcd.detect_batch"] * 3
    for m, start in zip(messages, (0, 4, 8)):
        items = m["kwargs"]["items"]
        key = f"umcd:img:{m['id']}"  # one array per message, named after it
        assert [it["request_id"] for it in items] == given[start : start + 4]
        assert [it["image"] for it in items] == [{"array": {"redis_key": key, "index": j}} for j in range(len(items))]
        assert np.array_equal(np.load(io.BytesIO(raw.get(key)), allow_pickle=False), pixels[start : start + 4])
        assert 0 < raw.ttl(key) <= client.settings.image_ref_ttl_s
        assert m["kwargs"]["client"] == "arrays" and "<" in m["kwargsrepr"]
    gray = np.zeros((3, 8, 8), np.uint8)  # (n, H, W) is gray
    client.submit_inserts(gray, source="cam", label=1)
    (message,) = _queued(raw, "screen")
    assert message["task"] == "umcd.screen_batch" and message["kwargs"]["label"] == 1
    assert np.load(io.BytesIO(raw.get(f"umcd:img:{message['id']}"))).shape == (3, 8, 8, 1)


@pytest.mark.parametrize("pixels, error, words", [
    (np.zeros((2, 8, 8, 3), np.float32), ValueError, "must be uint8"),
    (np.zeros((2, 8, 8, 4), np.uint8), ValueError, "C 1 or 3"),
    (np.zeros((8, 8), np.uint8), ValueError, "must have shape"),
    (np.zeros((0, 8, 8), np.uint8), ValueError, "holds no image"),
    (np.zeros((1, 1024, 1024, 3), np.uint8), ValueError, "exceed the limit"),  # ImageTooLarge
    (np.zeros((32, 32, 3), np.uint8), ValueError, r"image\[None\]"),  # one colour image, not 32 gray ones
])
def test_bad_pixel_arrays_are_refused_before_anything_is_sent(broker, pixels, error, words):
    client, raw = broker
    with pytest.raises(error, match=words):
        client.submit_queries(pixels)
    with pytest.raises(ValueError, match="2 images but 1 request ids"):
        client.submit_queries(np.zeros((2, 8, 8), np.uint8), request_ids=["one"])
    assert raw.dbsize() == 0


def _umcd_submit(client: Client, tmp_path, monkeypatch, args: list[str]):
    """``umcd submit ARGS`` (the submit commands alone) against the client's broker; the CliRunner result."""
    import typer
    from typer.testing import CliRunner

    from umcd.commands import submit
    from umcd.settings import get_settings

    app = typer.Typer()
    submit.register(app)
    for key, value in {"UMCD_BROKER_URL": client.settings.broker_url, "UMCD_RESULT_BACKEND": client.settings.broker_url,
                       "UMCD_ARTIFACTS": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(app, ["submit", *args])
    finally:
        get_settings.cache_clear()


def test_umcd_submit_sends_files_in_batch_messages_in_order_and_lists_a_file_it_cannot_send(
        broker, tmp_path, monkeypatch):
    """`umcd submit` gathers files into batch messages (their blobs in Redis); a file too large for the limit is
    listed as not sent and the others go on, in order around an .npy array; --batch-size 0 sends one message a
    file as before."""
    client, raw = broker
    folder = tmp_path / "in"
    folder.mkdir()
    images = {f"{i:02d}.png": _png(8, seed=i) for i in range(7)}
    images["03.png"] = _png(64, seed=99)  # over the limit set below
    for name, data in images.items():
        (folder / name).write_bytes(data)
    np.save(folder / "03x.npy", np.zeros((2, 8, 8), np.uint8))  # an array between the files
    monkeypatch.setenv("UMCD_MAX_IMAGE_BYTES", str(len(images["03.png"]) - 1))
    result = _umcd_submit(client, tmp_path, monkeypatch, ["query", str(folder), "--no-wait", "--json",
                                                           "--batch-size", "2"])
    assert result.exit_code == 1, result.output
    rows = json.loads(result.stdout[result.stdout.index("["):])
    names = [Path(r["path"]).name for r in rows]
    assert names == ["00.png", "01.png", "02.png", "03.png", "03x.npy[0]", "03x.npy[1]", "04.png", "05.png", "06.png"]
    assert rows[3]["request_id"] is None and "exceeds the limit" in rows[3]["error"]
    assert all(r["request_id"] and r["error"] is None for k, r in enumerate(rows) if k != 3)
    messages = _queued(raw, "detect")
    assert [m["task"] for m in messages] == ["umcd.detect_batch"] * 5
    assert [[it["request_id"] for it in m["kwargs"]["items"]] for m in messages] == [
        [rows[0]["request_id"], rows[1]["request_id"]], [rows[2]["request_id"]],
        [rows[4]["request_id"], rows[5]["request_id"]], [rows[6]["request_id"], rows[7]["request_id"]],
        [rows[8]["request_id"]]]
    first = messages[0]
    assert raw.get(f"umcd:img:{first['id']}") == images["00.png"] + images["01.png"]
    raw.delete("detect")
    one_each = _umcd_submit(client, tmp_path, monkeypatch, ["query", str(folder / "00.png"), str(folder / "01.png"),
                                                             "--no-wait", "--batch-size", "0"])
    assert one_each.exit_code == 0, one_each.output
    assert [m["task"] for m in _queued(raw, "detect")] == ["umcd.detect", "umcd.detect"]


def test_umcd_submit_sends_the_rest_of_a_batch_when_one_file_changed_after_it_was_checked(
        broker, tmp_path, monkeypatch):
    from umcd.commands import submit

    client, raw = broker
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(_png(8, seed=i))
    real_add = submit._Batcher.add

    def add_then_remove(self, path, row):  # the file goes away after its check, before its batch is sent
        real_add(self, path, row)
        if path.name == "1.png":
            path.unlink()

    monkeypatch.setattr(submit._Batcher, "add", add_then_remove)
    result = _umcd_submit(client, tmp_path, monkeypatch, ["query", *(str(tmp_path / f"{i}.png") for i in range(3)),
                                                          "--no-wait", "--json"])
    assert result.exit_code == 1, result.output
    rows = json.loads(result.stdout[result.stdout.index("["):])
    assert [r["request_id"] is not None for r in rows] == [True, False, True]
    assert "1.png" in rows[1]["error"]
    (message,) = _queued(raw, "detect")
    assert [it["request_id"] for it in message["kwargs"]["items"]] == [rows[0]["request_id"], rows[2]["request_id"]]


def test_umcd_submit_sends_the_rest_when_a_file_vanishes_after_part_of_its_batch_went_out(
        broker, tmp_path, monkeypatch):
    """A batch split by the SDK into two blobs: the file that vanishes is in the second, after the first was sent;
    the intact file beside it is sent once more, not reported with the other's error (found by a code review)."""
    from producers import sdk

    client, raw = broker
    paths = _png_files(tmp_path, 4)
    monkeypatch.setattr(sdk, "BLOB_MESSAGE_BYTES", 2 * max(p.stat().st_size for p in paths) + 1)  # two files a blob
    real = sdk.read_image

    def read_image(image, max_bytes):  # 3.png goes away after its checks, while its batch is being sent
        if isinstance(image, Path) and image.name == "3.png" and image.exists():
            image.unlink()
        return real(image, max_bytes)

    monkeypatch.setattr(sdk, "read_image", read_image)
    result = _umcd_submit(client, tmp_path, monkeypatch, ["query", *map(str, paths), "--no-wait", "--json"])
    assert result.exit_code == 1, result.output
    rows = json.loads(result.stdout[result.stdout.index("["):])
    assert [r["request_id"] is not None for r in rows] == [True, True, True, False]
    assert "3.png" in rows[3]["error"] and rows[2]["error"] is None
    assert [[it["request_id"] for it in m["kwargs"]["items"]] for m in _queued(raw, "detect")] == [
        [rows[0]["request_id"], rows[1]["request_id"]], [rows[2]["request_id"]]]


def test_umcd_submit_sends_an_npy_file_as_pixel_array_batches_and_reports_a_bad_one(broker, tmp_path, monkeypatch):
    client, raw = broker
    pixels = np.random.default_rng(5).integers(0, 256, (300, 9, 9, 3), dtype=np.uint8)
    np.save(tmp_path / "frames.npy", pixels)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "cut.npy").write_bytes((tmp_path / "frames.npy").read_bytes()[:100])
    result = _umcd_submit(client, tmp_path, monkeypatch, [
        "query", str(tmp_path / "frames.npy"), str(tmp_path / "objects.npy"), str(tmp_path / "cut.npy"), "--no-wait",
        "--json", "--client", "cli"])
    assert result.exit_code == 1, result.output  # the object array and the cut file were not sent
    rows = json.loads(result.stdout[result.stdout.index("["):])
    assert [r["path"] for r in rows[:300]] == [f"{tmp_path / 'frames.npy'}[{i}]" for i in range(300)]
    assert [(r["path"], r["request_id"]) for r in rows[300:]] == [(str(tmp_path / "objects.npy"), None),
                                                                 (str(tmp_path / "cut.npy"), None)]
    assert all("not an array of pixels" in r["error"] for r in rows[300:])
    messages = _queued(raw, "detect")  # 300 images: messages of the SDK's default 256 and 44, each with its array
    assert DEFAULT_BATCH_SIZE == 256 and [len(m["kwargs"]["items"]) for m in messages] == [256, 44]
    assert [it["request_id"] for m in messages for it in m["kwargs"]["items"]] == [r["request_id"] for r in rows[:300]]
    stored = np.concatenate([np.load(io.BytesIO(raw.get(f"umcd:img:{m['id']}"))) for m in messages])
    assert np.array_equal(stored, pixels)


def test_umcd_submit_lists_what_it_queued_before_the_broker_went_away(broker, tmp_path, monkeypatch):
    """Exit code 3, and the request ids already queued are printed: their verdicts will still come."""
    from producers import sdk

    client, raw = broker
    paths = _png_files(tmp_path, 4)
    real = sdk.Client.submit_query
    calls = []

    def submit_query(self, image, *args, **kwargs):
        calls.append(image)
        if len(calls) == 3:
            raise sdk.BrokerUnavailable("could not send umcd.detect: connection refused")
        return real(self, image, *args, **kwargs)

    monkeypatch.setattr(sdk.Client, "submit_query", submit_query)
    result = _umcd_submit(client, tmp_path, monkeypatch, ["query", *map(str, paths), "--json", "--batch-size", "0"])
    assert result.exit_code == 3, result.output
    said = " ".join(result.stderr.split())  # rich wraps long lines
    assert "broker unavailable" in said and "2 image(s) were queued before" in said
    rows = json.loads(result.stdout[result.stdout.index("["):])
    assert [r["path"] for r in rows] == list(map(str, paths)) and len(calls) == 3  # the fourth was not tried
    sent = [r["request_id"] for r in rows[:2]]
    assert all(sent) and [r["request_id"] for r in rows[2:]] == [None, None]
    assert all("broker unavailable" in r["error"] for r in rows[2:])
    assert [m["id"] for m in _queued(raw, "detect")] == sent


def test_umcd_submit_in_batches_lists_what_it_queued_before_the_broker_went_away(broker, tmp_path, monkeypatch):
    from producers import sdk

    client, raw = broker
    paths = _png_files(tmp_path, 5)
    real, calls = sdk.Client._send, []

    def send(self, task, kwargs, *args, **options):
        calls.append(task)
        if len(calls) == 2:
            raise sdk.BrokerUnavailable("could not send umcd.detect_batch: connection refused")
        return real(self, task, kwargs, *args, **options)

    monkeypatch.setattr(sdk.Client, "_send", send)
    result = _umcd_submit(client, tmp_path, monkeypatch, ["query", *map(str, paths), "--json", "--batch-size", "2"])
    assert result.exit_code == 3, result.output
    assert "2 image(s) were queued before" in " ".join(result.stderr.split())
    rows = json.loads(result.stdout[result.stdout.index("["):])
    assert [r["path"] for r in rows] == list(map(str, paths)) and len(calls) == 2  # the third batch was not tried
    assert all(r["request_id"] for r in rows[:2]) and not any(r["request_id"] for r in rows[2:])
    assert all("broker unavailable" in r["error"] for r in rows[2:])
    (message,) = _queued(raw, "detect")
    assert [it["request_id"] for it in message["kwargs"]["items"]] == [r["request_id"] for r in rows[:2]]
    assert [k.decode() for k in raw.scan_iter("umcd:img:*")] == [f"umcd:img:{message['id']}"]  # no orphan blob


def test_a_finished_message_deletes_only_its_own_pixel_array(broker):
    from types import SimpleNamespace

    from workers.batchtasks import release_message_images

    _client, raw = broker
    for key in ("umcd:img:m1", "umcd:img:m2", "celery-task-meta-m1", "umcd:img:other"):
        raw.set(key, b"x")
    items = [{"request_id": "a", "image": {"array": {"redis_key": "umcd:img:m1", "index": 0}}},
             {"request_id": "b", "image": {"array": {"redis_key": "umcd:img:m1", "index": 1}}},
             {"request_id": "c", "image": {"array": {"redis_key": "celery-task-meta-m1", "index": 0}}},  # crafted
             {"request_id": "d", "image": {"array": {"path": "/tmp/x.npy", "index": 0}}},
             {"request_id": "e", "image": {"inline": "AAAA"}},
             {"request_id": "f", "image": {"array": {"redis_key": "umcd:img:m2"}}},  # malformed: no index
             {"request_id": "g", "image": {"array": {"redis_key": "umcd:img:m2", "index": 0}}},  # another's
             {"request_id": "h", "image": {"part": {"redis_key": "umcd:img:m2", "offset": 0, "length": 1}}}]
    # the SDK keys a message's array by its id
    assert release_message_images(SimpleNamespace(redis=raw), items, "m1") == 1
    assert sorted(k.decode() for k in raw.scan_iter("*")) == ["celery-task-meta-m1", "umcd:img:m2", "umcd:img:other"]
    assert release_message_images(SimpleNamespace(redis=raw), items, None) == 0
    # a blob of files (part references) is the message's own the same way
    parts = [{"request_id": "p", "image": {"part": {"redis_key": "umcd:img:m2", "offset": 0, "length": 1}}},
             {"request_id": "q", "image": {"part": {"redis_key": "umcd:img:other", "offset": -1, "length": 1}}}]
    assert release_message_images(SimpleNamespace(redis=raw), parts, "other") == 0  # malformed: deletes nothing
    assert release_message_images(SimpleNamespace(redis=raw), parts, "m2") == 1
    assert sorted(k.decode() for k in raw.scan_iter("*")) == ["celery-task-meta-m1", "umcd:img:other"]


# --------------------------------------------------------------------------- refused before sending, or sent in part


def test_metadata_the_audit_store_cannot_hold_is_refused_before_anything_is_sent(broker):
    client, raw = broker
    image = _png(16)
    for call, words in (
        (lambda: client.submit_insert(image, label=2**31), "label 2147483648 is outside"),
        (lambda: client.submit_inserts([image], label=-(2**31) - 1, batch=True), "outside"),
        (lambda: client.submit_query(image, client="c" * 257), "client must be text of at most 256"),
        (lambda: client.submit_queries(np.zeros((2, 8, 8), np.uint8), client="c" * 300), "client"),
        (lambda: client.submit_inserts([image], source=7), "source must be text"),  # type: ignore[arg-type]
    ):
        with pytest.raises(ValueError, match=words):
            call()
    assert raw.dbsize() == 0
    client.submit_insert(image, label=2**31 - 1, client="c" * 256, source="s" * 256)  # the limits themselves pass
    assert len(_queued(raw, "screen")) == 1


@pytest.mark.parametrize("batch", [False, True])
def test_a_request_id_given_to_two_images_is_refused_before_anything_is_sent(broker, batch):
    client, raw = broker
    with pytest.raises(ValueError, match="'twice' is given to more than one image"):
        client.submit_queries([_png(16, 1), _png(16, 2), _png(16, 3)], request_ids=["twice", "once", "twice"],
                              batch=batch)
    assert raw.dbsize() == 0


@pytest.mark.parametrize("batch", [False, True])
def test_a_missing_or_too_large_file_is_found_before_anything_is_sent(broker, tmp_path, batch):
    client, raw = broker
    good = tmp_path / "good.png"
    good.write_bytes(_png(16))
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (512 * 1024 + 1))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        client.submit_queries([good, tmp_path / "missing.png"], batch=batch)
    with pytest.raises(ValueError, match="exceeds the limit"):  # ImageTooLarge
        client.submit_queries([good, big], batch=batch)
    with pytest.raises(IsADirectoryError):
        client.submit_queries([good, tmp_path], batch=batch)
    assert raw.dbsize() == 0


@pytest.mark.parametrize("batch", [False, True])
def test_a_submission_stopped_part_way_names_the_request_ids_already_queued(broker, tmp_path, batch):
    """A file that vanishes after the checks stops the sending; the ids queued before it go with the error."""
    client, raw = broker
    paths = _png_files(tmp_path, 5)
    ids = [f"part-{i}" for i in range(5)]
    seen: list[str] = []

    def vanish(index: int, rid: str) -> None:  # after the second image is queued, the fourth file goes away
        seen.append(rid)
        if index == 1:
            paths[3].unlink()

    with pytest.raises(FileNotFoundError) as caught:
        client.submit_queries(paths, request_ids=ids, on_sent=vanish, batch=batch, batch_size=2)
    queued = [item["request_id"] for m in _queued(raw, "detect")
              for item in (m["kwargs"]["items"] if batch else [m["kwargs"]])]
    assert caught.value.sent == seen == queued
    assert queued == (ids[:2] if batch else ids[:3])  # batches of two: the second batch never left
