"""The HTTP upload gateway: multipart images in, request ids out, Results by request id."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from db.contract import metadata_problem
from producers.results import REQUEST_ID_LEN, REQUEST_ID_PATTERN, validate_request_id
from producers.sdk import BrokerUnavailable, Client, ImageTooLarge
from umcd.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: bytes a multipart body may carry beyond the image itself (boundaries, headers, form fields)
FORM_OVERHEAD_BYTES = 64 * 1024
#: how long the gateway retries a publish while the broker is down before answering 503
GATEWAY_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.0, "interval_step": 0.2, "interval_max": 1.0}
_STATUS = {"SUCCESS": "done", "STARTED": "running", "FAILURE": "failed", "REVOKED": "failed",
           "REJECTED": "failed", "IGNORED": "failed"}


# --------------------------------------------------------------------------- rate limiting


class TokenBucketLimiter:
    """Per-identity token buckets: ``per_minute`` tokens refill per minute, bursts up to ``burst``.

    ``take(identity)`` returns 0.0 when a token was taken, else the seconds until one is free.
    At most ``max_identities`` buckets are kept (least recently used dropped). Thread-safe.
    """

    def __init__(self, per_minute: float, burst: float | None = None, *, max_identities: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute <= 0:
            raise ValueError("per_minute must be positive")
        self.rate = per_minute / 60.0  # tokens per second
        self.burst = float(burst if burst is not None else max(1.0, per_minute))
        self.max_identities = max_identities
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # id -> (tokens, stamp)
        self._lock = threading.Lock()

    def take(self, identity: str) -> float:
        now = self.clock()
        with self._lock:
            tokens, stamp = self._buckets.pop(identity, (self.burst, now))
            tokens = min(self.burst, tokens + (now - stamp) * self.rate)
            if tokens >= 1.0:
                tokens -= 1.0
                wait = 0.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[identity] = (tokens, now)
            while len(self._buckets) > self.max_identities:
                self._buckets.popitem(last=False)
        return wait


# --------------------------------------------------------------------------- upload size cap


class BodyTooLarge(Exception):
    """The request body passed the gateway's byte limit while it was being read."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


def _too_large_response(limit_bytes: int, image_limit: int) -> JSONResponse:
    return JSONResponse(
        status_code=413,
        content={"detail": f"upload too large: images are limited to {image_limit} bytes "
                           f"(request bodies to {limit_bytes} bytes)"},
    )


class BodySizeLimit:
    """ASGI middleware refusing bodies over ``limit`` bytes: by Content-Length before reading,
    and while streaming (chunked uploads) as soon as the count passes the limit."""

    def __init__(self, app: ASGIApp, limit: int, image_limit: int) -> None:
        self.app = app
        self.limit = limit
        self.image_limit = image_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.limit:
                    await _too_large_response(self.limit, self.image_limit)(scope, receive, send)
                    return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await _too_large_response(self.limit, self.image_limit)(scope, receive, send)


# --------------------------------------------------------------------------- the app


def _multipart_body(with_insert_fields: bool) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "file": {"type": "string", "format": "binary", "description": "the image (PNG, JPEG, ...)"},
        "request_id": {"type": "string", "pattern": REQUEST_ID_PATTERN, "maxLength": REQUEST_ID_LEN,
                       "description": "optional client-chosen id; default: a new UUID version 7 in hex (time-ordered)"},
    }
    if with_insert_fields:
        properties["source"] = {"type": "string", "maxLength": 256, "description": "where the image came from"}
        properties["label"] = {"type": "integer", "description": "optional class label"}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["file"], "properties": properties}}}}}


def audit_lookup(settings: Settings, request_id: str) -> dict[str, Any] | None:
    """The Result of ``request_id`` from the audit store, or None (no store, no row, or no ``db``)."""
    try:
        from sqlalchemy.engine import make_url

        from db.contract import result_from_verdict
        from db.repo import get_verdict, row_dict
        from db.session import session_scope
    except ImportError:
        return None
    url = settings.db_url
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or not os.path.exists(parsed.database):
            return None  # never create an empty audit file from the gateway
    with session_scope(url) as session:
        row = row_dict(get_verdict(session, request_id))
    return result_from_verdict(row) if row else None  # the Result a worker gives a redelivery


def create_app(settings: Settings | None = None, *, client: Client | None = None,
               audit_fallback: bool = True, audit_timeout_s: float = 2.0) -> FastAPI:
    """The gateway app. ``client`` (an SDK Client) defaults to one built from ``settings``.

    With ``audit_fallback``, a request the result backend does not know (its result expired, or
    the backend was flushed) is looked up in the audit store, for at most ``audit_timeout_s``.
    """
    settings = settings or get_settings()
    api_key = settings.api_key.get_secret_value().encode() if settings.api_key is not None else None
    limiter = TokenBucketLimiter(settings.rate_limit_per_minute)
    body_limit = settings.max_image_bytes + FORM_OVERHEAD_BYTES
    holder: dict[str, Client] = {}
    lock = threading.Lock()

    def get_client() -> Client:
        if client is not None:
            return client
        with lock:
            if "client" not in holder:
                holder["client"] = Client(settings, retry_policy=GATEWAY_RETRY_POLICY)
            return holder["client"]

    app = FastAPI(
        title="UMCD gateway",
        version="1",
        description="Upload images to screen for adversarial manipulation; poll for verdicts. "
                    "Send `X-API-Key` when the gateway has a key.",
    )
    app.add_middleware(BodySizeLimit, limit=body_limit, image_limit=settings.max_image_bytes)
    app.state.settings = settings
    app.state.limiter = limiter

    # Prometheus: one registry per app, so several apps in one process (tests) do not collide
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
    from starlette.responses import Response

    registry = CollectorRegistry()
    http_requests = Counter("umcd_gateway_requests_total", "Gateway HTTP requests by route and status code",
                            ["route", "status"], registry=registry)
    http_latency = Histogram("umcd_gateway_latency_seconds", "Gateway request handling time", ["route"],
                             registry=registry)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        http_requests.labels(route, str(response.status_code)).inc()
        http_latency.labels(route).observe(time.perf_counter() - t0)
        return response

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(BodyTooLarge)
    async def _body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return _too_large_response(exc.limit, settings.max_image_bytes)

    def guard(request: Request) -> str:
        """Rate limit, then API key; returns the caller's identity (``key:<hash>`` or ``ip:<addr>``)."""
        presented = request.headers.get("x-api-key")
        authorized = api_key is None or (
            presented is not None and hmac.compare_digest(presented.encode(), api_key))
        if api_key is not None and authorized:
            identity = "key:" + hashlib.sha256(api_key).hexdigest()[:12]
        else:
            identity = "ip:" + (request.client.host if request.client else "unknown")
        wait = limiter.take(identity)
        if wait > 0:
            raise HTTPException(
                status_code=429, detail=f"rate limit of {settings.rate_limit_per_minute} requests per minute "
                                        f"exceeded; retry in {math.ceil(wait)} s",
                headers={"Retry-After": str(max(1, math.ceil(wait)))})
        if not authorized:
            raise HTTPException(status_code=401, detail="missing or wrong API key (send it in X-API-Key)",
                                headers={"WWW-Authenticate": "ApiKey"})
        return identity

    async def read_upload(request: Request, with_insert_fields: bool) -> dict[str, Any]:
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):  # media types are case-insensitive
            raise HTTPException(status_code=415, detail="send the image as multipart/form-data in field 'file'")
        form = await request.form(max_files=1, max_fields=8, max_part_size=4096)
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise HTTPException(status_code=422, detail="missing the image: a multipart file field named 'file'")
            data = await upload.read(settings.max_image_bytes + 1)
        finally:
            await form.close()
        if len(data) > settings.max_image_bytes:
            raise HTTPException(status_code=413,
                                detail=f"upload too large: images are limited to {settings.max_image_bytes} bytes")
        fields: dict[str, Any] = {"image": data}
        rid = form.get("request_id")
        if rid not in (None, ""):
            try:
                fields["request_id"] = validate_request_id(rid)
            except ValueError as exc:
                raise HTTPException(status_code=422, detail=str(exc)) from None
        if with_insert_fields:
            source = form.get("source")
            fields["source"] = source or None
            label = form.get("label")
            if label not in (None, ""):
                try:
                    fields["label"] = int(label)  # type: ignore[arg-type]
                except (TypeError, ValueError):
                    raise HTTPException(status_code=422, detail="label must be an integer") from None
            problem = metadata_problem(source=fields["source"], label=fields.get("label"))
            if problem is not None:  # what the audit store cannot hold is refused here, not lost on a worker
                raise HTTPException(status_code=422, detail=problem)
        return fields

    async def submit(submit_fn: Callable[..., str], fields: dict[str, Any]) -> JSONResponse:
        try:
            rid = await run_in_threadpool(submit_fn, **fields)
        except ImageTooLarge as exc:
            raise HTTPException(status_code=413, detail=str(exc)) from None
        except BrokerUnavailable:
            raise HTTPException(status_code=503, detail="the queue is unavailable; retry shortly",
                                headers={"Retry-After": "5"}) from None
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        return JSONResponse(status_code=202, content={"request_id": rid})

    @app.post("/v1/query", status_code=202, openapi_extra=_multipart_body(False),
              summary="Screen a query image", responses={413: {}, 429: {}, 401: {}, 503: {}})
    async def post_query(request: Request, identity: str = Depends(guard)) -> JSONResponse:
        fields = await read_upload(request, with_insert_fields=False)
        return await submit(get_client().submit_query, {**fields, "client": identity})

    @app.post("/v1/insert", status_code=202, openapi_extra=_multipart_body(True),
              summary="Screen an image for insertion into the database",
              responses={413: {}, 429: {}, 401: {}, 503: {}})
    async def post_insert(request: Request, identity: str = Depends(guard)) -> JSONResponse:
        fields = await read_upload(request, with_insert_fields=True)
        return await submit(get_client().submit_insert, {**fields, "client": identity})

    @app.get("/v1/requests/{request_id}", summary="A request's status and Result")
    async def get_request(
        request_id: str = Path(..., pattern=REQUEST_ID_PATTERN, max_length=REQUEST_ID_LEN),
        identity: str = Depends(guard),
    ) -> dict[str, Any]:
        """``status``: pending (queued, or unknown), running, done or failed (the task raised;
        ``result.verdict`` is ``error``). ``result`` is the Result when finished; ``source`` says
        where it came from (``result_backend``, or ``audit`` once the backend forgot it)."""
        try:
            state, result = await run_in_threadpool(get_client().lookup, request_id)
        except Exception as exc:  # noqa: BLE001 - the backend is down: say so, do not 500
            raise HTTPException(status_code=503, detail=f"result backend unavailable ({type(exc).__name__})",
                                headers={"Retry-After": "5"}) from None
        status = _STATUS.get(state, "pending")
        if result is not None:
            return {"request_id": request_id, "status": status, "result": result.to_dict(),
                    "source": "result_backend"}
        if status == "pending" and audit_fallback:
            try:
                row = await asyncio.wait_for(run_in_threadpool(audit_lookup, settings, request_id),
                                             timeout=audit_timeout_s)
            except Exception as exc:  # noqa: BLE001 - the audit store is an extra: never fail on it
                log.warning("audit lookup of %s failed: %s", request_id, exc)
                row = None
            if row is not None:
                return {"request_id": request_id, "status": "done", "result": row, "source": "audit"}
        return {"request_id": request_id, "status": "running" if status == "running" else "pending",
                "result": None, "source": None}

    @app.get("/healthz", summary="Liveness: the gateway answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: the broker answers PING")
    async def readyz() -> JSONResponse:
        def ping() -> bool:
            from umcd.celeryconf import redis_from_url

            try:
                probe = redis_from_url(get_client().app.conf.broker_url, retries=0, socket_timeout_s=1.0)
                try:
                    return bool(probe.ping())
                finally:
                    probe.close()
            except Exception:  # noqa: BLE001 - any failure means not ready
                return False

        ok = await run_in_threadpool(ping)
        return JSONResponse(status_code=200 if ok else 503, content={"broker": "ok" if ok else "unavailable"})

    return app


def __getattr__(name: str) -> Any:
    """``producers.gateway:app`` for ``uvicorn producers.gateway:app`` (built on first access)."""
    if name == "app":
        global app
        app = create_app()
        return app
    raise AttributeError(name)
