"""`umcd gateway`: serve the HTTP upload gateway with uvicorn."""

from __future__ import annotations

import ipaddress
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("gateway")(gateway)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def gateway(
    host: Optional[str] = typer.Option(None, help="bind address (default: UMCD_GATEWAY_HOST, 127.0.0.1)"),
    port: Optional[int] = typer.Option(None, min=0, max=65535, help="port (default: UMCD_GATEWAY_PORT, 8000; 0: any free port)"),
    workers: int = typer.Option(1, min=1, help="uvicorn worker processes (rate limits are per process)"),
) -> None:
    """Serve POST /v1/query, POST /v1/insert, GET /v1/requests/{id}, /healthz and the OpenAPI docs."""
    import uvicorn
    from rich.console import Console

    from umcd.settings import get_settings, redact_url

    settings = get_settings()
    host = host or settings.gateway_host
    port = settings.gateway_port if port is None else port  # 0: any free port
    console = Console(stderr=True)
    if settings.api_key is None and not _is_loopback(host):
        console.print(f"[bold yellow]warning:[/] serving on {host} without an API key (set UMCD_API_KEY)")
    broker = redact_url(settings.broker_url) if settings.broker_url else f"embedded ({settings.artifacts}/redis.sock)"
    console.print(f"gateway on http://{host}:{port} (docs at /docs), broker {broker}")
    if workers > 1:
        uvicorn.run("producers.gateway:app", host=host, port=port, workers=workers,
                    log_level=settings.log_level.lower())
    else:
        from producers.gateway import create_app

        uvicorn.run(create_app(settings), host=host, port=port, log_level=settings.log_level.lower())
