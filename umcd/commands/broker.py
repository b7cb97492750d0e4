"""`umcd broker status|stop`: the embedded broker (a redis-server on ``artifacts/redis.sock``) that the SDK starts
when ``UMCD_BROKER_URL`` is unset, and that outlives the process that started it (workers share it)."""

from __future__ import annotations

import json
from typing import Any

import typer

broker_app = typer.Typer(
    help="The embedded broker: the redis-server on artifacts/redis.sock that the SDK starts when UMCD_BROKER_URL "
         "is unset and that outlives it. See what it holds; stop it.",
    no_args_is_help=True,
)

#: the fleet's queues (umcd.celeryconf.QUEUES; not imported here, to keep `umcd --help` light)
QUEUE_NAMES = ("detect", "screen", "train", "attack", "eval")


def register(app: typer.Typer) -> None:
    app.add_typer(broker_app, name="broker")


def _embedded() -> tuple[Any, Any]:
    """(settings, the EmbeddedRedis of settings.artifacts attached to a live server or not)."""
    from umcd.embedded import EmbeddedRedis
    from umcd.settings import get_settings

    from umcd.embedded import EmbeddedBrokerError

    settings = get_settings()
    try:
        server = EmbeddedRedis(settings.artifacts, die_with_parent=False)
    except EmbeddedBrokerError as exc:  # e.g. a socket path over the kernel's limit: no embedded broker there
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    server.attach()
    return settings, server


def redis_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.ConnectionError, redis.TimeoutError)


def _status(server: Any) -> dict[str, Any]:
    """What a live embedded server holds: queued messages per queue, connected clients, memory."""
    import redis

    client = redis.Redis(unix_socket_path=str(server.socket_path), socket_timeout=2.0)
    try:
        info = client.info()
        queued = {name: int(client.llen(name)) for name in QUEUE_NAMES}
        unacked = int(client.hlen("unacked"))
    finally:
        client.close()
    return {"queued": queued, "unacknowledged": unacked, "clients": int(info.get("connected_clients", 1)) - 1,
            "used_memory_mib": round(info.get("used_memory", 0) / 2**20, 1)}


@broker_app.command("status")
def status(as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Whether the embedded broker runs, its pid and socket, and what it holds. Exit 1 when it does not run."""
    from umcd.settings import redact_url

    settings, server = _embedded()
    out: dict[str, Any] = {"socket": str(server.socket_path), "running": server.is_alive(), "pid": server.pid,
                           "configured_broker": redact_url(settings.broker_url) if settings.broker_url else None}
    if out["running"]:
        try:
            out.update(_status(server))
        except redis_errors():  # it stopped between the two questions
            out["running"] = False
    if as_json:
        typer.echo(json.dumps(out, indent=2))
    else:
        if out["configured_broker"]:
            typer.echo(f"UMCD_BROKER_URL is set ({out['configured_broker']}): the fleet does not use the embedded "
                       "broker")
        if not out["running"]:
            typer.echo(f"no embedded broker runs on {out['socket']}")
        else:
            queued = ", ".join(f"{name} {n}" for name, n in out["queued"].items())
            typer.echo(f"embedded broker: redis-server pid {out['pid']} on {out['socket']}\n"
                       f"  queued: {queued}; unacknowledged: {out['unacknowledged']}\n"
                       f"  clients connected (workers, producers): {out['clients']}; memory: "
                       f"{out['used_memory_mib']} MiB\n"
                       f"  stop it with `umcd broker stop`")
    raise typer.Exit(0 if out["running"] else 1)


@broker_app.command("stop")
def stop() -> None:
    """Stop the embedded broker. Its queue is saved to artifacts/redis.db and comes back at its next start; workers
    and clients still connected retry until it is back."""
    _, server = _embedded()
    if not server.is_alive():
        typer.echo(f"no embedded broker runs on {server.socket_path}")
        return
    try:
        held = _status(server)
    except redis_errors():
        held = {"queued": {}, "unacknowledged": 0, "clients": 0}
    pid = server.pid
    server.stop()
    waiting = sum(held["queued"].values()) + held["unacknowledged"]
    typer.echo(f"stopped the embedded broker (pid {pid})"
               + (f"; {waiting} message(s) it held are saved in {server.paths['root'] / 'redis.db'}" if waiting else "")
               + (f"; {held['clients']} client(s) were connected" if held["clients"] else ""))
