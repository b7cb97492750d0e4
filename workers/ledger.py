"""The request ledger: producers list every message they send; workers strike it off and re-send what the broker lost."""

# Why: Celery's Redis transport pops a message with BRPOP and only then records it as unacknowledged.
# A worker killed in between (SIGKILL, OOM, a lost machine) takes the message with it: it is in no
# queue and in no ``unacked`` hash, so ``acks_late`` and ``visibility_timeout`` never bring it back
# (celery/kombu#305, celery/celery#4354). Under load a killed worker almost always has a BRPOP
# reply in its socket, so a hard kill would lose a request now and then.
#
# The ledger closes that window. Before publishing, the SDK (producers/sdk.py) stores the message
# (task name, kwargs, queue) under ``umcd:ledger:msg:<task id>`` and adds the id to the sorted set
# ``umcd:ledger`` (score: when it was last seen, epoch seconds). A worker touches the entry when it
# starts the task (each delivery, each retry) and strikes it off when the task has finished for good
# (success or final failure; a retry keeps it). Every detection worker runs a :class:`Redriver`
# that re-sends the messages not seen for ``2 x visibility_timeout``: long enough for the broker
# to have redelivered anything it still knew about. Re-sending is safe because every write is
# idempotent on the request id; at worst a request is scored twice and keeps its first verdict.
# The key names are a contract with producers/sdk.py (which cannot import workers).

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

#: sorted set: task id -> epoch seconds it was last sent or started
LEDGER_KEY = "umcd:ledger"
#: prefix of the JSON ``{"task", "kwargs", "queue"}`` of each listed message
PAYLOAD_PREFIX = "umcd:ledger:msg:"
#: a short lock so that one worker at a time sweeps
LOCK_KEY = "umcd:ledger:lock"
#: the task names whose messages the SDK lists (the screening tasks)
LEDGER_TASKS = frozenset({"umcd.detect", "umcd.screen", "umcd.detect_batch", "umcd.screen_batch"})
#: messages re-sent per sweep at most
SWEEP_LIMIT = 500


def redrive_after_s(app: Any) -> float:
    """Seconds a listed message may go unseen before it is re-sent: twice the broker's visibility timeout."""
    options = app.conf.broker_transport_options or {}
    return 2.0 * float(options.get("visibility_timeout", 3600))


def touch(redis: Any, task_id: str, now: float | None = None) -> None:
    """Mark a listed message as seen now (a worker started it); unlisted ids stay unlisted."""
    redis.zadd(LEDGER_KEY, {task_id: time.time() if now is None else now}, xx=True)


def strike(redis: Any, task_id: str) -> None:
    """Take a message off the ledger: its task finished for good."""
    with redis.pipeline(transaction=False) as pipe:
        pipe.zrem(LEDGER_KEY, task_id)
        pipe.delete(PAYLOAD_PREFIX + task_id)
        pipe.execute()


def listed(redis: Any) -> dict[str, float]:
    """Every listed task id with the time it was last seen (for tests and operators)."""
    return {k.decode() if isinstance(k, bytes) else k: float(v)
            for k, v in redis.zrange(LEDGER_KEY, 0, -1, withscores=True)}


def sweep(redis: Any, app: Any, after_s: float, *, now: float | None = None, limit: int = SWEEP_LIMIT) -> list[str]:
    """Re-send the listed messages unseen for ``after_s`` seconds; returns their task ids.

    Entries whose stored message has expired are dropped. A re-sent message keeps its task id, so
    its Result and verdict row are the ones the producer waits for.
    """
    now = time.time() if now is None else now
    stale = [k.decode() if isinstance(k, bytes) else k
             for k in redis.zrangebyscore(LEDGER_KEY, "-inf", now - after_s, start=0, num=limit)]
    if not stale:
        return []
    payloads = redis.mget([PAYLOAD_PREFIX + tid for tid in stale])
    sent: list[str] = []
    expired: list[str] = []
    for tid, raw in zip(stale, payloads):
        if raw is None:
            expired.append(tid)
            continue
        try:
            message = json.loads(raw)
            if not (isinstance(message, dict) and isinstance(message.get("task"), str)
                    and isinstance(message.get("kwargs"), dict)):
                raise ValueError("not an object with a task name and its kwargs")
        except ValueError as exc:  # one bad entry is dropped; it must not stop the sweep for the others
            log.error("ledger entry %s is unreadable (%s); dropping it", tid, exc)
            expired.append(tid)
            continue
        options = {"queue": message["queue"]} if isinstance(message.get("queue"), str) and message["queue"] else {}
        # refresh first (XX: an entry struck off meanwhile stays off), then send
        redis.zadd(LEDGER_KEY, {tid: now}, xx=True)
        app.send_task(message["task"], kwargs=message["kwargs"], task_id=tid, **options)
        sent.append(tid)
    if expired:
        redis.zrem(LEDGER_KEY, *expired)
    if sent:
        log.warning("re-sent %d message(s) the broker lost (unseen for %.0f s): %s", len(sent), after_s,
                    ", ".join(sent[:10]) + (" ..." if len(sent) > 10 else ""))
    return sent


class Redriver:
    """A daemon thread of a detection worker: every ``interval_s`` it sweeps the ledger (one worker at a time)."""

    def __init__(self, app: Any, redis: Any, *, after_s: float | None = None, interval_s: float | None = None,
                 name: str = "worker") -> None:
        self.app = app
        self.redis = redis
        self.after_s = redrive_after_s(app) if after_s is None else float(after_s)
        self.interval_s = float(interval_s) if interval_s is not None else max(1.0, min(60.0, self.after_s / 4))
        self.name = name
        self.resent = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Redriver:
        self._thread = threading.Thread(target=self._run, name="umcd-ledger-redrive", daemon=True)
        self._thread.start()
        log.info("ledger re-drive: messages unseen for %.0f s are re-sent (sweep every %.0f s)", self.after_s,
                 self.interval_s)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def sweep_once(self) -> list[str]:
        """One sweep if no other worker holds the sweep lock; returns the re-sent task ids."""
        if not self.redis.set(LOCK_KEY, self.name, nx=True, ex=max(1, int(self.interval_s))):
            return []
        sent = sweep(self.redis, self.app, self.after_s)
        self.resent += len(sent)
        return sent

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep_once()
            except Exception as exc:  # noqa: BLE001 - the broker may be down: try at the next sweep
                log.warning("ledger sweep failed (%s: %s); retrying", type(exc).__name__, exc)
