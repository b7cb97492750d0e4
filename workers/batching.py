"""An in-worker dynamic batcher: task threads hand items to one batching thread and wait on their own futures
(or, for the items of one message, on one :class:`BatchGroup`)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatcherStopped(RuntimeError):
    """The batcher was stopped: no new item is accepted and queued ones are failed with this."""


#: an outcome not in yet
PENDING = object()


class BatchGroup:
    """The outcomes of items queued together (``MicroBatcher.submit_many``): one wait for all of them.

    ``outcomes[i]`` is item i's result, the exception that failed it, or :data:`PENDING`. ``wait``
    returns when every item has its outcome (True) or when the timeout passes (False); ``cancel`` keeps
    the items not started yet out of any batch (they stay PENDING). A worker's message queues 256
    images at once: one ``concurrent.futures.Future`` each, with ``wait()``'s waiter on every one,
    cost ~8.8 µs of CPU an image on the development machine, this ~1.
    """

    __slots__ = ("outcomes", "cancelled", "_remaining", "_lock", "_done")

    def __init__(self, n: int) -> None:
        self.outcomes: list[Any] = [PENDING] * n
        self.cancelled = False
        self._remaining = n
        self._lock = threading.Lock()
        self._done = threading.Event()
        if n == 0:
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        self.cancelled = True

    def _set(self, index: int, outcome: Any) -> None:
        self.outcomes[index] = outcome
        with self._lock:
            self._remaining -= 1
            last = self._remaining == 0
        if last:
            self._done.set()


class _GroupSlot:
    """Item ``index`` of a :class:`BatchGroup`, answered as the batcher answers a ``Future``."""

    __slots__ = ("group", "index")

    def __init__(self, group: BatchGroup, index: int) -> None:
        self.group = group
        self.index = index

    def set_running_or_notify_cancel(self) -> bool:
        return not self.group.cancelled

    def set_result(self, result: Any) -> None:
        self.group._set(self.index, result)

    def set_exception(self, exc: BaseException) -> None:
        self.group._set(self.index, exc)


@dataclass
class BatchStats:
    """Counters of one batcher (read by metrics and tests): batches run, items seen, sizes."""

    batches: int = 0
    items: int = 0
    max_size: int = 0
    sizes: list[int] = field(default_factory=list)  # the last 1000 batch sizes

    def record(self, size: int) -> None:
        self.batches += 1
        self.items += size
        self.max_size = max(self.max_size, size)
        self.sizes.append(size)
        if len(self.sizes) > 1000:
            del self.sizes[:-1000]


class MicroBatcher(Generic[T, R]):
    """Gathers items submitted by many threads into batches for ``process`` and answers each on its own.

    ``process(items) -> outcomes`` runs on one background thread with a list of 1..``max_size``
    items and returns one outcome per item, in order: a result, or an exception instance that fails
    that item only. A batch is closed when it holds ``max_size`` items or ``max_wait_s`` seconds
    after its first item arrived, whichever comes first (items already queued when the wait ends
    still join, up to ``max_size``). If ``process`` raises for a batch of several items, each item
    is retried alone, so a poison item fails by itself and its batch-mates still get their results.

    ``process`` may also return a ``concurrent.futures.Future`` of those outcomes: the batch's last
    stage (storing its verdicts) then runs elsewhere and the batcher moves on to the next batch at once;
    each item's future is resolved when that future is. If it fails, every item of the batch fails with
    its exception (no one-by-one retry: the deferred stage is expected to isolate its own failures).

    ``submit(item)`` returns a ``concurrent.futures.Future`` resolved with that item's outcome;
    ``submit_many(items)`` queues several at once (one wake-up of the batching thread, not one each) and
    returns one :class:`BatchGroup` for them.
    While a batch gathers, the batching thread sleeps until it could be full or its wait is over:
    it is not woken for every item (each wake-up is a GIL hand-off with the submitting threads).

    Why not celery-batches: its 0.11 release pins ``celery<5.7`` (we run 5.7), and a late-acked
    batch task is acked as a whole even when it raises, so one failure loses or fails every message
    of the batch. Here each Celery message stays one task on a ``threads`` pool thread: it waits on
    its own future, returns its own Result, retries on its own, and is acked only when its verdict
    is stored; only the model call is shared.
    """

    def __init__(
        self,
        process: Callable[[list[T]], Sequence[R | BaseException]],
        *,
        max_size: int,
        max_wait_s: float,
        name: str = "umcd-batcher",
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.process = process
        self.max_size = int(max_size)
        self.max_wait_s = float(max_wait_s)
        self.name = name
        self.on_batch = on_batch  # (batch size, seconds spent in process) after every batch
        self.stats = BatchStats()
        #: queued (item, future or group slot) entries; None asks the batching thread to stop
        self._queue: deque[tuple[T, Future | _GroupSlot] | None] = deque()
        #: queued entries that would end the batching thread's current wait (1 while it waits for a first item)
        self._wanted = 1
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # start/stop against submit
        self._ready = threading.Condition(threading.Lock())  # guards _queue and _wanted

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> MicroBatcher[T, R]:
        """Start the batching thread (idempotent)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stopping.clear()
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop accepting items; finish the batch in progress and the items queued before the stop; fail
        what is still queued once ``timeout`` seconds have passed (the thread stuck in a batch)."""
        with self._lock:
            self._stopping.set()
            with self._ready:
                self._queue.append(None)
                self._ready.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        self._fail_queued(BatcherStopped("the batcher was stopped"))

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    def __enter__(self) -> MicroBatcher[T, R]:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ submitting

    def submit(self, item: T) -> Future:
        """Queue ``item``; the returned future holds its result (or raises its exception)."""
        future: Future = Future()
        self._enqueue([(item, future)])
        return future

    def submit_many(self, items: Sequence[T]) -> BatchGroup:
        """Queue ``items`` in order, at once; returns the :class:`BatchGroup` of their outcomes."""
        group = BatchGroup(len(items))
        self._enqueue([(item, _GroupSlot(group, i)) for i, item in enumerate(items)])
        return group

    def _enqueue(self, entries: list[tuple[T, Future | _GroupSlot]]) -> None:
        with self._lock:
            if self._stopping.is_set() or self._thread is None:
                raise BatcherStopped("the batcher is not running")
            with self._ready:
                self._queue.extend(entries)
                if len(self._queue) >= self._wanted:
                    self._ready.notify()

    # ------------------------------------------------------------------ the batching thread

    def _gather(self) -> list[tuple[T, Future | _GroupSlot]] | None:
        """The next batch: blocks for a first item, then gathers until full or the wait ends."""
        with self._ready:
            self._wanted = 1
            while not self._queue:
                self._ready.wait()
            first = self._queue.popleft()
            if first is None:
                return None
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_size:
                while self._queue and len(batch) < self.max_size:
                    entry = self._queue.popleft()
                    if entry is None:  # stop requested: run what we have, then exit
                        self._queue.appendleft(None)
                        return batch
                    batch.append(entry)
                remaining = deadline - time.monotonic()
                if len(batch) >= self.max_size or remaining <= 0:
                    break
                self._wanted = self.max_size - len(batch)  # a submitter wakes us when the batch could be full
                self._ready.wait(remaining)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
            if live:
                self._run_batch(live)
            if self._stopping.is_set() and not self._queue:
                return

    def _run_batch(self, batch: list[tuple[T, Future | _GroupSlot]]) -> None:
        items = [item for item, _ in batch]
        t0 = time.perf_counter()
        deferred: Future | None = None
        try:
            returned = self.process(items)
            if isinstance(returned, Future):
                deferred, outcomes = returned, []
            else:
                outcomes = list(returned)
                if len(outcomes) != len(items):
                    raise RuntimeError(f"batch function returned {len(outcomes)} outcomes for {len(items)} items")
        except BaseException as exc:  # noqa: BLE001 - isolate the poison item, never kill the thread
            if len(items) == 1:
                outcomes = [exc]
            else:
                log.warning("batch of %d failed (%s: %s); retrying its items one by one",
                            len(items), type(exc).__name__, exc)
                outcomes = [self._run_single(item) for item in items]
        elapsed = time.perf_counter() - t0
        self.stats.record(len(items))
        if self.on_batch is not None:
            try:
                self.on_batch(len(items), elapsed)
            except Exception:  # noqa: BLE001 - metrics must never fail a batch
                log.exception("on_batch callback failed")
        if deferred is not None:
            deferred.add_done_callback(lambda done: self._resolve_deferred(batch, done))
            return
        self._resolve(batch, outcomes)

    @staticmethod
    def _resolve(batch: list[tuple[T, Future | _GroupSlot]], outcomes: Sequence[R | BaseException]) -> None:
        for (_, future), outcome in zip(batch, outcomes):
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    def _resolve_deferred(self, batch: list[tuple[T, Future | _GroupSlot]], done: Future) -> None:
        """Resolve a batch's item futures from the future its ``process`` call returned."""
        try:
            outcomes = list(done.result())
            if len(outcomes) != len(batch):
                raise RuntimeError(f"batch function returned {len(outcomes)} outcomes for {len(batch)} items")
        except BaseException as exc:  # noqa: BLE001 - a cancelled or failed stage fails its items
            log.warning("the deferred stage of a batch of %d failed (%s: %s)", len(batch), type(exc).__name__, exc)
            outcomes = [exc] * len(batch)
        self._resolve(batch, outcomes)

    def _run_single(self, item: T) -> R | BaseException:
        try:
            returned = self.process([item])
            (outcome,) = returned.result() if isinstance(returned, Future) else returned
            return outcome
        except BaseException as exc:  # noqa: BLE001
            return exc

    def _fail_queued(self, exc: BaseException) -> None:
        with self._ready:
            entries, self._queue = list(self._queue), deque()
        for entry in entries:
            if entry is not None and entry[1].set_running_or_notify_cancel():
                entry[1].set_exception(exc)
