"""The one Celery configuration shared by producers (send by task name) and workers (add tasks)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from celery.backends.redis import RedisBackend

from umcd.settings import Settings, get_settings

if TYPE_CHECKING:  # pragma: no cover
    import celery

#: queue name -> what it carries (the routing contract of docs/CONTRACTS.md)
QUEUES: dict[str, str] = {
    "detect": "query images to screen",
    "screen": "insertion images to screen (benign ones join the index)",
    "train": "CSQ training runs",
    "attack": "adversarial set generation",
    "eval": "benchmark runs",
}

#: task names (the contract) -> queue
TASK_NAMES: dict[str, str] = {
    "umcd.detect": "detect",
    "umcd.screen": "screen",
    "umcd.train": "train",
    "umcd.attack": "attack",
    "umcd.eval": "eval",
}

#: seconds Redis waits before redelivering an unacknowledged message (Celery's default: 1 hour)
VISIBILITY_TIMEOUT_S = 600
#: seconds a result stays in the result backend
RESULT_EXPIRES_S = 24 * 3600


def broker_urls(settings: Settings, *, start_embedded: bool = False) -> tuple[str, str]:
    """(broker URL, result backend URL) for these settings.

    ``broker_url`` None means the embedded broker on ``settings.artifacts/redis.sock`` (see
    :mod:`umcd.embedded`); it is started (or a live one reused) only with ``start_embedded``.
    ``result_backend`` None means the broker's Redis.
    """
    from umcd.embedded import ensure_embedded, socket_url

    broker = settings.broker_url
    if broker is None:
        if start_embedded:
            broker = ensure_embedded(settings.artifacts).url
        else:
            broker = socket_url(Path(settings.artifacts) / "redis.sock")
    backend = settings.result_backend or broker
    return broker, backend


def celery_config(settings: Settings, broker: str, backend: str) -> dict:
    """The Celery configuration mapping (lowercase setting names) for these URLs."""
    from kombu import Exchange, Queue

    return {
        "broker_url": broker,
        "result_backend": backend,
        # JSON only: a message in any other content type (pickle, yaml, msgpack) is refused
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        # queues and routing by task name
        "task_queues": tuple(
            Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES
        ),
        "task_default_queue": "detect",
        "task_default_exchange": "detect",
        "task_default_routing_key": "detect",
        "task_routes": {name: {"queue": q, "routing_key": q} for name, q in TASK_NAMES.items()},
        # at-least-once delivery: ack after the task ran, redeliver when a worker dies
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": settings.worker_prefetch,
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "broker_connection_retry_on_startup": True,
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,
        "result_expires": RESULT_EXPIRES_S,
        "redis_socket_timeout": 30.0,
        "redis_socket_connect_timeout": 5.0,
        "redis_retry_on_timeout": True,
        "result_extended": True,
        "task_track_started": True,
        # events for Flower
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "enable_utc": True,
        "timezone": "UTC",
        "worker_hijack_root_logger": False,
    }


class _RequestShown:
    """A task request as the result backend records it (``result_extended``): its ``args`` and
    ``kwargs`` are the reprs its message carries for events and Flower (``argsrepr``/``kwargsrepr``,
    set by the SDK, else Celery's 1 KiB ``saferepr``); every other attribute is the request's own."""

    __slots__ = ("_request",)

    def __init__(self, request) -> None:
        self._request = request

    def __getattr__(self, name: str):
        if name == "_request":  # not set (a copy made without __init__): no endless recursion
            raise AttributeError(name)
        return getattr(self._request, name)

    @property
    def args(self):
        return getattr(self._request, "argsrepr", None)

    @property
    def kwargs(self):
        return getattr(self._request, "kwargsrepr", None)


class FleetRedisBackend(RedisBackend):
    """Celery's Redis result backend, minus the pub/sub subscription a producer makes per message,
    and minus the copy of every message's images in its stored states.

    Stock Celery subscribes to every sent task's result channel before publishing (one extra
    round trip per message) and, with Redis down, retries that for 20 s and then leaves the
    app's result consumer dead until restart. Our producers poll results by id (``MGET``), so
    they skip it; ``AsyncResult.get()`` still works (it subscribes when called).

    With ``result_extended`` stock Celery also stores the task's ``args`` and ``kwargs`` in its
    STARTED and SUCCESS states: for a screening message those hold the inline images (base64, up
    to ``inline_image_limit`` each, up to 1,024 per batch message), kept for ``result_expires``
    (a day) and encoded, read back and decoded again at every state change. Here they are the
    message's reprs instead (the SDK's summary, ``<64 images>``); name, worker, queue and retries
    stay.
    """

    def on_task_call(self, producer, task_id):  # noqa: D102 - see the class docstring
        return None

    def _get_result_meta(self, result, state, traceback, request, format_date=True, encode=False):
        if request is not None:
            request = _RequestShown(request)
        return super()._get_result_meta(result, state, traceback, request, format_date=format_date, encode=encode)


def make_celery(settings: Settings | None = None, *, name: str = "umcd",
                start_embedded: bool = False) -> celery.Celery:
    """A Celery app configured from ``settings`` (default: :func:`umcd.settings.get_settings`).

    Producers use it as is and send tasks by name (``app.send_task("umcd.detect", ...)``);
    workers register their tasks on it. Nothing here imports torch. Building the app starts
    nothing: with no ``broker_url`` it points at the embedded broker's socket under
    ``artifacts``, and ``start_embedded=True`` also starts that broker if none is live there
    (a worker or producer entry point does this; importing a module that builds the app must not).
    """
    import celery

    settings = settings or get_settings()
    broker, backend = broker_urls(settings, start_embedded=start_embedded)
    app = celery.Celery(name, set_as_current=False)
    app.conf.update(celery_config(settings, broker, backend))
    # redis:// rediss:// redis+socket:// result backends use FleetRedisBackend (per app, not global)
    app.loader.override_backends = {"redis": f"{__name__}:FleetRedisBackend",
                                    "rediss": f"{__name__}:FleetRedisBackend"}
    return app


def redis_from_url(url: str, *, retries: int = 5, socket_timeout_s: float = 10.0):
    """A redis-py client for a broker/backend URL, with retries and exponential back-off.

    Understands ``redis://``, ``rediss://``, ``unix://`` and kombu's ``redis+socket:///path``
    (the embedded broker); with several ``;``-separated broker URLs, the first is used.
    Producers store large images here and workers read them back (``umcd:img:<request_id>:<16 hex>``).
    """
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    url = url.split(";", 1)[0].strip()
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not a URL: {url!r}")
    retry = Retry(ExponentialBackoff(cap=2.0, base=0.05), retries)
    common = {
        "retry": retry,
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
        "socket_timeout": socket_timeout_s,
    }
    if scheme in ("redis+socket", "socket"):
        path, _, query = rest.partition("?")
        db = 0
        for item in query.split("&"):
            key, _, value = item.partition("=")
            if key in ("virtual_host", "db") and value.isdigit():
                db = int(value)
        return redis.Redis(unix_socket_path=path, db=db, **common)
    if scheme in ("redis", "rediss", "unix"):
        return redis.Redis.from_url(url, socket_connect_timeout=socket_timeout_s, **common)
    raise ValueError(f"the broker {scheme}:// is not Redis: large images need a Redis broker")
