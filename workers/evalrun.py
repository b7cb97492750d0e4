"""The `eval` queue's work: run core.evaluation.run_benchmark and record the run in eval_runs."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from db import repo
from db.session import make_engine, session_scope
from umcd.settings import Settings, get_settings

log = logging.getLogger(__name__)


class BenchmarkUnavailable(RuntimeError):
    """core.evaluation.run_benchmark is not importable in this installation."""


def _benchmark():
    try:
        from core.evaluation import run_benchmark
    except ImportError as exc:
        raise BenchmarkUnavailable(f"core.evaluation.run_benchmark is not available: {exc}") from exc
    return run_benchmark


def _jsonable(value: Any) -> Any:
    """Results as JSON: dataclasses and objects with ``to_dict`` become dicts; the rest goes through json."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    elif hasattr(value, "to_dict"):
        value = value.to_dict()
    return json.loads(json.dumps(value, default=str))


def run_eval(dataset: str | None = None, n_images: int | None = None, seed: int = 0, *,
             settings: Settings | None = None, **params: Any) -> dict[str, Any]:
    """Run the benchmark with these parameters; returns ``{eval_run_id, report_dir, model_version}``.

    ``params`` are ``core.evaluation.BenchmarkConfig`` fields (``steps``, ``n_cw``, ``epochs``, ...)
    plus ``report_dir``. Without a ``checkpoint``, the benchmark evaluates the active model version
    (the one the fleet serves); with none published, it trains its own. The run is recorded as
    ``running`` first and then ``done`` with its results (or ``failed`` with the error). The report
    goes to ``artifacts/reports/eval-<id>`` unless ``report_dir`` is given.
    """
    settings = settings or get_settings()
    run_benchmark = _benchmark()
    dataset = dataset or settings.dataset
    engine = make_engine(settings.db_url)
    model_version = None
    if params.get("checkpoint") is None:
        params.pop("checkpoint", None)
        with session_scope(engine) as s:
            active = repo.active_model_version(s)
            if active is not None and active.dataset == dataset:
                params["checkpoint"] = active.checkpoint_path
                model_version = active.version
    report_dir = params.pop("report_dir", None)
    record = {"n_images": n_images, "seed": seed, "model_version": model_version, **params}
    with session_scope(engine) as s:
        run_id = repo.start_eval_run(s, dataset, _jsonable(record))
    report_dir = Path(report_dir or Path(settings.artifacts) / "reports" / f"eval-{run_id}")
    kwargs = {"out_dir": report_dir, "name": f"eval-{run_id}", "progress": False, **params}
    if n_images is not None:
        kwargs["n_images"] = n_images
    try:
        results = run_benchmark(dataset, seed=seed, **kwargs)
    except BaseException as exc:
        with session_scope(engine) as s:
            repo.finish_eval_run(s, run_id, {"error": f"{type(exc).__name__}: {exc}"}, str(report_dir), "failed")
        raise
    with session_scope(engine) as s:
        repo.finish_eval_run(s, run_id, _jsonable(results), str(report_dir), "done")
    log.info("eval run %d done; report in %s", run_id, report_dir)
    return {"eval_run_id": run_id, "report_dir": str(report_dir), "model_version": model_version}
