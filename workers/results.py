"""Worker-side requests and the Result dicts of docs/CONTRACTS.md (verdicts, reasons, latencies)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from db.contract import IMAGE_REF_KINDS, TEXT_LEN, as_epoch, metadata_problem
from db.contract import result_from_verdict as result_from_verdict  # noqa: PLC0414  (re-exported)

#: what each criterion measures, for the reasons of a rejection
CRITERION_WORDS = {
    "c1": "mean Hamming distance to the top-k codes",
    "c2": "quantization loss",
    "c3": "disagreement with the blurred image",
}
#: queue of each request kind
QUEUE_OF_KIND = {"query": "detect", "insert": "screen"}


def image_ref_kind(image: Any) -> str | None:
    """The kind of an ImageRef (``inline``, ``redis_key``, ``path``, ``array``, ``part``: its one key), or None."""
    if isinstance(image, dict) and len(image) == 1:
        ref = next(iter(image))
        return ref if ref in IMAGE_REF_KINDS else None
    return None


@dataclass
class ScreenRequest:
    """One ``umcd.detect`` (kind ``query``) or ``umcd.screen`` (kind ``insert``) request as a worker got it.

    Times are epoch seconds: ``submitted_at`` on the producer's clock, ``received_at`` on the worker's.
    """

    request_id: str
    kind: str
    worker: str
    submitted_at: float | None = None
    received_at: float = field(default_factory=time.time)
    client: str | None = None
    source: str | None = None
    label: int | None = None
    image_ref: str | None = None  # inline | redis_key | path | array | part
    image_bytes: int | None = None
    #: why the message's own fields (not its image) cannot be accepted; the request is answered
    #: ``invalid_input`` with it, and the fields it names are not stored
    problem: str | None = None

    @classmethod
    def from_message(cls, *, request_id: str, kind: str, worker: str, image: Any, submitted_at: Any = None,
                     client: Any = None, source: Any = None, label: Any = None) -> ScreenRequest:
        """The request a task message describes, its fields made storable: a field the audit store cannot hold
        (``db.contract``: text over 256 characters, a label outside 32 bits, a wrong type) is left out and named
        in ``problem``; a ``submitted_at`` that is no storable time becomes unknown (None)."""
        problem = metadata_problem(client=client, source=source, label=label)
        if problem is not None:  # each field the contract refuses is left out
            client = client if metadata_problem(client=client) is None else None
            source = source if metadata_problem(source=source) is None else None
            label = label if metadata_problem(label=label) is None else None
        return cls(request_id=request_id, kind=kind, worker=worker[:TEXT_LEN], submitted_at=as_epoch(submitted_at),
                   client=client, source=source, label=label, image_ref=image_ref_kind(image), problem=problem)

    @classmethod
    def from_items(cls, items: list[dict], *, kind: str, worker: str, submitted_at: Any = None, client: Any = None,
                   source: Any = None, label: Any = None) -> list[ScreenRequest]:
        """:meth:`from_message` of each ``{"request_id", "image"}`` item of one batch message, whose fields they
        share: those are checked once for the message, not once an item. The message's items were received at
        one time, and their requests hold that one ``received_at``."""
        shared = cls.from_message(request_id="", kind=kind, worker=worker, image=None, submitted_at=submitted_at,
                                  client=client, source=source, label=label)
        return [cls(request_id=item["request_id"], kind=kind, worker=shared.worker, submitted_at=shared.submitted_at,
                    received_at=shared.received_at, client=shared.client, source=shared.source, label=shared.label,
                    image_ref=image_ref_kind(item.get("image")), problem=shared.problem) for item in items]

    @property
    def queue(self) -> str:
        return QUEUE_OF_KIND[self.kind]

    @property
    def queue_ms(self) -> float:
        """Milliseconds from submission to this worker starting the request (0 when unknown)."""
        if self.submitted_at is None:
            return 0.0
        return max(0.0, (self.received_at - self.submitted_at) * 1000.0)

    def total_ms(self, now: float | None = None) -> float:
        """Milliseconds from submission (or receipt, when unknown) to ``now``."""
        start = self.submitted_at if self.submitted_at is not None else self.received_at
        return max(0.0, ((now if now is not None else time.time()) - start) * 1000.0)

    def request_fields(self) -> dict[str, Any]:
        """Keyword arguments of ``db.repo.record_request``."""
        return {
            "request_id": self.request_id,
            "kind": self.kind,
            "client": self.client,
            "source": self.source,
            "label": self.label,
            "image_bytes": self.image_bytes,
            "image_ref": self.image_ref,
            "submitted_at": self.submitted_at,
            "received_at": self.received_at,
        }


def rejection_reasons(fired: list[str], scores: dict[str, float], thresholds: dict[str, float],
                      directions: dict[str, str]) -> list[str]:
    """One sentence per fired criterion: its score against its threshold, in the suspicious direction."""
    out = []
    for name in fired:
        words = CRITERION_WORDS.get(name, name)
        op = "<" if directions.get(name) == "low" else ">"
        out.append(f"{name} fired: {words} {scores[name]:.4g} {op} threshold {thresholds[name]:.4g}")
    return out


def detection_result(
    request: ScreenRequest,
    record: dict[str, Any],
    *,
    directions: dict[str, str],
    model_version: str,
    calibration_id: int | None,
    detector: str,
    batch_size: int,
    model_ms: float,
    search_ms: float,
    now: float | None = None,
) -> dict[str, Any]:
    """The Result of a scored request from ``DetectionBatch.record(i)`` (its ``code`` is dropped).

    A benign verdict carries the top-k ids and distances; a rejection carries ``topk: None`` and one
    reason per fired criterion (the audit row keeps the neighbours either way). ``thresholds`` is the record's
    own dict, not a copy: the records of one batch share it (``DetectionBatch.records``), and so do their
    Results, whose audit rows then encode it once.
    """
    benign = record["verdict"] == "benign"
    return {
        "request_id": request.request_id,
        "kind": request.kind,
        "verdict": record["verdict"],
        "reasons": [] if benign else rejection_reasons(record["fired"], record["scores"], record["thresholds"],
                                                       directions),
        "fired": list(record["fired"]),
        "scores": dict(record["scores"]),
        "thresholds": record["thresholds"],
        "topk": dict(record["topk"]) if benign else None,
        "image_id": None,
        "model_version": model_version,
        "calibration_id": calibration_id,
        "detector": detector,
        "batch_size": int(batch_size),
        "latency_ms": {
            "queue": round(request.queue_ms, 3),
            "model": round(model_ms, 3),
            "search": round(search_ms, 3),
            "total": round(request.total_ms(now), 3),
        },
        "worker": request.worker,
    }


def invalid_result(request: ScreenRequest, reason: str, *, detector: str,
                   model_version: str | None = None, calibration_id: int | None = None) -> dict[str, Any]:
    """The Result of a request whose image could not be used (``batch_size`` 0: it never reached a batch)."""
    return {
        "request_id": request.request_id,
        "kind": request.kind,
        "verdict": "invalid_input",
        "reasons": [reason],
        "fired": [],
        "scores": None,
        "thresholds": None,
        "topk": None,
        "image_id": None,
        "model_version": model_version,
        "calibration_id": calibration_id,
        "detector": detector,
        "batch_size": 0,
        "latency_ms": {"queue": round(request.queue_ms, 3), "model": 0.0, "search": 0.0,
                       "total": round(request.total_ms(), 3)},
        "worker": request.worker,
    }
