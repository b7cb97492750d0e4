"""A worker's writer thread: the batcher scores the next batch while the last one's verdicts are stored."""

from __future__ import annotations

import base64
import threading
import time

import numpy as np
import pytest

from tests.fleet_helpers import png, untrained_runtime
from tests.servers import wait_until


@pytest.fixture()
def runtime(tmp_path, monkeypatch):
    """A started DetectionRuntime over an untrained 16-bit model published to SQLite (no servers)."""
    with untrained_runtime(tmp_path, monkeypatch) as rt:
        yield rt


def _png(seed: int) -> dict:
    """An inline ImageRef of a random 32x32 RGB PNG."""
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return {"inline": base64.b64encode(png(pixels)).decode("ascii")}


def _request(rid: str):
    from workers.results import ScreenRequest

    return ScreenRequest(request_id=rid, kind="query", worker="w@test")


class _HeldWrites:
    """Wraps ``runtime._write``: each call records its request ids and waits until released."""

    def __init__(self, runtime) -> None:
        self.inner = runtime._write
        self.started: list[list[str]] = []
        self.release = threading.Event()
        self.thread_names: set[str] = set()

    def __call__(self, state, entries):
        self.started.append([e[0].request.request_id for e in entries])
        self.thread_names.add(threading.current_thread().name)
        assert self.release.wait(30), "the test never released the write"
        return self.inner(state, entries)


def test_the_next_batch_is_scored_while_the_last_ones_verdicts_are_still_being_stored(runtime, monkeypatch):
    from db import repo
    from db.session import session_scope

    held = _HeldWrites(runtime)
    monkeypatch.setattr(runtime, "_write", held)
    state = runtime.state
    scored: list[int] = []
    score_batch = state.detector.score_batch
    monkeypatch.setattr(state.detector, "score_batch", lambda x: scored.append(len(x)) or score_batch(x))

    results: dict[str, dict] = {}

    def ask(rid: str, seed: int) -> None:
        results[rid] = runtime.handle(_request(rid), _png(seed))

    first = threading.Thread(target=ask, args=("writer-a", 1))
    first.start()
    assert wait_until(lambda: held.started == [["writer-a"]])
    second = threading.Thread(target=ask, args=("writer-b", 2))
    second.start()
    # batch 2 is scored although batch 1's transaction has not even begun to commit
    assert wait_until(lambda: len(scored) == 2), scored
    assert held.started == [["writer-a"]] and not results
    held.release.set()
    first.join(20)
    second.join(20)
    assert held.started == [["writer-a"], ["writer-b"]]  # one writer thread: stored in the order scored
    assert held.thread_names and all(name.startswith("umcd-writer") for name in held.thread_names)
    assert {rid: r["verdict"] for rid, r in results.items()}.keys() == {"writer-a", "writer-b"}
    with session_scope(runtime.engine) as s:
        for rid in ("writer-a", "writer-b"):
            assert repo.get_verdict(s, rid).verdict == results[rid]["verdict"]


def test_stop_stores_and_answers_the_batches_already_scored(runtime, monkeypatch):
    from db import repo
    from db.session import session_scope

    held = _HeldWrites(runtime)
    monkeypatch.setattr(runtime, "_write", held)
    results: dict[str, dict] = {}
    asking = threading.Thread(target=lambda: results.update(late=runtime.handle(_request("writer-late"), _png(3))))
    asking.start()
    assert wait_until(lambda: held.started == [["writer-late"]])
    stopping = threading.Thread(target=runtime.stop)
    stopping.start()
    time.sleep(0.3)
    assert stopping.is_alive(), "stop returned while a scored batch was still unstored"
    held.release.set()
    stopping.join(20)
    asking.join(20)
    assert not stopping.is_alive() and results["late"]["request_id"] == "writer-late"
    with session_scope(runtime.engine) as s:
        assert repo.get_verdict(s, "writer-late") is not None


def test_a_worker_counts_its_cpu_by_stage_for_its_metrics(runtime):
    """umcd_worker_cpu_seconds_total{stage}: decoding on the task thread, scoring on the batcher and the
    audit transaction on the writer each add their thread's CPU time."""
    from prometheus_client import REGISTRY

    def stages() -> dict[str, float]:
        return {stage: REGISTRY.get_sample_value("umcd_worker_cpu_seconds_total", {"stage": stage}) or 0.0
                for stage in ("decode", "score", "store")}

    before = stages()
    results = runtime.handle_many([_request(f"cpu-{i}") for i in range(8)], [_png(10 + i) for i in range(8)])
    assert all(r["verdict"] in ("benign", "adversarial") for r in results)
    after = stages()
    assert all(after[k] > before[k] for k in after), (before, after)


def test_items_not_answered_within_the_result_timeout_get_a_timeout_and_their_verdicts_are_still_stored(
        runtime, monkeypatch):
    """handle_many waits once for all of a message's items; an item whose batch has not answered within
    result_timeout_s gets a TimeoutError (the task retries it, and the retry answers from the audit store)."""
    from concurrent.futures import TimeoutError as FutureTimeout

    from db import repo
    from db.session import session_scope

    held = _HeldWrites(runtime)
    monkeypatch.setattr(runtime, "_write", held)
    runtime.result_timeout_s = 0.3
    refs = [_png(20), {"inline": base64.b64encode(b"not an image").decode("ascii")}, _png(21)]
    outcomes = runtime.handle_many([_request(f"slow-{i}") for i in range(3)], refs)
    assert isinstance(outcomes[0], FutureTimeout) and isinstance(outcomes[2], FutureTimeout), outcomes
    assert outcomes[1]["verdict"] == "invalid_input"  # answered at once, without the batcher
    held.release.set()

    def stored() -> bool:
        with session_scope(runtime.engine) as s:
            return all(repo.get_verdict(s, rid) is not None for rid in ("slow-0", "slow-1", "slow-2"))

    assert wait_until(stored, timeout=20)


def test_a_worker_process_freezes_its_long_lived_objects_and_a_replaced_model_is_still_freed(tmp_path, monkeypatch):
    """UMCD_WORKER_GC_FREEZE: a worker's runtime moves what is alive after its start into the GC's permanent
    generation; a model switch freezes again after a full collection, so the replaced model is not kept."""
    import gc
    import weakref

    from core.checkpoint import save_untrained_checkpoint
    from db.migrate import upgrade
    from db.session import dispose_engine
    from umcd.settings import Settings
    from workers import runtime as runtime_module
    from workers.publish import publish

    url = f"sqlite:///{tmp_path / 'audit.db'}"
    upgrade(url)
    settings = Settings(artifacts=tmp_path, database_url=url, broker_url="redis://unused", bits=16, device="cpu")
    publish(save_untrained_checkpoint(tmp_path / "first.safetensors", 16, seed=0), settings=settings,
            seed_fraction=0.5)
    monkeypatch.setattr(runtime_module.metrics, "serve", lambda port: None)
    assert not runtime_module.DetectionRuntime(settings).freeze_heap  # a test's or a CLI's runtime: GC untouched
    assert not runtime_module.DetectionRuntime(settings.model_copy(update={"worker_gc_freeze": False}),
                                               worker_process=True).freeze_heap
    switch = __import__("sys").getswitchinterval()
    gc.unfreeze()
    rt = runtime_module.DetectionRuntime(settings, worker_process=True)
    try:
        rt.start()
        assert gc.get_freeze_count() > 1000
        first = rt.state.version
        old_model = weakref.ref(rt.state.model)
        publish(save_untrained_checkpoint(tmp_path / "second.safetensors", 16, seed=1), settings=settings,
                seed_fraction=0.5)
        assert rt.refresh_model() and rt.state.version != first
        assert old_model() is None, "the replaced model is still alive"
        assert gc.get_freeze_count() > 1000
    finally:
        rt.stop()
        gc.unfreeze()
        __import__("sys").setswitchinterval(switch)
        dispose_engine(url)


def test_verdicts_are_written_under_the_audit_stores_write_lock(runtime, monkeypatch):
    """A batch's verdicts (on the writer thread) and an invalid image's verdict (on the task thread) are
    written holding the SQLite file's write lock, so two workers on one SQLite file queue for it instead
    of sleeping in SQLite's busy handler."""
    from db.session import SqliteWriteLock

    holders: list[str] = []
    hold = SqliteWriteLock.hold

    def counted(self, *args, **kwargs):
        holders.append(threading.current_thread().name)
        return hold(self, *args, **kwargs)

    monkeypatch.setattr(SqliteWriteLock, "hold", counted)
    bad = {"inline": base64.b64encode(b"not an image").decode("ascii")}
    results = runtime.handle_many([_request("locked-ok"), _request("locked-bad")], [_png(40), bad])
    assert results[0]["verdict"] in ("benign", "adversarial") and results[1]["verdict"] == "invalid_input"
    assert sorted(name.startswith("umcd-writer") for name in holders) == [False, True]
