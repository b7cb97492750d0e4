"""Prometheus metrics of the detection workers (names are a contract with deploy/ dashboards)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter(
    "umcd_requests", "Tasks finished, by queue and outcome: screening requests (detect, screen) by verdict "
    "(benign, adversarial, invalid_input, error); train, attack and eval tasks ok or error.", ["queue", "outcome"])
BATCH_SIZE = Histogram(
    "umcd_batch_size", "Images per model batch.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096))
MODEL_LATENCY = Histogram(
    "umcd_model_latency_seconds", "Seconds per batch in the model (x and t(x) in one forward pass).",
    buckets=_LATENCY_BUCKETS)
SEARCH_LATENCY = Histogram(
    "umcd_search_latency_seconds", "Seconds per batch in the top-k Hamming search.", buckets=_LATENCY_BUCKETS)
INDEX_SIZE = Gauge("umcd_index_size", "Codes in this worker's search replica.")
REPLICA_LAG = Gauge(
    "umcd_replica_lag_seconds", "Seconds since this worker's replica last reached the head of the index log.")
MODEL_INFO = Gauge("umcd_model_info", "1 for the model version this worker serves.", ["version"])
#: not in the dashboard contract: how long a log row took to become searchable on this replica
REPLICA_VISIBILITY = Histogram(
    "umcd_replica_visibility_seconds", "Seconds from an index_log row's write to its application on this replica.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0))

#: where a detection worker's CPU goes (thread CPU time, so other threads' work is never counted)
STAGES = ("decode", "score", "store", "answer")
STAGE_CPU = Counter(
    "umcd_worker_cpu_seconds", "Thread CPU seconds of a detection worker by stage: decode (reading and decoding "
    "images, task threads), score (model, search, criteria and Results, the batcher), store (the audit "
    "transaction, the writer), answer (Result stores of batch messages, task threads).", ["stage"])

_server_lock = threading.Lock()
_server_port: int | None = None


def serve(port: int) -> bool:
    """Start the /metrics HTTP endpoint on ``port`` once per process (0: none). True if it runs now."""
    global _server_port
    if port <= 0:
        return False
    with _server_lock:
        if _server_port is not None:
            return True
        try:
            from umcd.settings import get_settings

            start_http_server(port, addr=get_settings().metrics_host)
        except OSError as exc:
            log.error("cannot serve Prometheus metrics on port %d: %s", port, exc)
            return False
        _server_port = port
        log.info("Prometheus metrics on :%d/metrics", port)
        return True


def bind_replica(index_size: Callable[[], float], lag: Callable[[], float]) -> None:
    """Read the index size and replica lag from callables at every scrape."""
    INDEX_SIZE.set_function(index_size)
    REPLICA_LAG.set_function(lag)


def set_model(version: str | None, previous: str | None = None) -> None:
    """``umcd_model_info{version}`` = 1 for the served version (the previous one's series is removed)."""
    if previous is not None and previous != version:
        try:
            MODEL_INFO.remove(previous)
        except KeyError:
            pass
    if version is not None:
        MODEL_INFO.labels(version=version).set(1)


def observe_batch(size: int, model_s: float, search_s: float) -> None:
    BATCH_SIZE.observe(size)
    MODEL_LATENCY.observe(model_s)
    SEARCH_LATENCY.observe(search_s)


def count(queue: str, outcome: str, n: int = 1) -> None:
    REQUESTS.labels(queue=queue, outcome=outcome).inc(n)


def observe_visibility(delays: list[float]) -> None:
    for d in delays:
        REPLICA_VISIBILITY.observe(max(0.0, d))


def add_cpu(stage: str, seconds: float) -> None:
    """Add thread CPU ``seconds`` (``time.thread_time()`` differences) to ``stage`` (one of STAGES)."""
    STAGE_CPU.labels(stage=stage).inc(max(0.0, seconds))
