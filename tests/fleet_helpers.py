"""Shared helpers for tests that run the real fleet: test model, Celery worker processes, audit-store queries."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
BITS = 16
EPOCHS = 3
#: settings every test worker runs with (small batches wait, fast replica sync and model polling)
WORKER_ENV = {
    "UMCD_BATCH_MAX_WAIT_MS": "20",
    "UMCD_REPLICA_SYNC_INTERVAL_MS": "100",
    "UMCD_MODEL_POLL_INTERVAL_S": "0.5",
    "UMCD_MAX_IMAGE_BYTES": str(256 * 1024),
    "UMCD_DEVICE": "cpu",
    "UMCD_LOG_LEVEL": "INFO",
    "OMP_NUM_THREADS": "1",  # two workers and the tests share two cores
}

_memo: dict[str, object] = {}
_memo_lock = threading.Lock()


# --------------------------------------------------------------------------- images and the test model


def png(pixels: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def digits_splits():
    """The digits splits (seed 0), loaded once per process."""
    with _memo_lock:
        if "digits" not in _memo:
            from core.datasets import load_dataset

            _memo["digits"] = load_dataset("digits", seed=0)
        return _memo["digits"]


def digits_query_pngs() -> list[bytes]:
    """PNG bytes of every image of the digits query split (in split order), built once per process."""
    splits = digits_splits()
    with _memo_lock:
        if "query_pngs" not in _memo:
            x = splits.query.get().mul(255).round().byte().permute(0, 2, 3, 1).numpy()
            _memo["query_pngs"] = [png(a) for a in x]
        return _memo["query_pngs"]


def trained_checkpoint(tmp_path_factory) -> Path:
    """A small CSQ model (16 bits, 3 epochs on digits), trained once per test session and shared.

    Seconds to train; accuracy is not the point. Several test modules ask for it: the first one
    trains it into a session temporary folder and later ones get the same file.
    """
    with _memo_lock:
        path = _memo.get("checkpoint")
        if path is not None and Path(path).is_file():
            return Path(path)
        from umcd.settings import Settings
        from workers.publish import train_checkpoint

        out = tmp_path_factory.mktemp("ckpt") / f"csq-digits-{BITS}.safetensors"
        train_checkpoint(settings=Settings(artifacts=out.parent, broker_url="redis://unused"), dataset="digits",
                         bits=BITS, epochs=EPOCHS, seed=0, device="cpu", out=out)
        _memo["checkpoint"] = out
        return out


# --------------------------------------------------------------------------- worker processes


@dataclass
class Worker:
    """One Celery detection worker process started by a test (its own process group)."""

    name: str
    metrics_port: int
    log: Path
    proc: subprocess.Popen

    @property
    def queue(self) -> str:
        """A queue only this worker reads (tests pin requests to a worker with it)."""
        return f"pin.{self.name}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def metrics(self, timeout: float = 5.0) -> dict[str, float]:
        """The worker's umcd_* and process_* samples (name{labels} -> value) from its Prometheus endpoint."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=timeout) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith(("umcd_", "process_")):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def worker_env(settings, metrics_port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a test worker: this process's (minus UMCD_*), WORKER_ENV, the settings' URLs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UMCD_")}
    env.update(WORKER_ENV)
    env.update({
        "UMCD_BROKER_URL": settings.broker_url,
        "UMCD_RESULT_BACKEND": settings.result_backend,
        "UMCD_DATABASE_URL": settings.database_url,
        "UMCD_ARTIFACTS": str(settings.artifacts),
        "UMCD_METRICS_PORT": str(metrics_port),
        "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    })
    env.update(extra or {})
    return env


def start_worker(name: str, settings, log_dir: Path, *, app: str = "workers.app", concurrency: int = 16,
                 prefetch_multiplier: int = 1, env: dict[str, str] | None = None, log_name: str | None = None,
                 metrics_port: int | None = None, loglevel: str = "INFO") -> Worker:
    """Start a detection worker ``name@<host>`` reading detect, screen and ``pin.<name>``; logs to ``log_dir``."""
    from umcd.commands.worker import worker_argv

    port = metrics_port or free_port()
    log = log_dir / (log_name or f"{name}.log")
    argv = worker_argv("detect", concurrency=concurrency, prefetch_multiplier=prefetch_multiplier,
                       name=f"{name}@%h", queues=f"detect,screen,pin.{name}", events=False, app=app,
                       loglevel=loglevel, extra=["--without-gossip", "--without-mingle"])
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, cwd=ROOT, env=worker_env(settings, port, env), stdin=subprocess.DEVNULL,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    return Worker(name, port, log, proc)


def stop_worker(worker: Worker) -> None:
    """SIGTERM the worker's process group (warm shutdown), SIGKILL it if it lingers."""
    if worker.proc.poll() is None:
        try:
            os.killpg(worker.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            worker.proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
    kill_worker(worker)


def kill_worker(worker: Worker) -> None:
    """SIGKILL the worker's process group (a crash: no shutdown, nothing acknowledged) and reap it."""
    try:
        os.killpg(worker.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        worker.proc.wait(10)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pass


def wait_ready(client, workers: dict[str, Worker], timeout: float = 120.0) -> None:
    """Block until every worker answers a Celery ping (raises if one exits or the time runs out)."""
    deadline = time.monotonic() + timeout
    waiting = set(workers)
    while waiting:
        for w in workers.values():
            if w.proc.poll() is not None:
                raise RuntimeError(f"worker {w.name} exited with {w.proc.returncode}:\n"
                                   + w.log.read_text(errors="replace")[-4000:])
        replies = client.app.control.ping(timeout=1.0) or []
        waiting -= {node.split("@", 1)[0] for reply in replies for node in reply}
        if waiting and time.monotonic() > deadline:
            raise TimeoutError(f"workers {sorted(waiting)} did not answer in {timeout:.0f} s")


# --------------------------------------------------------------------------- the audit store


def verdict_rows(db_url: str, request_ids) -> dict[str, list[dict]]:
    """request id -> its verdict rows (as dicts), for every id asked (an empty list when none)."""
    from sqlalchemy import select

    from db.models import Verdict
    from db.repo import row_dict
    from db.session import session_scope

    out: dict[str, list[dict]] = {rid: [] for rid in request_ids}
    ids = list(out)
    with session_scope(db_url) as s:
        for start in range(0, len(ids), 500):
            for row in s.scalars(select(Verdict).where(Verdict.request_id.in_(ids[start : start + 500]))):
                out[row.request_id].append(row_dict(row))
    return out


def total_verdicts(db_url: str) -> int:
    """Rows in ``verdicts``."""
    from sqlalchemy import func, select

    from db.models import Verdict
    from db.session import session_scope

    with session_scope(db_url) as s:
        return int(s.execute(select(func.count()).select_from(Verdict)).scalar())


# --------------------------------------------------------------------------- a whole fleet, for chaos and load tests


class FleetRun:
    """A published model, detection workers and an SDK client over one broker and one audit store.

    ``start()`` migrates the audit store, publishes ``checkpoint`` and starts the workers;
    ``close()`` stops every process this object started, even after a failure (use it in a
    ``finally`` or as a context manager). Workers run ``worker_app`` (``-A``) with ``worker_env``
    on top of :data:`WORKER_ENV`; each start of a worker gets its own log file
    (``<name>.<incarnation>.log`` under ``artifacts``).
    """

    def __init__(self, artifacts: Path, *, db_url: str, broker_url: str, checkpoint: Path,
                 worker_app: str = "workers.app", worker_env: dict[str, str] | None = None,
                 concurrency: int = 16, prefetch_multiplier: int = 1, **settings_overrides) -> None:
        from umcd.settings import Settings

        self.artifacts = Path(artifacts)
        self.db_url = db_url
        self.checkpoint = checkpoint
        self.worker_app = worker_app
        self.worker_env = dict(worker_env or {})
        self.concurrency = concurrency
        self.prefetch_multiplier = prefetch_multiplier
        values = {"artifacts": self.artifacts, "database_url": db_url, "broker_url": broker_url,
                  "result_backend": broker_url, "bits": BITS, "rate_limit_per_minute": 1_000_000,
                  "max_image_bytes": int(WORKER_ENV["UMCD_MAX_IMAGE_BYTES"]), **settings_overrides}
        self.settings = Settings(**values)
        self.workers: dict[str, Worker] = {}
        self.retired: list[Worker] = []  # earlier incarnations (killed or stopped)
        self.incarnations: dict[str, int] = {}
        self.client = None
        self.published = None

    # ---- lifecycle
    def start(self, names=("w1", "w2"), *, seed_fraction: float = 0.5) -> FleetRun:
        from db.migrate import upgrade
        from producers.sdk import Client
        from workers.publish import publish

        try:
            upgrade(self.db_url)
            self.published = publish(self.checkpoint, settings=self.settings, seed_fraction=seed_fraction)
            self.client = Client(self.settings)
            for name in names:
                self.start_worker(name)
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def start_worker(self, name: str) -> Worker:
        """Start (or start again) worker ``name``; its metrics port stays the same across restarts."""
        n = self.incarnations.get(name, 0) + 1
        self.incarnations[name] = n
        previous = self.workers.get(name)
        port = previous.metrics_port if previous is not None else None
        worker = start_worker(name, self.settings, self.artifacts, app=self.worker_app,
                              concurrency=self.concurrency, prefetch_multiplier=self.prefetch_multiplier,
                              env={**self.worker_env, "UMCD_MAX_IMAGE_BYTES": str(self.settings.max_image_bytes)},
                              log_name=f"{name}.{n}.log", metrics_port=port)
        if previous is not None:
            self.retired.append(previous)
        self.workers[name] = worker
        return worker

    def kill_worker(self, name: str) -> None:
        """SIGKILL worker ``name`` (it stays in ``workers`` until started again)."""
        kill_worker(self.workers[name])

    def wait_ready(self, names=None, timeout: float = 120.0) -> None:
        wait_ready(self.client, {n: self.workers[n] for n in (names or self.workers)}, timeout)

    def close(self) -> None:
        """Stop every worker (every incarnation), close the client, dispose the audit store's engine."""
        from db.session import dispose_engine

        for worker in [*self.workers.values(), *self.retired]:
            try:
                stop_worker(worker)
            except Exception:  # noqa: BLE001 - keep stopping the others
                pass
        if self.client is not None:
            try:
                self.client.close()
            except Exception:  # noqa: BLE001
                pass
        dispose_engine(self.db_url)

    def __enter__(self) -> FleetRun:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- requests
    def send(self, task: str, image: bytes, *, request_id: str | None = None, queue: str | None = None,
             client=None, **extra) -> str:
        """Send one request straight to the broker, skipping the SDK's checks (the worker judges every
        byte): inline up to the inline limit, else by a ``umcd:img:`` key in Redis. Returns its id."""
        import base64
        import uuid

        client = client or self.client
        rid = request_id or uuid.uuid4().hex
        if len(image) <= self.settings.inline_image_limit:
            ref = {"inline": base64.b64encode(image).decode()}
        else:
            key = f"umcd:img:{rid}"
            client.redis.set(key, image, ex=600)
            ref = {"redis_key": key}
        kwargs = {"request_id": rid, "image": ref, "submitted_at": time.time(), "client": "test", **extra}
        options = {"queue": queue} if queue else {}
        client.app.send_task(task, kwargs=kwargs, task_id=rid, **options)
        return rid

    def logs(self, n: int = 15, width: int = 300) -> str:
        """The last ``n`` lines (cut at ``width`` characters) of every worker log, for failure messages."""
        out = []
        for w in [*self.retired, *self.workers.values()]:
            lines = [line[:width] for line in w.log_text().splitlines()[-n:]]
            out.append(f"--- {w.log.name} (rc={w.proc.poll()}) ---\n" + "\n".join(lines))
        return "\n".join(out)

    def all_logs(self) -> str:
        """Every worker log of every incarnation, concatenated."""
        return "\n".join(w.log_text() for w in [*self.retired, *self.workers.values()])


def wait_for_verdicts(db_url: str, request_ids, timeout: float, *, settle: float = 0.0,
                      interval: float = 0.25) -> dict[str, list[dict]]:
    """Poll the audit store until every request has at least one verdict row (or ``timeout`` s pass),
    then wait ``settle`` s more so that late duplicates would show; returns :func:`verdict_rows`."""
    ids = list(dict.fromkeys(request_ids))
    deadline = time.monotonic() + timeout
    missing = set(ids)
    while missing and time.monotonic() < deadline:
        rows = verdict_rows(db_url, missing)
        missing = {rid for rid, r in rows.items() if not r}
        if missing:
            time.sleep(interval)
    if settle:
        time.sleep(settle)
    return verdict_rows(db_url, ids)


def verdict_audit(db_url: str, request_ids) -> dict:
    """Loss and duplication figures of ``request_ids`` in the audit store.

    ``sent``: ids asked; ``verdict_rows``: rows found for them; ``lost``: ids without a row;
    ``duplicated``: ids with more than one; ``store_duplicates``: what ``db.repo.duplicates``
    finds anywhere in the store (verdicts, db_images per request, index_log adds per image).
    """
    from db import repo
    from db.session import session_scope

    ids = list(dict.fromkeys(request_ids))
    rows = verdict_rows(db_url, ids)
    with session_scope(db_url) as s:
        dup = repo.duplicates(s)
    return {
        "sent": len(ids),
        "verdict_rows": sum(len(r) for r in rows.values()),
        "lost": sorted(rid for rid, r in rows.items() if not r),
        "duplicated": sorted(rid for rid, r in rows.items() if len(r) > 1),
        "store_duplicates": {k: len(v) for k, v in dup.items()},
        "verdicts": dict(sorted(_count(r[0]["verdict"] for r in rows.values() if r).items())),
    }


def _count(values) -> dict:
    from collections import Counter

    return dict(Counter(values))


def index_consistency(db_url: str, model_version: str, bits: int = BITS) -> dict:
    """Whether database images, ``index_log`` and a replica rebuilt from the log agree (no half-done insertion).

    Returns sets of image ids that break an invariant (all empty when consistent) and the sizes:
    ``active_without_add``: active images with no ``add`` row under ``model_version``;
    ``log_without_image``: log rows whose image row does not exist; ``log_not_active``: ids the log
    leaves in the index (adds minus removes) that are not active; ``replica_vs_active``: symmetric
    difference between a fresh replica's ids and the active images; ``code_mismatch``: replica
    entries whose code differs from ``image_codes``.
    """
    from sqlalchemy import select

    from db.models import DbImage, ImageCode, IndexLog
    from db.session import make_engine, session_scope
    from workers.replica import Replica

    with session_scope(db_url) as s:
        images = dict(s.execute(select(DbImage.id, DbImage.status)).all())
        log_rows = s.execute(select(IndexLog.op, IndexLog.image_id)
                             .where(IndexLog.model_version == model_version)).all()
        codes = {int(i): bytes(c) for i, c in s.execute(
            select(ImageCode.image_id, ImageCode.code).where(ImageCode.model_version == model_version)).all()}
    active = {int(i) for i, st in images.items() if st == "active"}
    adds = {int(i) for op, i in log_rows if op == "add"}
    removes = {int(i) for op, i in log_rows if op == "remove"}
    in_log = adds - removes
    replica = Replica.bootstrap(make_engine(db_url), model_version, bits, snapshot_dir=None)
    replica_ids = {int(i) for i in replica.index.ids()}
    mismatched = set()
    if replica_ids:
        ids = np.array(sorted(replica_ids), dtype=np.int64)
        for i, row in zip(ids, replica.index.reconstruct(ids)):
            if np.asarray(row, dtype=np.uint8).tobytes() != codes.get(int(i)):
                mismatched.add(int(i))
    return {
        "active_images": len(active),
        "active_ids": sorted(active),
        "log_adds": len(adds),
        "replica_size": len(replica_ids),
        "active_without_add": sorted(active - adds),
        "log_without_image": sorted((adds | removes) - set(images)),
        "log_not_active": sorted(in_log - active),
        "replica_vs_active": sorted(replica_ids ^ active),
        "code_mismatch": sorted(mismatched),
    }


class SteadyLoad(threading.Thread):
    """A producer thread: ``n`` requests through its own SDK client at ``rate`` per second.

    Every ``insert_every``-th request is an insertion (``umcd.screen``), the others queries;
    images cycle through ``images``. ``sent`` holds the request ids the SDK reported as sent
    (with their kind, send time and how long the send took, back-off included), ``refused``
    the ones it gave up on (``BrokerUnavailable``) — those were never acknowledged.
    """

    def __init__(self, settings, images: list[bytes], n: int, rate: float, *, insert_every: int = 5,
                 retry_policy: dict | None = None, client_name: str = "load") -> None:
        super().__init__(name="umcd-test-load", daemon=True)
        self.settings = settings
        self.images = images
        self.n = n
        self.rate = rate
        self.insert_every = insert_every
        self.retry_policy = retry_policy
        self.client_name = client_name
        self.sent: list[dict] = []
        self.refused: list[dict] = []
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    @property
    def ids(self) -> list[str]:
        return [r["request_id"] for r in self.sent]

    def progress(self) -> int:
        return len(self.sent) + len(self.refused)

    def run(self) -> None:
        from producers.sdk import BrokerUnavailable, Client

        try:
            with Client(self.settings, retry_policy=self.retry_policy) as client:
                self.started_at = time.monotonic()
                for i in range(self.n):
                    if self.stopping.is_set():
                        break
                    delay = self.started_at + i / self.rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    image = self.images[i % len(self.images)]
                    insert = self.insert_every > 0 and i % self.insert_every == 0
                    t0 = time.monotonic()
                    try:
                        if insert:
                            rid = client.submit_insert(image, source="chaos", client=self.client_name)
                        else:
                            rid = client.submit_query(image, client=self.client_name)
                    except BrokerUnavailable as exc:
                        self.refused.append({"index": i, "error": str(exc), "at": t0})
                        continue
                    self.sent.append({"request_id": rid, "kind": "insert" if insert else "query", "at": t0,
                                      "send_s": time.monotonic() - t0})
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.finished_at = time.monotonic()


@contextmanager
def untrained_runtime(tmp_path: Path, monkeypatch, **overrides) -> Iterator:
    """A started DetectionRuntime over an untrained 16-bit model published to SQLite in ``tmp_path`` (no
    servers; its Redis URL is never used), with ``overrides`` of its Settings."""
    import sys

    from core.checkpoint import save_untrained_checkpoint
    from db.migrate import upgrade
    from db.session import dispose_engine
    from umcd.settings import Settings
    from workers import runtime as runtime_module
    from workers.publish import publish

    checkpoint = save_untrained_checkpoint(tmp_path / "untrained.safetensors", 16)
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    upgrade(url)
    options = {"batch_max_size": 1, "batch_max_wait_ms": 0, **overrides}
    settings = Settings(artifacts=tmp_path, database_url=url, broker_url="redis://unused", bits=16, device="cpu",
                        **options)
    publish(checkpoint, settings=settings, seed_fraction=0.5)
    monkeypatch.setattr(runtime_module.metrics, "serve", lambda port: None)
    switch = sys.getswitchinterval()
    runtime = runtime_module.DetectionRuntime(settings).start()
    try:
        yield runtime
    finally:
        runtime.stop()
        sys.setswitchinterval(switch)
        dispose_engine(url)
