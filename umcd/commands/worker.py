"""`umcd worker detect|cpu`: run a Celery worker of the fleet with the right pool and queues."""

from __future__ import annotations

import os
import sys
from enum import Enum
from typing import Optional

import typer

#: queues and pool of each kind of worker (docs/CONTRACTS.md routes tasks to these queues)
KINDS: dict[str, dict[str, str]] = {
    # one process per GPU; a thread pool whose threads each hand one image to the process's batcher
    "detect": {"queues": "detect,screen", "pool": "threads", "name": "detect@%h"},
    # training, attacks and the benchmark: one heavy task at a time
    "cpu": {"queues": "train,attack,eval", "pool": "solo", "name": "cpu@%h"},
}
#: threads of a detection worker: enough for batches to fill under load; the value the fleet, the demo and
#: compose run with (README, Performance: the fleet's figures, its memory, the 4-thread trial)
DEFAULT_DETECT_CONCURRENCY = 16
#: messages reserved per thread (Celery's prefetch multiplier)
DEFAULT_PREFETCH_MULTIPLIER = 1


class Kind(str, Enum):
    detect = "detect"
    cpu = "cpu"


def worker_argv(
    kind: str,
    *,
    concurrency: int | None = None,
    prefetch_multiplier: int | None = None,
    name: str | None = None,
    queues: str | None = None,
    loglevel: str = "INFO",
    events: bool = True,
    app: str = "workers.app",
    python: str | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    """The command line of a worker of ``kind`` (``detect`` or ``cpu``): ``python -m celery -A ... worker ...``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    spec = KINDS[kind]
    argv = [python or sys.executable, "-m", "celery", "-A", app, "worker",
            "-Q", queues or spec["queues"], "-P", spec["pool"], "-n", name or spec["name"],
            "--loglevel", loglevel]
    if kind == "detect":
        argv += ["--concurrency", str(concurrency or DEFAULT_DETECT_CONCURRENCY),
                 "--prefetch-multiplier", str(prefetch_multiplier or DEFAULT_PREFETCH_MULTIPLIER)]
    elif prefetch_multiplier:
        argv += ["--prefetch-multiplier", str(prefetch_multiplier)]
    if events:
        argv.append("-E")
    return argv + list(extra or [])


def register(app: typer.Typer) -> None:
    app.command(
        "worker",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(worker)


def worker(
    ctx: typer.Context,
    kind: Kind = typer.Argument(Kind.detect, help="detect: queues detect+screen, threads pool, the model "
                                                  "loaded once per process; cpu: train+attack+eval, solo pool"),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", "-c", min=1,
                                              help=f"threads of a detection worker (default "
                                                   f"{DEFAULT_DETECT_CONCURRENCY})"),
    prefetch_multiplier: Optional[int] = typer.Option(None, "--prefetch-multiplier", min=1,
                                                      help="messages reserved per thread"),
    name: Optional[str] = typer.Option(None, "--name", "-n", help="node name (default detect@%h or cpu@%h)"),
    queues: Optional[str] = typer.Option(None, "--queues", "-Q", help="override the queues"),
    loglevel: str = typer.Option("INFO", "--loglevel", "-l"),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port", min=0,
                                               help="Prometheus port of this worker (sets UMCD_METRICS_PORT)"),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda (sets UMCD_DEVICE)"),
    cpus: Optional[str] = typer.Option(None, "--cpus", help="pin a detection worker to these CPUs, e.g. 0 or 0-3 "
                                                            "(sets UMCD_WORKER_CPUS)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the command instead of running it"),
) -> None:
    """Run a fleet worker in this process (exec: signals reach Celery directly). Extra arguments go to Celery."""
    argv = worker_argv(kind.value, concurrency=concurrency, prefetch_multiplier=prefetch_multiplier, name=name,
                       queues=queues, loglevel=loglevel, extra=list(ctx.args))
    env = dict(os.environ)
    if metrics_port is not None:
        env["UMCD_METRICS_PORT"] = str(metrics_port)
    if device is not None:
        env["UMCD_DEVICE"] = device
    if cpus is not None:
        from umcd.settings import format_cpu_list, parse_cpu_list

        try:
            env["UMCD_WORKER_CPUS"] = format_cpu_list(parse_cpu_list(cpus))
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--cpus") from None
    if dry_run:
        import shlex

        shown = ("UMCD_METRICS_PORT", "UMCD_DEVICE", "UMCD_WORKER_CPUS")
        prefix = " ".join(f"{k}={shlex.quote(env[k])}" for k in shown if k in env and env.get(k) != os.environ.get(k))
        typer.echo((prefix + " " if prefix else "") + shlex.join(argv))
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)
