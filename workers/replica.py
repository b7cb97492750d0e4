"""Index replicas: one FAISS Hamming index per model version, kept current from the index_log table, with snapshots."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from sqlalchemy import select

from core.index import HammingIndex
from db.models import IndexLog
from db.session import session_scope

log = logging.getLogger(__name__)

#: log rows read per query while catching up
SYNC_CHUNK = 10_000


@dataclass(frozen=True)
class LogEntry:
    """One ``index_log`` row: ``code`` is the packed code (K/8 bytes) of an ``add``, None for ``remove``."""

    seq: int
    op: str
    image_id: int
    code: bytes | None
    created_at: float  # epoch seconds (the writer's clock)


def read_log(engine, model_version: str, after_seq: int, limit: int = SYNC_CHUNK) -> list[LogEntry]:
    """Rows of ``model_version`` with ``seq > after_seq``, oldest first, at most ``limit`` (with their times)."""
    with session_scope(engine) as session:
        rows = session.execute(
            select(IndexLog.seq, IndexLog.op, IndexLog.image_id, IndexLog.code, IndexLog.created_at)
            .where(IndexLog.model_version == model_version, IndexLog.seq > after_seq)
            .order_by(IndexLog.seq)
            .limit(limit)
        ).all()
    return [
        LogEntry(int(s), op, int(i), None if c is None else bytes(c), _epoch(t))
        for s, op, i, c, t in rows
    ]


def _epoch(value: datetime | None) -> float:
    return value.timestamp() if value is not None else time.time()


# --------------------------------------------------------------------------- snapshots


def snapshot_paths(directory: str | Path, model_version: str) -> tuple[Path, Path, Path]:
    """(index file ``<version>.faiss``, watermark file ``<version>.json``, lock file) under ``directory``."""
    d = Path(directory)
    return d / f"{model_version}.faiss", d / f"{model_version}.json", d / f"{model_version}.lock"


@contextlib.contextmanager
def _flock(path: Path, exclusive: bool) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def read_snapshot_meta(directory: str | Path, model_version: str) -> dict | None:
    """The watermark JSON of a saved snapshot (``watermark``, ``n``, ``bits``, ...) or None."""
    _, meta_path, _ = snapshot_paths(directory, model_version)
    try:
        return json.loads(meta_path.read_text())
    except (FileNotFoundError, ValueError):
        return None


# --------------------------------------------------------------------------- the replica


class Replica:
    """The search index of one model version and the ``index_log`` watermark it reflects.

    ``index`` is a :class:`core.index.HammingIndex` (K-bit codes under int64 image ids) that the
    detector searches while this object updates it in place. ``sync`` applies the log rows past
    ``watermark`` in ``seq`` order (adds and removes); ``add_local`` puts an image this worker has
    just committed into the index at once, before its log row is read back. Applying is idempotent:
    an id already present is not added twice, and a removed id never comes back (an image leaves
    ``active`` for good), so a snapshot or a local add that runs ahead of the watermark is harmless.
    """

    def __init__(self, model_version: str, bits: int, backend: str = "cpu",
                 on_visible: Callable[[list[float]], None] | None = None) -> None:
        self.model_version = model_version
        self.bits = int(bits)
        self.index = HammingIndex(self.bits, backend)
        self.watermark = 0
        self._present: set[int] = set()
        self._removed: set[int] = set()
        self._lock = threading.RLock()
        self.created_at = time.time()
        self.caught_up_at: float | None = None  # last time a sync reached the head of the log
        self.snapshot_watermark = 0  # watermark of the snapshot this replica started from / last wrote
        self.applied_rows = 0
        #: seconds from a log row's write to its application here (rows read from the log only)
        self.visibility: deque[float] = deque(maxlen=10_000)
        self.on_visible = on_visible

    def __len__(self) -> int:
        return len(self.index)

    @property
    def lag_seconds(self) -> float:
        """Seconds since this replica last saw the head of the log (how stale it may be)."""
        ref = self.caught_up_at if self.caught_up_at is not None else self.created_at
        return max(0.0, time.time() - ref)

    def contains(self, image_id: int) -> bool:
        return int(image_id) in self._present

    # ------------------------------------------------------------------ applying

    def _add(self, ids: list[int], codes: list[bytes]) -> list[int]:
        keep, seen = [], set()
        for i, c in zip(ids, codes):  # an id already in the index, removed, or twice in these rows: added once
            if i not in self._present and i not in self._removed and i not in seen:
                seen.add(i)
                keep.append((i, c))
        if not keep:
            return []
        packed = np.frombuffer(b"".join(c for _, c in keep), dtype=np.uint8).reshape(len(keep), self.bits // 8)
        self.index.add(packed, np.array([i for i, _ in keep], dtype=np.int64))
        added = [i for i, _ in keep]
        self._present.update(added)
        return added

    def _remove(self, ids: list[int]) -> None:
        self._removed.update(ids)
        present = [i for i in ids if i in self._present]
        if present:
            self.index.remove(np.array(present, dtype=np.int64))
            self._present.difference_update(present)

    def apply(self, entries: Iterable[LogEntry]) -> int:
        """Apply log rows in order (their seq must be past the watermark); returns how many changed the index."""
        changed = 0
        now = time.time()
        delays: list[float] = []
        with self._lock:
            pending_ids: list[int] = []
            pending_codes: list[bytes] = []
            pending_times: list[float] = []

            def flush() -> int:
                added = set(self._add(pending_ids, pending_codes))
                delays.extend(now - t for i, t in zip(pending_ids, pending_times) if i in added)
                n = len(added)
                pending_ids.clear()
                pending_codes.clear()
                pending_times.clear()
                return n

            for e in entries:
                if e.seq <= self.watermark:
                    continue
                if e.op == "add":
                    if e.code is None or len(e.code) != self.bits // 8:
                        raise ValueError(f"index_log row {e.seq}: code of {0 if e.code is None else len(e.code)} "
                                         f"bytes for a {self.bits}-bit index")
                    pending_ids.append(e.image_id)
                    pending_codes.append(e.code)
                    pending_times.append(e.created_at)
                elif e.op == "remove":
                    changed += flush()
                    before = len(self._present)
                    self._remove([e.image_id])
                    changed += before - len(self._present)
                else:
                    raise ValueError(f"index_log row {e.seq}: unknown op {e.op!r}")
                self.watermark = e.seq
                self.applied_rows += 1
            changed += flush()
            self.visibility.extend(delays)
        if delays and self.on_visible is not None:
            self.on_visible(delays)
        return changed

    def add_local(self, image_id: int, code: bytes) -> bool:
        """Add an image this worker committed (its log row comes later); True if it was not there yet."""
        with self._lock:
            return bool(self._add([int(image_id)], [bytes(code)]))

    def sync(self, engine, chunk: int = SYNC_CHUNK) -> int:
        """Read and apply every log row past the watermark; returns how many rows were read."""
        total = 0
        while True:
            started = time.time()
            entries = read_log(engine, self.model_version, self.watermark, chunk)
            self.apply(entries)
            total += len(entries)
            if len(entries) < chunk:
                self.caught_up_at = started
                return total

    # ------------------------------------------------------------------ snapshots

    def save_snapshot(self, directory: str | Path) -> bool:
        """Write ``<version>.faiss`` and ``<version>.json`` (the watermark) under ``directory``.

        Skipped (False) when the snapshot there is already at or past this watermark. A file lock
        keeps several workers from interleaving their writes and readers from reading half of one.
        """
        index_path, meta_path, lock_path = snapshot_paths(directory, self.model_version)
        with _flock(lock_path, exclusive=True):
            existing = read_snapshot_meta(directory, self.model_version)
            if existing is not None and int(existing.get("watermark", -1)) >= self.watermark:
                return False
            with self._lock:
                tmp = index_path.with_name(f".{index_path.name}.{uuid.uuid4().hex}")
                self.index.save(tmp)
                meta = {
                    "model_version": self.model_version,
                    "bits": self.bits,
                    "watermark": self.watermark,
                    "n": len(self.index),
                    "removed": sorted(self._removed),
                    "written_at": time.time(),
                }
            os.replace(tmp, index_path)
            tmp_meta = meta_path.with_name(f".{meta_path.name}.{uuid.uuid4().hex}")
            tmp_meta.write_text(json.dumps(meta))
            os.replace(tmp_meta, meta_path)
        self.snapshot_watermark = meta["watermark"]
        log.info("index snapshot of %s written: %d codes at watermark %d", self.model_version, meta["n"],
                 meta["watermark"])
        return True

    @classmethod
    def load_snapshot(cls, directory: str | Path, model_version: str, backend: str = "cpu",
                      on_visible: Callable[[list[float]], None] | None = None) -> Replica | None:
        """The replica saved under ``directory`` for ``model_version``, or None (none, or unreadable)."""
        index_path, meta_path, lock_path = snapshot_paths(directory, model_version)
        if not meta_path.exists() or not index_path.exists():
            return None
        try:
            with _flock(lock_path, exclusive=False):
                meta = json.loads(meta_path.read_text())
                index = HammingIndex.load(index_path, backend)
        except Exception as exc:  # noqa: BLE001 - a bad snapshot only costs a full log replay
            log.warning("ignoring the index snapshot of %s: %s: %s", model_version, type(exc).__name__, exc)
            return None
        if meta.get("model_version") != model_version or len(index) != int(meta.get("n", -1)):
            log.warning("ignoring the index snapshot of %s: it does not match its watermark file", model_version)
            return None
        replica = cls(model_version, index.bits, backend, on_visible)
        replica.index = index
        replica.watermark = int(meta["watermark"])
        replica.snapshot_watermark = replica.watermark
        replica._present = {int(i) for i in index.ids()}
        replica._removed = {int(i) for i in meta.get("removed", [])}
        return replica

    @classmethod
    def bootstrap(cls, engine, model_version: str, bits: int, snapshot_dir: str | Path | None = None,
                  backend: str = "cpu", on_visible: Callable[[list[float]], None] | None = None) -> Replica:
        """A replica of ``model_version`` at the head of the log: from the snapshot if any, then the log."""
        replica = None
        if snapshot_dir is not None:
            replica = cls.load_snapshot(snapshot_dir, model_version, backend, on_visible)
            if replica is not None and replica.bits != bits:
                log.warning("ignoring the index snapshot of %s: %d bits, expected %d", model_version,
                            replica.bits, bits)
                replica = None
        started_from = "snapshot" if replica is not None else "empty"
        if replica is None:
            replica = cls(model_version, bits, backend, on_visible)
        # rows replayed while starting are not "visibility" of fresh writes: do not report them
        callback, replica.on_visible = replica.on_visible, None
        try:
            rows = replica.sync(engine)
        finally:
            replica.on_visible = callback
            replica.visibility.clear()
        log.info("replica of %s ready: %d codes (from %s at watermark %d, then %d log rows; watermark %d)",
                 model_version, len(replica), started_from, replica.snapshot_watermark, rows, replica.watermark)
        return replica
