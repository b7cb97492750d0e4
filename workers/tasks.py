"""The Celery tasks of docs/CONTRACTS.md: umcd.detect, umcd.screen (and their _batch forms), train, attack, eval."""

from __future__ import annotations

import logging
import random
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

log = logging.getLogger(__name__)

#: retries of a request whose verdict could not be stored (audit store or Redis down): ~25 min of back-off
TRANSIENT_MAX_RETRIES = 50
#: retries of a request that arrived before any model was published (5 s apart: 10 minutes)
NO_MODEL_MAX_RETRIES = 120
NO_MODEL_COUNTDOWN_S = 5.0


#: the kwarg a retried screening message counts its waits for a first model in (its other retries were outages)
MODEL_WAITS_KWARG = "model_waits"


def retry_plan(request: Any, no_model: bool) -> tuple[int, int, dict[str, Any]]:
    """(this kind's retries so far, Celery's ``max_retries`` for the next one, the retried message's kwargs).

    Waiting for a first model and riding out an outage have budgets of their own: a request that waited
    long for a model still gets every outage retry, and the other way round. The waits are counted in the
    message's kwargs (``model_waits``); Celery's ``retries`` counts both kinds.
    """
    kwargs = dict(request.kwargs or {})
    retries = int(request.retries or 0)
    waits = kwargs.get(MODEL_WAITS_KWARG)
    waits = min(retries, waits) if isinstance(waits, int) and not isinstance(waits, bool) and waits >= 0 else 0
    outages = retries - waits
    if no_model:
        kwargs[MODEL_WAITS_KWARG] = waits + 1
        return waits, outages + NO_MODEL_MAX_RETRIES, kwargs
    return outages, waits + TRANSIENT_MAX_RETRIES, kwargs


def backoff_s(retries: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Exponential back-off with full jitter: a delay in [base/2, min(cap, base * 2**retries)] seconds."""
    top = min(cap, base * (2 ** min(retries, 16)))
    return random.uniform(min(base / 2, top), top)


def transient_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "the fleet is unwell, try again", not "this request is bad"."""
    import redis
    import sqlalchemy.exc

    from workers.batching import BatcherStopped

    return (
        sqlalchemy.exc.OperationalError,
        sqlalchemy.exc.InterfaceError,
        sqlalchemy.exc.TimeoutError,
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        FutureTimeout,
        BatcherStopped,
    )


def _screen(task, kind: str, request_id: str, image: Any, client: str | None, submitted_at: Any,
            source: str | None = None, label: Any = None) -> dict:
    import sqlalchemy.exc

    from db.contract import request_id_problem
    from workers.results import ScreenRequest
    from workers.runtime import NoModel, get_runtime

    problem = request_id_problem(request_id)
    if problem is not None:  # no verdict row can be keyed by it: the task fails with the reason
        raise ValueError(problem)
    runtime = get_runtime(broker_url=task.app.conf.broker_url)
    request = ScreenRequest.from_message(
        request_id=request_id, kind=kind, worker=task.request.hostname or "unknown", image=image,
        submitted_at=submitted_at, client=client, source=source, label=label,
    )
    try:
        result = runtime.handle(request, image)
    except NoModel as exc:
        _, max_retries, kwargs = retry_plan(task.request, no_model=True)
        raise task.retry(exc=exc, kwargs=kwargs, countdown=NO_MODEL_COUNTDOWN_S, max_retries=max_retries) from None
    except (*transient_errors(), sqlalchemy.exc.DBAPIError) as exc:
        if isinstance(exc, sqlalchemy.exc.DBAPIError) and not isinstance(exc, transient_errors()) \
                and not exc.connection_invalidated:
            raise  # a real error in a statement, not an outage
        outages, max_retries, kwargs = retry_plan(task.request, no_model=False)
        log.warning("request %s: %s: %s; retrying (%d so far)", request_id, type(exc).__name__, exc, outages)
        raise task.retry(exc=exc, kwargs=kwargs, countdown=backoff_s(outages), max_retries=max_retries) from None
    from workers.batchtasks import release_message_images

    # answered and stored: nobody reads its own image again (a single message's id is its request id)
    release_message_images(runtime, [{"request_id": request_id, "image": image}], None)
    return result


#: train, attack and eval are acknowledged when a worker takes them, not when they end. They run for minutes to
#: hours and are not idempotent (a publish, an attack set, an eval row), and Redis hands a message still unacked
#: after the broker's visibility timeout (600 s) to a worker again, even while the first one still runs it: a long
#: training would run twice. A worker that dies in one loses it; the caller sees no Result and sends it again.
LONG_TASKS_ACK_EARLY = ("umcd.train", "umcd.attack", "umcd.eval")


def register_tasks(app) -> dict[str, Any]:
    """Register every task of the contract on ``app``; returns name -> task."""

    @app.task(name="umcd.detect", bind=True, acks_late=True, reject_on_worker_lost=True)
    def detect(self, request_id: str, image: dict, client: str | None = None, submitted_at: float | None = None,
               **extra: Any) -> dict:
        """Screen a query image: verdict, and top-k ids and distances when benign."""
        return _screen(self, "query", request_id, image, client, submitted_at)

    @app.task(name="umcd.screen", bind=True, acks_late=True, reject_on_worker_lost=True)
    def screen(self, request_id: str, image: dict, client: str | None = None, submitted_at: float | None = None,
               source: str | None = None, label: int | None = None, **extra: Any) -> dict:
        """Screen an insertion: benign images join the database and the index, adversarial ones are quarantined."""
        return _screen(self, "insert", request_id, image, client, submitted_at, source, label)

    @app.task(name="umcd.detect_batch", bind=True, acks_late=True, reject_on_worker_lost=True)
    def detect_batch(self, items: list, client: str | None = None, submitted_at: float | None = None,
                     **extra: Any) -> dict:
        """Screen many query images of one message; each gets its own verdict row and stored Result."""
        from workers.batchtasks import screen_batch

        return screen_batch(self, "query", items, client, submitted_at)

    @app.task(name="umcd.screen_batch", bind=True, acks_late=True, reject_on_worker_lost=True)
    def screen_batch(self, items: list, client: str | None = None, submitted_at: float | None = None,
                     source: str | None = None, label: int | None = None, **extra: Any) -> dict:
        """Screen many insertion images of one message (benign ones join the index), each under its own id."""
        from workers.batchtasks import screen_batch as run

        return run(self, "insert", items, client, submitted_at, source, label)

    @app.task(name="umcd.train", bind=True, acks_late=False)  # see LONG_TASKS_ACK_EARLY
    def train(self, dataset: str | None = None, bits: int | None = None, backbone: str | None = None,
              epochs: int = 30, seed: int | None = None, target_fpr: float | None = None, publish: bool = True,
              seed_fraction: float = 0.5, **extra: Any) -> dict:
        """Train CSQ, save the checkpoint and (``publish``) make it the active model with its calibration."""
        from workers.publish import train_and_publish

        return train_and_publish(dataset=dataset, bits=bits, backbone=backbone, epochs=epochs, seed=seed,
                                 target_fpr=target_fpr, publish_model=publish, seed_fraction=seed_fraction)

    @app.task(name="umcd.attack", bind=True, acks_late=False)  # see LONG_TASKS_ACK_EARLY
    def attack(self, attack: str, n_images: int = 100, eps: float | None = None, seed: int = 0,
               **params: Any) -> dict:
        """Generate an adversarial set against the active model: PNG files plus an attack_sets row."""
        from workers.attacksets import generate_attack_set

        return generate_attack_set(attack, n_images=n_images, eps=eps, seed=seed, **params)

    @app.task(name="umcd.eval", bind=True, acks_late=False)  # see LONG_TASKS_ACK_EARLY
    def evaluate(self, dataset: str | None = None, n_images: int | None = None, seed: int = 0,
                 **params: Any) -> dict:
        """Run the benchmark (core.evaluation.run_benchmark) and record it in eval_runs."""
        from workers.evalrun import run_eval

        return run_eval(dataset=dataset, n_images=n_images, seed=seed, **params)

    return {t.name: t for t in (detect, screen, detect_batch, screen_batch, train, attack, evaluate)}
