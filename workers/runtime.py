"""The detection runtime of one worker process: model state, micro-batcher, replica sync and model switching."""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.calibration import Calibration
from core.checkpoint import load_checkpoint
from core.detector import Detector
from core.extensions import REFERENCE_DETECTORS, SECRET_ENV, FeatureReference, make_detector, reference_path
from db import repo
from db.session import make_engine, session_scope
from umcd.settings import Settings, export_detector_secret
from workers import auditwrites, metrics
from workers.batching import PENDING, MicroBatcher
from workers.encoding import decode_pixels_for_model, encode_stored, store_image
from workers.gcfreeze import freeze_long_lived
from workers.imaging import (InvalidImage, array_ref_source, blob_part, load_pixel_array, part_ref_source,
                             pixels_at_size, pixels_png, read_array_source, read_blob, resolve_image_ref, to_model)
from workers.malloc import keep_freed_memory
from workers.replica import Replica
from workers.results import ScreenRequest, detection_result, invalid_result, result_from_verdict

log = logging.getLogger(__name__)

#: image side used to judge an input before any model is loaded
DEFAULT_IMAGE_SIZE = 32
#: images re-encoded per pass when catching up insertions made under an older model version
STRAGGLER_CHUNK = 256
#: a straggler that failed to re-encode is tried again after this many seconds, doubling (at most an hour) ...
STRAGGLER_RETRY_S = 30.0
#: ... this many times before it is given up (until the next publish re-encodes every active image)
STRAGGLER_RETRIES = 6
#: scored batches that may wait for the writer thread before the batcher waits for it
WRITES_IN_FLIGHT = 2


class NoModel(RuntimeError):
    """No model version is published (or loaded) yet: the request should be retried later."""


class ModelNotReady(RuntimeError):
    """The active model version cannot be served yet (its detector's feature reference file is missing or
    unreadable); the watcher tries again at every poll and the served state, if any, stays."""


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU falls back to cpu (logged)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        log.warning("UMCD_DEVICE=cuda but no GPU is available: falling back to the CPU")
        return torch.device("cpu")
    return torch.device(device)


@dataclass
class ModelState:
    """Everything one model version needs to answer: model, calibrated detector over its replica."""

    version: str
    calibration_id: int
    detector_name: str
    detector: Detector
    calibration: Calibration
    replica: Replica
    image_size: int
    bits: int
    loaded_at: float

    @property
    def key(self) -> tuple[str, int]:
        return self.version, self.calibration_id

    @property
    def model(self) -> torch.nn.Module:
        return self.detector.model


@dataclass
class BatchItem:
    """One decoded request on its way through the batcher: image (S, S, 3) uint8, or (3, S, S) float32 in
    [0, 1] for an image with deeper samples (``workers.imaging.decode_pixels``); a batch goes to float at once."""

    request: ScreenRequest
    image: np.ndarray
    #: the original bytes (stored for insertions, for re-encoding at the next publish; a view into its message's
    #: blob for a ``part``); b"" for a query from a pixel array, a PNG of its pixels for an insertion from one
    data: bytes | memoryview


def _shared_ref(ref: Any) -> tuple[str, str] | None:
    """``(kind, key or path)`` of a ``redis_key`` or ``path`` ImageRef (what several items of a message may name
    alike), None for any other."""
    if isinstance(ref, dict) and len(ref) == 1:
        kind, value = next(iter(ref.items()))
        if kind in ("redis_key", "path") and isinstance(value, str):
            return kind, value
    return None


def load_calibration(row: Any) -> Calibration:
    """The full calibration of a ``calibrations`` row: the copy committed in its ``meta``, else its JSON file.

    The copy in the row first: the file's path is one per model version and detector, which another
    calibration of the same version (``umcd calibrate``, a publish that died before its commit) may have
    overwritten since; the row is what this calibration id was."""
    stored = (row.meta or {}).get("calibration")
    if stored:
        return Calibration(**stored)
    path = getattr(row, "path", None)
    if path and Path(path).is_file():
        return Calibration.load(path)
    raise FileNotFoundError(f"calibration {row.id}: no copy in its meta and no file at {path!r}")


class DetectionRuntime:
    """One per detection worker process; task threads call :meth:`handle`.

    Threads: the batcher (one model batch at a time), the writer (stores a scored batch's verdicts
    while the batcher scores the next one), the replica syncer (reads ``index_log`` past
    the watermark every ``replica_sync_interval_ms``, snapshots every
    ``replica_snapshot_interval_s``) and the model watcher (polls the active model version and
    calibration every ``model_poll_interval_s``; a new one is loaded and its replica built before it
    replaces the current state in one assignment, so a batch always sees one consistent state).
    """

    def __init__(self, settings: Settings, *, broker_url: str | None = None, worker_process: bool = False) -> None:
        self.settings = settings
        #: freeze the long-lived objects out of the GC's reach (workers.gcfreeze): only in a worker process,
        #: whose heap is the runtime's (a test or a CLI embedding a runtime keeps its own GC as it is)
        self.freeze_heap = worker_process and settings.worker_gc_freeze
        self.worker_process = worker_process
        self.device = resolve_device(settings.device)
        export_detector_secret(settings)  # the random denoiser of umcd-rand* reads it from os.environ
        self.engine = make_engine(settings.db_url)
        self.artifacts = Path(settings.artifacts)
        self.snapshot_dir = self.artifacts / "index"
        self.broker_url = broker_url
        self._redis = None
        self._redis_lock = threading.Lock()
        self._state: ModelState | None = None
        self._state_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._straggler_seq: int | None = None
        #: stragglers that failed to re-encode under the served version: image id -> (failures, when to try again)
        self._straggler_retry: dict[int, tuple[int, float]] = {}
        #: why the active model is not served (e.g. its feature reference is missing), None when it is
        self.not_ready: str | None = None
        self._not_ready_logged: set[tuple[str, int]] = set()
        self._last_snapshot = time.monotonic()
        self.batcher: MicroBatcher[BatchItem, dict] = MicroBatcher(
            self._process, max_size=settings.batch_max_size, max_wait_s=settings.batch_max_wait_ms / 1000.0,
        )
        #: stores scored batches (audit transaction, replica adds) so that the batcher scores the next
        #: one meanwhile; one thread, so batches commit in the order they were scored
        self._writer = self._new_writer()
        self._write_slots = threading.BoundedSemaphore(WRITES_IN_FLIGHT)
        #: seconds a task thread waits for its batch before giving up (and retrying)
        self.result_timeout_s = 120.0

    # ------------------------------------------------------------------ lifecycle

    def start(self, load: bool = True) -> DetectionRuntime:
        """Pin the worker process to its CPUs (if set), serve metrics, load the active model if one is
        published, start the threads."""
        if self.worker_process and self.settings.worker_cpus:
            from workers.affinity import pin_process

            pin_process(self.settings.worker_cpus)  # a bad list stops the worker here, with the reason
        sys.setswitchinterval(self.settings.worker_gil_switch_ms / 1000.0)  # process-wide: see the setting
        keep_freed_memory(self.settings.worker_malloc_keep_mib)  # activations reuse the last batch's pages
        metrics.serve(self.settings.metrics_port)
        metrics.bind_replica(
            lambda: float(len(self._state.replica)) if self._state is not None else 0.0,
            lambda: self._state.replica.lag_seconds if self._state is not None else 0.0,
        )
        if load:
            try:
                self.refresh_model()
            except Exception:  # noqa: BLE001 - the watcher tries again
                log.exception("could not load the active model at start; will retry")
        self.batcher.start()
        for name, target in (("umcd-replica-sync", self._sync_loop), ("umcd-model-watch", self._watch_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("detection runtime started on %s (batches of up to %d, %.1f ms wait)", self.device,
                 self.settings.batch_max_size, self.settings.batch_max_wait_ms)
        self._freeze_heap()
        return self

    def _freeze_heap(self) -> None:
        if self.freeze_heap:
            log.info("%d long-lived objects frozen out of the garbage collector's full passes", freeze_long_lived())

    @staticmethod
    def _new_writer() -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="umcd-writer")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the threads (the batch in progress finishes) and write a last snapshot."""
        self._stop.set()
        self.batcher.stop(timeout)
        writer, self._writer = self._writer, self._new_writer()  # a fresh one (no thread yet) for a later start
        try:  # the batches scored so far are stored and answered before we go (a hung audit store: not forever)
            writer.submit(lambda: None).result(timeout)
        except Exception as exc:  # noqa: BLE001
            log.warning("the writer did not finish its batches within %.0f s (%s)", timeout, type(exc).__name__)
        writer.shutdown(wait=False)
        for thread in self._threads:
            thread.join(timeout)
        state = self._state
        if state is not None and state.replica.watermark > state.replica.snapshot_watermark:
            try:
                state.replica.save_snapshot(self.snapshot_dir)
            except Exception:  # noqa: BLE001
                log.exception("could not write the index snapshot at shutdown")

    @property
    def state(self) -> ModelState | None:
        return self._state

    def wait_for_model(self, timeout: float) -> ModelState:
        """The current state, waiting up to ``timeout`` s for a first one (raises NoModel)."""
        deadline = time.monotonic() + timeout
        while self._state is None:
            if time.monotonic() >= deadline:
                raise NoModel(self.not_ready or "no model version is published yet")
            time.sleep(0.05)
        return self._state

    # ------------------------------------------------------------------ model versions

    def _active_rows(self) -> tuple[Any, Any] | None:
        with session_scope(self.engine) as s:
            mv = repo.active_model_version(s)
            if mv is None:
                return None
            cal = repo.active_calibration(s, mv.version, self.settings.detector)
            if cal is None:
                log.warning("model %s has no active calibration for detector %s", mv.version, self.settings.detector)
                return None
            return mv, cal

    def refresh_model(self) -> bool:
        """Load the active (model version, calibration) if it differs from the served one; True if switched.

        A version that cannot be served yet (``ModelNotReady``: its feature reference is missing) is
        logged once as an error and left in ``not_ready``; the served state, if any, stays and the
        watcher tries again at its next poll.
        """
        rows = self._active_rows()
        if rows is None:
            return False
        mv, cal_row = rows
        current = self._state
        if current is not None and current.key == (mv.version, cal_row.id):
            return False
        try:
            if current is not None and current.version == mv.version:
                # same model, new thresholds: keep the replica and the model, swap the detector
                state = self._build_state(mv, cal_row, replica=current.replica, model=current.model)
            else:
                state = self._build_state(mv, cal_row)
        except ModelNotReady as exc:
            self.not_ready = str(exc)
            key = (mv.version, int(cal_row.id))
            if key not in self._not_ready_logged:
                self._not_ready_logged.add(key)
                log.error("model %s is not ready: %s%s", mv.version, exc,
                          f"; still serving {current.version}" if current is not None else "")
            return False
        self.not_ready = None
        with self._state_lock:
            previous, self._state = self._state, state
        self._straggler_seq = int((mv.meta or {}).get("reencoded_through_seq", 0))
        self._straggler_retry = {}  # a new version: every image gets its own chance again
        metrics.set_model(state.version, previous.version if previous is not None else None)
        log.info("serving model %s with calibration %d (%s, %d codes in the replica)%s", state.version,
                 state.calibration_id, state.detector_name, len(state.replica),
                 f"; was {previous.version}/{previous.calibration_id}" if previous is not None else "")
        previous = None  # the replaced state goes with the collection that precedes the new freeze
        self._freeze_heap()
        return True

    def load_reference(self, mv: Any, cal_row: Any) -> FeatureReference | None:
        """The FeatureReference a REFERENCE_DETECTORS detector needs (None for the others).

        Read from the path the publisher recorded in the calibration's meta, else from
        ``reference_path(artifacts, version)``; raises ModelNotReady when neither file is there
        or the file does not load.
        """
        if cal_row.detector not in REFERENCE_DETECTORS:
            return None
        recorded = (cal_row.meta or {}).get("reference")
        candidates = [Path(p) for p in dict.fromkeys([recorded, str(reference_path(self.artifacts, mv.version))]) if p]
        for path in candidates:
            if path.is_file():
                try:
                    return FeatureReference.load(path)
                except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
                    raise ModelNotReady(f"detector {cal_row.detector} cannot load its feature reference {path}: "
                                        f"{type(exc).__name__}: {exc}") from exc
        raise ModelNotReady(
            f"detector {cal_row.detector} needs the feature reference of model {mv.version}, but there is no file "
            f"at {' or '.join(str(p) for p in candidates)}; publishing the model with "
            f"UMCD_DETECTOR={cal_row.detector} builds it")

    def _build_state(self, mv: Any, cal_row: Any, replica: Replica | None = None,
                     model: torch.nn.Module | None = None) -> ModelState:
        t0 = time.perf_counter()
        reference = self.load_reference(mv, cal_row)  # first: a missing file costs no checkpoint load
        ckpt = None
        if model is None:
            ckpt = load_checkpoint(mv.checkpoint_path, device=self.device)
            if ckpt.sha256 != mv.checkpoint_sha256:
                raise ValueError(f"{mv.checkpoint_path} does not hold model {mv.version} (sha256 differs)")
            model = ckpt.model
        calibration = load_calibration(cal_row)
        if replica is None:
            replica = Replica.bootstrap(self.engine, mv.version, int(mv.bits), self.snapshot_dir,
                                        backend=self.settings.index_backend, on_visible=metrics.observe_visibility)
        top_k = int(calibration.meta.get("top_k", self.settings.top_k))
        detector = make_detector(cal_row.detector, model, replica.index, reference=reference, calibration=calibration,
                                 transform=cal_row.transform, top_k=top_k, device=self.device)
        if "random-denoise" in detector.spec.transforms and not os.environ.get(SECRET_ENV):
            log.warning("detector %s draws its random denoiser with the public default secret: set %s",
                        cal_row.detector, SECRET_ENV)
        image_size = int(ckpt.meta.image_size) if ckpt is not None else self._state.image_size  # type: ignore[union-attr]
        log.info("model %s loaded in %.2f s", mv.version, time.perf_counter() - t0)
        return ModelState(mv.version, int(cal_row.id), cal_row.detector, detector, calibration, replica,
                          image_size, int(mv.bits), time.time())

    # ------------------------------------------------------------------ background threads

    def _sync_loop(self) -> None:
        interval = self.settings.replica_sync_interval_ms / 1000.0
        failures = 0
        while not self._stop.wait(interval if failures == 0 else min(5.0, interval * 2 ** failures)):
            state = self._state
            if state is None:
                continue
            try:
                state.replica.sync(self.engine)
                failures = 0
            except Exception as exc:  # noqa: BLE001 - the audit store may be down: retry with back-off
                failures = min(failures + 1, 6)
                log.warning("replica sync failed (%s: %s); retrying", type(exc).__name__, exc)
                continue
            if (time.monotonic() - self._last_snapshot >= self.settings.replica_snapshot_interval_s
                    and state.replica.watermark > state.replica.snapshot_watermark):
                self._last_snapshot = time.monotonic()
                try:
                    state.replica.save_snapshot(self.snapshot_dir)
                except Exception:  # noqa: BLE001
                    log.exception("could not write the index snapshot")

    def _watch_loop(self) -> None:
        while not self._stop.wait(self.settings.model_poll_interval_s):
            try:
                self.refresh_model()
            except Exception:  # noqa: BLE001
                log.exception("could not switch to the active model; will retry")
            try:
                self.reencode_stragglers()
            except Exception:  # noqa: BLE001
                log.exception("could not re-encode images inserted under an older model")

    def reencode_stragglers(self, limit: int = STRAGGLER_CHUNK) -> int:
        """Encode, under the served version, active images that workers on an older version inserted.

        Reads ``index_log`` adds of other versions past a cursor (starting where the publisher's
        re-encoding stopped) and stores codes for the images that lack one: their ``add`` rows
        under the served version reach every replica through the log. Returns how many were added.

        An image that cannot be read or decoded (its file missing, say, or a file system that failed
        for a moment) is tried again after ``STRAGGLER_RETRY_S``, doubling up to an hour, and given
        up with an error after ``STRAGGLER_RETRIES`` more failures; until then it stays active but out
        of the served index. Before, one failure left it out for as long as this process served the
        version.
        """
        state, cursor = self._state, self._straggler_seq
        if state is None or cursor is None:
            return 0
        from sqlalchemy import and_, exists, select

        from db.models import DbImage, ImageCode, IndexLog

        retry = self._straggler_retry
        now = time.monotonic()
        due = [image_id for image_id, (_, at) in retry.items() if at <= now]
        with session_scope(self.engine) as s:
            head = repo.max_log_seq(s)
            rows = []
            if head > cursor:
                has_code = exists().where(and_(ImageCode.image_id == IndexLog.image_id,
                                               ImageCode.model_version == state.version))
                rows = s.execute(
                    select(IndexLog.seq, IndexLog.image_id, DbImage.image_path)
                    .join(DbImage, DbImage.id == IndexLog.image_id)
                    .where(IndexLog.seq > cursor, IndexLog.seq <= head, IndexLog.op == "add",
                           IndexLog.model_version != state.version, DbImage.status == "active", ~has_code)
                    .order_by(IndexLog.seq).limit(limit)
                ).all()
            again = []
            if due:  # still active and still without a code under the served version (another worker may have
                # encoded it, or it was removed meanwhile)
                has_code = exists().where(and_(ImageCode.image_id == DbImage.id,
                                               ImageCode.model_version == state.version))
                again = s.execute(select(DbImage.id, DbImage.image_path)
                                  .where(DbImage.id.in_(due), DbImage.status == "active", ~has_code)).all()
        next_cursor = head if len(rows) < limit else int(rows[-1][0])
        for image_id in set(due) - {int(i) for i, _ in again}:
            retry.pop(image_id, None)
        items = [(int(i), p) for i, p in again]
        items += [(int(i), p) for _, i, p in rows if int(i) not in retry]
        added = 0
        if items:
            codes, failed = encode_stored(state.model, items, self.settings, state.image_size, self.device)
            paths = dict(items)
            for image_id, why in failed:
                failures = retry.get(image_id, (0, 0.0))[0] + 1
                if failures > STRAGGLER_RETRIES or not paths.get(image_id):  # no stored file: nothing to retry
                    retry[image_id] = (failures, math.inf)
                    log.error("image %d cannot be re-encoded under %s after %d tries, giving up (it stays out of "
                              "this version's index until the next publish): %s", image_id, state.version,
                              failures, why)
                    continue
                wait = min(STRAGGLER_RETRY_S * 2 ** (failures - 1), 3600.0)
                retry[image_id] = (failures, now + wait)
                log.warning("image %d cannot be re-encoded under %s (%s); trying again in %.0f s", image_id,
                            state.version, why, wait)
            if codes:
                try:
                    with session_scope(self.engine, write=True) as s:
                        added = repo.add_image_codes_bulk(s, state.version, codes)
                except Exception:
                    # not written: the new ones past the cursor are read again (the cursor stays), and retried ones
                    # stay due (dropping them first lost them for good when the audit store failed for a moment)
                    for image_id, _ in codes:
                        if image_id in retry:
                            retry[image_id] = (retry[image_id][0], now)
                    raise
                for image_id, _ in codes:
                    retry.pop(image_id, None)
            if added:
                log.info("re-encoded %d images inserted under an older model into %s", added, state.version)
        if self._state is state:
            self._straggler_seq = next_cursor
        return added

    # ------------------------------------------------------------------ requests (task threads)

    @property
    def redis(self):
        """The broker's Redis (for ``redis_key`` image references), created on first use."""
        if self._redis is None:
            with self._redis_lock:
                if self._redis is None:
                    if not self.broker_url:
                        return None
                    from umcd.celeryconf import redis_from_url

                    try:
                        self._redis = redis_from_url(self.broker_url)
                    except ValueError:  # not a Redis broker: redis_key references cannot be read
                        return None
        return self._redis

    def handle(self, request: ScreenRequest, image_ref: Any) -> dict:
        """Decode, batch, score, store and answer one request (runs on a task thread).

        Bad input is answered here (verdict ``invalid_input``, audit rows written) and never reaches
        the batcher. Raises NoModel when no model is published yet, and lets audit-store and Redis
        errors through (the task retries them).
        """
        if request.problem is not None:  # the message's own fields are bad: answered before its image is read
            return self.answer_invalid(request, request.problem)
        state = self._state
        size = state.image_size if state is not None else DEFAULT_IMAGE_SIZE
        cpu = time.thread_time()
        try:
            data = resolve_image_ref(image_ref, self.redis, allowed_roots=self.settings.image_roots,
                                     max_bytes=self.settings.max_image_bytes)
            request.image_bytes = len(data)
            image = decode_pixels_for_model(data, self.settings, size)
        except InvalidImage as exc:
            return self.answer_invalid(request, exc.reason)
        finally:
            metrics.add_cpu("decode", time.thread_time() - cpu)
        if state is None:
            self.wait_for_model(timeout=5.0)  # raises NoModel: the task retries later
        future = self.batcher.submit(BatchItem(request, image, data))
        try:
            return future.result(timeout=self.result_timeout_s)
        except FutureTimeout:
            future.cancel()
            raise

    def handle_many(self, requests: list[ScreenRequest], image_refs: list[Any]) -> list[dict | BaseException]:
        """Decode, score, store and answer several requests of one message (runs on a task thread).

        Every decoded image goes to the batcher at once, so the images of a message share model
        batches (of up to ``batch_max_size``) and one audit-store transaction per batch. Returns one
        outcome per request, in order: its Result, or the exception that stopped it (``NoModel``
        when no model is published, audit-store or Redis errors, ``TimeoutError`` when its batch
        did not answer within ``result_timeout_s``). Never raises for one request's sake: bad input
        gets its ``invalid_input`` Result as in :meth:`handle`.
        """
        outcomes: list[dict | BaseException | None] = [None] * len(requests)
        state = self._state
        size = state.image_size if state is not None else DEFAULT_IMAGE_SIZE
        decoded: list[tuple[int, BatchItem]] = []
        in_arrays: dict[tuple[str, str], list[tuple[int, int]]] = {}  # array source -> [(item, index)]
        fetched: dict[tuple[str, str], bytes] = {}  # a redis_key or path named by several items: read once
        blobs: dict[str, bytes | BaseException] = {}  # the file blobs ``part`` refs point into: read once
        cpu = time.thread_time()
        for i, (request, ref) in enumerate(zip(requests, image_refs)):
            try:
                if request.problem is not None:
                    raise InvalidImage(request.problem, "bad_request")
                spot = array_ref_source(ref)
                if spot is not None:
                    in_arrays.setdefault(spot[:2], []).append((i, spot[2]))
                    continue
                part = part_ref_source(ref)
                if part is not None:
                    data = self._blob_part(part, blobs)
                else:
                    shared = _shared_ref(ref)
                    data = fetched.get(shared) if shared is not None else None
                    if data is None:
                        data = resolve_image_ref(ref, self.redis, allowed_roots=self.settings.image_roots,
                                                 max_bytes=self.settings.max_image_bytes)
                        if shared is not None:
                            fetched[shared] = data
                request.image_bytes = len(data)
                # a query's bytes are not kept once decoded (an insertion's are stored with its row)
                decoded.append((i, BatchItem(request, decode_pixels_for_model(data, self.settings, size),
                                             data if request.kind == "insert" else b"")))
            except InvalidImage as exc:
                outcomes[i] = self._invalid_outcome(request, exc)
            except Exception as exc:  # noqa: BLE001 - e.g. Redis down while reading a redis_key image
                outcomes[i] = exc
        for source, spots in in_arrays.items():
            self._decode_array(source, spots, requests, size, decoded, outcomes)
        metrics.add_cpu("decode", time.thread_time() - cpu)  # with the audit rows of invalid images, if any
        if decoded and state is None:
            try:
                self.wait_for_model(timeout=5.0)
            except NoModel as exc:
                for i, _ in decoded:
                    outcomes[i] = exc
                return outcomes  # type: ignore[return-value]
        if not decoded:
            return outcomes  # type: ignore[return-value]
        try:  # all at once: one wake-up of the batcher, and this thread wakes once, when the last is answered
            group = self.batcher.submit_many([item for _, item in decoded])
        except Exception as exc:  # noqa: BLE001 - BatcherStopped: a shutdown; the task retries
            for i, _ in decoded:
                outcomes[i] = exc
            return outcomes  # type: ignore[return-value]
        if not group.wait(self.result_timeout_s):
            group.cancel()  # the items not in a batch yet stay out of any
        for (i, _), outcome in zip(decoded, group.outcomes):  # a result, or the exception that failed this item alone
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome  # SystemExit, KeyboardInterrupt...: the task stops, as handle() lets them through
            outcomes[i] = outcome if outcome is not PENDING else FutureTimeout(
                f"no answer from the batcher within {self.result_timeout_s:.0f} s")
        return outcomes  # type: ignore[return-value]

    def _blob_part(self, part: tuple[str, int, int], blobs: dict[str, bytes | BaseException]) -> memoryview:
        """The image file a ``part`` ImageRef names, its blob read from Redis once per message (a failure to
        read it, once too: every item of a missing blob gets the same reason, a Redis outage the same error). A
        message's parts must all point into one blob, which bounds what one message holds in memory to
        ``MAX_ARRAY_BYTES``."""
        key, offset, length = part
        blob = blobs.get(key)
        if blob is None and blobs:  # the SDK puts a message's files in one blob: one is all a message may hold
            raise InvalidImage(f"bad image reference: the parts of a batch message point into one blob; this one "
                               f"names a second, {key}", "bad_reference")
        if blob is None:
            try:
                blob = read_blob(key, self.redis)
            except Exception as exc:  # noqa: BLE001 - InvalidImage or a Redis error, raised for each item below
                blob = exc
            blobs[key] = blob
        if isinstance(blob, BaseException):
            raise blob.with_traceback(None)  # one exception for many items: its traceback must not grow each time
        return blob_part(blob, key, offset, length, self.settings.max_image_bytes)

    def _invalid_outcome(self, request: ScreenRequest, exc: InvalidImage) -> dict | BaseException:
        """The stored ``invalid_input`` Result of ``request``, or the error that kept it from being stored."""
        try:
            return self.answer_invalid(request, exc.reason)
        except Exception as store_exc:  # noqa: BLE001 - this request fails alone
            return store_exc

    def _decode_array(self, source: tuple[str, str], spots: list[tuple[int, int]], requests: list[ScreenRequest],
                      size: int, decoded: list[tuple[int, BatchItem]],
                      outcomes: list[dict | BaseException | None]) -> None:
        """The images of one pixel array (``{"array": ...}`` ImageRefs): the array is read once, brought to
        the model's size in one step (still uint8: its model batch goes to float), and each image goes on as
        a BatchItem (its PNG kept only for insertions, which store their bytes). A bad array answers all its
        items ``invalid_input``; a bad index, its own."""
        try:
            blob = read_array_source(*source, self.redis, allowed_roots=self.settings.image_roots)
            pixels = load_pixel_array(blob, max_bytes=self.settings.max_image_bytes,
                                      max_pixels=self.settings.max_image_pixels, min_side=self.settings.min_image_side)
        except InvalidImage as exc:
            for i, _ in spots:
                outcomes[i] = self._invalid_outcome(requests[i], exc)
            return
        except Exception as exc:  # noqa: BLE001 - e.g. Redis down: the items are retried
            for i, _ in spots:
                outcomes[i] = exc
            return
        good: list[tuple[int, int]] = []
        for i, index in spots:
            if index < len(pixels):
                good.append((i, index))
            else:
                outcomes[i] = self._invalid_outcome(requests[i], InvalidImage(
                    f"bad image reference: index {index} of a pixel array of {len(pixels)} images",
                    "bad_reference"))
        if not good:
            return
        # each distinct image once: a message may name one index many times, and copying (or encoding) it
        # per item would turn one image of the array into up to 1024 full-size copies
        unique, inverse = np.unique(np.array([index for _, index in good]), return_inverse=True)
        images = pixels_at_size(pixels[unique], (size, size))
        image_bytes = int(np.prod(pixels.shape[1:]))
        pngs: dict[int, bytes] = {}
        for (i, index), j in zip(good, inverse.reshape(-1)):
            request = requests[i]
            request.image_bytes = image_bytes
            if request.kind == "insert" and index not in pngs:
                pngs[index] = pixels_png(pixels[index])
            decoded.append((i, BatchItem(request, images[j], pngs.get(index, b"") if request.kind == "insert" else b"")))

    def answer_invalid(self, request: ScreenRequest, reason: str) -> dict:
        """Store and return the ``invalid_input`` verdict of a request."""
        state = self._state
        result = invalid_result(
            request, reason, detector=state.detector_name if state else self.settings.detector,
            model_version=state.version if state else None, calibration_id=state.calibration_id if state else None,
        )
        with session_scope(self.engine, write=True) as s:
            repo.record_request(s, **request.request_fields())
            inserted = repo.write_verdict(s, **repo.verdict_fields_from_result(result))
            if not inserted:
                result = result_from_verdict(repo.row_dict(repo.get_verdict(s, request.request_id)))
        metrics.count(request.queue, result["verdict"])
        return result

    # ------------------------------------------------------------------ batches (the batcher thread)

    def _process(self, items: list[BatchItem]) -> list[dict | BaseException] | Future:
        """Score a batch once and hand it to the writer thread, which stores every verdict (and
        insertion) in one transaction and answers each item: returns that future (the batcher resolves
        the items' futures from it), or the outcomes at once when no model is loaded."""
        state = self._state
        if state is None:
            return [NoModel("no model loaded") for _ in items]
        cpu = time.thread_time()
        images = self._model_input([it.image for it in items], state.image_size)
        batch = state.detector.score_batch(torch.from_numpy(images))
        model_s = float(batch.timings.get("model", 0.0))
        search_s = float(batch.timings.get("search", 0.0))
        metrics.observe_batch(len(items), model_s, search_s)
        directions = state.detector.directions
        entries: list[tuple[BatchItem, dict, dict, bytes] | BaseException] = []
        now = time.time()
        for item, record in zip(items, batch.records()):
            result = detection_result(
                item.request, record, directions=directions, model_version=state.version,
                calibration_id=state.calibration_id, detector=state.detector_name, batch_size=len(items),
                model_ms=model_s * 1000.0, search_ms=search_s * 1000.0, now=now,
            )
            entries.append((item, result, record, bytes.fromhex(record["code"])))
        # store the bytes of insertions before their rows point at them
        for k, entry in enumerate(entries):
            if isinstance(entry, tuple) and entry[0].request.kind == "insert":
                try:
                    path = store_image(self.artifacts, entry[0].request.request_id, entry[0].data)
                    entry[1]["_image_path"] = str(path)
                except Exception as exc:  # noqa: BLE001 - this item fails alone
                    entries[k] = exc
        metrics.add_cpu("score", time.thread_time() - cpu)
        # the verdicts are stored on the writer thread while this thread scores the next batch; at most
        # WRITES_IN_FLIGHT batches wait there (then scoring waits: the audit store sets the pace)
        self._write_slots.acquire()
        try:
            return self._writer.submit(self._store, state, items, entries)
        except BaseException:
            self._write_slots.release()
            raise

    def _store(self, state: ModelState, items: list[BatchItem],
               entries: list[tuple[BatchItem, dict, dict, bytes] | BaseException]) -> list[dict | BaseException]:
        """The writer thread's half of a batch: one transaction for its verdicts (one by one if that
        fails), then each item's outcome in order."""
        cpu = time.thread_time()
        try:
            return self._store_outcomes(state, items, entries)
        finally:
            self._write_slots.release()
            metrics.add_cpu("store", time.thread_time() - cpu)

    def _store_outcomes(self, state: ModelState, items: list[BatchItem],
                        entries: list[tuple[BatchItem, dict, dict, bytes] | BaseException]) -> list[dict | BaseException]:
        good = [e for e in entries if isinstance(e, tuple)]
        try:
            written = self._write(state, good)
        except Exception as exc:  # noqa: BLE001
            if len(good) <= 1:
                raise
            log.warning("writing a batch of %d verdicts failed (%s: %s); writing them one by one",
                        len(good), type(exc).__name__, exc)
            written = {}
            for entry in good:
                try:
                    written.update(self._write(state, [entry]))
                except Exception as one_exc:  # noqa: BLE001
                    written[entry[0].request.request_id] = one_exc
        outcomes: list[dict | BaseException] = []
        counts: Counter[tuple[str, str]] = Counter()  # (queue, outcome): the metric counted once a batch
        for item, entry in zip(items, entries):
            outcome = entry if isinstance(entry, BaseException) else written[item.request.request_id]
            counts[item.request.queue, "error" if isinstance(outcome, BaseException) else outcome["verdict"]] += 1
            outcomes.append(outcome)
        for (queue, outcome_name), n in counts.items():
            metrics.count(queue, outcome_name, n)
        return outcomes

    @classmethod
    def _model_input(cls, images: list[np.ndarray], size: int) -> np.ndarray:
        """(n, 3, size, size) float32 in [0, 1] of the batch's decoded images: the usual batch, uint8 images all
        at the model's size, goes to float in one step; otherwise each image on its own."""
        if all(im.dtype == np.uint8 and im.shape == (size, size, 3) for im in images):
            return to_model(np.stack(images))
        return np.stack([cls._fit(to_model(im), size) for im in images])

    @staticmethod
    def _fit(image: np.ndarray, size: int) -> np.ndarray:
        """The (3, H, W) image at the served model's size (a model switch between decode and batch may change it)."""
        if image.shape[-1] == size and image.shape[-2] == size:
            return image
        x = torch.nn.functional.interpolate(torch.from_numpy(image)[None], size=(size, size), mode="bilinear",
                                            align_corners=False)
        return x[0].clamp(0, 1).numpy()

    def _write(self, state: ModelState, entries: list[tuple[BatchItem, dict, dict, bytes]]) -> dict[str, Any]:
        """One transaction: request rows, insertions (active or quarantined), verdict rows.

        Queries' request and verdict rows go in one multi-row statement per table
        (:mod:`workers.auditwrites`); insertions row by row (each gets its image id and log row).
        Returns request id -> Result. A request that already had a verdict (a redelivery) returns the
        stored one. Benign insertions join the local replica right after the commit.
        """
        out: dict[str, Any] = {}
        duplicates: list[str] = []
        orphans: list[tuple[str, str | None]] = []  # (request id, the image file this delivery stored)
        local_adds: list[tuple[int, bytes]] = []
        queries, seen = [], set()
        for entry in entries:  # a request id twice in one batch (a redelivery): the first one is written
            rid = entry[0].request.request_id
            if entry[0].request.kind != "insert":
                if rid in seen:
                    duplicates.append(rid)
                else:
                    queries.append(entry)
            seen.add(rid)
        with session_scope(self.engine, write=True) as s:
            if queries:  # queries touch no index: their rows go in one multi-row statement per table
                auditwrites.record_requests(s, [item.request.request_fields() for item, *_ in queries])
                rows = []
                for item, result, record, _ in queries:
                    values = repo.verdict_values_from_result(result)
                    values[_TOPK_AT] = record["topk"]  # the audit row keeps the neighbours of rejections too
                    values.append(None)  # created_at: the batch's time of writing
                    rows.append(values)
                    out[item.request.request_id] = result
                written = auditwrites.write_verdict_values(s, rows)
                duplicates += [item.request.request_id for item, *_ in queries
                               if item.request.request_id not in written]
            inserts = [entry for entry in entries if entry[0].request.kind == "insert"]
            # an id answered before (a redelivery, or an id sent again, even first as a query) keeps its verdict,
            # and an image never joins the database without a verdict of its own
            before = repo.answered(s, [item.request.request_id for item, *_ in inserts]) if inserts else set()
            for item, result, record, code in inserts:
                req = item.request
                if req.request_id in before:
                    duplicates.append(req.request_id)
                    orphans.append((req.request_id, result.get("_image_path")))
                    continue
                before.add(req.request_id)  # the same id again in this batch is a redelivery of this one
                image_path = result.get("_image_path")  # taken off the Result after the commit (a failed
                # batch is written again one request at a time, with the same Results)
                repo.record_request(s, **req.request_fields())
                benign = result["verdict"] == "benign"
                image_id = repo.insert_database_image(
                    s, req.request_id, code, state.version, source=req.source, label=req.label,
                    image_path=image_path, status="active" if benign else "quarantined",
                    reasons=result["reasons"],
                )
                if benign:
                    result["image_id"] = image_id
                fields = repo.verdict_fields_from_result(result)
                fields["topk"] = record["topk"]  # the audit row keeps the neighbours of rejections too
                if repo.write_verdict(s, **fields):
                    if benign:
                        local_adds.append((image_id, code))
                else:
                    # a redelivery: the first delivery stored the image with its own verdict (it may have
                    # quarantined it); only the log, never this delivery's verdict, puts it in the index
                    duplicates.append(req.request_id)
                out[req.request_id] = result
            for rid in duplicates:
                out[rid] = result_from_verdict(repo.row_dict(repo.get_verdict(s, rid)))
            # the bytes an id answered before came with again: kept only where they are that id's stored image
            # (a redelivery of the same bytes names the same file)
            kept = repo.image_paths(s, [rid for rid, path in orphans if path]) if orphans else {}
        for rid, path in orphans:
            if path and kept.get(rid) != path:
                Path(path).unlink(missing_ok=True)
        for result in out.values():  # committed: the path is in its row, never in a client's Result
            result.pop("_image_path", None)
        for image_id, code in local_adds:
            state.replica.add_local(image_id, code)
        return out


#: where a Result's verdict values hold the top-k neighbours (``repo.verdict_values_from_result``)
_TOPK_AT = repo.VERDICT_RESULT_COLUMNS.index("topk")


# --------------------------------------------------------------------------- the process-wide runtime

_runtime: DetectionRuntime | None = None
_runtime_lock = threading.Lock()


def get_runtime(settings: Settings | None = None, broker_url: str | None = None,
                worker_process: bool = False) -> DetectionRuntime:
    """This process's runtime, created and started on first use (in the worker process, never before a fork).
    ``worker_process``: the caller is a worker's start-up, whose heap the runtime may tune (``worker_gc_freeze``)."""
    global _runtime
    if _runtime is None:
        with _runtime_lock:
            if _runtime is None:
                from umcd.settings import get_settings

                _runtime = DetectionRuntime(settings or get_settings(), broker_url=broker_url,
                                            worker_process=worker_process).start()
    return _runtime


def stop_runtime() -> None:
    """Stop this process's runtime, if one was started."""
    global _runtime
    with _runtime_lock:
        runtime, _runtime = _runtime, None
    if runtime is not None:
        runtime.stop()
