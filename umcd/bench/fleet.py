"""Fleet throughput and latency (producer -> Redis -> workers -> audit store) against in-process scoring."""

from __future__ import annotations

import gc
import itertools
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from umcd.bench.common import machine_info, real_codes, tile_codes, trained_model, write_json

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
#: the issue's targets on this machine class (reported, never asserted)
TARGET_BATCH_RATIO = 0.7
TARGET_P99_MS = 50.0


@dataclass(frozen=True)
class FleetBenchPlan:
    """Sizes of one run. Rates are images per second; durations seconds."""

    db_codes: int
    workers: int
    warmup: int
    open_rate: float
    open_seconds: float
    open_batch: int  # images per message in the open-loop batch phase (same image rate)
    saturation_single: int
    saturation_batch: int
    batch_size: int  # the workers' model batch (and the in-process baseline's batch)
    message_size: int  # images per message in the saturation batch phases (the SDK's default batch_size)
    in_process_seconds: float
    timeout_s: float
    bracket_seconds: float  # the in-process runs (per thread count) right before and after each saturation phase


FULL = FleetBenchPlan(db_codes=100_000, workers=2, warmup=256, open_rate=50.0, open_seconds=20.0, open_batch=5,
                      saturation_single=3_000, saturation_batch=10_000, batch_size=64, message_size=256,
                      in_process_seconds=3.0,
                      timeout_s=300.0, bracket_seconds=1.5)
QUICK = FleetBenchPlan(db_codes=2_000, workers=2, warmup=16, open_rate=20.0, open_seconds=1.0, open_batch=4,
                       saturation_single=40, saturation_batch=96, batch_size=16, message_size=32, in_process_seconds=0.3,
                       timeout_s=120.0, bracket_seconds=0.2)


# --------------------------------------------------------------------------- the model and its images


def _checkpoint(artifacts: Path, work: Path, quick: bool) -> tuple[Path, str]:
    """(checkpoint path, how it was obtained): the trained 64-bit digits model; quick runs take an
    untrained 16-bit one when no trained checkpoint exists yet."""
    from core.checkpoint import save_untrained_checkpoint
    from core.pipeline import checkpoint_path

    trained = checkpoint_path(artifacts, "digits", 64, "smallcnn")
    if quick and not trained.is_file():
        return save_untrained_checkpoint(work / "untrained-16.safetensors"), "untrained smallcnn, 16 bits (quick)"
    ck = trained_model(artifacts)  # trains and saves it when missing
    return Path(ck.path), f"trained smallcnn, {ck.meta.bits} bits, digits"


@lru_cache(maxsize=1)
def _digits() -> tuple[tuple[bytes, ...], np.ndarray]:
    """The digits query split as PNG bytes and as (n, 3, 32, 32) float32 in [0, 1] (the same pixels)."""
    import io

    from PIL import Image

    from core.datasets import load_dataset

    pixels = load_dataset("digits", seed=0).query.get().mul(255).round().byte().permute(0, 2, 3, 1).numpy()
    pngs = []
    for a in pixels:
        buf = io.BytesIO()
        Image.fromarray(a, mode="RGB").save(buf, format="PNG")
        pngs.append(buf.getvalue())
    return tuple(pngs), pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255.0


def _query_pixels(n: int) -> np.ndarray:
    """``n`` digits query images as one (n, 32, 32, 3) uint8 array (the pixels of :func:`_query_pngs`)."""
    pixels = np.ascontiguousarray(np.round(_digits()[1] * 255.0).astype(np.uint8).transpose(0, 2, 3, 1))
    return pixels[np.arange(n) % len(pixels)]  # C-contiguous, as a stacked batch of frames is


def _query_pngs(n: int) -> list[bytes]:
    """``n`` digits query images as PNG bytes (the split cycled)."""
    pngs = _digits()[0]
    return [pngs[i % len(pngs)] for i in range(n)]


def _percentiles(values_ms: list[float]) -> dict[str, float | None]:
    if not values_ms:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    a = np.asarray(values_ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}


# --------------------------------------------------------------------------- in-process baseline


def _score_times(detector, x, seconds: float, threads: int, warmup: int = 3, min_calls: int = 5) -> list[float]:
    """Seconds of each ``detector.score_batch(x)`` call on ``threads`` torch threads, for about ``seconds``
    after ``warmup`` calls (at least ``min_calls`` calls); the thread count is put back after."""
    import torch

    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            detector.score_batch(x)
        times: list[float] = []
        start = time.perf_counter()
        while time.perf_counter() - start < seconds or len(times) < min_calls:
            t0 = time.perf_counter()
            detector.score_batch(x)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(default)
    return times


def _in_process_rows(detector, images: np.ndarray, batch_sizes: tuple[int, ...], seconds: float,
                     threads: tuple[int, ...]) -> list[dict]:
    """``Detector.score_batch`` on tensors in this process at each batch size, with each torch thread
    count in ``threads``; a row keeps the fastest count (the strongest baseline) and the others' rates."""
    import torch

    rows = []
    for bs in batch_sizes:
        x = torch.from_numpy(np.resize(images, (bs, *images.shape[1:])).copy())
        runs = {n: _score_times(detector, x, seconds, n) for n in threads}
        rates = {n: bs * len(t) / sum(t) for n, t in runs.items()}
        best = max(rates, key=rates.get)
        rows.append({"batch_size": bs, "threads": best, "images": bs * len(runs[best]),
                     "images_per_s": rates[best], "images_per_s_by_threads": rates,
                     "latencies_ms": [1e3 * t for t in runs[best]]})
    return rows


def _in_process_rate(detector, x, seconds: float, threads: int) -> float:
    """Images per second of ``detector.score_batch(x)`` over about ``seconds`` (after two warm-up calls)."""
    times = _score_times(detector, x, seconds, threads, warmup=2, min_calls=3)
    return len(x) * len(times) / sum(times)


@contextmanager
def _workers_paused(fleet, used: dict[str, float] | None = None) -> Iterator[None]:
    """The fleet's detection workers stopped (SIGSTOP) inside the block, continued after it.

    ``used``, when given, receives the CPU seconds each kind of the fleet's processes (``worker``,
    ``redis``, ...) used inside the block: from the moment every worker is seen stopped to the end of it.
    """
    import psutil

    services = []
    for record in fleet.read_state().services:
        try:
            services.append((record.kind, psutil.Process(record.pid)))
        except psutil.Error:
            continue
    paused = []
    try:
        for kind, proc in services:
            if kind == "worker":
                proc.suspend()
                paused.append(proc)
        deadline = time.monotonic() + 1.0  # SIGSTOP lands asynchronously
        for proc in paused:
            while time.monotonic() < deadline:
                try:
                    if proc.status() == psutil.STATUS_STOPPED:
                        break
                except psutil.Error:
                    break
                time.sleep(0.001)
        start = _cpu_by_kind(services)
        yield
        if used is not None:
            end = _cpu_by_kind(services)
            used.update({k: round(v - start.get(k, 0.0), 3) for k, v in end.items()})
    finally:
        for proc in paused:
            try:
                proc.resume()
            except psutil.Error:
                log.warning("could not continue worker %d", proc.pid)


def _bracket(before: dict[int, float], after: dict[int, float], paused_cpu: dict[str, float]) -> dict:
    """The in-process rate measured just before and just after a saturation phase (the workers stopped), each
    at the faster of the torch thread counts tried (one count's run can land in a slow spell of the machine)."""
    # how much faster the most torch threads scored than one: the in-process side of the ratio, and on this
    # shared machine the term that moves it most (1.2x to 2.0x between runs)
    scaling = [rates[max(rates)] / rates[1] for rates in (before, after) if 1 in rates and max(rates) > 1]
    return {"before": max(before.values()), "after": max(after.values()),
            "images_per_s": statistics.fmean([max(before.values()), max(after.values())]),
            "images_per_s_by_threads": {"before": before, "after": after},
            "thread_scaling": statistics.fmean(scaling) if scaling else None,
            # one torch thread's CPU per image in process, to hold against the workers' score stage (one thread each)
            "one_thread_ms_per_image": (1e3 / statistics.fmean([before[1], after[1]])
                                        if 1 in before and 1 in after else None),
            # the CPU the fleet used while "before" ran (the workers' is 0: SIGSTOP held them)
            "fleet_cpu_seconds_during_before": {k: paused_cpu.get(k, 0.0) for k in ("worker", "redis")}}


# --------------------------------------------------------------------------- result arrivals


class ResultListener:
    """Records when each Result reaches the result backend, as the producer sees it.

    Celery's Redis backend PUBLISHes every stored state on the channel named after its key
    (``celery-task-meta-<id>``); this thread subscribes to the pattern and stamps each ready
    state (SUCCESS, FAILURE) with ``time.perf_counter()`` on arrival (when the socket read that brought it
    returns). STARTED and RETRY are ignored.
    """

    READY = frozenset({"SUCCESS", "FAILURE"})
    #: how Celery's JSON (`"status": "SUCCESS"`) and workers.batchtasks' orjson (`"status":"SUCCESS"`) spell
    #: a ready status: found without parsing the whole Result (this thread shares the cores it measures;
    #: json.loads was ~40% of its ~41 us per Result)
    _STATUS_BYTES = (b'"status": "', b'"status":"')
    _READY_BYTES = tuple(key + s.encode() + b'"' for key, s in itertools.product(_STATUS_BYTES, sorted(READY)))

    @classmethod
    def _ready(cls, data: bytes) -> bool:
        """Whether a published state is ready; an unusual spelling falls back to parsing it."""
        if any(marker in data for marker in cls._READY_BYTES):
            return True
        if any(key in data for key in cls._STATUS_BYTES):  # spelled as expected, and not ready (STARTED, RETRY)
            return False
        try:
            return json.loads(data).get("status") in cls.READY
        except (ValueError, TypeError, AttributeError):
            return False

    def __init__(self, backend_url: str) -> None:
        from umcd.celeryconf import redis_from_url

        self.redis = redis_from_url(backend_url)
        self.arrived: dict[str, float] = {}
        self.reconnects = 0  # the connection was lost and made again (what was published meanwhile is missed)
        self._awaited: set[str] = set()  # ids a wait_for still misses; it is woken when this empties
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._connect()  # subscribed before anything is sent
        self._thread = threading.Thread(target=self._run, name="umcd-bench-results", daemon=True)
        self._thread.start()

    def _connect(self) -> None:
        """A connection of its own, subscribed (its PSUBSCRIBE confirmed) when this returns. Its replies are
        read raw: redis-py's PubSub.get_message cost this thread ~11-18 us of CPU a Result (on the cores it
        measures), hiredis's Reader on the socket's bytes a fraction of it."""
        import hiredis

        conn = self.redis.connection_pool.make_connection()
        try:
            conn.connect()  # the handshake (AUTH, SELECT) as any client of this URL
            conn.send_command("PSUBSCRIBE", "celery-task-meta-*")
            self._conn, self._reader, self._sock = conn, hiredis.Reader(), conn._sock
            self._sock.settimeout(0.1)
            deadline = time.monotonic() + 10.0
            while (reply := self._reader.gets()) is False:
                if time.monotonic() > deadline:
                    raise TimeoutError("no reply from the result backend")
                self._feed()
            if not (isinstance(reply, list) and reply[:1] == [b"psubscribe"]):
                raise RuntimeError(f"the result listener could not subscribe: {reply!r}")
        except BaseException:
            conn.disconnect()
            raise

    def _feed(self) -> bool:
        """Read what the socket holds into the reader (False when nothing came within 0.1 s); a closed or
        broken connection raises ConnectionError."""
        try:
            data = self._sock.recv(1 << 20)
        except TimeoutError:
            return False
        except OSError as exc:
            raise ConnectionError(f"the listener's connection failed: {exc}") from exc
        if not data:
            raise ConnectionError("the result backend closed the listener's connection")
        self._reader.feed(data)
        return True

    def _reconnect(self, exc: Exception) -> None:
        """Connect and subscribe again, with back-off, until it works or the listener is closed."""
        log.warning("the result listener lost its connection (%s); subscribing again (Results published "
                    "meanwhile are missed)", exc)
        self._conn.disconnect()
        delay = 0.05
        while not self._stop.is_set():
            try:
                self._connect()
                self.reconnects += 1
                return
            except Exception as again:  # noqa: BLE001 - the backend is still away
                log.debug("the result listener could not reconnect yet: %s", again)
                self._stop.wait(delay)
                delay = min(2.0, delay * 2)

    def _run(self) -> None:
        prefix = len(b"celery-task-meta-")
        ready = self._ready
        while not self._stop.is_set():
            try:
                if not self._feed():
                    continue
            except ConnectionError as exc:
                if not self._stop.is_set():
                    self._reconnect(exc)
                continue
            now = time.perf_counter()
            arrived = []
            while (reply := self._reader.gets()) is not False:  # also any that came with the confirmation
                if isinstance(reply, list) and len(reply) == 4 and reply[0] == b"pmessage" and ready(reply[3]):
                    arrived.append(reply[2][prefix:].decode())
            if not arrived:
                continue
            with self._cond:
                for rid in arrived:
                    self.arrived.setdefault(rid, now)
                    if rid in self._awaited:
                        self._awaited.discard(rid)
                        if not self._awaited:
                            self._cond.notify_all()

    def wait_for(self, ids: list[str], timeout: float) -> int:
        """Block until every id arrived or ``timeout`` s passed; returns how many are still missing.
        One waiter at a time (the benchmark's phases run one after another).

        The listener wakes the waiter once, when the last awaited id arrives (not on every arrival:
        rescanning 10,000 ids per Result cost the producer's process seconds of CPU, taken from the
        workers on the same cores)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._awaited = {rid for rid in ids if rid not in self.arrived}
            while self._awaited:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
            missing = len(self._awaited)
            self._awaited = set()
            return missing

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._conn.disconnect()
        self.redis.close()


# --------------------------------------------------------------------------- where the CPU went


def _cpu_by_kind(procs: list[tuple[str, object]]) -> dict[str, float]:
    """CPU seconds (user + system) used so far, summed by kind over ``(kind, psutil.Process)`` pairs."""
    out: dict[str, float] = {}
    for kind, proc in procs:
        try:
            t = proc.cpu_times()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - a process gone mid-phase counts as what it had used
            continue
        out[kind] = out.get(kind, 0.0) + t.user + t.system
    return out


class CpuMeter:
    """CPU seconds (user + system) of the fleet's processes and of this (producer) process over a phase.

    kinds: the fleet's services grouped by kind (``worker``, ``redis``, ...) plus ``producer`` (this
    process: the SDK sending, the result listener). On a machine where all of them share the cores,
    this says whether the fleet was CPU-bound and what else the cores were doing.
    """

    def __init__(self, fleet) -> None:
        import psutil

        self.procs: list[tuple[str, object]] = [("producer", psutil.Process())]
        state = fleet.read_state() if fleet is not None else None
        #: the workers' /metrics endpoints (their CPU by stage: workers.metrics.STAGE_CPU)
        self.metrics_urls = [r.url for r in (state.services if state else []) if r.kind == "worker" and r.url]
        for record in (state.services if state else []):
            try:
                self.procs.append((record.kind, psutil.Process(record.pid)))
            except psutil.Error:
                continue
        self._start = self._sample()
        self._stages_start = self.stage_cpu()
        self._rss_start = self.worker_rss()

    def stage_cpu(self) -> dict[str, float]:
        """The workers' thread CPU seconds by stage (``umcd_worker_cpu_seconds_total``), summed over workers;
        a worker whose endpoint does not answer is left out."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        out: dict[str, float] = {}
        for url in self.metrics_urls:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    text = response.read().decode()
            except OSError:
                continue
            for family in text_string_to_metric_families(text):
                if family.name != "umcd_worker_cpu_seconds":
                    continue
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        stage = sample.labels["stage"]
                        out[stage] = out.get(stage, 0.0) + sample.value
        return out

    def worker_rss(self) -> dict[str, int]:
        """Resident bytes of each worker process (by pid)."""
        out = {}
        for kind, proc in self.procs:
            if kind == "worker":
                try:
                    out[str(proc.pid)] = int(proc.memory_info().rss)  # type: ignore[attr-defined]
                except Exception:  # noqa: BLE001
                    continue
        return out

    def _sample(self) -> dict[str, float]:
        return _cpu_by_kind(self.procs)

    def stop(self, seconds: float) -> dict:
        end = self._sample()
        used = {k: round(end.get(k, 0.0) - self._start.get(k, 0.0), 3) for k in end}
        total = sum(used.values())
        stages_end = self.stage_cpu()
        stages = {k: round(v - self._stages_start.get(k, 0.0), 4) for k, v in stages_end.items()}
        if stages and "worker" in used:  # Celery's own work, message decoding, polling threads
            stages["other"] = round(used["worker"] - sum(stages.values()), 4)
        rss = self.worker_rss()
        return {"cpu_seconds": used, "cpu_seconds_total": round(total, 3), "worker_stage_cpu_seconds": stages,
                "cores_busy": round(total / max(seconds, 1e-9), 3), "cores": os.cpu_count(),
                "worker_rss_mib_start": {k: round(v / 2**20, 1) for k, v in self._rss_start.items()},
                "worker_rss_mib_end": {k: round(v / 2**20, 1) for k, v in rss.items()}}


# --------------------------------------------------------------------------- phases


@dataclass
class Phase:
    """One measured phase: what was sent when (perf_counter seconds), by request id."""

    mode: str
    load: str
    submission: str
    offered_per_s: float | None
    sent: dict[str, float]
    messages: int
    sender_lag_ms: float = 0.0
    send_seconds: float = 0.0  # from the first submit to the last send's return


def _send_single(client, ids: list[str], images: list[bytes], rate: float | None) -> tuple[dict[str, float], float]:
    """One ``umcd.detect`` message per image; at ``rate`` images/s (open loop: one ``submit_query``
    call each) or as fast as one producer sends (``submit_queries`` over one connection).

    Returns (request id -> perf_counter just before its submit began, the sender's worst lag behind
    the schedule in ms).
    """
    sent: dict[str, float] = {}
    lag = 0.0
    if not rate:  # image i's submit starts when image i-1's send returned
        marks = [time.perf_counter()]
        client.submit_queries(images, request_ids=ids, client="bench",
                              on_sent=lambda i, rid: marks.append(time.perf_counter()))
        return dict(zip(ids, marks)), 0.0
    t0 = time.perf_counter()
    for i, (rid, image) in enumerate(zip(ids, images)):
        target = t0 + i / rate
        delay = target - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        lag = max(lag, time.perf_counter() - target)
        sent[rid] = time.perf_counter()
        client.submit_query(image, request_id=rid, client="bench")
    return sent, lag * 1e3


def _send_batches(client, ids: list[str], images: list[bytes], per_message: int,
                  rate: float | None) -> tuple[dict[str, float], int, float]:
    """``umcd.detect_batch`` messages of ``per_message`` images; at ``rate`` images/s or as fast as possible."""
    sent: dict[str, float] = {}
    lag = 0.0
    messages = 0
    t0 = time.perf_counter()
    for start in range(0, len(ids), per_message):
        chunk_ids, chunk = ids[start : start + per_message], images[start : start + per_message]
        if rate:
            target = t0 + start / rate
            delay = target - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            lag = max(lag, time.perf_counter() - target)
        now = time.perf_counter()
        for rid in chunk_ids:
            sent[rid] = now
        client.submit_queries(chunk, request_ids=chunk_ids, client="bench", batch=True, batch_size=per_message)
        messages += 1
    return sent, messages, lag * 1e3


def _consumers(client, action: str, workers: int, queue: str = "detect") -> None:
    """Stop (``cancel``) or resume (``add``) every worker's consumption of ``queue`` (Celery remote
    control); returns as soon as all ``workers`` replied (a broadcast otherwise collects replies for its
    whole timeout), and raises if fewer did within 5 s."""
    control = client.app.control
    call = control.cancel_consumer if action == "cancel" else control.add_consumer
    replies = call(queue, reply=True, timeout=5.0, limit=workers)
    if len(replies or []) < workers:
        raise RuntimeError(f"{len(replies or [])} of {workers} workers answered {action}_consumer({queue!r})")


def _verdict_stats(db_url: str, prefix: str) -> dict:
    """Verdict rows whose request id starts with ``prefix``: count, verdicts, mean model batch size."""
    from sqlalchemy import func, select

    from db.models import Verdict
    from db.session import session_scope

    with session_scope(db_url) as s:
        rows = s.execute(
            select(Verdict.verdict, func.count(), func.avg(Verdict.batch_size))
            .where(Verdict.request_id.like(f"{prefix}%")).group_by(Verdict.verdict)
        ).all()
    n = sum(int(c) for _, c, _ in rows)
    mean_batch = sum(float(b or 0) * int(c) for _, c, b in rows) / n if n else None
    return {"verdict_rows": n, "verdicts": {v: int(c) for v, c, _ in rows}, "mean_model_batch": mean_batch}


def _phase_row(phase: Phase, listener: ResultListener, client, db_url: str, prefix: str, timeout: float,
               meter: CpuMeter | None = None, started: float = 0.0) -> dict:
    ids = list(phase.sent)
    missing = listener.wait_for(ids, timeout)
    cpu = meter.stop(time.perf_counter() - started) if meter is not None else None  # not the read-back below
    arrived = {rid: listener.arrived[rid] for rid in ids if rid in listener.arrived}
    results = client.wait(ids, timeout=5.0 if missing else 1.0)  # every Result, read back as a client would
    lat = [1e3 * (arrived[rid] - phase.sent[rid]) for rid in ids if rid in arrived]
    first = min(phase.sent.values())
    last = max(arrived.values()) if arrived else first
    span = max(last - first, 1e-9)
    errors = sum(r.verdict == "error" for r in results.values())
    row = {
        "mode": phase.mode, "load": phase.load, "submission": phase.submission,
        "offered_per_s": phase.offered_per_s, "images": len(ids), "messages": phase.messages,
        "images_per_s": len(arrived) / span, **_percentiles(lat), "mean_ms": statistics.fmean(lat) if lat else None,
        "results": len(results), "errors": errors, "latency_missing": len(ids) - len(arrived),
        "sender_lag_max_ms": phase.sender_lag_ms, "send_seconds": phase.send_seconds, "seconds": span,
    }
    row.update(_verdict_stats(db_url, prefix))
    row["_latencies_ms"] = lat
    if cpu is not None:
        row["cpu"] = cpu
    return row


# --------------------------------------------------------------------------- the run


def _prepare_audit_store(settings, checkpoint: Path, db_codes: int, progress: Callable[[str], None]) -> tuple:
    """Migrate, bulk-insert ``db_codes`` real-ish codes of the model (source ``bench``), publish it.

    Returns (PublishResult, the loaded checkpoint).
    """
    from core.checkpoint import load_checkpoint
    from core.index import pack_codes
    from db import repo
    from db.migrate import upgrade
    from db.session import session_scope
    from workers.publish import publish

    upgrade(settings.db_url)
    ck = load_checkpoint(checkpoint)
    base = real_codes(ck.model.eval(), min(db_codes, 20_000))
    codes = pack_codes(tile_codes(base, db_codes, flip_bits=2))
    progress(f"inserting {db_codes:,} database codes of model {ck.version}")
    with session_scope(settings.db_url) as s:
        repo.add_database_images(s, [c.tobytes() for c in codes], ck.version, source="bench")
    progress("publishing the model (seeding, calibrating against the database)")
    published = publish(checkpoint, settings=settings, seed_fraction=0.5)
    return published, ck


def _in_process_detector(published, ck, settings):
    """A Detector over the same codes, calibration, transform and top-k the workers serve."""
    from core.detector import Detector
    from db import repo
    from db.session import make_engine, session_scope
    from workers.replica import Replica
    from workers.runtime import load_calibration

    engine = make_engine(settings.db_url)
    replica = Replica.bootstrap(engine, published.model_version, ck.meta.bits, snapshot_dir=None)
    with session_scope(engine) as s:
        row = repo.get_calibration(s, published.calibration_id)
        calibration, transform, name = load_calibration(row), row.transform, row.detector
    top_k = int(calibration.meta.get("top_k", settings.top_k))
    return Detector(ck.model.eval(), replica.index, calibration, transform, detector=name, top_k=top_k,
                    device="cpu"), len(replica)


def run_fleet_bench(artifacts: Path, out_dir: Path, *, quick: bool = False,
                    progress: Callable[[str], None] | None = None) -> dict:
    """Measure the fleet against in-process scoring in one run; write fleet.json and fleet.png in ``out_dir``.

    Starts (and stops) Debian's redis-server and ``plan.workers`` detection workers through
    :class:`umcd.fleet.Fleet` with a SQLite audit store in a temporary folder holding
    ``plan.db_codes`` database codes. Rows: in-process ``Detector.score_batch`` at batch 1 and at
    the workers' batch size; the fleet with one message per image and with batch messages, at a
    fixed offered load (open loop) and at saturation (everything sent at once). Fleet latency is
    client-side: from just before the submit call to the producer receiving the result backend's
    publish of the stored Result (after the verdict row is committed).
    """
    import torch

    from producers.sdk import Client
    from umcd.fleet import Fleet
    from umcd.settings import Settings
    from workers.gcfreeze import freeze_long_lived
    from workers.malloc import keep_freed_memory

    say = progress or (lambda message: print(f"[bench fleet] {message}", file=sys.stderr, flush=True))
    plan = QUICK if quick else FULL
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="umcd-bench-fleet-"))
    fleet = None
    listener = None
    client = None
    try:
        bench_artifacts = work / "artifacts"
        bench_artifacts.mkdir()
        checkpoint, model_note = _checkpoint(Path(artifacts), work, quick)
        db_url = f"sqlite:///{bench_artifacts / 'audit.db'}"  # where Fleet(postgres=False) points the workers
        settings = Settings(artifacts=bench_artifacts, database_url=db_url, broker_url="redis://unused")
        published, ck = _prepare_audit_store(settings, checkpoint, plan.db_codes, say)

        # the baseline runs under the workers' malloc and GC settings (without them it pays the page faults
        # and full collections the workers no longer pay, and the ratio would flatter the fleet)
        keep_mib = Settings.model_fields["worker_malloc_keep_mib"].default  # the workers' (UMCD_* is not passed on)
        malloc_tuned = keep_freed_memory(keep_mib)
        gc_frozen = freeze_long_lived() if Settings.model_fields["worker_gc_freeze"].default else 0
        say("in-process baseline: Detector.score_batch")
        detector, index_size = _in_process_detector(published, ck, settings)
        tensors = _digits()[1]
        batch_sizes = (1, plan.batch_size)
        thread_options = tuple(sorted({torch.get_num_threads(), 1}, reverse=True))
        in_before = _in_process_rows(detector, tensors, batch_sizes, plan.in_process_seconds, thread_options)
        burst_batch = torch.from_numpy(np.resize(tensors, (plan.batch_size, *tensors.shape[1:])).copy())

        def in_process_burst() -> tuple[dict[int, float], dict[str, float]]:
            """The in-process rate right now at each torch thread count, with the detection workers stopped
            (SIGSTOP) meanwhile: idle, they still poll Redis and the audit store. Also the CPU the fleet's
            processes used meanwhile, by kind."""
            used: dict[str, float] = {}
            with _workers_paused(fleet, used):
                rates = {n: _in_process_rate(detector, burst_batch, plan.bracket_seconds, n) for n in thread_options}
            return rates, used

        threads = max(1, (os.cpu_count() or 1) // plan.workers)
        env = {k: v for k, v in os.environ.items() if not k.startswith("UMCD_")}
        env.update({"UMCD_DEVICE": "cpu", "UMCD_LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": str(threads),
                    "UMCD_BATCH_MAX_SIZE": str(plan.batch_size), "UMCD_MODEL_POLL_INTERVAL_S": "2",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))})
        for name in ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_PASSWORD", "UMCD_API_KEY"):
            env.pop(name, None)
        fleet = Fleet(bench_artifacts, workers=plan.workers, postgres=False, cpu_worker=False, gateway=False,
                      flower=False, env=env, workdir=ROOT, ready_timeout_s=180.0, stop_grace_s=10.0, progress=say)
        say(f"starting redis-server and {plan.workers} detection workers")
        fleet.up()
        urls = fleet.client_env()
        client_settings = Settings(artifacts=bench_artifacts, database_url=db_url, broker_url=urls["UMCD_BROKER_URL"],
                                   result_backend=urls["UMCD_RESULT_BACKEND"])
        client = Client(client_settings)
        listener = ResultListener(urls["UMCD_RESULT_BACKEND"])
        tag = f"{int(time.time())}"

        say(f"warming up with {plan.warmup} images")
        warm = _query_pngs(plan.warmup)
        warm_ids = [f"warm-{tag}-{i}" for i in range(plan.warmup)]
        _send_single(client, warm_ids[: plan.warmup // 2], warm[: plan.warmup // 2], None)
        _send_batches(client, warm_ids[plan.warmup // 2 :], warm[plan.warmup // 2 :], plan.message_size, None)
        listener.wait_for(warm_ids, plan.timeout_s)

        rows: list[dict] = []
        n_open = int(round(plan.open_rate * plan.open_seconds))
        phases = [
            ("fleet_single_open_loop", "open loop", "single", plan.open_rate, n_open, None),
            ("fleet_batch_open_loop", "open loop", f"batch of {plan.open_batch}", plan.open_rate, n_open,
             plan.open_batch),
            ("fleet_single_saturation", "saturation", "single", None, plan.saturation_single, None),
            ("fleet_batch_saturation", "saturation", f"batch of {plan.message_size}", None, plan.saturation_batch,
             plan.message_size),
            ("fleet_array_saturation", "saturation", f"pixel array, batch of {plan.message_size}", None,
             plan.saturation_batch, plan.message_size),
            # the same array in messages of one model batch each: what the per-message costs weigh
            ("fleet_array_saturation_small_messages", "saturation", f"pixel array, batch of {plan.batch_size}",
             None, plan.saturation_batch, plan.batch_size),
        ]
        for mode, load, submission, rate, n, per_message in phases:
            say(f"{mode}: {n} images" + (f" at {rate:g}/s" if rate else " sent at once"))
            prefix = f"{mode}-{tag}-"
            ids = [f"{prefix}{i}" for i in range(n)]
            images = _query_pixels(n) if mode.startswith("fleet_array") else _query_pngs(n)
            bracket_before = None
            if load == "saturation":
                bracket_before = in_process_burst()
            meter = CpuMeter(fleet)
            t_send = time.perf_counter()
            if per_message is None:
                sent, lag = _send_single(client, ids, images, rate)
                messages = n
            else:
                sent, messages, lag = _send_batches(client, ids, images, per_message, rate)
            phase = Phase(mode, load, submission, rate, sent, messages, lag, time.perf_counter() - t_send)
            rows.append(_phase_row(phase, listener, client, db_url, prefix, plan.timeout_s, meter, t_send))
            if bracket_before is not None:
                rows[-1]["in_process_bracket"] = _bracket(bracket_before[0], in_process_burst()[0], bracket_before[1])

        # the fleet's own capacity: the same batch load queued while the workers do not consume, then
        # released; the producer's CPU (and its share of the two cores) falls outside the measured span
        mode = "fleet_batch_prequeued"
        say(f"{mode}: {plan.saturation_batch} images queued first, then consumed")
        prefix = f"{mode}-{tag}-"
        ids = [f"{prefix}{i}" for i in range(plan.saturation_batch)]
        _consumers(client, "cancel", plan.workers)
        try:
            t_send = time.perf_counter()
            sent, messages, _ = _send_batches(client, ids, _query_pngs(len(ids)), plan.message_size, None)
            send_seconds = time.perf_counter() - t_send
            bracket_before = in_process_burst()  # the queue is full and nobody consumes it
            meter = CpuMeter(fleet)
            released = time.perf_counter()
        finally:
            _consumers(client, "add", plan.workers)
        phase = Phase(mode, "saturation", f"batch of {plan.message_size}, queued first", None,
                      dict.fromkeys(sent, released), messages, 0.0, send_seconds)
        rows.append(_phase_row(phase, listener, client, db_url, prefix, plan.timeout_s, meter, released))
        rows[-1]["in_process_bracket"] = _bracket(bracket_before[0], in_process_burst()[0], bracket_before[1])
        rows[-1]["note"] = ("throughput and latency from the moment the workers start consuming a full queue; "
                            "the producer sent everything before (send_seconds)")

        # steady-state memory: the batch saturation load once more; a worker whose RSS still grows
        # when the same load comes again leaks (the first pass grows allocator arenas and caches)
        n = plan.saturation_batch
        say(f"memory: the batch saturation load again ({n} images)")
        meter = CpuMeter(fleet)
        ids = [f"mem-{tag}-{i}" for i in range(n)]
        _send_batches(client, ids, _query_pngs(n), plan.message_size, None)
        missing = listener.wait_for(ids, plan.timeout_s)
        steady = meter.stop(1.0)
        steady_memory = {"requests": n - missing, "rss_mib_start": steady["worker_rss_mib_start"],
                         "rss_mib_end": steady["worker_rss_mib_end"],
                         "growth": {pid: (steady["worker_rss_mib_end"][pid] - v) / v
                                    for pid, v in steady["worker_rss_mib_start"].items()
                                    if pid in steady["worker_rss_mib_end"]}}
    except BaseException:
        log.error("the fleet benchmark failed; its servers' logs are kept in %s", work)
        raise
    finally:
        if listener is not None:
            listener.close()
        if client is not None:
            client.close()
        if fleet is not None:
            fleet.down()

    say("in-process baseline again (the fleet is down)")
    in_after = _in_process_rows(detector, tensors, batch_sizes, plan.in_process_seconds, thread_options)
    gc.unfreeze()  # this process's objects are the GC's again (a test process runs this function too)
    load_end = os.getloadavg()
    in_rows = []
    for before, after in zip(in_before, in_after):
        lat = before["latencies_ms"] + after["latencies_ms"]
        rate = statistics.fmean([before["images_per_s"], after["images_per_s"]])
        in_rows.append({
            "mode": f"in_process_batch{before['batch_size']}", "load": "saturation",
            "submission": f"tensor batch of {before['batch_size']}", "offered_per_s": None,
            "images": before["images"] + after["images"], "messages": None, "images_per_s": rate,
            "images_per_s_before": before["images_per_s"], "images_per_s_after": after["images_per_s"],
            "torch_threads": {"before": before["threads"], "after": after["threads"]},
            "images_per_s_by_threads": {"before": before["images_per_s_by_threads"],
                                        "after": after["images_per_s_by_threads"]},
            **_percentiles(lat), "mean_ms": statistics.fmean(lat), "_latencies_ms": lat,
        })
    reference = in_rows[-1]["images_per_s"]
    for row in rows:
        if row["load"] == "saturation":
            # against the in-process rate measured right around the phase: this machine's speed drifts by
            # up to a third over a run, and the baseline before the fleet started is minutes away
            row["ratio_to_in_process"] = row["images_per_s"] / row["in_process_bracket"]["images_per_s"]
            row["ratio_to_in_process_start_end"] = row["images_per_s"] / reference
        cpu = row.get("cpu")
        if cpu and row["images"]:
            # where each image's CPU went, and the rate the machine's cores would allow at that cost
            per = {k: 1e3 * v / row["images"] for k, v in cpu["cpu_seconds"].items()}
            cpu["ms_per_image"] = {k: round(v, 4) for k, v in per.items()}
            cpu["worker_stage_ms_per_image"] = {k: round(1e3 * v / row["images"], 4)
                                                for k, v in cpu.get("worker_stage_cpu_seconds", {}).items()}
            cpu["cpu_bound_images_per_s"] = round(1e3 * (cpu["cores"] or 1) / max(sum(per.values()), 1e-9), 1)
            if "score" in cpu["worker_stage_ms_per_image"]:
                # the share of all the fleet's CPU per image (workers, producer, Redis) that went to scoring,
                # the work the in-process rate measures: ratio_to_in_process is about cores_busy * score_share *
                # (in-process one_thread_ms_per_image / the workers' score ms per image) / thread_scaling (README)
                cpu["score_share"] = round(1e3 * cpu["worker_stage_cpu_seconds"]["score"] / row["images"]
                                           / max(sum(per.values()), 1e-9), 4)
    rows = in_rows + rows

    fleet_rows = [r for r in rows if r.get("cpu")]
    worker_memory = None
    if fleet_rows:
        first, last = fleet_rows[0]["cpu"]["worker_rss_mib_start"], fleet_rows[-1]["cpu"]["worker_rss_mib_end"]
        worker_memory = {"requests": sum(r["images"] for r in fleet_rows), "rss_mib_start": first, "rss_mib_end": last,
                         "growth": {pid: (last[pid] - first[pid]) / first[pid] for pid in first if pid in last},
                         "note": "each detection worker's RSS before the first measured phase (after the warm-up) "
                                 "and after the last one (the saturation phases hold far more requests in flight)",
                         "steady": steady_memory}
    by_mode = {r["mode"]: r for r in rows}
    batch_ratio = by_mode["fleet_array_saturation"]["ratio_to_in_process"]
    png_ratio = by_mode["fleet_batch_saturation"]["ratio_to_in_process"]
    prequeued_ratio = by_mode["fleet_batch_prequeued"]["ratio_to_in_process"]
    small_ratio = by_mode["fleet_array_saturation_small_messages"]["ratio_to_in_process"]
    open_p99 = by_mode["fleet_single_open_loop"]["p99_ms"]
    result = {
        "benchmark": "fleet",
        "machine": {**machine_info("cpu"), "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg_end": [round(x, 2) for x in load_end]},
        "settings": {
            "quick": quick, "model": model_note, "model_version": published.model_version,
            "bits": ck.meta.bits, "db_codes_inserted": plan.db_codes, "index_size": index_size,
            "detector": detector.spec.name, "top_k": detector.top_k, "workers": plan.workers,
            "worker_pool": "threads, concurrency 16, prefetch x1, events on (-E)",
            "worker_torch_threads": threads, "in_process_torch_threads_tried": list(thread_options),
            "worker_cpus": list(fleet.worker_cpus),  # UMCD_WORKER_CPUS of each detection worker (None: not pinned)
            "worker_batch_max_size": plan.batch_size, "worker_batch_max_wait_ms": Settings.model_fields["batch_max_wait_ms"].default,
            "worker_gil_switch_ms": Settings.model_fields["worker_gil_switch_ms"].default,
            "worker_malloc_keep_mib": keep_mib, "in_process_malloc_tuned": malloc_tuned,
            "worker_gc_freeze": Settings.model_fields["worker_gc_freeze"].default, "in_process_gc_frozen_objects": gc_frozen,
            "broker": "Debian redis-server (umcd.fleet.Fleet), result backend on the same server",
            "audit_store": "SQLite in a temporary folder",
            "open_loop": {"rate_images_per_s": plan.open_rate, "seconds": plan.open_seconds,
                          "batch_images_per_message": plan.open_batch},
            "saturation": {"single_images": plan.saturation_single, "batch_images": plan.saturation_batch,
                           "batch_images_per_message": plan.message_size,
                           "small_messages_images_per_message": plan.batch_size},
            "warmup_images": plan.warmup,
            "latency": "fleet rows: client-side, from just before the submit call (time.perf_counter in the "
                       "producer) to the producer receiving the result backend's PUBLISH of the stored Result "
                       "(Redis pub/sub on celery-task-meta-*; the verdict row is committed before); in-process "
                       "rows: one score_batch call",
            "throughput": "fleet rows: images answered / (last Result arrival - first submit); in-process rows: "
                          "images / time inside score_batch, mean of a run before the fleet started and one "
                          "after it stopped, each with the faster of the torch thread counts tried",
            "ratio_to_in_process": f"images_per_s / the in-process batch-{plan.batch_size} rate measured right "
                                   f"before and right after the phase ({plan.bracket_seconds:g} s per torch thread "
                                   "count, the faster one; mean of the two; in_process_bracket, the workers "
                                   "stopped by SIGSTOP meanwhile); ratio_to_in_process_start_end: / "
                                   f"in_process_batch{plan.batch_size} (before the fleet started and after it stopped)",
        },
        "targets": {
            "batch_throughput_ratio": {"target": TARGET_BATCH_RATIO, "measured": batch_ratio,
                                       "met": bool(batch_ratio >= TARGET_BATCH_RATIO),
                                       "submission": "pixel arrays (the in-process input: decoded pixels)",
                                       "png_files": png_ratio, "png_files_met": bool(png_ratio >= TARGET_BATCH_RATIO),
                                       "png_files_queued_first": prequeued_ratio,
                                       "images_per_message": plan.message_size,
                                       "pixel_arrays_in_messages_of_one_model_batch": small_ratio},
            "query_p99_ms_open_loop": {"target": TARGET_P99_MS, "rate_per_s": plan.open_rate,
                                       "db_codes": index_size, "measured": open_p99,
                                       "met": bool(open_p99 is not None and open_p99 <= TARGET_P99_MS)},
        },
        "worker_memory": worker_memory,
        "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
    }
    write_json(out_dir / "fleet.json", result)
    plot_fleet(result, rows, out_dir / "fleet.png")
    shutil.rmtree(work, ignore_errors=True)
    return result


def plot_fleet(result: dict, rows: list[dict], path: Path) -> None:
    """Three panels: throughput per mode, latency percentiles per mode, latency CDFs of the fleet rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(16, 4.8))
    names = [r["mode"].replace("fleet_", "").replace("_saturation", "").replace("_", "\n") for r in rows]
    colors = ["#999999" if r["mode"].startswith("in_process") else "#1f77b4" for r in rows]
    ax[0].bar(names, [r["images_per_s"] for r in rows], color=colors)
    # each saturation phase's target: 0.7 x the in-process rate measured right around it (its ratio's reference)
    marks = [(j, r["in_process_bracket"]["images_per_s"]) for j, r in enumerate(rows) if r.get("in_process_bracket")]
    for k, (j, rate) in enumerate(marks):
        ax[0].hlines(TARGET_BATCH_RATIO * rate, j - 0.45, j + 0.45, colors="k", linestyles=":",
                     label=f"{TARGET_BATCH_RATIO} x in-process around the phase" if k == 0 else None)
    ax[0].set(ylabel="images / s", title="(a) throughput")
    ax[0].legend()
    x = np.arange(len(rows))
    for j, (key, label) in enumerate((("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99"))):
        ax[1].bar(x + (j - 1) * 0.27, [r[key] or 0 for r in rows], 0.27, label=label)
    ax[1].axhline(TARGET_P99_MS, color="k", ls=":", label=f"{TARGET_P99_MS:g} ms")
    ax[1].set(xticks=x, xticklabels=names, yscale="log", ylabel="ms", title="(b) latency per request (batch call)")
    ax[1].legend()
    for r in rows:
        lat = np.sort(r.get("_latencies_ms") or [])
        if r["mode"].startswith("fleet") and len(lat):
            ax[2].plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=r["mode"].replace("fleet_", ""))
    ax[2].axvline(TARGET_P99_MS, color="k", ls=":")
    ax[2].set(xscale="log", xlabel="ms from submit to stored Result", ylabel="fraction of requests",
              title="(c) fleet latency CDF")
    ax[2].legend(fontsize=8)
    for a in ax:
        a.grid(alpha=0.3)
        a.tick_params(axis="x", labelsize=8)
    s = result["settings"]
    fig.suptitle(f"Fleet: {s['workers']} detection workers, {s['index_size']:,} codes, {s['model']} "
                 f"({result['machine']['cpu_count']} cores, load {result['machine']['loadavg_start'][0]:.1f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
