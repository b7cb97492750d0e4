"""`umcd bench` option wiring: the group's --out/--quick/--device reach a named sub-benchmark."""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner


@pytest.fixture
def recorded(monkeypatch):
    """run_index_scaling replaced by a recorder (the wiring is under test, not the benchmark)."""
    import umcd.bench.index_scaling as index_scaling
    import umcd.commands.bench as bench

    calls = []

    def fake(artifacts, folder, *, sizes, device):
        calls.append({"folder": folder, "sizes": sizes, "device": device})
        return {"rows": [], "machine_hamming_rate_per_s": 1.0}

    monkeypatch.setattr(index_scaling, "run_index_scaling", fake)
    monkeypatch.setattr(bench, "_GROUP", {})
    return calls


def test_group_options_reach_the_named_sub_benchmark(recorded, tmp_path):
    from umcd.cli import app

    result = CliRunner().invoke(app, ["bench", "--out", str(tmp_path / "run"), "--quick", "--device", "cuda", "index"])
    assert result.exit_code == 0, result.output
    assert recorded == [{"folder": tmp_path / "run", "sizes": (10_000, 100_000), "device": "cuda"}]


def test_sub_benchmark_options_still_work_on_their_own(recorded, tmp_path):
    from umcd.cli import app

    result = CliRunner().invoke(app, ["bench", "index", "--out", str(tmp_path / "own")])
    assert result.exit_code == 0, result.output
    assert recorded[0]["folder"] == tmp_path / "own" and recorded[0]["device"] == "cpu"
    assert recorded[0]["sizes"] == (10_000, 100_000, 1_000_000, 10_000_000)


def test_the_fleet_benchmarks_listener_reads_a_ready_state_without_parsing_either_writers_text(monkeypatch):
    """Result metas come spelled by Celery (`"status": "SUCCESS"`) or by workers.batchtasks' orjson
    (`"status":"SUCCESS"`): both are told ready or not from their bytes, without a json.loads per Result
    (the listener shares the cores it measures); only an unusual spelling is parsed."""
    import json

    import umcd.bench.fleet as fleet
    from db.jsontext import dumps_plain

    parsed = []
    real_loads = json.loads
    monkeypatch.setattr(fleet.json, "loads", lambda *a, **k: parsed.append(1) or real_loads(*a, **k))
    ready = fleet.ResultListener._ready
    for status, expected in (("SUCCESS", True), ("FAILURE", True), ("STARTED", False), ("RETRY", False)):
        meta = {"status": status, "result": {"verdict": "benign", "scores": {"c1": 1.5}}, "task_id": "r-1"}
        assert ready(dumps_plain(meta)) is expected, status
        assert ready(json.dumps(meta).encode()) is expected, status
    assert parsed == []
    assert ready(b'{"status" :  "SUCCESS"}') is True and parsed == [1]  # another spelling: parsed, still right


def test_the_fleet_benchmarks_listener_stamps_each_ready_result_as_it_is_published(redis_server):
    """The listener reads the backend's publications as raw replies on a connection of its own: a Result stored
    by a worker's batch script (orjson) or by Celery itself is stamped when it arrives; a state that is not
    ready (STARTED) is not, and neither is anything published on another channel."""
    from celery import states

    from umcd.bench.fleet import ResultListener
    from umcd.celeryconf import make_celery
    from umcd.settings import Settings
    from workers.batchtasks import store_item_results

    url = redis_server.url_for(13)
    backend = make_celery(Settings(broker_url=url, result_backend=url)).backend
    listener = ResultListener(url)
    try:
        t0 = time.perf_counter()
        store_item_results(backend, [(f"lr-{i}", {"request_id": f"lr-{i}", "verdict": "benign"}) for i in range(300)])
        backend.store_result("lr-celery", {"verdict": "benign"}, states.SUCCESS)
        backend.store_result("lr-started", None, states.STARTED)
        listener.redis.publish("elsewhere-lr-x", b'{"status":"SUCCESS"}')
        assert listener.wait_for([f"lr-{i}" for i in range(300)] + ["lr-celery"], timeout=10) == 0
        time.sleep(0.2)  # anything else published meanwhile has arrived too
        # (only this test's ids: another test's leftover Result on the shared server is no concern here)
        assert {rid for rid in listener.arrived if rid.startswith("lr-")} == {f"lr-{i}" for i in range(300)} | {
            "lr-celery"}
        assert all(t0 <= t <= time.perf_counter() for t in listener.arrived.values())
        assert listener.wait_for(["lr-never"], timeout=0.3) == 1  # one missing id: the wait ends at its timeout
        # its connection dropped (a restarted backend, a killed client): it subscribes again and goes on
        host, port = listener._sock.getsockname()[:2]
        assert listener.redis.execute_command("CLIENT", "KILL", "ADDR", f"{host}:{port}") in (b"OK", "OK", True)
        deadline = time.monotonic() + 10
        while listener.reconnects == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert listener.reconnects == 1
        store_item_results(backend, [("lr-after", {"request_id": "lr-after", "verdict": "benign"})])
        assert listener.wait_for(["lr-after"], timeout=10) == 0
    finally:
        listener.close()
    assert not listener._thread.is_alive()
