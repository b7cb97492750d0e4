"""The local fleet with its real modules: Flower's REST API and the workers' Prometheus endpoints see the work."""

from __future__ import annotations

import base64
import io
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from umcd.fleet import Fleet, postgres_bin_dir, read_env_file, worker_cpu_lists

ROOT = Path(__file__).resolve().parents[2]
BITS = 16
N_SDK, N_BATCH, N_GATEWAY, N_PINNED = 12, 8, 2, 3

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(300),
    pytest.mark.skipif(shutil.which("redis-server") is None and not os.access("/usr/bin/redis-server", os.X_OK),
                       reason="redis-server is not installed: run `make services`"),
    pytest.mark.skipif(postgres_bin_dir() is None, reason="PostgreSQL is not installed: run `make services`"),
]


def _pngs(n: int) -> list[bytes]:
    """``n`` digits query images as PNG bytes."""
    from PIL import Image

    from core.datasets import load_dataset

    pixels = load_dataset("digits", seed=0).query.get()[:n].mul(255).round().byte().permute(0, 2, 3, 1).numpy()
    out = []
    for a in pixels:
        buf = io.BytesIO()
        Image.fromarray(a, mode="RGB").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _metrics(url: str) -> dict[str, float]:
    """A worker's ``umcd_*`` samples (``name{labels}`` -> value)."""
    import httpx

    text = httpx.get(url, timeout=5).text
    out = {}
    for line in text.splitlines():
        if line.startswith("umcd_"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


@pytest.fixture(scope="module")
def fleet():
    """``umcd.fleet.Fleet``: redis-server, PostgreSQL, migrations, 2 detection workers, the gateway and Flower."""
    base = Path(tempfile.mkdtemp(prefix="umcd-flower-test-"))
    base.chmod(0o755)  # PostgreSQL runs as the `postgres` OS user and must reach its data folder
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("UMCD_") and k not in ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_PASSWORD")}
    env.update({"UMCD_DEVICE": "cpu", "OMP_NUM_THREADS": "1", "UMCD_MODEL_POLL_INTERVAL_S": "0.5",
                "UMCD_LOG_LEVEL": "INFO", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))})
    fleet = Fleet(base / "artifacts", workers=2, cpu_worker=False, env=env, workdir=ROOT, ready_timeout_s=180.0,
                  stop_grace_s=10.0)
    state = None
    try:
        state = fleet.up()
        yield fleet, state
    finally:
        fleet.down()
        recorded = state.services if state is not None else []
        try:
            assert [s.name for s in recorded if psutil.pid_exists(s.pid)
                    and psutil.Process(s.pid).status() != psutil.STATUS_ZOMBIE] == []
            assert [p.pid for p in psutil.process_iter() if fleet.started_by(p.pid)] == []
        finally:
            shutil.rmtree(base, ignore_errors=True)


def test_each_detection_worker_runs_every_thread_on_its_own_share_of_the_cpus(fleet):
    from umcd.settings import parse_cpu_list

    fleet, state = fleet
    shares = worker_cpu_lists(2)  # ["0", "1"] on two CPUs; [None, None] on one (nothing pinned)
    assert fleet.worker_cpus == shares
    for i, share in enumerate(shares):
        service = state.service(f"detect{i}")
        proc = psutil.Process(service.pid)
        want = parse_cpu_list(share) if share else os.sched_getaffinity(0)
        threads = {t.id: os.sched_getaffinity(t.id) for t in proc.threads()}
        assert len(threads) > 5  # Celery's and the runtime's threads, not the main thread alone
        assert set(map(frozenset, threads.values())) == {frozenset(want)}, (share, threads)
        assert (f"pinned to CPUs {share}" in Path(service.log).read_text(errors="replace")) == bool(share)
    if len(os.sched_getaffinity(0)) >= 2:
        assert shares[0] != shares[1]


def test_flower_and_prometheus_see_both_workers_and_the_work_they_did(fleet):
    import httpx

    from core.checkpoint import save_untrained_checkpoint
    from producers.sdk import Client
    from umcd.settings import Settings
    from workers.publish import publish

    fleet, state = fleet
    secrets_ = read_env_file(fleet.env_path)
    urls = fleet.client_env()
    settings = Settings(artifacts=Path(urls["UMCD_ARTIFACTS"]), broker_url=urls["UMCD_BROKER_URL"],
                        result_backend=urls["UMCD_RESULT_BACKEND"], database_url=urls["UMCD_DATABASE_URL"], bits=BITS)
    published = publish(save_untrained_checkpoint(fleet.root / "untrained.safetensors", BITS), settings=settings,
                        seed_fraction=0.3)
    workers = {name: state.service(name) for name in ("detect0", "detect1")}
    deadline = time.monotonic() + 60  # both workers load the published model before any work is sent
    while not all(f'umcd_model_info{{version="{published.model_version}"}}' in _metrics(w.url)
                  for w in workers.values()):
        assert time.monotonic() < deadline, "the workers did not load the published model"
        time.sleep(0.2)

    # `umcd fleet status` says which model each detection worker serves, and the store's active one
    assert {r.name: r.model for r in fleet.status() if r.kind == "worker"} == {
        "detect0": published.model_version, "detect1": published.model_version}
    from typer.testing import CliRunner

    from umcd.cli import app

    shown = CliRunner().invoke(app, ["fleet", "status", "--artifacts", str(fleet.artifacts)], env={"COLUMNS": "250"})
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.output.split())
    assert f"active model: {published.model_version}, calibration {published.calibration_id} of detector umcd" in text
    assert "not serving it yet" not in text

    images = _pngs(N_SDK + N_BATCH + N_GATEWAY + 2 * N_PINNED)
    with Client(settings) as client:
        nodes = sorted(node for reply in client.app.control.ping(timeout=2.0) for node in reply)
        assert [n.split("@")[0] for n in nodes] == ["detect0", "detect1"]
        ids = client.submit_queries(images[:N_SDK], client="flower-test")
        batch_ids = client.submit_queries(images[N_SDK : N_SDK + N_BATCH], batch=True)
        gateway = state.service("gateway").url
        for image in images[N_SDK + N_BATCH : N_SDK + N_BATCH + N_GATEWAY]:
            r = httpx.post(f"{gateway}/v1/query", files={"file": ("digit.png", image, "image/png")},
                           headers={"X-API-Key": secrets_["UMCD_API_KEY"]}, timeout=10)
            assert r.status_code == 202, r.text
            ids.append(r.json()["request_id"])
        pinned: dict[str, list[str]] = {}  # a few requests on each worker's own queue: both do work
        rest = images[N_SDK + N_BATCH + N_GATEWAY :]
        for k, node in enumerate(nodes):
            queue = f"pin.{node.split('@')[0]}"
            client.app.control.add_consumer(queue, destination=[node], reply=True, timeout=5.0)
            pinned[node] = []
            for image in rest[k * N_PINNED : (k + 1) * N_PINNED]:
                rid = uuid.uuid4().hex
                client.app.send_task("umcd.detect", task_id=rid, queue=queue, kwargs={
                    "request_id": rid, "image": {"inline": base64.b64encode(image).decode()},
                    "submitted_at": time.time()})
                pinned[node].append(rid)
        single_ids = ids + [rid for rids in pinned.values() for rid in rids]
        results = client.wait(single_ids + batch_ids, timeout=120)
    assert set(results) == set(single_ids + batch_ids)
    assert {r.verdict for r in results.values()} <= {"benign", "adversarial"}
    for node, rids in pinned.items():
        assert {results[rid].worker for rid in rids} == {node}

    flower = state.service("flower").url
    auth = (secrets_["FLOWER_USER"], secrets_["FLOWER_PASSWORD"])
    for path in ("/api/workers", "/api/tasks"):
        assert httpx.get(flower + path, timeout=10).status_code == 401
        assert httpx.get(flower + path, auth=(auth[0], "not-the-password"), timeout=10).status_code == 401

    listed = httpx.get(f"{flower}/api/workers?refresh=1", auth=auth, timeout=30)
    assert listed.status_code == 200, listed.text
    assert set(nodes) <= set(listed.json())
    for node in nodes:
        queues = {q["name"] for q in listed.json()[node]["active_queues"]}
        assert {"detect", "screen"} <= queues

    deadline = time.monotonic() + 60  # Flower learns about tasks from the workers' events
    while True:
        tasks = httpx.get(f"{flower}/api/tasks", auth=auth, timeout=10).json()
        done = {tid for tid, t in tasks.items() if t.get("state") == "SUCCESS"}
        if set(single_ids) <= done or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert set(single_ids) <= done, sorted(set(single_ids) - done)
    for rid in single_ids:
        assert tasks[rid]["name"] == "umcd.detect" and tasks[rid]["worker"] in nodes
    assert {t["worker"] for tid, t in tasks.items() if tid in single_ids} == set(nodes)
    assert any(t.get("name") == "umcd.detect_batch" and t.get("state") == "SUCCESS" for t in tasks.values())

    for name, worker in workers.items():
        counts = {k: v for k, v in _metrics(worker.url).items() if k.startswith("umcd_requests_total{")}
        assert sum(counts.values()) > 0, (name, counts)
        assert all('queue="detect"' in k for k in counts), counts
    served = sum(sum(v for k, v in _metrics(w.url).items() if k.startswith("umcd_requests_total{"))
                 for w in workers.values())
    assert served == len(single_ids) + len(batch_ids)  # one count per request, batch items included
