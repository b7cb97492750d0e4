"""Batch submissions: one message carries many images, each answered under its own request id."""

from __future__ import annotations

import logging
import time
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

from db.contract import valid_request_id
from db.jsontext import dumps_plain

log = logging.getLogger(__name__)

#: images one batch message may carry (more fail as a whole: split them on the producer side)
MAX_BATCH_ITEMS = 1024

#: stores a batch's Results in one command: each one SET (with the backend's expiry, ARGV[1] seconds, 0 for
#: none) and PUBLISHed on its key, in order, as Celery's Redis backend stores one task's state
_STORE_RESULTS_LUA = """
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  local value = ARGV[i + 1]
  if ttl > 0 then
    redis.call('SET', key, value, 'EX', ttl)
  else
    redis.call('SET', key, value)
  end
  redis.call('PUBLISH', key, value)
end
return #KEYS
"""
_store_scripts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # redis client -> its Script


def _store_script(client: Any) -> Any:
    script = _store_scripts.get(client)
    if script is None:
        script = _store_scripts[client] = client.register_script(_STORE_RESULTS_LUA)
    return script


def _task_keys(backend: Any, request_id: str) -> Callable[[str], Any]:
    """The backend's ``get_key_for_task`` for a batch's request ids: its prefix plus the id's bytes when that is
    what the backend's own method makes of ``request_id`` (Celery's Redis backend: ~2.5 µs an id through its
    generic join and encodings), else that method itself."""
    probe = backend.get_key_for_task("0")
    prefix = probe[:-1] if isinstance(probe, bytes) and probe.endswith(b"0") else None
    if prefix is not None and backend.get_key_for_task(request_id) == prefix + request_id.encode():
        return lambda rid: prefix + rid.encode()
    return backend.get_key_for_task


def store_item_results(backend: Any, entries: list[tuple[str, dict | BaseException]]) -> None:
    """Store each ``(request_id, Result or exception)`` in the result backend under its request id.

    A Result is stored as ``SUCCESS`` and an exception as ``FAILURE``, exactly as a ``umcd.detect``
    task with that id would leave them, so ``Client.wait(ids)`` and the gateway read them
    unchanged. On a Redis backend all entries go in one script call (``SET`` with the backend's
    expiry plus the ``PUBLISH`` that ``AsyncResult.get()`` listens to, per entry): a pipeline of two
    commands per entry cost the worker ~25 µs per image in redis-py alone. Other backends get one
    ``store_result`` per entry.
    """
    from celery import states

    if not entries:
        return
    client = getattr(backend, "client", None)
    if client is None or not hasattr(client, "register_script") or not hasattr(backend, "_get_result_meta"):
        for rid, outcome in entries:
            state = states.FAILURE if isinstance(outcome, BaseException) else states.SUCCESS
            backend.store_result(rid, outcome, state)
        return
    expires = getattr(backend, "expires", None)
    plain_json = getattr(backend, "serializer", None) == "json"
    date_done = backend.app.now().isoformat()  # one timestamp for the batch (what _get_result_meta stamps)
    keys: list[Any] = []
    values: list[Any] = []
    key_for = _task_keys(backend, entries[0][0])
    for rid, outcome in entries:
        state = states.FAILURE if isinstance(outcome, BaseException) else states.SUCCESS
        value = None
        if plain_json and state == states.SUCCESS:
            # the meta _get_result_meta builds for a request-less SUCCESS, encoded once by orjson (a Result is
            # plain JSON); anything else (NaN scores too) takes Celery's own path
            meta = {"status": state, "result": outcome, "traceback": None, "children": [],
                    "date_done": date_done, "task_id": rid}
            value = dumps_plain(meta)
        if value is None:
            meta = backend._get_result_meta(result=backend.encode_result(outcome, state), state=state,
                                            traceback=None, request=None)
            meta["task_id"] = rid
            value = backend.encode(meta)
        keys.append(key_for(rid))
        values.append(value)
    _store_script(client)(keys=keys, args=[int(expires) if expires else 0, *values], client=client)


def own_image_key(image: Any, request_id: Any) -> str | None:
    """The ``redis_key`` of an ImageRef when it is the request's own (``umcd:img:<request id>:<random>``, as the SDK
    stores an image too large to travel inline), else None: only such a key is deleted once the request is
    answered (a redelivery answers from the audit store), so a crafted reference deletes no one else's image."""
    from workers.imaging import image_redis_key

    if not (isinstance(image, dict) and len(image) == 1 and isinstance(request_id, str) and request_id):
        return None
    key = image.get("redis_key")
    if isinstance(key, str) and image_redis_key(key) and key.startswith(f"umcd:img:{request_id}:"):
        return key
    return None


def release_message_images(runtime: Any, items: list[dict], message_id: str | None) -> int:
    """Delete the pixel array or file blob in Redis of message ``message_id`` once its ``items`` all have their
    Results, and the items' own single-image keys (:func:`own_image_key`; also for a single-image message, as
    one item with no message id).

    A pixel array (``array`` ImageRefs) or a blob of image files (``part`` ImageRefs) belongs to the one message
    that references it: the SDK stores it under ``umcd:img:<message id>``, so once the message is answered nobody
    reads it again (a redelivery answers from the audit store). Without this, each would sit in Redis for its whole
    TTL (``image_ref_ttl_s``). Only those keys are deleted: an item naming another key (another message's array,
    another request's image) deletes nothing. Returns how many keys were deleted; a failure is logged and left to
    the TTL.
    """
    from workers.imaging import image_redis_key, message_blob_key

    own_blob = f"umcd:img:{message_id}" if message_id else None
    keys = set()
    for item in items:
        image = item.get("image")
        if own_blob is not None and own_blob not in keys:  # the message's items name one blob: found once is enough
            key = message_blob_key(image)
            if key == own_blob and image_redis_key(key):
                keys.add(key)  # this message's own array or blob: a crafted reference deletes nothing else
        if isinstance(image, dict) and "redis_key" in image:
            key = own_image_key(image, item.get("request_id"))
            if key is not None:
                keys.add(key)
    client = runtime.redis if keys else None
    if client is None:
        return 0
    try:
        return int(client.unlink(*sorted(keys)))
    except Exception as exc:  # noqa: BLE001 - Redis went away: the keys expire on their own
        log.warning("could not delete %d images, pixel arrays or file blobs (%s: %s); they expire with their TTL",
                    len(keys), type(exc).__name__, exc)
        return 0


def screen_batch(task: Any, kind: str, items: Any, client: str | None, submitted_at: Any,
                 source: str | None = None, label: Any = None) -> dict:
    """The work of ``umcd.detect_batch`` / ``umcd.screen_batch`` on a detection worker.

    ``items``: ``[{"request_id": str, "image": ImageRef}, ...]``. Every image is scored through
    the worker's batcher (shared model batches, one audit transaction per batch, a verdict row per
    request, idempotent on its request id); each Result is stored in the result backend under its
    own request id once its row is committed. Items whose outcome is a transient error (audit store
    or Redis down, no model yet) are retried as a new message holding only them; the message
    returns (and is acked) after every item has a stored Result or was sent on for a retry.

    Returns a summary: ``{"items", "stored", "verdicts": {verdict: n}, "failed", "retrying", "rejected"}``
    (``rejected``: items without a valid request id, which cannot be answered and are only logged).
    """
    import sqlalchemy.exc

    from workers import metrics
    from workers.results import ScreenRequest
    from workers.runtime import NoModel, get_runtime
    from workers.tasks import NO_MODEL_COUNTDOWN_S, backoff_s, retry_plan, transient_errors

    if not isinstance(items, list):
        items = []
    good: list[dict] = []
    rejected = 0
    for item in items:
        if isinstance(item, dict) and valid_request_id(item.get("request_id")):
            good.append(item)
        else:
            rejected += 1
            log.warning("batch %s: an item without a valid request id is dropped", task.request.id)
    if len(good) > MAX_BATCH_ITEMS:
        error = ValueError(f"a batch message holds at most {MAX_BATCH_ITEMS} images, got {len(good)}: "
                           "send smaller batches")
        runtime = get_runtime(broker_url=task.app.conf.broker_url)
        from db import repo
        from db.session import session_scope

        try:  # an id answered before keeps its Result: never overwritten here
            with session_scope(runtime.engine) as s:
                answered = repo.answered(s, [it["request_id"] for it in good])
        except Exception as exc:  # noqa: BLE001 - the audit store is down: each item still gets its error
            log.warning("batch %s: could not read which ids are answered (%s: %s)", task.request.id,
                        type(exc).__name__, exc)
            answered = set()
        failed = [(it["request_id"], error) for it in good if it["request_id"] not in answered]
        store_item_results(task.backend, failed)
        release_message_images(runtime, good, task.request.id)
        return {"items": len(items), "stored": len(failed), "verdicts": {}, "failed": len(failed), "retrying": 0,
                "rejected": rejected}

    runtime = get_runtime(broker_url=task.app.conf.broker_url)
    worker = task.request.hostname or "unknown"
    requests = ScreenRequest.from_items(good, kind=kind, worker=worker, submitted_at=submitted_at, client=client,
                                        source=source, label=label)
    outcomes = runtime.handle_many(requests, [it.get("image") for it in good])

    transient = transient_errors()
    done: list[tuple[str, dict | BaseException]] = []
    again: list[tuple[dict, BaseException]] = []
    for item, outcome in zip(good, outcomes):
        if isinstance(outcome, (NoModel, *transient)) or (
                isinstance(outcome, sqlalchemy.exc.DBAPIError) and outcome.connection_invalidated):
            again.append((item, outcome))
        else:
            done.append((item["request_id"], outcome))
    no_model = any(isinstance(exc, NoModel) for _, exc in again)
    spent, max_retries, retry_kwargs = retry_plan(task.request, no_model=no_model)  # this kind's own budget
    if again and (task.request.retries or 0) >= max_retries:  # out of retries: these items fail with their last error
        done += [(item["request_id"], exc) for item, exc in again]
        again = []
    cpu = time.thread_time()
    try:
        store_item_results(task.backend, done)
    except transient as exc:  # the verdicts are committed: a redelivery answers from the audit store
        log.warning("batch %s: storing %d results failed (%s: %s); retrying the message", task.request.id,
                    len(done), type(exc).__name__, exc)
        outages, outage_max, outage_kwargs = retry_plan(task.request, no_model=False)
        raise task.retry(kwargs=outage_kwargs, countdown=backoff_s(outages), max_retries=outage_max,
                         exc=exc) from None
    finally:
        metrics.add_cpu("answer", time.thread_time() - cpu)
    if not again:
        release_message_images(runtime, good, task.request.id)
    summary = {
        "items": len(items), "stored": len(done),
        "verdicts": dict(Counter(o["verdict"] for _, o in done if isinstance(o, dict))),
        "failed": sum(isinstance(o, BaseException) for _, o in done), "retrying": len(again), "rejected": rejected,
    }
    if again:
        first = again[0][1]
        log.warning("batch %s: %d of %d items hit %s: %s; retrying them (%d so far)", task.request.id, len(again),
                    len(good), type(first).__name__, first, spent)
        countdown = NO_MODEL_COUNTDOWN_S if no_model else backoff_s(spent)
        kwargs = {**retry_kwargs, "items": [item for item, _ in again]}
        raise task.retry(kwargs=kwargs, countdown=countdown, max_retries=max_retries, exc=first)
    return summary
