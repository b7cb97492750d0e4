"""The worker-side Celery app (`celery -A workers.app worker ...`): tasks, and the detection runtime's lifecycle."""

from __future__ import annotations

import logging

from celery import signals

from umcd.celeryconf import make_celery
from umcd.settings import get_settings
from workers.tasks import register_tasks

log = logging.getLogger(__name__)

#: queues served by detection workers (one process per GPU, a thread pool, the model loaded once)
DETECT_QUEUES = ("detect", "screen")
#: queues served by the cpu worker (one task at a time)
CPU_QUEUES = ("train", "attack", "eval")

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


@signals.worker_init.connect
def _start_in_main_process(sender=None, **_):
    """threads/solo pools: load the model in this (the only) process before consuming anything."""
    if sender is None or getattr(sender, "app", None) is not app:
        return
    _configure_logging()
    if not _serves_detection(sender):
        return
    if _is_prefork(sender):
        log.warning("a prefork pool loads one model per child process; prefer `-P threads` for detection")
        return  # worker_process_init starts it in each child, after the fork
    from workers.runtime import get_runtime

    get_runtime(broker_url=app.conf.broker_url)


@signals.worker_process_init.connect
def _start_in_child(**_):
    """prefork pools: each child loads its own model after the fork (CUDA does not survive a fork)."""
    selected = getattr(app.amqp.queues, "consume_from", None)
    if not selected or any(q in selected for q in DETECT_QUEUES):
        from workers.runtime import get_runtime

        get_runtime(broker_url=app.conf.broker_url)


@signals.worker_shutdown.connect
def _stop(**_):
    from workers.runtime import stop_runtime

    stop_runtime()


def _configure_logging() -> None:
    """Our loggers at UMCD_LOG_LEVEL on stderr (the app leaves the root logger to whoever runs it)."""
    level = getattr(logging, str(get_settings().log_level).upper(), logging.INFO)
    for name in ("workers", "db", "core"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not logger.handlers and not logging.getLogger().handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("[%(asctime)s: %(levelname)s/%(threadName)s] %(name)s: %(message)s"))
            logger.addHandler(handler)
