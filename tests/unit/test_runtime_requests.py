"""A detection worker's requests: bad message fields, a failed batch write, a request id sent again.

Each case must still end with exactly one verdict row (or, for an id answered before, the row it has).
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest

from tests.fleet_helpers import png, untrained_runtime


@pytest.fixture()
def runtime(tmp_path, monkeypatch):
    """A runtime whose batches take up to 8 images (a message's images share a batch and a transaction)."""
    with untrained_runtime(tmp_path, monkeypatch, batch_max_size=8, batch_max_wait_ms=200) as rt:
        yield rt


def _image(seed: int) -> dict:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return {"inline": base64.b64encode(png(pixels)).decode("ascii")}


def _request(rid: str, kind: str = "query", image: dict | None = None, **fields):
    from workers.results import ScreenRequest

    return ScreenRequest.from_message(request_id=rid, kind=kind, worker="w@test", image=image or _image(0), **fields)


def _rows(runtime, rids):
    from db import repo
    from db.models import DbImage, Request
    from db.session import session_scope

    with session_scope(runtime.engine) as s:
        verdicts = {rid: repo.row_dict(repo.get_verdict(s, rid)) for rid in rids}
        requests = {rid: s.get(Request, rid) for rid in rids}
        requests = {rid: None if r is None else {"client": r.client, "source": r.source, "label": r.label,
                                                 "image_ref": r.image_ref, "submitted_at": r.submitted_at}
                    for rid, r in requests.items()}
        images = {rid: [(i.status, i.image_path) for i in s.query(DbImage).filter(DbImage.request_id == rid)]
                  for rid in rids}
    return verdicts, requests, images


@pytest.mark.parametrize("fields, words", [
    ({"label": 2**31}, "label 2147483648 is outside"),
    ({"label": -(2**70)}, "is outside"),
    ({"label": "7"}, "label must be an integer"),
    ({"client": "c" * 300}, "client must be text of at most 256 characters, got 300"),
    ({"source": ["not", "text"]}, "source must be text"),
])
def test_fields_the_audit_store_cannot_hold_get_invalid_input_and_a_row(runtime, fields, words):
    """Another client (or an old SDK) may send them: a row and a reason, never a database error."""
    rid = "bad-" + "-".join(fields)
    single = runtime.handle(_request(rid, kind="insert", **fields), _image(1))
    assert single["verdict"] == "invalid_input" and words in single["reasons"][0]
    many = runtime.handle_many([_request(rid + "-m", kind="insert", **fields), _request("fine-" + rid, kind="insert")],
                               [_image(2), _image(3)])
    assert many[0]["verdict"] == "invalid_input" and words in many[0]["reasons"][0]
    assert many[1]["verdict"] in ("benign", "adversarial")  # its neighbour in the message is judged as usual
    verdicts, requests, images = _rows(runtime, [rid, rid + "-m", "fine-" + rid])
    assert verdicts[rid]["verdict"] == verdicts[rid + "-m"]["verdict"] == "invalid_input"
    assert requests[rid] is not None and all(requests[rid][k] is None for k in fields)  # the bad field is left out
    assert images[rid] == [] and images[rid + "-m"] == []  # nothing joins the database


@pytest.mark.parametrize("fields", [
    {"client": "c", "source": "s", "label": 3, "submitted_at": 1_700_000_000.5},
    {"label": 2**31, "client": "c" * 300, "submitted_at": "nan"},
    {"source": ["not", "text"], "submitted_at": "2026-11-29T01:02:03+00:00"},
    {},
])
def test_a_batch_messages_requests_are_those_of_its_items_one_by_one(fields):
    """``from_items`` checks the message's shared fields once; each request must be what ``from_message``
    makes of its item, bad fields, problems and image reference kinds included."""
    from workers.results import ScreenRequest

    items = [{"request_id": "a", "image": _image(0)}, {"request_id": "b", "image": {"part": {}}},
             {"request_id": "c", "image": {"colour": "blue"}}, {"request_id": "d"}]
    many = ScreenRequest.from_items(items, kind="insert", worker="w@test" * 50, **fields)
    ones = [ScreenRequest.from_message(request_id=it["request_id"], kind="insert", worker="w@test" * 50,
                                       image=it.get("image"), **fields) for it in items]
    assert len({r.received_at for r in many}) == 1  # received together
    for a, b in zip(many, ones):
        b.received_at = a.received_at  # the worker's clock when each was made
    assert many == ones
    assert [r.image_ref for r in many] == ["inline", "part", None, None]


def test_times_and_references_that_cannot_be_stored_are_kept_out_of_the_request_row(runtime):
    results = runtime.handle_many(
        [_request("t-nan", submitted_at="nan"), _request("t-far", submitted_at=10**400),
         _request("t-iso", submitted_at="2026-11-29T01:02:03+00:00"),
         _request("t-ref", image={"image_base64_inline": "x" * 40})],
        [_image(4), _image(5), _image(6), {"image_base64_inline": "x" * 40}])
    assert all(r["verdict"] in ("benign", "adversarial") for r in results[:3]), results[:3]  # judged
    assert results[3]["verdict"] == "invalid_input" and "need exactly one of" in results[3]["reasons"][0]
    _, requests, _ = _rows(runtime, ["t-nan", "t-far", "t-iso", "t-ref"])
    assert requests["t-nan"]["submitted_at"] is None and requests["t-far"]["submitted_at"] is None
    assert requests["t-iso"]["submitted_at"].year == 2026
    assert requests["t-ref"]["image_ref"] is None  # an unknown kind is not stored (its column holds 16 characters)


def test_a_batch_written_again_one_by_one_keeps_every_insertions_image_path(runtime, monkeypatch):
    """The first write of a batch fails (the audit store hiccups); the one-by-one retry must still point
    each image row at its stored file, and no Result may carry the internal path."""
    import sqlalchemy.exc

    from db import repo

    inner_write, inner_verdict = runtime._write, repo.write_verdict
    calls: list[int] = []
    verdicts_written: list[str] = []

    def write(state, entries):
        calls.append(len(entries))
        return inner_write(state, entries)

    def verdict(session, **fields):  # the batch's last verdict fails, after its images were handled
        verdicts_written.append(fields["request_id"])
        if len(verdicts_written) == 3:
            raise sqlalchemy.exc.OperationalError("INSERT ...", {}, Exception("database is locked"))
        return inner_verdict(session, **fields)

    monkeypatch.setattr(runtime, "_write", write)
    monkeypatch.setattr(repo, "write_verdict", verdict)
    rids = ["path-1", "path-2", "path-3"]
    results = runtime.handle_many([_request(r, kind="insert") for r in rids], [_image(i + 10) for i in range(3)])
    assert calls == [3, 1, 1, 1]  # the batch, then each request alone
    assert verdicts_written == rids + rids
    assert all("_image_path" not in r for r in results)
    verdicts, _, images = _rows(runtime, rids)
    for rid in rids:
        assert verdicts[rid] is not None
        ((status, path),) = images[rid]
        assert path is not None and Path(path).name.startswith(f"{rid}-") and path.endswith(".img"), (rid, path)


def test_an_exit_raised_in_a_batch_stops_the_task_as_it_does_for_a_single_image(runtime, monkeypatch):
    """An exception that is not an ``Exception`` (SystemExit, KeyboardInterrupt) fails no item quietly: both
    ``handle`` and ``handle_many`` let it through to the task, and a plain error stays the item's own outcome."""

    def process(items):
        raise SystemExit("stop")

    monkeypatch.setattr(runtime.batcher, "process", process)
    with pytest.raises(SystemExit):
        runtime.handle(_request("exit-1"), _image(20))
    with pytest.raises(SystemExit):
        runtime.handle_many([_request("exit-2"), _request("exit-3")], [_image(21), _image(22)])
    monkeypatch.setattr(runtime.batcher, "process", lambda items: [ValueError("this one") for _ in items])
    outcomes = runtime.handle_many([_request("err-1"), _request("err-2")], [_image(23), _image(24)])
    assert [type(o) for o in outcomes] == [ValueError, ValueError]


@pytest.mark.parametrize("first", ["query", "invalid"])
def test_an_id_answered_before_and_sent_again_as_an_insertion_adds_no_image(runtime, first):
    """The first verdict stands, and an image never joins the database without a verdict of its own."""
    rid = f"again-{first}"
    if first == "query":
        before = runtime.handle(_request(rid), _image(20))
    else:
        before = runtime.handle(_request(rid, kind="insert"), {"inline": base64.b64encode(b"not an image").decode()})
        assert before["verdict"] == "invalid_input"
    again = runtime.handle(_request(rid, kind="insert"), _image(21))
    assert (again["verdict"], again["kind"], again["image_id"]) == (before["verdict"], before["kind"], None)
    again_many = runtime.handle_many([_request(rid, kind="insert")], [_image(22)])[0]
    assert again_many["verdict"] == before["verdict"]
    _, _, images = _rows(runtime, [rid])
    assert images[rid] == []
    assert not any(rid_ == rid for rid_, _ in _replica_requests(runtime))


def _replica_requests(runtime):
    """(request id, image id) of every database image the audit store holds."""
    from db.models import DbImage
    from db.session import session_scope

    with session_scope(runtime.engine) as s:
        return [(i.request_id, i.id) for i in s.query(DbImage)]


@pytest.mark.parametrize("rid", ["..", "", "x" * 65, None])
def test_a_single_message_with_a_bad_request_id_fails_with_the_reason_before_any_work(rid):
    """No verdict row can be keyed by it: the task fails (its Result says why), as a batch drops such an item."""
    from workers.tasks import _screen

    with pytest.raises(ValueError, match="invalid request id"):
        _screen(None, "query", rid, _image(0), None, None)  # no task, no runtime: nothing else is touched


def test_waiting_for_a_model_and_riding_out_outages_have_budgets_of_their_own():
    """Celery gives up when retries >= max_retries; retry_plan sets max_retries so that each kind counts only
    its own retries (a long wait for the first model used to leave no retry for a later outage)."""
    from types import SimpleNamespace

    from workers.tasks import MODEL_WAITS_KWARG, NO_MODEL_MAX_RETRIES, TRANSIENT_MAX_RETRIES, retry_plan

    def run(kinds: list[str]) -> tuple[int, str | None]:
        """Retries taken before Celery would give up, following ``kinds`` ('model' or 'outage') in turn."""
        request = SimpleNamespace(retries=0, kwargs={"request_id": "r"})
        for step, kind in enumerate(kinds):
            _, max_retries, kwargs = retry_plan(request, no_model=kind == "model")
            if request.retries >= max_retries:
                return step, kind
            assert kwargs["request_id"] == "r"
            request = SimpleNamespace(retries=request.retries + 1, kwargs=kwargs)
        return len(kinds), None

    assert run(["model"] * 200) == (NO_MODEL_MAX_RETRIES, "model")
    assert run(["outage"] * 200) == (TRANSIENT_MAX_RETRIES, "outage")
    # a long wait for a model, then an outage: the outage still gets all its retries, and the other way round
    waited = NO_MODEL_MAX_RETRIES - 1
    assert run(["model"] * waited + ["outage"] * 200) == (waited + TRANSIENT_MAX_RETRIES, "outage")
    assert run(["outage"] * 49 + ["model"] * 200) == (49 + NO_MODEL_MAX_RETRIES, "model")
    # the waits travel in the retried message; a missing or nonsensical count is read as none
    _, _, kwargs = retry_plan(SimpleNamespace(retries=3, kwargs={MODEL_WAITS_KWARG: 2}), no_model=True)
    assert kwargs[MODEL_WAITS_KWARG] == 3
    for junk in ("7", -1, True, None, 10**9):
        spent, _, _ = retry_plan(SimpleNamespace(retries=5, kwargs={MODEL_WAITS_KWARG: junk}), no_model=False)
        assert spent == (0 if junk == 10**9 else 5)  # more waits than retries: clamped to the retries


def test_an_insertion_id_sent_again_with_other_bytes_never_changes_the_stored_image(runtime):
    """The stored file is what the next model re-encodes: bytes sent again under an accepted id (never screened)
    must not replace it, and are not kept; the same bytes again (a redelivery) keep the one file."""
    import hashlib
    from pathlib import Path

    first_png = base64.b64decode(_image(30)["inline"])
    other = _image(31)
    first = runtime.handle(_request("keep-1", kind="insert"), {"inline": base64.b64encode(first_png).decode()})
    _, _, images = _rows(runtime, ["keep-1"])
    ((_, path),) = images["keep-1"]
    assert Path(path).read_bytes() == first_png
    again = runtime.handle(_request("keep-1", kind="insert"), other)
    assert again["verdict"] == first["verdict"] and again["image_id"] == first["image_id"]
    assert Path(path).read_bytes() == first_png and _rows(runtime, ["keep-1"])[2]["keep-1"] == [images["keep-1"][0]]
    stored = sorted(p.name for p in Path(path).parent.iterdir() if p.name.startswith("keep-1"))
    assert stored == [Path(path).name]  # the other bytes were not left behind
    digest = hashlib.sha256(base64.b64decode(other["inline"])).hexdigest()[:16]
    assert not any(digest in name for name in stored)
    runtime.handle(_request("keep-1", kind="insert"), {"inline": base64.b64encode(first_png).decode()})
    assert Path(path).read_bytes() == first_png  # a redelivery of the same bytes: the same file, kept


def test_a_served_calibration_is_the_copy_committed_with_its_row_not_a_file_written_since(tmp_path):
    """The file's path is one per version and detector: `umcd calibrate` of the same version overwrites it."""
    from dataclasses import asdict
    from types import SimpleNamespace

    from core.calibration import Calibration
    from workers.runtime import load_calibration

    rng = np.random.default_rng(3)
    directions = {"c1": "high", "c2": "low", "c3": "high"}
    committed = Calibration.fit({k: rng.normal(size=200) for k in directions}, directions, 0.05)
    later = Calibration.fit({k: rng.normal(size=200) for k in directions}, directions, 0.30)
    path = later.save(tmp_path / "v1-umcd.json")
    row = SimpleNamespace(id=1, path=str(path), meta={"calibration": asdict(committed)})
    assert load_calibration(row).thresholds == committed.thresholds
    assert load_calibration(SimpleNamespace(id=2, path=str(path), meta={})).thresholds == later.thresholds
    with pytest.raises(FileNotFoundError, match="calibration 3"):
        load_calibration(SimpleNamespace(id=3, path=str(tmp_path / "none.json"), meta={}))


def test_screening_tasks_are_acknowledged_when_done_and_long_tasks_when_taken():
    """A screening message is redelivered if its worker dies (its verdict write is idempotent); train, attack and
    eval are not idempotent and outlast the broker's visibility timeout, so they are acknowledged on receipt."""
    from celery import Celery

    from workers.tasks import LONG_TASKS_ACK_EARLY, register_tasks

    tasks = register_tasks(Celery("ack-test"))
    late = {name for name, task in tasks.items() if task.acks_late}
    assert late == {"umcd.detect", "umcd.screen", "umcd.detect_batch", "umcd.screen_batch"}
    assert set(tasks) - late == set(LONG_TASKS_ACK_EARLY)
    assert all(tasks[name].reject_on_worker_lost for name in late)


def test_the_cpu_worker_serves_metrics_and_counts_its_tasks(monkeypatch):
    """A worker of train, attack and eval loads no detection runtime, yet its /metrics (its health check and
    Prometheus target) and its task counts must exist."""
    from types import SimpleNamespace

    from workers import app as worker_app
    from workers import metrics

    def worker(queues):
        amqp = SimpleNamespace(queues=SimpleNamespace(consume_from=queues))
        return SimpleNamespace(app=SimpleNamespace(amqp=amqp), pool_cls="threads", hostname="w")

    cpu, detect = worker({"train": 1, "attack": 1, "eval": 1}), worker({"detect": 1, "screen": 1})
    assert worker_app.MonitoringStep(cpu).enabled and not worker_app.MonitoringStep(detect).enabled
    assert worker_app.DetectionRuntimeStep(detect).enabled and not worker_app.DetectionRuntimeStep(cpu).enabled
    served = []
    monkeypatch.setattr(metrics, "serve", served.append)
    monkeypatch.setattr(worker_app, "get_settings", lambda: SimpleNamespace(metrics_port=9100, log_level="INFO"))
    worker_app.MonitoringStep(cpu).start(cpu)
    assert served == [9100]

    def counted(queue, outcome):
        return metrics.REQUESTS.labels(queue=queue, outcome=outcome)._value.get()

    before = counted("train", "ok"), counted("eval", "error")
    worker_app._count_long_task(sender=SimpleNamespace(name="umcd.train"), state="SUCCESS")
    worker_app._count_long_task(sender=SimpleNamespace(name="umcd.eval"), state="FAILURE")
    worker_app._count_long_task(sender=SimpleNamespace(name="umcd.detect"), state="SUCCESS")  # counted by verdict
    worker_app._count_long_task(sender=SimpleNamespace(name="umcd.train"), state="RETRY")
    assert (counted("train", "ok"), counted("eval", "error")) == (before[0] + 1, before[1] + 1)


def test_items_naming_one_image_many_times_make_one_copy_of_it(runtime, tmp_path, monkeypatch):
    """A crafted message may name one image of a pixel array, or one file, in every item: the worker reads, resizes
    and (for insertions) encodes it once, not once per item (that was up to 1024 full-size copies)."""
    from workers import imaging
    from workers import runtime as runtime_module

    shared = tmp_path / "shared"
    shared.mkdir()
    runtime.settings = runtime.settings.model_copy(update={"image_roots": (shared,)})
    pixels = np.random.default_rng(0).integers(0, 256, (2, 96, 96, 1), dtype=np.uint8)
    np.save(shared / "frames.npy", pixels)
    (shared / "one.png").write_bytes(png(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)))
    resized, encoded, reads = [], [], []
    real_at_size, real_png, real_read = imaging.pixels_at_size, runtime_module.pixels_png, imaging._read_path
    monkeypatch.setattr(runtime_module, "pixels_at_size", lambda im, size: resized.append(len(im)) or real_at_size(im, size))
    monkeypatch.setattr(runtime_module, "pixels_png", lambda im: encoded.append(im.shape) or real_png(im))
    monkeypatch.setattr(imaging, "_read_path", lambda *a: reads.append(a[0]) or real_read(*a))
    array_ref = {"array": {"path": str(shared / "frames.npy"), "index": 0}}
    n = 24
    results = runtime.handle_many([_request(f"amp-{i}", kind="insert", image=array_ref) for i in range(n)]
                                  + [_request(f"same-{i}", image={"path": str(shared / "one.png")}) for i in range(n)],
                                  [array_ref] * n + [{"path": str(shared / "one.png")}] * n)
    assert all(r["verdict"] in ("benign", "adversarial") for r in results), results[:2]
    assert resized == [1] and encoded == [(96, 96, 1)]  # one image resized, one PNG for 24 insertions
    assert sorted(reads) == [str(shared / "frames.npy"), str(shared / "one.png")]  # each file read once
    # every item got the same numbers as that image alone
    assert len({r["scores"]["c3"] for r in results[:n]}) == 1 and len({r["scores"]["c3"] for r in results[n:]}) == 1


class _BlobRedis:
    """What the runtime asks of the broker's Redis for ``part`` references: GET, counted per key."""

    def __init__(self, blobs: dict[str, bytes], down: set[str] = frozenset()) -> None:
        self.blobs, self.down, self.gets = blobs, down, []

    def get(self, key):
        import redis

        self.gets.append(key)
        if key in self.down:
            raise redis.ConnectionError("Redis went away")
        return self.blobs.get(key)

    def strlen(self, key):
        import redis

        if key in self.down:
            raise redis.ConnectionError("Redis went away")
        return len(self.blobs.get(key, b""))


def test_files_in_a_message_blob_score_as_inline_files_and_bad_parts_get_their_own_reason(runtime):
    """``part`` references (the SDK's batch messages): each blob is read once per message, each file scores as
    the same bytes sent inline, an insertion keeps its own bytes, and a part out of range, a blob gone from Redis
    or a Redis outage is answered per item (invalid_input with the reason, or the error the task retries)."""
    import redis

    from db.models import DbImage, Request
    from db.session import session_scope

    files = [png(np.random.default_rng(20 + k).integers(0, 256, (32, 32, 3), dtype=np.uint8)) for k in range(3)]
    key, gone, down = "umcd:img:msg-1", "umcd:img:msg-gone", "umcd:img:msg-down"
    offsets = np.cumsum([0] + [len(f) for f in files])
    fake = _BlobRedis({key: b"".join(files)}, down={down})
    runtime._redis = fake

    def part(k, offset=None, length=None, blob=key):
        return {"part": {"redis_key": blob, "offset": int(offsets[k]) if offset is None else offset,
                         "length": len(files[k]) if length is None else length}}

    refs = [part(0), part(1), part(2), part(2), part(1, offset=int(offsets[3]) - 2, length=len(files[1])),
            part(1, length=0)]
    kinds = ["query", "query", "query", "insert", "query", "query"]
    results = runtime.handle_many([_request(f"part-{i}", kind=kind, image=ref) for i, (ref, kind)
                                   in enumerate(zip(refs, kinds))], refs)
    inline = runtime.handle_many([_request(f"inline-{k}", image=_inline(f)) for k, f in enumerate(files)],
                                 [_inline(f) for f in files])
    for k in range(3):
        assert results[k]["scores"] == inline[k]["scores"] and results[k]["verdict"] == inline[k]["verdict"]
    assert results[3]["scores"] == inline[2]["scores"]
    assert results[4]["verdict"] == "invalid_input" and "lies past the end of umcd:img:msg-1" in results[4]["reasons"][0]
    assert results[5]["verdict"] == "invalid_input" and "empty image" in results[5]["reasons"][0]  # as inline
    assert fake.gets == [key]  # the blob read once for the whole message

    def message(name, refs):
        return runtime.handle_many([_request(f"{name}-{i}", image=ref) for i, ref in enumerate(refs)], refs)

    missing = message("gone", [part(0, blob=gone), part(1, blob=gone)])
    assert [r["verdict"] for r in missing] == ["invalid_input"] * 2
    assert all("missing from Redis" in r["reasons"][0] for r in missing)
    assert all(isinstance(r, redis.ConnectionError) for r in message("down", [part(0, blob=down), part(1, blob=down)]))
    two = message("two", [part(0), part(1, blob=gone)])  # a message's parts point into one blob
    assert two[0]["verdict"] in ("benign", "adversarial")
    assert two[1]["verdict"] == "invalid_input" and "names a second, umcd:img:msg-gone" in two[1]["reasons"][0]
    assert fake.gets == [key, gone, key]  # each message read its blob once, also when it was not there
    with session_scope(runtime.engine) as s:
        rows = {r.request_id: r for r in s.query(Request).filter(Request.request_id.like("part-%"))}
        assert {rid: r.image_ref for rid, r in rows.items()} == {f"part-{i}": "part" for i in range(6)}
        assert rows["part-3"].image_bytes == len(files[2])
        stored = s.query(DbImage).filter(DbImage.request_id == "part-3").all()
    # an insertion stores its own file's bytes (accepted or quarantined)
    assert len(stored) == 1 and Path(stored[0].image_path).read_bytes() == files[2], results[3]["verdict"]


def test_insertions_naming_one_large_part_many_times_hold_no_copy_of_it_each(runtime):
    """A crafted message may name one large file of its blob (or overlapping parts of it) in every item; an
    insertion keeps its bytes until its row is written, so a copy per item would multiply the blob."""
    import tracemalloc

    big = png(np.random.default_rng(7).integers(0, 256, (600, 600, 3), dtype=np.uint8))  # ~1 MB of noise
    key = "umcd:img:msg-big"
    runtime._redis = _BlobRedis({key: b"\x00" + big})  # after another byte: a slice of it is no longer the whole
    n = 48
    refs = [{"part": {"redis_key": key, "offset": 1, "length": len(big)}}] * n
    tracemalloc.start()
    try:
        results = runtime.handle_many([_request(f"big-{i}", kind="insert", image=ref) for i, ref in enumerate(refs)],
                                      refs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert all(r["verdict"] in ("benign", "adversarial") for r in results), results[:1]
    assert peak < 8 * len(big), f"{peak / 2**20:.0f} MiB at peak for a {len(big) / 2**20:.1f} MiB part named {n} times"


def _inline(data: bytes) -> dict:
    return {"inline": base64.b64encode(data).decode("ascii")}


class _Later:
    """The ``time`` module as the runtime sees it, its monotonic clock ``offset`` seconds ahead."""

    def __init__(self, offset: float) -> None:
        import time

        self._time, self.offset = time, offset

    def monotonic(self) -> float:
        return self._time.monotonic() + self.offset

    def __getattr__(self, name):
        return getattr(self._time, name)


def test_images_inserted_under_the_old_model_are_re_encoded_and_a_failed_one_is_tried_again(tmp_path, monkeypatch):
    """Stragglers: images a worker still on the old model inserted after the publisher's re-encoding pass. The
    served worker encodes them under the new version; one whose file cannot be read for a while is tried again
    later (before, one failure left it out of the index for as long as the process served the version), one
    removed meanwhile is not, and one without a stored file is given up at once."""
    from core.checkpoint import save_untrained_checkpoint
    from db import repo
    from db.models import ImageCode, IndexLog
    from db.session import session_scope
    from workers import runtime as runtime_module
    from workers.publish import publish

    with untrained_runtime(tmp_path, monkeypatch, model_poll_interval_s=3600.0) as rt:
        old = rt._state.version
        new = publish(save_untrained_checkpoint(tmp_path / "v2.safetensors", 16, seed=1),
                      settings=rt.settings).model_version
        assert new != old
        files = {}
        for name, seed in (("fine", 1), ("flaky", 2), ("removed", 3)):
            files[name] = tmp_path / f"{name}.png"
            files[name].write_bytes(png(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)))
        ids = {}
        with session_scope(rt.engine, write=True) as s:  # what a worker still serving the old model writes
            for name in ("fine", "flaky", "removed", "no-file"):
                ids[name] = repo.insert_database_image(s, f"straggler-{name}", b"\x00\x00", old,
                                                       image_path=str(files[name]) if name in files else None)
        files["flaky"].rename(tmp_path / "away.png")
        files["removed"].unlink()

        def coded() -> set[int]:
            with session_scope(rt.engine) as s:
                codes = {i for (i,) in s.query(ImageCode.image_id).filter(ImageCode.model_version == new)}
                logged = {i for (i,) in s.query(IndexLog.image_id).filter(IndexLog.model_version == new,
                                                                           IndexLog.op == "add")}
            assert codes == logged  # every new code of an active image reaches the replicas through the log
            return codes & set(ids.values())

        assert rt.refresh_model() and rt._state.version == new
        assert rt.reencode_stragglers() == 1 and coded() == {ids["fine"]}
        (tmp_path / "away.png").rename(files["flaky"])  # the file system is back
        assert rt.reencode_stragglers() == 0  # not yet: the retry waits
        with session_scope(rt.engine, write=True) as s:
            assert repo.remove_image(s, ids["removed"])
        monkeypatch.setattr(runtime_module, "time", _Later(3601))  # past any first wait (at most an hour)
        real_add = repo.add_image_codes_bulk

        def store_down(*args, **kwargs):
            raise RuntimeError("the audit store went away for a moment")

        monkeypatch.setattr(repo, "add_image_codes_bulk", store_down)  # encoded, then its code cannot be written
        with pytest.raises(RuntimeError, match="went away"):
            rt.reencode_stragglers()
        monkeypatch.setattr(repo, "add_image_codes_bulk", real_add)  # still due: tried again at the next pass
        assert rt.reencode_stragglers() == 1 and coded() == {ids["fine"], ids["flaky"]}
        retry = rt._straggler_retry
        assert ids["removed"] not in retry and ids["flaky"] not in retry  # removed meanwhile: dropped, not retried
        assert retry[ids["no-file"]][1] == float("inf")  # nothing stored to read: given up at once
        monkeypatch.setattr(runtime_module, "time", _Later(10 * 3600))
        assert rt.reencode_stragglers() == 0 and coded() == {ids["fine"], ids["flaky"]}
