"""Hostile inputs through a real worker: crafted files, bad references and random bytes get a verdict, never a crash."""

from __future__ import annotations

import base64
import json
import random
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fleet_helpers import FleetRun, verdict_audit, wait_for_verdicts
from tests.hostile_corpus import CORPUS_LIMITS, build_hostile_corpus

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.timeout(300)]

NORMAL = ("benign", "adversarial")
#: random inputs hypothesis tries (each one answered before the next is sent)
RANDOM_EXAMPLES = 200
#: how much a worker's peak resident memory may grow over the whole hostile run
MAX_PEAK_GROWTH_MIB = 256

_outcomes: list[dict] = []  # what the hypothesis test saw, for its figures


def _memory(pid: int) -> dict[str, float]:
    """The worker's resident memory now and at its peak (VmHWM), in MiB."""
    import psutil

    rss = psutil.Process(pid).memory_info().rss / 2**20
    peak = rss
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    except OSError:
        pass
    return {"rss_mib": round(rss, 1), "peak_mib": round(peak, 1)}


@pytest.fixture(scope="module")
def hostile_fleet(redis_server, chaos_checkpoint, query_pngs, tmp_path_factory):
    """One detection worker (SQLite) with the decoder limits the corpus assumes, warmed up."""
    import redis as redis_lib

    broker = redis_server.url_for(10)
    redis_lib.Redis.from_url(broker).flushdb()
    artifacts = tmp_path_factory.mktemp("hostile")
    limits = {"UMCD_MAX_IMAGE_PIXELS": str(CORPUS_LIMITS["max_pixels"]),
              "UMCD_MIN_IMAGE_SIDE": str(CORPUS_LIMITS["min_side"]),
              "UMCD_IMAGE_FORMATS": json.dumps(list(CORPUS_LIMITS["formats"]))}
    fleet = FleetRun(artifacts, db_url=f"sqlite:///{artifacts / 'audit.db'}", broker_url=broker,
                     checkpoint=chaos_checkpoint, max_image_bytes=CORPUS_LIMITS["max_bytes"], worker_env=limits)
    try:
        fleet.start(("w1",))
        warm = [fleet.send("umcd.detect", query_pngs[i]) for i in range(64)]
        assert len(fleet.client.wait(warm, timeout=60)) == 64, fleet.logs()
        fleet.baseline_memory = _memory(fleet.workers["w1"].pid)
        yield fleet
    finally:
        fleet.close()


def _bad_references(fleet: FleetRun, png: bytes) -> dict[str, dict]:
    """Task kwargs that are hostile in themselves: image references and fields a client should never send."""
    fleet.client.redis.set("not-an-image-key", png)
    inline = base64.b64encode(png).decode()
    return {
        "ref_path_outside_roots": {"image": {"path": "/etc/passwd"}},
        "ref_path_traversal": {"image": {"path": "/shared/../etc/passwd"}},
        "ref_foreign_redis_key": {"image": {"redis_key": "not-an-image-key"}},
        "ref_missing_redis_key": {"image": {"redis_key": "umcd:img:does-not-exist"}},
        "ref_two_kinds": {"image": {"inline": inline, "path": "/shared/x.png"}},
        "ref_empty": {"image": {}},
        "ref_not_an_object": {"image": "iVBORw0KGgo="},
        "ref_inline_not_base64": {"image": {"inline": "not base64 at all!!"}},
        "ref_inline_number": {"image": {"inline": 12345}},
        "fields_of_wrong_types": {"image": {"inline": inline}, "client": {"x": 1}, "submitted_at": "yesterday",
                                  "source": ["a"], "label": "seven"},
        "label_beyond_32_bits": {"task": "umcd.screen", "image": {"inline": inline}, "label": 2**40},
        "client_too_long": {"image": {"inline": inline}, "client": "c" * 1000},
        "ref_unknown_kind": {"image": {"image_base64_inline": inline}},
        "ref_part_outside_a_batch": {"image": {"part": {"redis_key": "umcd:img:x", "offset": 0, "length": 9}}},
        # only a time: one that cannot be stored is recorded as unknown and the image is judged
        "submitted_at_not_a_time": {"image": {"inline": inline}, "submitted_at": "yesterday"},
        "submitted_at_beyond_year_3000": {"image": {"inline": inline}, "submitted_at": 1e20},
    }

#: the bad references and fields after which the image is still judged (the others get invalid_input)
_JUDGED_ANYWAY = {"submitted_at_not_a_time", "submitted_at_beyond_year_3000"}


def test_every_crafted_file_and_bad_reference_gets_a_verdict_and_the_worker_goes_on(
        hostile_fleet, query_pngs, tmp_path, figures):
    fleet = hostile_fleet
    corpus = build_hostile_corpus(tmp_path / "corpus")
    sent: dict[str, tuple[str, str]] = {}  # request id -> (name, expected)
    good: list[str] = []
    for i, (name, path, expected) in enumerate(corpus):
        data = path.read_bytes()
        sent[fleet.send("umcd.detect", data)] = (name, expected)
        sent[fleet.send("umcd.screen", data, source="hostile")] = (f"{name} (insert)", expected)
        good.append(fleet.send("umcd.detect", query_pngs[100 + i]))  # batch-mates of the hostile ones
    for name, extra in _bad_references(fleet, query_pngs[0]).items():
        rid = uuid.uuid4().hex
        task = extra.pop("task", "umcd.detect")
        kwargs = {"request_id": rid, "submitted_at": time.time(), "client": "hostile", **extra}
        fleet.client.app.send_task(task, kwargs=kwargs, task_id=rid)
        sent[rid] = (name, "valid" if name in _JUDGED_ANYWAY else "invalid")

    ids = [*sent, *good]
    results = fleet.client.wait(ids, timeout=120)
    wait_for_verdicts(fleet.db_url, ids, timeout=30)
    audit = verdict_audit(fleet.db_url, ids)
    worker = fleet.workers["w1"]
    memory = _memory(worker.pid)
    mismatched = {sent[rid][0]: results[rid].verdict for rid in sent if rid in results and (
        (sent[rid][1] == "valid") != (results[rid].verdict in NORMAL))}
    figures.update({
        "hostile_inputs_tried": len(sent), "corpus_files": len(corpus), "bad_references": len(sent) - 2 * len(corpus),
        "answered": sum(rid in results for rid in sent), "crashes": int(not worker.alive()),
        "invalid_input": sum(results[rid].verdict == "invalid_input" for rid in sent if rid in results),
        "normal_verdicts": sum(results[rid].verdict in NORMAL for rid in sent if rid in results),
        "valid_batch_mates_answered": sum(rid in results and results[rid].verdict in NORMAL for rid in good),
        "verdict_rows": audit["verdict_rows"], "lost": len(audit["lost"]), "duplicated": len(audit["duplicated"]),
        "memory_before": fleet.baseline_memory, "memory_after": memory,
    })
    assert worker.alive(), fleet.logs()
    missing = [sent.get(rid, ("valid batch-mate",))[0] for rid in ids if rid not in results]
    assert not missing, f"no answer (a hang or a stuck batch) for {missing}\n{fleet.logs()}"
    assert not mismatched, f"unexpected verdicts: {mismatched}"
    for rid, (name, expected) in sent.items():
        r = results[rid]
        if r.verdict == "invalid_input":
            assert r.reasons and r.reasons[0], name  # a reason in words
    assert not audit["lost"] and not audit["duplicated"] and audit["verdict_rows"] == len(ids)
    assert memory["peak_mib"] - fleet.baseline_memory["peak_mib"] < MAX_PEAK_GROWTH_MIB, (fleet.baseline_memory,
                                                                                           memory)
    after = fleet.client.wait([fleet.send("umcd.detect", query_pngs[1])], timeout=30)
    assert len(after) == 1 and next(iter(after.values())).verdict in NORMAL


_MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBP",
          b"\x00\x00\x01\x00", b"P6\n", b"<svg", b"%PDF-1.4"]


_seeds: list[bytes] = []


def _seed_images() -> list[bytes]:
    """Ten digit PNGs and the same ten as JPEGs (JPEG has no checksum: flipped bytes often still decode)."""
    if not _seeds:
        import io

        from PIL import Image

        from tests.fleet_helpers import digits_query_pngs

        for data in digits_query_pngs()[:10]:
            buf = io.BytesIO()
            Image.open(io.BytesIO(data)).convert("RGB").save(buf, "JPEG", quality=90)
            _seeds.extend([data, buf.getvalue()])
    return _seeds


@st.composite
def hostile_bytes(draw) -> bytes:
    """Random bytes, image magic numbers followed by noise, and real digit images truncated or with flipped bytes."""
    kind = draw(st.sampled_from(["random", "magic", "mutated", "truncated"]))
    if kind == "random":
        return draw(st.binary(max_size=4096))
    if kind == "magic":
        return draw(st.sampled_from(_MAGIC)) + draw(st.binary(max_size=2048))
    image = bytearray(draw(st.sampled_from(_seed_images())))
    if kind == "truncated":
        return bytes(image[: draw(st.integers(0, len(image) - 1))])
    for _ in range(draw(st.integers(1, 16))):
        image[draw(st.integers(0, len(image) - 1))] = draw(st.integers(0, 255))
    return bytes(image)


@settings(max_examples=RANDOM_EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=hostile_bytes(), insert=st.booleans())
def test_random_bytes_get_invalid_input_or_a_normal_verdict(hostile_fleet, data, insert):
    fleet = hostile_fleet
    rid = fleet.send("umcd.screen" if insert else "umcd.detect", data)
    got = fleet.client.wait([rid], timeout=30, interval=0.005)
    assert rid in got, f"no answer within 30 s for {len(data)} bytes {data[:16]!r}\n{fleet.logs()}"
    assert got[rid].verdict in ("invalid_input", *NORMAL), got[rid]
    _outcomes.append({"request_id": rid, "verdict": got[rid].verdict})


def test_after_the_random_inputs_the_worker_is_alive_bounded_and_answers(hostile_fleet, query_pngs, figures):
    fleet = hostile_fleet
    worker = fleet.workers["w1"]
    memory = _memory(worker.pid)
    ids = [o["request_id"] for o in _outcomes]
    audit = verdict_audit(fleet.db_url, ids)
    probe = fleet.client.wait([fleet.send("umcd.detect", query_pngs[random.randrange(1000)])], timeout=30)
    figures.update({
        "random_inputs_tried": len(ids), "crashes": int(not worker.alive()),
        "invalid_input": sum(o["verdict"] == "invalid_input" for o in _outcomes),
        "normal_verdicts": sum(o["verdict"] in NORMAL for o in _outcomes),
        "verdict_rows": audit["verdict_rows"], "lost": len(audit["lost"]), "duplicated": len(audit["duplicated"]),
        "memory_before": fleet.baseline_memory, "memory_after": memory,
    })
    assert len(ids) >= RANDOM_EXAMPLES  # hypothesis ran every example (and shrank nothing: none failed)
    assert worker.alive(), fleet.logs()
    assert not audit["lost"] and not audit["duplicated"] and audit["verdict_rows"] == len(ids)
    assert memory["peak_mib"] - fleet.baseline_memory["peak_mib"] < MAX_PEAK_GROWTH_MIB
    assert len(probe) == 1 and next(iter(probe.values())).verdict in NORMAL
