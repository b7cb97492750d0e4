"""Security with real processes: API key and limits at the gateway, pickle refused, Flower auth, no secret in logs, safe checkpoints."""

from __future__ import annotations

import os
import pickle
import secrets
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.fleet_helpers import ROOT, FleetRun, verdict_rows, wait_for_verdicts
from tests.servers import RedisServer, free_port, redis_server_binary, wait_for_port

pytestmark = [
    pytest.mark.chaos, pytest.mark.integration, pytest.mark.timeout(300),
    pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not installed: run `make services`"),
]

API_KEY = "key-" + secrets.token_hex(16)
FLOWER_USER, FLOWER_PASSWORD = "ops", "flower-" + secrets.token_hex(12)
RATE_PER_MINUTE = 20
MAX_IMAGE = 64 * 1024


class Fleet:
    """The security fleet: password Redis, PostgreSQL with a password, one worker, the gateway and Flower."""

    def __init__(self, run: FleetRun, redis: RedisServer, pg_password: str, gateway_url: str, flower_url: str,
                 logs: dict[str, Path], processes: list[subprocess.Popen]) -> None:
        self.run, self.redis, self.pg_password = run, redis, pg_password
        self.gateway_url, self.flower_url, self.logs, self.processes = gateway_url, flower_url, logs, processes

    @property
    def secrets(self) -> dict[str, str]:
        return {"redis password": self.redis.password, "postgres password": self.pg_password,
                "gateway api key": API_KEY, "flower password": FLOWER_PASSWORD}

    def all_logs(self) -> dict[str, str]:
        out = {name: path.read_text(errors="replace") for name, path in self.logs.items() if path.exists()}
        for w in [*self.run.retired, *self.run.workers.values()]:
            out[w.log.name] = w.log_text()
        return out


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


@pytest.fixture(scope="module")
def secure_fleet(postgres_server, chaos_checkpoint, tmp_path_factory):
    artifacts = tmp_path_factory.mktemp("secure")
    redis = RedisServer(dir=artifacts / "redis", password="redis-" + secrets.token_hex(12))
    db_name = f"chaos_sec_{uuid.uuid4().hex[:10]}"
    db_url = postgres_server.create_database(db_name)
    run = FleetRun(artifacts, db_url=db_url, broker_url=redis.url, checkpoint=chaos_checkpoint,
                   worker_env={"UMCD_LOG_LEVEL": "DEBUG"}, max_image_bytes=MAX_IMAGE)
    processes: list[subprocess.Popen] = []
    try:
        run.start(("w1",))
        env = {k: v for k, v in os.environ.items() if not k.startswith("UMCD_")}
        env.update({"UMCD_BROKER_URL": redis.url, "UMCD_RESULT_BACKEND": redis.url, "UMCD_DATABASE_URL": db_url,
                    "UMCD_ARTIFACTS": str(artifacts), "UMCD_LOG_LEVEL": "DEBUG", "PYTHONPATH": str(ROOT),
                    "UMCD_API_KEY": API_KEY, "UMCD_RATE_LIMIT_PER_MINUTE": str(RATE_PER_MINUTE),
                    "UMCD_MAX_IMAGE_BYTES": str(MAX_IMAGE)})
        gateway_port, flower_port = free_port(), free_port()
        logs = {"gateway.log": artifacts / "gateway.log", "flower.log": artifacts / "flower.log"}
        processes.append(_spawn([sys.executable, "-m", "umcd.cli", "gateway", "--host", "127.0.0.1",
                                 "--port", str(gateway_port)], env, logs["gateway.log"]))
        processes.append(_spawn([sys.executable, "-m", "celery", "-A", "workers.app", "flower",
                                 "--address=127.0.0.1", f"--port={flower_port}"],
                                {**env, "FLOWER_BASIC_AUTH": f"{FLOWER_USER}:{FLOWER_PASSWORD}"}, logs["flower.log"]))
        for port, proc in ((gateway_port, processes[0]), (flower_port, processes[1])):
            wait_for_port(port, timeout=60, process=proc)
        yield Fleet(run, redis, postgres_server.password, f"http://127.0.0.1:{gateway_port}",
                    f"http://127.0.0.1:{flower_port}", logs, processes)
    finally:
        for proc in processes:
            _stop(proc)
        run.close()
        redis.cleanup()
        postgres_server.drop_database(db_name)


def _upload(url: str, image: bytes, key: str | None = None) -> httpx.Response:
    headers = {"X-API-Key": key} if key is not None else {}
    return httpx.post(url + "/v1/query", files={"file": ("x.png", image, "image/png")}, headers=headers, timeout=30)


# --------------------------------------------------------------------------- the gateway, as a real process


def test_the_gateway_process_wants_its_key_caps_uploads_and_rate_limits_key_guessing(secure_fleet, query_pngs):
    url = secure_fleet.gateway_url
    accepted = _upload(url, query_pngs[0], API_KEY)
    assert accepted.status_code == 202, accepted.text
    rid = accepted.json()["request_id"]
    assert _upload(url, query_pngs[0]).status_code == 401
    too_big = _upload(url, b"\0" * (MAX_IMAGE + 1), API_KEY)
    assert too_big.status_code == 413
    # guessing keys: every wrong guess spends the address's tokens, then 429 instead of 401
    codes = [_upload(url, query_pngs[1], f"guess-{i}").status_code for i in range(RATE_PER_MINUTE + 3)]
    assert set(codes[:RATE_PER_MINUTE - 3]) == {401} and codes[-1] == 429, codes
    # the key's own bucket is separate: the real client is not locked out by a guesser on its address
    assert _upload(url, query_pngs[2], API_KEY).status_code == 202
    rows = wait_for_verdicts(secure_fleet.run.db_url, [rid], timeout=60)
    assert len(rows[rid]) == 1
    status = httpx.get(f"{url}/v1/requests/{rid}", headers={"X-API-Key": API_KEY}, timeout=10).json()
    assert status["status"] == "done" and status["result"]["verdict"] in ("benign", "adversarial")


# --------------------------------------------------------------------------- pickle is never accepted


class _Marker:
    """Unpickling this creates ``path``: proof that a payload ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickled_celery_message_is_refused_unexecuted_and_gets_no_verdict(secure_fleet, query_pngs, tmp_path):
    from kombu import Connection, Exchange

    fleet = secure_fleet.run
    marker = tmp_path / "pickle-ran"
    rid = uuid.uuid4().hex
    body = pickle.dumps(((), {"request_id": rid, "image": _Marker(marker), "client": "attacker"},
                         {"callbacks": None, "errbacks": None, "chain": None, "chord": None}))
    headers = {"lang": "py", "task": "umcd.detect", "id": rid, "root_id": rid, "parent_id": None, "argsrepr": "()",
               "kwargsrepr": "{}", "origin": "attacker", "retries": 0, "eta": None, "expires": None}
    with Connection(fleet.settings.broker_url) as conn:
        conn.Producer().publish(body, exchange=Exchange("detect", type="direct"), routing_key="detect",
                                content_type="application/x-python-serialize", content_encoding="binary",
                                headers=headers, serializer=None)
    probe = fleet.send("umcd.detect", query_pngs[3])  # sent after: answered once the pickle was dealt with
    assert probe in fleet.client.wait([probe], timeout=60)
    deadline = time.monotonic() + 10
    while "untrusted content" not in fleet.all_logs() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "untrusted content" in fleet.all_logs() or "ContentDisallowed" in fleet.all_logs(), fleet.logs()
    assert not marker.exists(), "the pickled payload was executed"
    assert verdict_rows(fleet.db_url, [rid])[rid] == []
    assert fleet.client.state(rid) == "PENDING"  # no result either
    assert fleet.workers["w1"].alive()


# --------------------------------------------------------------------------- Flower


def test_flower_refuses_unauthenticated_api_calls(secure_fleet):
    flower = secure_fleet.flower_url
    assert httpx.get(f"{flower}/api/workers", timeout=20).status_code == 401
    assert httpx.get(f"{flower}/api/workers", auth=(FLOWER_USER, "wrong"), timeout=20).status_code == 401
    assert httpx.get(f"{flower}/api/workers", auth=(FLOWER_USER, FLOWER_PASSWORD), timeout=20).status_code == 200


# --------------------------------------------------------------------------- checkpoints


def _evil_checkpoint(path: Path, marker: Path) -> str:
    """A pickle checkpoint whose loading with weights_only=False would create ``marker``; returns its sha256."""
    import torch

    from core.checkpoint import file_sha256

    torch.save({"tensors": {}, "meta": "{}", "payload": _Marker(marker)}, path)
    return file_sha256(path)


def test_a_published_pickle_checkpoint_is_refused_and_the_worker_keeps_its_model(secure_fleet, query_pngs, tmp_path):
    import torch

    from db import repo
    from db.session import session_scope

    fleet = secure_fleet.run
    good = fleet.published.model_version
    # the crafted file is real: a plain torch.load runs its payload
    proof, proof_marker = tmp_path / "proof.pt", tmp_path / "proof-ran"
    _evil_checkpoint(proof, proof_marker)
    torch.load(proof, weights_only=False)
    assert proof_marker.exists()

    markers = []
    evil_versions = []
    for suffix in (".pt", ".safetensors"):  # a pickle, and a pickle swapped in under a safetensors name
        marker = tmp_path / f"evil{suffix}-ran"
        path = fleet.artifacts / "models" / f"evil-{uuid.uuid4().hex[:6]}{suffix}"
        sha = _evil_checkpoint(path, marker)
        version = sha[:12]
        with session_scope(fleet.db_url) as s:
            cal = repo.active_calibration(s, good, "umcd")
            repo.publish_model_version(s, version, checkpoint_path=str(path), checkpoint_sha256=sha,
                                       backbone="smallcnn", bits=16, dataset="digits")
            repo.add_calibration(s, version, cal.detector, cal.transform, cal.target_fpr, cal.n_samples,
                                 cal.thresholds, path=cal.path, meta=cal.meta)
        markers.append(marker)
        evil_versions.append((version, path))
        deadline = time.monotonic() + 20
        while f"refused to load {path}" not in fleet.all_logs() and "SafetensorError" not in fleet.all_logs() \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        answer = fleet.client.wait([fleet.send("umcd.detect", query_pngs[4])], timeout=60)
        (result,) = answer.values()
        assert result.model_version == good, "the worker left its model for a refused checkpoint"
    try:
        logs = fleet.all_logs()
        assert f"refused to load {evil_versions[0][1]}" in logs, fleet.logs()
        assert "could not switch to the active model" in logs
        assert "SafetensorError" in logs  # the pickle under a .safetensors name is not even parsed
        assert not any(m.exists() for m in markers), "a crafted checkpoint's payload ran in the worker"
        assert fleet.workers["w1"].alive()
    finally:
        with session_scope(fleet.db_url) as s:
            repo.publish_model_version(s, good)


# --------------------------------------------------------------------------- secrets in logs (last: reads every log)


def test_no_password_or_key_appears_in_any_log_even_across_a_broker_restart(secure_fleet, query_pngs):
    fleet = secure_fleet
    fleet.redis.restart()  # connection errors and reconnections are where URLs get printed
    rid = fleet.run.send("umcd.detect", query_pngs[5])
    assert rid in fleet.run.client.wait([rid], timeout=90), fleet.run.logs()
    logs = fleet.all_logs()
    assert set(logs) >= {"gateway.log", "flower.log", "w1.1.log"}
    assert all(len(text) > 0 for text in logs.values())
    assert "127.0.0.1" in logs["w1.1.log"]  # the worker does log where its servers are, without their passwords
    leaks = {(what, name) for what, value in fleet.secrets.items() for name, text in logs.items() if value in text}
    assert not leaks, f"secrets found in logs: {sorted(leaks)}"
