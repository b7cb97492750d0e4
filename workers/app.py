"""The worker-side Celery app (`celery -A workers.app worker ...`): tasks, and the detection runtime's lifecycle."""

from __future__ import annotations

import functools
import logging
import threading

import redis
from celery import bootsteps, signals

from umcd.celeryconf import make_celery
from umcd.settings import get_settings
from workers.tasks import register_tasks

log = logging.getLogger(__name__)

#: queues served by detection workers (one process per GPU, a thread pool, the model loaded once)
DETECT_QUEUES = ("detect", "screen")
#: queues served by the cpu worker (one task at a time)
CPU_QUEUES = ("train", "attack", "eval")



def tolerate_collected_redis_channels() -> None:
    """Keep a worker alive when Redis goes away while it holds unacknowledged messages (kombu/Celery 5.7).

    On a broker connection error Celery first ``collect()``s the connection, which drops the
    transport's client, then closes it. A channel whose first close was cut short by the dead
    socket (a BRPOP in flight) then tries to restore its unacknowledged messages through the
    dropped client: ``AttributeError: 'NoneType' object has no attribute 'hostname'`` escapes, Celery
    logs "Unrecoverable error" and the worker stops consuming for good. Those messages are still in
    the broker's ``unacked`` set and come back after ``visibility_timeout``, so the channel may close
    without restoring them. Idempotent.
    """
    from kombu.transport import redis as kombu_redis

    close = kombu_redis.Channel.close
    if getattr(close, "__umcd_tolerant__", False):
        return

    @functools.wraps(close)
    def tolerant_close(self):
        try:
            return close(self)
        except (AttributeError, redis.exceptions.ConnectionError):
            if getattr(self.connection, "client", None) is not None:
                raise
            log.warning("broker connection lost: %d unacknowledged message(s) stay with the broker and come back "
                        "after its visibility timeout", len(getattr(self._qos, "_delivered", None) or ()))
            self.closed = True
            return None

    tolerant_close.__umcd_tolerant__ = True
    kombu_redis.Channel.close = tolerant_close

    # The same dropped client reaches the periodic sweep that restores unacked messages
    # (MultiChannelPoller.maybe_restore_messages, on the event loop's timer): it catches connection
    # errors but not this AttributeError, which then stops the worker. Skip the cycle instead; the
    # next tick after reconnecting restores them.
    restore = kombu_redis.MultiChannelPoller.maybe_restore_messages

    @functools.wraps(restore)
    def tolerant_restore(self):
        try:
            return restore(self)
        except AttributeError:
            if all(getattr(ch.connection, "client", None) is not None for ch in self._channels):
                raise
            log.warning("broker connection lost: skipping this restore cycle of unacknowledged messages")
            return None

    tolerant_restore.__umcd_tolerant__ = True
    kombu_redis.MultiChannelPoller.maybe_restore_messages = tolerant_restore


def reuse_redis_clients() -> None:
    """Let each kombu Redis channel reuse one synchronous client per connection pool (kombu 5.7).

    ``Channel.conn_or_acquire()`` without a client builds a new ``redis.Redis`` for every fanout
    publish (every task event of ``-E``, every remote-control reply); redis-py's client constructor
    builds its response-callback tables each time, ~0.7 ms of CPU per message in a profile of a
    detection worker. A client is only a handle over the channel's thread-safe pool, so one per
    pool is equivalent; a replaced pool (after a reconnect) gets a fresh one. Idempotent.
    """
    from kombu.transport import redis as kombu_redis

    create = kombu_redis.Channel._create_client
    if getattr(create, "__umcd_cached__", False):
        return

    @functools.wraps(create)
    def cached_create(self, asynchronous=False):
        if asynchronous:
            return create(self, asynchronous)
        try:
            pool = self.pool
        except AttributeError:
            # Redis went away and Celery collected the connection: kombu would raise this
            # AttributeError from deep inside (an ack of a finished task then stops the worker, as
            # seen in the broker-restart chaos test); a connection error is what its callers handle
            # (the ack is logged as failed, the message stays unacked and comes back)
            if getattr(self.connection, "client", None) is None:
                raise redis.exceptions.ConnectionError("the broker connection was closed (Redis went away)") from None
            raise
        cached = self.__dict__.get("_umcd_sync_client")
        if cached is None or cached.connection_pool is not pool:
            cached = create(self, False)
            self.__dict__["_umcd_sync_client"] = cached
        return cached

    cached_create.__umcd_cached__ = True
    kombu_redis.Channel._create_client = cached_create


tolerate_collected_redis_channels()
reuse_redis_clients()
app = make_celery(name="umcd")
tasks = register_tasks(app)


def _serves_detection(worker) -> bool:
    """Whether a starting worker consumes ``detect`` or ``screen`` (no ``-Q``: every queue)."""
    selected = getattr(worker.app.amqp.queues, "consume_from", None)
    return not selected or any(q in selected for q in DETECT_QUEUES)


def _is_prefork(worker) -> bool:
    from celery import concurrency
    from celery.concurrency.prefork import TaskPool

    pool = worker.pool_cls
    if isinstance(pool, str):
        pool = concurrency.get_implementation(pool)
    return isinstance(pool, type) and issubclass(pool, TaskPool)


class DetectionRuntimeStep(bootsteps.StartStopStep):
    """Worker bootstep: load the model and start the runtime after logging is set up and before the
    consumer takes any message (threads/solo pools: one process, no fork). Prefork children start
    their own in ``worker_process_init``."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)
        self.enabled = _serves_detection(worker) and not _is_prefork(worker)

    def start(self, worker):
        _configure_logging()
        from workers.runtime import get_runtime

        get_runtime(broker_url=app.conf.broker_url, worker_process=True)
        _start_redriver(getattr(worker, "hostname", None) or "worker")

    def stop(self, worker):
        from workers.runtime import stop_runtime

        _stop_redriver()
        stop_runtime()


app.steps["worker"].add(DetectionRuntimeStep)

#: the queues of the cpu worker's tasks, by task name (their outcomes are counted in umcd_requests_total)
LONG_TASK_QUEUES = {"umcd.train": "train", "umcd.attack": "attack", "umcd.eval": "eval"}


class MonitoringStep(bootsteps.StartStopStep):
    """Worker bootstep of the workers that serve no detection (the cpu worker: train, attack, eval): our log
    level and the /metrics endpoint (``UMCD_METRICS_PORT``), which a detection worker gets from its runtime.
    Its health check and Prometheus read that endpoint."""

    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)
        self.enabled = not _serves_detection(worker)

    def start(self, worker):
        from workers import metrics

        _configure_logging()
        metrics.serve(get_settings().metrics_port)


app.steps["worker"].add(MonitoringStep)


@signals.task_postrun.connect
def _count_long_task(sender=None, state=None, **_):
    """``umcd_requests_total{queue=train|attack|eval, outcome=ok|error}`` (detect and screen count verdicts)."""
    queue = LONG_TASK_QUEUES.get(getattr(sender, "name", None))
    if queue is not None and state in ("SUCCESS", "FAILURE"):
        from workers import metrics

        metrics.count(queue, "ok" if state == "SUCCESS" else "error")


@signals.worker_process_init.connect
def _start_in_child(**_):
    """prefork pools: each child loads its own model after the fork (CUDA does not survive a fork)."""
    selected = getattr(app.amqp.queues, "consume_from", None)
    if not selected or any(q in selected for q in DETECT_QUEUES):
        from workers.runtime import get_runtime

        get_runtime(broker_url=app.conf.broker_url, worker_process=True)


@signals.worker_shutdown.connect
def _stop(**_):
    from workers.runtime import stop_runtime

    _stop_redriver()
    stop_runtime()


# --------------------------------------------------------------------------- the request ledger (workers/ledger.py)

_ledger: dict[str, object] = {}
_ledger_lock = threading.Lock()


def _ledger_redis():
    """The broker's Redis for the ledger, or None when the broker is not Redis."""
    with _ledger_lock:
        if "redis" not in _ledger:
            from umcd.celeryconf import redis_from_url

            try:
                _ledger["redis"] = redis_from_url(app.conf.broker_url, retries=1, socket_timeout_s=5.0)
            except ValueError:
                _ledger["redis"] = None
        return _ledger["redis"]


def _start_redriver(name: str) -> None:
    from workers.ledger import Redriver

    redis = _ledger_redis()
    with _ledger_lock:
        if redis is not None and "redriver" not in _ledger:
            _ledger["redriver"] = Redriver(app, redis, name=name).start()


def _stop_redriver() -> None:
    with _ledger_lock:
        redriver = _ledger.pop("redriver", None)
    if redriver is not None:
        redriver.stop()


@signals.task_prerun.connect
def _ledger_seen(task_id=None, task=None, **_):
    """A listed message is being run: it is not lost (its entry's clock restarts)."""
    from workers.ledger import LEDGER_TASKS, touch

    if task is None or task.name not in LEDGER_TASKS or not task_id:
        return
    try:
        redis = _ledger_redis()
        if redis is not None:
            touch(redis, task_id)
    except Exception as exc:  # noqa: BLE001 - the ledger never fails a task: at worst a redundant re-send
        log.debug("ledger touch of %s failed: %s", task_id, exc)


@signals.task_postrun.connect
def _ledger_done(task_id=None, task=None, state=None, **_):
    """Strike a message off the ledger once its task finished for good (a retry or a reject keeps it)."""
    from workers.ledger import LEDGER_TASKS, strike

    if task is None or task.name not in LEDGER_TASKS or not task_id or state not in ("SUCCESS", "FAILURE"):
        return
    try:
        redis = _ledger_redis()
        if redis is not None:
            strike(redis, task_id)
    except Exception as exc:  # noqa: BLE001 - left listed: the re-drive finds its verdict stored and answers again
        log.debug("ledger strike of %s failed: %s", task_id, exc)


def _configure_logging() -> None:
    """Our loggers at UMCD_LOG_LEVEL (Celery's worker logging handles the output)."""
    level = getattr(logging, str(get_settings().log_level).upper(), logging.INFO)
    for name in ("workers", "db", "core"):
        logging.getLogger(name).setLevel(level)
