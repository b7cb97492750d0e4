"""The Python SDK: submit query/insert images by task name and wait for their Results."""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Union

from db.contract import metadata_problem
from producers.results import Result, new_request_id, validate_request_id
from umcd.settings import Settings, get_settings

log = logging.getLogger(__name__)

ImageInput = Union[bytes, bytearray, memoryview, str, os.PathLike]

#: the Redis key prefix of images too large to travel inline (the worker only reads these keys)
IMAGE_KEY_PREFIX = "umcd:img:"
#: the request ledger (a contract with workers/ledger.py): sorted set of listed message ids, and the
#: prefix of each listed message's JSON; workers re-send a listed message nobody started for a while
LEDGER_KEY = "umcd:ledger"
LEDGER_PAYLOAD_PREFIX = "umcd:ledger:msg:"
#: the tasks whose messages are listed (the screening tasks)
LEDGER_TASKS = frozenset({"umcd.detect", "umcd.screen", "umcd.detect_batch", "umcd.screen_batch"})
#: Celery's publish retry policy when the broker is down: ~10 s of back-off, then BrokerUnavailable
DEFAULT_RETRY_POLICY = {"max_retries": 8, "interval_start": 0.0, "interval_step": 0.25, "interval_max": 2.0}
_READY = frozenset({"SUCCESS", "FAILURE", "REVOKED", "REJECTED", "IGNORED"})
#: the batch task of each single-image task, and its queue (one message, many images, a Result per image)
BATCH_TASKS = {"umcd.detect": ("umcd.detect_batch", "detect"), "umcd.screen": ("umcd.screen_batch", "screen")}
#: images per batch message by default: four of the workers' default model batches (64). A message costs
#: its worker ~4 ms of CPU whatever it holds (Celery's trace, task events, the summary Result, the ack) and
#: the producer and Redis ~2.5 ms more; at 64 images a message that was ~0.1 ms of an image's ~1.2 ms. With
#: pixel arrays, 256-image messages answered 7-19% more images/s than 64-image ones, paired in one run
DEFAULT_BATCH_SIZE = 256
#: a batch message is closed once its inline images hold this many bytes (base64 counted)
BATCH_MESSAGE_BYTES = 4 * 1024 * 1024
#: the most pixel bytes one message's array holds (workers refuse arrays over workers.imaging.MAX_ARRAY_BYTES)
ARRAY_MESSAGE_BYTES = 32 * 1024 * 1024
#: the most file bytes one message's blob holds (workers refuse blobs over workers.imaging.MAX_ARRAY_BYTES); a
#: larger file (settings.max_image_bytes may allow one) travels under a Redis key of its own
BLOB_MESSAGE_BYTES = 32 * 1024 * 1024



def kwargs_summary(kwargs: dict[str, Any]) -> str:
    """What task events, logs and Flower show of a message's kwargs: images replaced by a summary.

    Celery would otherwise ``repr`` the kwargs on the worker for every message (base64 image data
    in every event: slow, large, and nothing a monitoring page should hold).
    """
    shown: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key == "image":
            shown[key] = "<image>"
        elif key == "items" and isinstance(value, list):
            shown[key] = f"<{len(value)} images>"
        else:
            shown[key] = value
    return repr(shown)[:1024]

def pixel_array(images: Any, max_image_bytes: int) -> Any:
    """``images`` as an ``(n, H, W, C)`` uint8 array when it is a numpy array (C 1 or 3), else None.

    A numpy array must be uint8 of shape ``(n, H, W)`` (gray) or ``(n, H, W, C)`` with C 1 or 3, at
    least one image, each within ``max_image_bytes``: anything else raises ``ValueError`` (or
    :class:`ImageTooLarge`) before anything is sent.
    """
    np = sys.modules.get("numpy")  # an ndarray can only exist once numpy was imported
    if np is None or not isinstance(images, np.ndarray):
        return None
    if images.dtype != np.uint8:
        raise ValueError(f"a pixel array must be uint8 (0..255), not {images.dtype}: convert it first, "
                         "e.g. (x * 255).round().clip(0, 255).astype(numpy.uint8) for floats in [0, 1]")
    if images.ndim == 3 and images.shape[-1] in (1, 3, 4):
        raise ValueError(f"a pixel array of shape {tuple(images.shape)} reads as {images.shape[0]} gray images "
                         f"{images.shape[-1]} pixels wide: for one colour image pass a batch of one, "
                         "image[None] (shape (1, H, W, C))")
    array = images[..., None] if images.ndim == 3 else images
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"a pixel array must have shape (n, H, W) or (n, H, W, C) with C 1 or 3, "
                         f"not {tuple(images.shape)}")
    if len(array) == 0 or 0 in array.shape[1:3]:
        raise ValueError(f"a pixel array of shape {tuple(images.shape)} holds no image")
    per_image = int(np.prod(array.shape[1:]))
    if per_image > max_image_bytes:
        raise ImageTooLarge(f"images of {per_image} bytes exceed the limit of {max_image_bytes} bytes")
    return array


class ImageTooLarge(ValueError):
    """The image has more bytes than ``settings.max_image_bytes``."""


class BrokerUnavailable(RuntimeError):
    """The broker (or its Redis) could not be reached after the retries."""


def check_image(image: ImageInput, max_bytes: int) -> None:
    """What :func:`read_image` would refuse, found without reading: a wrong type, a missing path or
    directory, more than ``max_bytes``."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        size = len(image) if not isinstance(image, memoryview) else image.nbytes
        if size > max_bytes:
            raise ImageTooLarge(f"image of {size} bytes exceeds the limit of {max_bytes} bytes")
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        stat = path.stat()  # FileNotFoundError names the path
        if not path.is_file():
            raise IsADirectoryError(f"{path}: not a regular file")
        if not os.access(path, os.R_OK):
            raise PermissionError(f"{path}: not readable")
        if stat.st_size > max_bytes:
            raise ImageTooLarge(f"{path}: {stat.st_size} bytes exceeds the limit of {max_bytes} bytes")
    else:
        raise TypeError(f"image must be bytes or a path, not {type(image).__name__}")


def read_image(image: ImageInput, max_bytes: int) -> bytes:
    """The bytes of ``image`` (bytes, or a path read here), refusing what :func:`check_image` refuses."""
    check_image(image, max_bytes)
    data = bytes(image) if isinstance(image, (bytes, bytearray, memoryview)) else Path(image).read_bytes()
    if len(data) > max_bytes:  # a file that grew after its check
        raise ImageTooLarge(f"image of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    return data


class Client:
    """Sends ``umcd.detect`` (queries) and ``umcd.screen`` (insertions) and reads their Results.

    ``submit_queries``/``submit_inserts`` with ``batch=True`` send ``umcd.detect_batch`` /
    ``umcd.screen_batch`` messages of many images instead; each image still has its own request id.

    The task id of every message is its request id, so ``wait``/``result`` look Results up by
    request id. Images up to ``settings.inline_image_limit`` bytes travel inline (base64);
    larger ones are stored in the broker's Redis under ``umcd:img:<request_id>:<random>`` for
    ``settings.image_ref_ttl_s`` seconds. Sending retries with back-off while the broker is down
    and raises :class:`BrokerUnavailable` after ``retry_policy`` is exhausted. With no
    ``broker_url``, the embedded broker under ``artifacts`` is started unless one is live there
    (``start_embedded``); it outlives this client (``umcd broker stop`` stops it).
    """

    def __init__(self, settings: Settings | None = None, *, app: Any = None, redis_client: Any = None,
                 retry_policy: dict[str, float] | None = None, start_embedded: bool = True) -> None:
        self.settings = settings or get_settings()
        if app is None:
            from umcd.celeryconf import make_celery

            app = make_celery(self.settings, name="umcd-producer", start_embedded=start_embedded)
        self.app = app
        self._redis = redis_client
        self.retry_policy = dict(retry_policy or DEFAULT_RETRY_POLICY)

    # ------------------------------------------------------------------ plumbing

    @property
    def redis(self) -> Any:
        """The broker's Redis (redis-py), created on first use."""
        if self._redis is None:
            from umcd.celeryconf import redis_from_url

            self._redis = redis_from_url(self.app.conf.broker_url,
                                         retries=int(self.retry_policy.get("max_retries", 8)))
        return self._redis

    def image_ref(self, request_id: str, data: bytes) -> dict[str, str]:
        """The ImageRef for ``data``: inline base64, or a Redis key with a TTL for large images."""
        if len(data) <= self.settings.inline_image_limit:
            return {"inline": base64.b64encode(data).decode("ascii")}
        import redis

        # a key of this message's own: a request id sent again (by this caller or another) never replaces the
        # image a message still waiting in the queue points to
        key = f"{IMAGE_KEY_PREFIX}{request_id}:{uuid.uuid4().hex[:16]}"
        try:
            self.redis.set(key, data, ex=self.settings.image_ref_ttl_s)
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"could not store the image in Redis: {exc}") from exc
        return {"redis_key": key}

    def _request_id(self, request_id: str | None) -> str:
        return new_request_id() if request_id is None else validate_request_id(request_id)

    def _send(self, task: str, kwargs: dict[str, Any], request_id: str, producer: Any = None,
              queue: str | None = None) -> None:
        from kombu.exceptions import OperationalError

        options = {"queue": queue} if queue is not None else {}
        listed = self._list_in_ledger(task, kwargs, request_id, queue)
        try:
            self.app.send_task(task, kwargs=kwargs, task_id=request_id, producer=producer,
                               retry=True, retry_policy=self.retry_policy, argsrepr="()",
                               kwargsrepr=kwargs_summary(kwargs), **options)
        except OperationalError as exc:
            if listed:
                self._unlist(request_id)
            raise BrokerUnavailable(f"could not send {task} {request_id}: {exc}") from exc

    def _list_in_ledger(self, task: str, kwargs: dict[str, Any], message_id: str, queue: str | None) -> bool:
        """List the message in the request ledger before it is published (see workers/ledger.py).

        A worker killed right after popping a message from Redis loses it for good; workers re-send
        listed messages that nobody started for a while. Returns False when the broker is not Redis.
        """
        import json

        import redis

        if task not in LEDGER_TASKS:
            return False
        try:
            client = self.redis
        except ValueError:  # not a Redis broker: no ledger
            return False
        ttl = int(self.settings.image_ref_ttl_s)
        payload = json.dumps({"task": task, "kwargs": kwargs, "queue": queue}, separators=(",", ":"))
        try:
            with client.pipeline(transaction=True) as pipe:
                pipe.set(LEDGER_PAYLOAD_PREFIX + message_id, payload, ex=ttl)
                pipe.zadd(LEDGER_KEY, {message_id: time.time()})
                pipe.expire(LEDGER_KEY, ttl)
                pipe.execute()
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"could not list {task} {message_id} in the ledger: {exc}") from exc
        return True

    def _unlist(self, message_id: str) -> None:
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                pipe.zrem(LEDGER_KEY, message_id)
                pipe.delete(LEDGER_PAYLOAD_PREFIX + message_id)
                pipe.execute()
        except Exception:  # noqa: BLE001 - the broker is down: a stale entry is re-sent later, harmlessly
            log.debug("could not take %s off the ledger", message_id)

    def _submit(self, task: str, image: ImageInput, request_id: str | None, extra: dict[str, Any],
                producer: Any = None) -> str:
        rid = self._request_id(request_id)
        data = read_image(image, self.settings.max_image_bytes)
        kwargs = {"request_id": rid, "image": self.image_ref(rid, data), "submitted_at": time.time(), **extra}
        self._send(task, kwargs, rid, producer)
        return rid

    @staticmethod
    def _query_extra(client: str | None) -> dict[str, Any]:
        """A query's metadata; ``ValueError`` for what the audit store cannot hold (``db.contract``)."""
        problem = metadata_problem(client=client)
        if problem is not None:
            raise ValueError(problem)
        return {"client": client}

    @staticmethod
    def _insert_extra(source: str | None, label: int | None, client: str | None) -> dict[str, Any]:
        """An insertion's metadata; ``ValueError`` for what the audit store cannot hold (``db.contract``)."""
        problem = metadata_problem(client=client, source=source, label=label)
        if problem is not None:
            raise ValueError(problem)
        return {"client": client, "source": source, "label": label}

    # ------------------------------------------------------------------ submitting

    def submit_query(self, image: ImageInput, request_id: str | None = None, client: str | None = None) -> str:
        """Queue a query image on ``detect``; returns its request id."""
        return self._submit("umcd.detect", image, request_id, self._query_extra(client))

    def submit_insert(self, image: ImageInput, request_id: str | None = None, source: str | None = None,
                      label: int | None = None, client: str | None = None) -> str:
        """Queue an insertion image on ``screen`` (it joins the index if benign); returns its request id."""
        return self._submit("umcd.screen", image, request_id, self._insert_extra(source, label, client))

    def submit_queries(self, images: Iterable[ImageInput], request_ids: Sequence[str | None] | None = None,
                       client: str | None = None,
                       on_sent: Callable[[int, str], None] | None = None, *, batch: bool = False,
                       batch_size: int = DEFAULT_BATCH_SIZE) -> list[str]:
        """Queue several query images over one broker connection; returns their request ids in order.

        ``on_sent(index, request_id)`` is called after each image is sent (for progress bars). With
        ``batch``, images travel ``batch_size`` to a message (``umcd.detect_batch``): far less broker
        and worker overhead per image, the same Result per request id, read with :meth:`wait`.

        ``images`` may also be a numpy array of decoded pixels, uint8 of shape ``(n, H, W)`` or
        ``(n, H, W, C)`` (C 1 or 3): it always travels in batch messages, each message's pixels stored
        once in Redis, with no image file to encode or decode (the scores are those of a PNG of the
        same pixels).

        Before anything is sent, every request id is checked (and may be given to one image only), and
        every image file is checked to exist within ``settings.max_image_bytes``. If sending still stops
        part way (the broker goes away, a file vanishes), the exception raised has ``sent``: the request
        ids already queued, whose Results will come.
        """
        return self._submit_many("umcd.detect", images, request_ids, self._query_extra(client), on_sent, batch,
                                 batch_size)

    def submit_inserts(self, images: Iterable[ImageInput], request_ids: Sequence[str | None] | None = None,
                       source: str | None = None, label: int | None = None, client: str | None = None,
                       on_sent: Callable[[int, str], None] | None = None, *, batch: bool = False,
                       batch_size: int = DEFAULT_BATCH_SIZE) -> list[str]:
        """Queue several insertion images over one broker connection; returns their request ids.

        ``batch``: ``batch_size`` images to a message (``umcd.screen_batch``), and numpy pixel arrays, as in
        :meth:`submit_queries`.
        """
        extra = self._insert_extra(source, label, client)
        return self._submit_many("umcd.screen", images, request_ids, extra, on_sent, batch, batch_size)

    def _submit_many(self, task: str, images: Iterable[ImageInput], request_ids: Sequence[str | None] | None,
                     extra: dict[str, Any], on_sent: Callable[[int, str], None] | None, batch: bool = False,
                     batch_size: int = DEFAULT_BATCH_SIZE) -> list[str]:
        if not 1 <= int(batch_size) <= 1024:
            raise ValueError(f"batch_size must be in 1..1024, got {batch_size}")
        pixels = pixel_array(images, self.settings.max_image_bytes)
        if pixels is not None:
            images = [None] * len(pixels)  # the checks of the ids below, then the array's own path
        images = list(images)
        ids = list(request_ids) if request_ids is not None else [None] * len(images)
        if len(ids) != len(images):
            raise ValueError(f"{len(images)} images but {len(ids)} request ids")
        for rid in ids:  # refuse a bad id before anything is sent
            if rid is not None:
                validate_request_id(rid)
        repeated = [rid for rid, n in Counter(rid for rid in ids if rid is not None).items() if n > 1]
        if repeated:  # one id is one request: a second image under it would never be screened
            raise ValueError(f"request id {repeated[0]!r} is given to more than one image of this submission "
                             f"({len(repeated)} such ids): each image needs its own id")
        if pixels is None:  # a missing, unreadable or too large image stops the submission before anything is sent
            for image in images:
                check_image(image, self.settings.max_image_bytes)
        queued: list[str] = []

        def sent_one(index: int, rid: str) -> None:
            queued.append(rid)
            if on_sent is not None:
                on_sent(index, rid)

        try:
            if pixels is not None:
                return self._submit_array_batches(task, pixels, ids, extra, sent_one, int(batch_size))
            if batch:
                return self._submit_batches(task, images, ids, extra, sent_one, int(batch_size))
            sent = []
            with self.app.producer_or_acquire() as producer:
                for index, (image, rid) in enumerate(zip(images, ids)):
                    sent.append(self._submit(task, image, rid, extra, producer))
                    sent_one(index, sent[-1])
            return sent
        except Exception as exc:
            # sending stopped part way (the broker went away, a file vanished): the ids already queued go with
            # the error, so that the caller can still wait for their verdicts
            exc.sent = list(queued)  # type: ignore[attr-defined]
            raise

    def _submit_batches(self, task: str, images: list[ImageInput], ids: list[str | None], extra: dict[str, Any],
                        on_sent: Callable[[int, str], None] | None, batch_size: int) -> list[str]:
        """Send image files as ``umcd.*_batch`` messages of up to ``batch_size`` images; returns the request
        ids in order.

        Each message's files are stored once in Redis, concatenated (``umcd:img:<message id>``, with the
        image TTL, up to ``BLOB_MESSAGE_BYTES``), and its items point into that blob (``{"part": {"redis_key",
        "offset", "length"}}``); the worker deletes it once every item has its Result. The bytes then cross
        Redis once, as they are: inline, each file went base64-encoded into the message's JSON, which Celery's
        transport base64-encodes again, and the request ledger and the broker's unacked copy held it so too.
        A broker other than Redis gets the inline messages (``BATCH_MESSAGE_BYTES`` each).
        """
        try:
            self.redis  # noqa: B018 - the blob needs the broker's Redis
        except ValueError:  # not a Redis broker
            return self._submit_inline_batches(task, images, ids, extra, on_sent, batch_size)
        import redis

        batch_task, queue = BATCH_TASKS[task]
        sent: list[str] = []
        pending: list[tuple[str, bytes | dict[str, str]]] = []  # (request id, file bytes, or a ref of its own)
        pending_bytes = 0

        def flush(producer: Any) -> None:
            nonlocal pending, pending_bytes
            if not pending:
                return
            message_id = new_request_id()
            key = f"{IMAGE_KEY_PREFIX}{message_id}"
            items, parts, offset = [], [], 0
            for rid, data in pending:
                if isinstance(data, dict):
                    items.append({"request_id": rid, "image": data})
                    continue
                items.append({"request_id": rid, "image": {"part": {"redis_key": key, "offset": offset,
                                                                    "length": len(data)}}})
                parts.append(data)
                offset += len(data)
            if parts:
                try:
                    self.redis.set(key, b"".join(parts), ex=self.settings.image_ref_ttl_s)
                except redis.RedisError as exc:
                    raise BrokerUnavailable(f"could not store the images in Redis: {exc}") from exc
            try:
                self._send(batch_task, {"items": items, "submitted_at": time.time(), **extra}, message_id,
                           producer, queue=queue)
            except BrokerUnavailable:
                with contextlib.suppress(redis.RedisError):  # nothing will read it
                    self.redis.unlink(key)
                raise
            first = len(sent)
            sent.extend(rid for rid, _ in pending)
            if on_sent is not None:
                for k, (rid, _) in enumerate(pending):
                    on_sent(first + k, rid)
            pending, pending_bytes = [], 0

        with self.app.producer_or_acquire() as producer:
            for image, rid in zip(images, ids):
                rid = new_request_id() if rid is None else rid  # given ids were checked by _submit_many
                data = read_image(image, self.settings.max_image_bytes)
                if len(data) > BLOB_MESSAGE_BYTES:  # larger than a blob (a raised UMCD_MAX_IMAGE_BYTES): its own key
                    pending.append((rid, self.image_ref(rid, data)))
                else:
                    if pending and pending_bytes + len(data) > BLOB_MESSAGE_BYTES:
                        flush(producer)
                    pending.append((rid, data))
                    pending_bytes += len(data)
                if len(pending) >= batch_size:
                    flush(producer)
            flush(producer)
        return sent

    def _submit_inline_batches(self, task: str, images: list[ImageInput], ids: list[str | None],
                               extra: dict[str, Any], on_sent: Callable[[int, str], None] | None,
                               batch_size: int) -> list[str]:
        """Batch messages whose images travel in the message (a broker that is not Redis): up to
        ``batch_size`` images and ``BATCH_MESSAGE_BYTES`` of inline data a message."""
        batch_task, queue = BATCH_TASKS[task]
        sent: list[str] = []
        pending: list[dict[str, Any]] = []
        pending_bytes = 0

        def flush(producer: Any) -> None:
            nonlocal pending, pending_bytes
            if not pending:
                return
            kwargs = {"items": pending, "submitted_at": time.time(), **extra}
            self._send(batch_task, kwargs, new_request_id(), producer, queue=queue)
            first = len(sent) - len(pending)
            if on_sent is not None:
                for offset, item in enumerate(pending):
                    on_sent(first + offset, item["request_id"])
            pending, pending_bytes = [], 0

        with self.app.producer_or_acquire() as producer:
            for image, rid in zip(images, ids):
                rid = new_request_id() if rid is None else rid  # given ids were checked by _submit_many
                ref = self.image_ref(rid, read_image(image, self.settings.max_image_bytes))
                size = len(ref.get("inline", ""))
                if pending and pending_bytes + size > BATCH_MESSAGE_BYTES:
                    flush(producer)
                pending.append({"request_id": rid, "image": ref})
                pending_bytes += size
                sent.append(rid)
                if len(pending) >= batch_size:
                    flush(producer)
            flush(producer)
        return sent

    def _submit_array_batches(self, task: str, pixels: Any, ids: list[str | None], extra: dict[str, Any],
                              on_sent: Callable[[int, str], None] | None, batch_size: int) -> list[str]:
        """Send a pixel array as ``umcd.*_batch`` messages of up to ``batch_size`` images: each message's
        images are stored once in Redis as an ``.npy`` file (``umcd:img:<message id>``, with the image
        TTL) and its items point into it (``{"array": {"redis_key", "index"}}``); the worker deletes the
        array once every item has its Result. Returns the request ids in order."""
        import io

        import numpy as np
        import redis

        batch_task, queue = BATCH_TASKS[task]
        per_image = int(np.prod(pixels.shape[1:]))
        step = max(1, min(batch_size, ARRAY_MESSAGE_BYTES // per_image))
        rids = [new_request_id() if rid is None else rid for rid in ids]  # given ids were checked by _submit_many
        with self.app.producer_or_acquire() as producer:
            for start in range(0, len(rids), step):
                chunk = rids[start : start + step]
                message_id = new_request_id()
                key = f"{IMAGE_KEY_PREFIX}{message_id}"
                buf = io.BytesIO()
                np.save(buf, np.ascontiguousarray(pixels[start : start + step]), allow_pickle=False)
                try:
                    self.redis.set(key, buf.getvalue(), ex=self.settings.image_ref_ttl_s)
                except redis.RedisError as exc:
                    raise BrokerUnavailable(f"could not store the pixel array in Redis: {exc}") from exc
                items = [{"request_id": rid, "image": {"array": {"redis_key": key, "index": j}}}
                         for j, rid in enumerate(chunk)]
                try:
                    self._send(batch_task, {"items": items, "submitted_at": time.time(), **extra}, message_id,
                               producer, queue=queue)
                except BrokerUnavailable:
                    try:  # nothing will read it
                        self.redis.unlink(key)
                    except redis.RedisError:
                        pass
                    raise
                if on_sent is not None:
                    for offset, rid in enumerate(chunk):
                        on_sent(start + offset, rid)
        return rids

    # ------------------------------------------------------------------ results

    @staticmethod
    def _from_meta(request_id: str, meta: dict[str, Any]) -> Result:
        status = meta.get("status")
        if status == "SUCCESS":
            return Result.from_dict(meta.get("result"), request_id)
        error = meta.get("result")
        if isinstance(error, dict) and "exc_type" in error:
            message = f"{error.get('exc_type')}: {error.get('exc_message')}"
        else:
            message = f"task {status}: {error!r}"
        return Result.failed(request_id, message)

    def _meta(self, request_id: str) -> dict[str, Any]:
        import redis

        try:
            return self.app.backend.get_task_meta(validate_request_id(request_id))
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"result backend unavailable: {exc}") from exc

    def state(self, request_id: str) -> str:
        """Celery's state for the request: PENDING (also: unknown), STARTED, SUCCESS, FAILURE, ..."""
        return self._meta(request_id).get("status", "PENDING")

    def result(self, request_id: str) -> Result | None:
        """The request's Result if it is finished, else None (never blocks)."""
        return self.lookup(request_id)[1]

    def lookup(self, request_id: str) -> tuple[str, Result | None]:
        """(Celery state, Result or None) in one read of the result backend (never blocks)."""
        meta = self._meta(request_id)
        state = meta.get("status", "PENDING")
        return state, (self._from_meta(request_id, meta) if state in _READY else None)

    def wait(self, request_ids: str | Iterable[str], timeout: float | None = 60.0,
             interval: float = 0.05) -> dict[str, Result]:
        """Block until every request is finished or ``timeout`` seconds passed.

        Returns ``{request_id: Result}`` for the finished ones (a request still pending at the
        timeout is absent; a task that raised gives ``verdict == "error"``).
        """
        import redis
        from celery.exceptions import TimeoutError as CeleryTimeout

        ids = [request_ids] if isinstance(request_ids, str) else list(dict.fromkeys(request_ids))
        for rid in ids:
            validate_request_id(rid)
        results: dict[str, Result] = {}
        if not ids:
            return results
        try:
            for rid, meta in self.app.backend.get_many(set(ids), timeout=timeout, interval=interval):
                results[rid] = self._from_meta(rid, meta)
        except CeleryTimeout:
            pass
        except redis.RedisError as exc:
            raise BrokerUnavailable(f"result backend unavailable: {exc}") from exc
        return results

    def close(self) -> None:
        """Release broker and Redis connections."""
        if self._redis is not None:
            self._redis.close()
        self.app.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
