"""`umcd fleet` with real processes: Redis, PostgreSQL, Celery workers, a gateway and Flower start, answer and stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from umcd.fleet import Fleet, FleetError, postgres_bin_dir, read_env_file

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

needs_redis = pytest.mark.skipif(
    shutil.which("redis-server") is None and not os.access("/usr/bin/redis-server", os.X_OK),
    reason="redis-server is not installed: run `make services`",
)
needs_postgres = pytest.mark.skipif(postgres_bin_dir() is None, reason="PostgreSQL is not installed: run `make services`")

# Small stand-ins for workers.app, producers.gateway and db.migrate (written by other parts of the
# project): the fleet starts them exactly as it starts the real ones, only the module names differ.
PROBE_APP = '''
"""A Celery app for the fleet tests: its broker and backend from the fleet's variables."""
import os
from celery import Celery

app = Celery("fleet_probe", broker=os.environ["UMCD_BROKER_URL"], backend=os.environ["UMCD_RESULT_BACKEND"])
app.conf.update(accept_content=["json"], task_serializer="json", result_serializer="json",
                broker_connection_retry_on_startup=True)


@app.task(name="probe.add")
def add(a, b):
    return a + b
'''
PROBE_GATEWAY = '''
"""An ASGI app for the fleet tests: /healthz, and /env to show what the fleet passed."""
import os
from fastapi import FastAPI

app = FastAPI()


@app.get("/healthz")
def healthz():
    return {"ok": True}


@app.get("/env")
def env():
    return {k: bool(os.environ.get(k)) for k in ("UMCD_BROKER_URL", "UMCD_DATABASE_URL", "UMCD_API_KEY")}
'''
PROBE_MIGRATE = '''
"""Stands in for db.migrate: creates one table in UMCD_DATABASE_URL."""
import os
import sqlalchemy as sa

engine = sa.create_engine(os.environ["UMCD_DATABASE_URL"])
with engine.begin() as conn:
    conn.execute(sa.text("CREATE TABLE IF NOT EXISTS fleet_probe (id INTEGER PRIMARY KEY)"))
    conn.execute(sa.text("INSERT INTO fleet_probe (id) SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM fleet_probe)"))
engine.dispose()
'''


@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fleet_probes")
    (path / "fleet_probe_app.py").write_text(textwrap.dedent(PROBE_APP))
    (path / "fleet_probe_gateway.py").write_text(textwrap.dedent(PROBE_GATEWAY))
    (path / "fleet_probe_migrate.py").write_text(textwrap.dedent(PROBE_MIGRATE))
    return path


@pytest.fixture()
def artifacts():
    """An artifacts folder the ``postgres`` OS user can reach (pytest's tmp folders are mode 700)."""
    base = Path(tempfile.mkdtemp(prefix="umcd-fleet-test-"))
    base.chmod(0o755)
    try:
        yield base / "artifacts"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def make_fleet(artifacts: Path, probes: Path, **kwargs) -> Fleet:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_PASSWORD")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(probes), env.get("PYTHONPATH")]))
    kwargs.setdefault("ready_timeout_s", 120.0)
    return Fleet(
        artifacts, celery_app="fleet_probe_app", gateway_app="fleet_probe_gateway:app",
        migrate_module="fleet_probe_migrate", env=env, stop_grace_s=10.0, **kwargs,
    )


def live(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def compose_healthcheck(service: str, env: dict[str, str], *replace: tuple[str, str]) -> int:
    """Exit code of a compose service's health check run here (``$$`` is compose's ``$``), after ``replace``."""
    import yaml

    test = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"][service]["healthcheck"]["test"]
    argv = ["sh", "-c", test[1]] if test[0] == "CMD-SHELL" else test[1:]
    argv = [arg.replace("$$", "$") for arg in argv]
    for old, new in replace:
        assert any(old in arg for arg in argv), (old, argv)
        argv = [arg.replace(old, new) for arg in argv]
    return subprocess.run(argv, env=env, timeout=60, capture_output=True).returncode


def http_status(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        import base64

        request.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@needs_redis
@needs_postgres
def test_fleet_up_starts_every_service_and_down_leaves_no_process(artifacts, probes):
    import celery
    import redis
    import sqlalchemy as sa

    fleet = make_fleet(artifacts, probes, workers=2)
    state = fleet.up()
    try:
        names = [s.name for s in state.services]
        assert names == ["redis", "postgres", "detect0", "detect1", "cpu", "gateway", "flower"]
        assert all(live(s.pid) for s in state.services)
        assert state.oneshots["migrate"]["rc"] == 0

        # state.json records pid, log and URL of each process, and no secret
        recorded = json.loads(fleet.state_path.read_text())
        assert [s["name"] for s in recorded["services"]] == names
        assert all(Path(s["log"]).exists() and s["url"] and s["pid"] > 0 for s in recorded["services"])
        secrets_ = read_env_file(fleet.env_path)
        assert stat.S_IMODE(fleet.env_path.stat().st_mode) == 0o600
        text = fleet.state_path.read_text()
        for key in ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_PASSWORD", "UMCD_API_KEY"):
            assert len(secrets_[key]) >= 16 and secrets_[key] not in text, key
        for log in (artifacts / "fleet" / "logs").iterdir():
            assert secrets_["FLOWER_PASSWORD"] not in log.read_text(errors="replace"), log

        # Redis: append-only, password required
        redis_port = state.service("redis").port
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=redis_port).ping()
        client = redis.Redis(port=redis_port, password=secrets_["REDIS_PASSWORD"])
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        client.close()

        # PostgreSQL on 127.0.0.1: the migration ran against it
        env = fleet.client_env()
        assert env["UMCD_DATABASE_URL"].startswith("postgresql+psycopg://")
        engine = sa.create_engine(env["UMCD_DATABASE_URL"])
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM fleet_probe")).scalar_one() == 1
        engine.dispose()

        # workers consume their queues: a task through the broker comes back from a worker
        app = celery.Celery("fleet_test", broker=env["UMCD_BROKER_URL"], backend=env["UMCD_RESULT_BACKEND"])
        try:
            nodes = {node.split("@")[0] for reply in app.control.ping(timeout=2.0) for node in reply}
            assert nodes == {"detect0", "detect1", "cpu"}
            assert app.send_task("probe.add", args=(2, 3), queue="detect").get(timeout=30) == 5
            assert app.send_task("probe.add", args=(4, 5), queue="train").get(timeout=30) == 9
        finally:
            app.close()
        metric_ports = [state.service(n).port for n in ("detect0", "detect1", "cpu")]
        assert len(set(metric_ports)) == 3

        # gateway and Flower answer; Flower's UI needs its basic auth, its health check does not
        gateway, flower = state.service("gateway"), state.service("flower")
        assert http_status(gateway.url + "/healthz") == 200
        with urllib.request.urlopen(gateway.url + "/env", timeout=5) as response:
            assert json.load(response) == {"UMCD_BROKER_URL": True, "UMCD_DATABASE_URL": True, "UMCD_API_KEY": True}
        assert http_status(flower.url + "/healthcheck") == 200
        assert http_status(flower.url + "/workers") == 401
        assert http_status(flower.url + "/workers", auth=(secrets_["FLOWER_USER"], secrets_["FLOWER_PASSWORD"])) == 200

        # the health checks of docker-compose.yml, run against the same servers (Docker sets HOSTNAME;
        # `-n cpu@%h` is the cpu worker's node name under compose and here)
        pg = state.service("postgres")
        check_env = {
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
            "HOSTNAME": socket.gethostname(), "UMCD_BROKER_URL": env["UMCD_BROKER_URL"], "PGPORT": str(pg.port),
            "POSTGRES_USER": secrets_["POSTGRES_USER"], "POSTGRES_DB": secrets_["POSTGRES_DB"],
        }
        assert compose_healthcheck("postgres", check_env) == 0
        assert compose_healthcheck("detect-worker", check_env, ("detect@", "cpu@")) == 0
        assert compose_healthcheck("detect-worker", check_env, ("detect@", "nobody@"), ("--timeout 10", "--timeout 1")) != 0
        assert compose_healthcheck("gateway", check_env, (":8000/", f":{gateway.port}/")) == 0
        assert compose_healthcheck("flower", check_env, (":5555/", f":{flower.port}/")) == 0

        assert {s.pid for s in state.services} <= {p.pid for p in psutil.process_iter() if fleet.started_by(p.pid)}
        rows = fleet.status()
        assert [(r.name, r.alive) for r in rows] == [(n, True) for n in names]
        assert all(r.healthy is not False for r in rows)
        with pytest.raises(FleetError, match="already running"):
            make_fleet(artifacts, probes).up()
    finally:
        stopped = fleet.down()

    assert stopped == names
    assert not fleet.state_path.exists()
    assert [s.name for s in state.services if live(s.pid)] == []
    assert [p.pid for p in psutil.process_iter() if fleet.started_by(p.pid)] == []  # PostgreSQL's children too
    assert [s.name for s in state.services if s.port and port_open(s.port)] == []
    assert fleet.status() == []
    assert fleet.down() == []


@needs_redis
@needs_postgres
def test_second_up_reuses_the_cluster_and_the_secrets(artifacts, probes):
    import sqlalchemy as sa

    fleet = make_fleet(artifacts, probes, workers=0, cpu_worker=False, gateway=False, flower=False)
    fleet.up()
    try:
        first = read_env_file(fleet.env_path)
        engine = sa.create_engine(fleet.client_env()["UMCD_DATABASE_URL"])
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO fleet_probe (id) VALUES (2)"))
        engine.dispose()
    finally:
        fleet.down()

    again = make_fleet(artifacts, probes, workers=0, cpu_worker=False, gateway=False, flower=False)
    state = again.up()
    try:
        second = read_env_file(again.env_path)
        for key in ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_PASSWORD", "UMCD_API_KEY"):
            assert first[key] == second[key], key
        engine = sa.create_engine(again.client_env()["UMCD_DATABASE_URL"])
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM fleet_probe")).scalar_one() == 2
        engine.dispose()
    finally:
        again.down()
    assert [s.name for s in state.services if live(s.pid)] == []


@needs_redis
def test_failed_up_stops_what_it_started(artifacts, probes):
    fleet = make_fleet(
        artifacts, probes, workers=1, postgres=False, cpu_worker=False, flower=False, ready_timeout_s=60.0,
    )
    fleet.gateway_app = "fleet_probe_missing_module:app"
    with pytest.raises(FleetError, match="gateway exited"):
        fleet.up()
    assert not fleet.state_path.exists()
    for log_name in ("redis", "detect0", "gateway"):
        assert (artifacts / "fleet" / "logs" / f"{log_name}.log").exists()
    assert [p.pid for p in psutil.process_iter() if fleet.started_by(p.pid)] == []


@needs_redis
def test_cli_up_status_down_with_sqlite(artifacts, probes, monkeypatch):
    import typer
    from typer.testing import CliRunner

    from umcd.commands.fleet import register

    app = typer.Typer()
    register(app)
    runner = CliRunner()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(probes), os.environ.get("PYTHONPATH")])))
    for key in ("REDIS_PASSWORD", "FLOWER_PASSWORD", "UMCD_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    common = ["--artifacts", str(artifacts)]
    monkeypatch.setenv("UMCD_VISIBILITY_TIMEOUT_S", "37")  # settings of the shell running `up`, one of them secret
    monkeypatch.setenv("UMCD_DETECTOR_SECRET", "s3cret-of-up")
    monkeypatch.delenv("UMCD_TOP_K", raising=False)

    result = runner.invoke(app, ["fleet", "status", *common])
    assert result.exit_code == 0 and "no fleet recorded" in result.output

    result = runner.invoke(app, [
        "fleet", "up", *common, "--workers", "0", "--no-postgres", "--celery-app", "fleet_probe_app",
        "--gateway-app", "fleet_probe_gateway:app", "--migrate-module", "fleet_probe_migrate",
    ])
    try:
        assert result.exit_code == 0, result.output
        secrets_ = read_env_file(artifacts / "fleet" / ".env")
        assert secrets_["UMCD_DATABASE_URL"].startswith("sqlite:///")
        assert (artifacts / "audit.db").exists()
        for key in ("REDIS_PASSWORD", "FLOWER_PASSWORD", "UMCD_API_KEY"):
            assert secrets_[key] not in result.output
        for name in ("redis", "cpu", "gateway", "flower"):
            assert name in result.output
        assert "postgres" not in [s["name"] for s in json.loads((artifacts / "fleet" / "state.json").read_text())["services"]]

        result = runner.invoke(app, ["fleet", "status", *common, "--json"])
        assert result.exit_code == 0, result.output
        rows = json.loads(result.output)
        assert [(r["name"], r["alive"]) for r in rows] == [("redis", True), ("cpu", True), ("gateway", True), ("flower", True)]
        pids = [r["pid"] for r in rows]

        os.kill(rows[1]["pid"], signal.SIGKILL)  # the cpu worker crashes: status says so, and how to restart
        deadline = time.monotonic() + 10
        while live(rows[1]["pid"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        result = runner.invoke(app, ["fleet", "status", *common])
        assert result.exit_code == 1, result.output
        text = " ".join(result.output.split())
        assert "stopped: cpu." in text and "umcd fleet restart NAME" in text and "umcd fleet down" in text

        # started again as `up` did: same command line and metrics port, answering; then every service is up. The
        # shell running `restart` lacks a setting `up` had and holds one `up` did not: the worker gets those of `up`
        monkeypatch.delenv("UMCD_VISIBILITY_TIMEOUT_S")
        monkeypatch.delenv("UMCD_DETECTOR_SECRET")
        monkeypatch.setenv("UMCD_TOP_K", "3")
        result = runner.invoke(app, ["fleet", "restart", "cpu", *common])
        assert result.exit_code == 0, result.output
        state = json.loads((artifacts / "fleet" / "state.json").read_text())
        services = state["services"]
        cpu = next(s for s in services if s["name"] == "cpu")
        assert cpu["pid"] != rows[1]["pid"] and cpu["env"]["UMCD_METRICS_PORT"] == str(cpu["port"])
        environ = psutil.Process(cpu["pid"]).environ()
        assert environ["UMCD_VISIBILITY_TIMEOUT_S"] == "37" and environ["UMCD_DETECTOR_SECRET"] == "s3cret-of-up"
        assert "UMCD_TOP_K" not in environ
        assert {"UMCD_VISIBILITY_TIMEOUT_S", "UMCD_DETECTOR_SECRET"} <= set(state["settings"])
        assert "s3cret-of-up" not in json.dumps(state)  # the secret's value is kept in .env (mode 600) only
        result = runner.invoke(app, ["fleet", "status", *common, "--json"])
        assert result.exit_code == 0 and all(r["alive"] for r in json.loads(result.output)), result.output
        pids.append(cpu["pid"])
        result = runner.invoke(app, ["fleet", "restart", "flower", *common])  # a running one: stopped, then started
        assert result.exit_code == 0, result.output
        services = json.loads((artifacts / "fleet" / "state.json").read_text())["services"]
        flower = next(s for s in services if s["name"] == "flower")
        assert flower["pid"] not in pids and not live(rows[3]["pid"])
        pids.append(flower["pid"])
        assert http_status(flower["url"] + "/workers") == 401  # its basic auth again, from the fleet's secrets
        assert http_status(flower["url"] + "/workers", auth=(secrets_["FLOWER_USER"], secrets_["FLOWER_PASSWORD"])) == 200
        refused = runner.invoke(app, ["fleet", "restart", "redis", *common])  # its port is in every URL
        assert refused.exit_code == 1 and "umcd fleet down" in " ".join(refused.output.split())
        unknown = runner.invoke(app, ["fleet", "restart", "nope", *common])
        assert unknown.exit_code == 1 and "no service 'nope'" in unknown.output
    finally:
        down = runner.invoke(app, ["fleet", "down", *common])
    assert down.exit_code == 0 and "stopped: redis, cpu, gateway, flower" in down.output
    assert [p for p in pids if live(p)] == []


def test_restart_refuses_what_it_cannot_start_again_as_it_was(tmp_path):
    """No process is started: records that an older umcd wrote (no variables of their own), a command line
    recorded with a redacted secret in it, Redis, and names not in the fleet are all refused with the way out."""
    from umcd.fleet import FleetState, ServiceRecord, write_private_file

    fleet = Fleet(tmp_path)
    with pytest.raises(FleetError, match="no fleet recorded"):
        fleet.restart("cpu")
    base = {"create_time": 0.0, "log": str(tmp_path / "x.log"), "url": "", "port": 1}
    state = FleetState(artifacts=str(tmp_path), started_at=0.0, database="", settings=[], services=[
        ServiceRecord(name="redis", kind="redis", pid=1, argv=["redis-server"], **base),
        ServiceRecord(name="cpu", kind="worker", pid=1, argv=["celery", "worker"], **base),
        ServiceRecord(name="gateway", kind="gateway", pid=1, argv=["uvicorn", "--app-dir", "/x/***/y"], **base),
        ServiceRecord(name="flower", kind="flower", pid=1, argv=["celery", "flower"], **base),
    ])
    (tmp_path / "fleet").mkdir(exist_ok=True)
    write_private_file(fleet.state_path, state.to_json())
    for name, message in [("redis", "holds the fleet's state"), ("cpu", "older umcd"), ("gateway", "redacted"),
                          ("nope", "no service 'nope'")]:
        with pytest.raises(FleetError, match=message):
            fleet.restart(name)
    state.settings = None  # written by an umcd that did not keep the settings of `up`: restarting would lose them
    write_private_file(fleet.state_path, state.to_json())
    with pytest.raises(FleetError, match="older umcd"):
        fleet.restart("flower")


def test_a_setting_on_several_lines_is_refused_before_anything_starts(tmp_path):
    """.env is read line by line: a value with a line break would come back cut, or a line of it as another
    variable (found by a code review once `up` kept the shell's settings there)."""
    fleet = Fleet(tmp_path, env={**os.environ, "UMCD_IMAGE_ROOTS": '[\n "/shared"\n]'}, postgres=False)
    with pytest.raises(FleetError, match="UMCD_IMAGE_ROOTS holds a line break"):
        fleet.up()
    assert fleet.read_state() is None and not fleet.is_up()


def test_env_file_round_trips_any_secret_with_mode_600(tmp_path):
    from umcd.fleet import _env_line, write_private_file

    values = {"PLAIN": "abc-DEF_123", "SPACES": "two words", "QUOTES": "it's \"x\"", "SHELL": "$HOME;#`x`", "EMPTY": ""}
    path = tmp_path / ".env"
    write_private_file(path, "# comment\n" + "\n".join(_env_line(k, v) for k, v in values.items()) + "\n")
    assert read_env_file(path) == values
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # what a shell reads from it is the same (the file is meant for `set -a; . .env`)
    out = subprocess.run(
        ["bash", "-c", f"set -a; . {path}; printf '%s\\0' \"$PLAIN\" \"$SPACES\" \"$QUOTES\" \"$SHELL\" \"$EMPTY\""],
        capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]},
    ).stdout.split("\0")[:-1]
    assert out == list(values.values())
