"""`umcd submit query|insert PATH...`: send images to the fleet and show their verdicts."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

submit_app = typer.Typer(
    help="Send images to the fleet's detect (query) or screen (insert) queue and show the verdicts.",
    no_args_is_help=True,
)

#: file name suffixes picked up when a directory is given
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ico", ".ppm", ".pgm"}
#: a file of decoded pixels: a uint8 numpy array (n, H, W) or (n, H, W, C), sent as pixel-array batch messages
ARRAY_SUFFIX = ".npy"
#: image files a message by default (the SDK's DEFAULT_BATCH_SIZE; not imported here, to keep `umcd --help` light)
BATCH_SIZE = 256
BATCH_HELP = ("image files per batch message, stored once in Redis as the message's blob (0: one message per "
              "file, as umcd.detect / umcd.screen)")
_VERDICT_STYLE = {"benign": "green", "adversarial": "bold red", "invalid_input": "yellow", "error": "red"}


def register(app: typer.Typer) -> None:
    app.add_typer(submit_app, name="submit")


def expand_paths(paths: list[Path]) -> list[Path]:
    """Files as given, plus the image files directly inside any directory (sorted)."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out.extend(sorted(p for p in path.iterdir()
                              if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | {ARRAY_SUFFIX}))
        else:
            out.append(path)
    return out


def _progress(console: Any):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def _why(exc: BaseException) -> str:
    from producers.sdk import BrokerUnavailable

    return f"broker unavailable: {exc}" if isinstance(exc, BrokerUnavailable) else str(exc)


class _Batcher:
    """Image files of a submission gathered into batch messages of ``size`` (the SDK's ``batch=True``).

    Each file is checked on its own first, so that a missing, unreadable or too large file is listed as not
    sent and the others go on, as they do one message per file; a file that fails only while its group is
    sent (it vanished in between) is set aside and the rest of the group is sent once more (:meth:`flush`);
    what was queued before keeps its request id."""

    def __init__(self, client: Any, kind: str, size: int, progress: Any, task: Any, client_name: str | None,
                 source: str | None, label: int | None) -> None:
        self.client, self.kind, self.size = client, kind, size
        self.progress, self.task = progress, task
        self.extra = {"client": client_name} if kind == "query" else {"source": source, "label": label,
                                                                        "client": client_name}
        self.group: list[tuple[Path, dict[str, Any]]] = []

    def add(self, path: Path, row: dict[str, Any]) -> None:
        from producers.sdk import check_image

        check_image(path, self.client.settings.max_image_bytes)
        self.group.append((path, row))
        if len(self.group) >= self.size:
            self.flush()

    def flush(self, again: bool = True) -> None:
        """Send the gathered files; raises what stopped them (the rows of those not sent carry the error).

        A file that changed since it was checked (gone, grown past the limit) stops the SDK at that file (or, at
        its pre-check, before anything of the group): then each file not sent yet is checked again and the others
        are sent once more without it."""
        from producers.sdk import BrokerUnavailable, check_image

        group, self.group = self.group, []
        if not group:
            return

        def sent(index: int, rid: str) -> None:
            group[index][1]["request_id"] = rid
            self.progress.advance(self.task)

        submit = self.client.submit_queries if self.kind == "query" else self.client.submit_inserts
        try:
            submit([path for path, _ in group], on_sent=sent, batch=True, batch_size=self.size, **self.extra)
        except Exception as exc:
            if again and not isinstance(exc, BrokerUnavailable):
                for path, row in group:
                    if row["request_id"] is not None:
                        continue
                    try:
                        check_image(path, self.client.settings.max_image_bytes)
                        self.group.append((path, row))
                    except (OSError, ValueError) as bad:
                        row["error"] = _why(bad)
                        self.progress.advance(self.task)
                if any(row["error"] is not None for _, row in group):  # the file that changed is set aside
                    return self.flush(again=False)
                self.group = []
            for _, row in group:
                if row["request_id"] is None:
                    row["error"] = _why(exc)
                    self.progress.advance(self.task)
            raise


def _run(kind: str, paths: list[Path], *, wait: bool, timeout: float, as_json: bool,
         client_name: str | None, source: str | None = None, label: int | None = None,
         batch_size: int = 0) -> None:
    from rich.console import Console
    from rich.table import Table

    from producers.sdk import BrokerUnavailable, Client, ImageTooLarge

    err = Console(stderr=True)
    out = Console()
    files = expand_paths(paths)
    if not files:
        err.print("[red]no image files given[/]")
        raise typer.Exit(2)

    rows: list[dict[str, Any]] = []
    failures = 0
    broker_down: BrokerUnavailable | None = None
    with Client() as client, _progress(err) as progress:
        task = progress.add_task(f"submitting to {'detect' if kind == 'query' else 'screen'}", total=len(files))
        batcher = (_Batcher(client, kind, batch_size, progress, task, client_name, source, label)
                   if batch_size else None)
        for path in [*files, None]:  # None: the end, where the last batch goes
            is_array = path is not None and path.suffix.lower() == ARRAY_SUFFIX
            if batcher is not None and (path is None or is_array):  # the files gathered so far go first, in order
                try:
                    batcher.flush()
                except BrokerUnavailable as exc:
                    broker_down = exc
                    break
                except (ImageTooLarge, OSError, ValueError):
                    pass  # its rows carry the error
            if path is None:
                break
            try:
                if is_array:
                    rows += _submit_array(client, kind, path, client_name, source, label)
                else:
                    row: dict[str, Any] = {"path": str(path), "request_id": None, "error": None, "result": None}
                    rows.append(row)
                    if batcher is not None:
                        batcher.add(path, row)  # the progress bar advances as its batch is sent
                        continue
                    if kind == "query":
                        row["request_id"] = client.submit_query(path, client=client_name)
                    else:
                        row["request_id"] = client.submit_insert(path, source=source, label=label,
                                                                 client=client_name)
            except (BrokerUnavailable, ImageTooLarge, OSError, ValueError) as exc:
                if is_array:  # the images of the array queued before it stopped
                    rows += [{"path": f"{path}[{i}]", "request_id": rid, "error": None, "result": None}
                             for i, rid in enumerate(getattr(exc, "sent", []))]
                    rows.append({"path": str(path), "request_id": None, "error": None, "result": None})
                if rows[-1]["error"] is None:  # this file's own failure (a failed batch marked and counted its own)
                    rows[-1]["error"] = _why(exc)
                    progress.advance(task)
                if isinstance(exc, BrokerUnavailable):  # the rest cannot be sent either
                    broker_down = exc
                    break
                continue
            progress.advance(task)
        if broker_down is not None:
            listed = {row["path"] for row in rows}
            rows += [{"path": str(p), "request_id": None, "error": "not sent: broker unavailable", "result": None}
                     for p in files if str(p) not in listed]
            for row in rows:  # gathered for a batch that was never sent
                if row["request_id"] is None and row["error"] is None:
                    row["error"] = "not sent: broker unavailable"
        failures = sum(1 for row in rows if row["request_id"] is None)

        pending = {row["request_id"]: row for row in rows if row["request_id"]}
        if wait and pending and broker_down is None:
            waiting = progress.add_task("waiting for verdicts", total=len(pending))
            deadline = time.monotonic() + timeout
            while pending and time.monotonic() < deadline:
                done = client.wait(list(pending), timeout=min(0.5, max(0.0, deadline - time.monotonic())))
                for rid, result in done.items():
                    pending.pop(rid)["result"] = result.to_dict()
                progress.advance(waiting, len(done))
            if pending:
                err.print(f"[yellow]{len(pending)} request(s) still pending after {timeout:.0f} s[/]")
                failures += len(pending)

    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        table = Table(title=f"umcd submit {kind}", show_lines=False)
        table.add_column("file", overflow="fold")
        table.add_column("request id", style="cyan", no_wrap=True)
        if wait:
            for name in ("verdict", "fired", "reasons", "ms"):
                table.add_column(name, overflow="fold", justify="right" if name == "ms" else "left")
        for row in rows:
            cells = [Path(row["path"]).name, row["request_id"] or "-"]
            if wait:
                result = row["result"]
                if row["error"]:
                    cells += ["[red]not sent[/]", "", row["error"], ""]
                elif result is None:
                    cells += ["[yellow]pending[/]", "", "", ""]
                else:
                    verdict = result.get("verdict", "?")
                    total = (result.get("latency_ms") or {}).get("total")
                    cells += [f"[{_VERDICT_STYLE.get(verdict, 'white')}]{verdict}[/]",
                              ",".join(result.get("fired") or []), "; ".join(result.get("reasons") or []),
                              f"{total:.1f}" if isinstance(total, (int, float)) else ""]
            elif row["error"]:
                cells[1] = f"[red]not sent: {row['error']}[/]"
            table.add_row(*cells)
        out.print(table)
    if broker_down is not None:  # what was queued before is listed above: its verdicts will still come
        sent = sum(1 for row in rows if row["request_id"])
        err.print(f"[red]broker unavailable:[/] {broker_down} ({sent} image(s) were queued before; "
                  "their request ids are listed)")
        raise typer.Exit(3)
    if failures:
        raise typer.Exit(1)


def _submit_array(client: Any, kind: str, path: Path, client_name: str | None, source: str | None,
                  label: int | None) -> list[dict[str, Any]]:
    """Send the images of an ``.npy`` file of uint8 pixels in batch messages; one row per image (``file.npy[i]``).

    Raises ``ValueError`` for a file that is not such an array (pickles are never loaded)."""
    import numpy as np

    try:
        pixels = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as exc:  # an object array (it would need a pickle), a cut or foreign file
        raise ValueError(f"not an array of pixels: {type(exc).__name__}: {exc}") from None
    if not isinstance(pixels, np.ndarray):
        raise ValueError("an .npz archive: give one .npy array of shape (n, H, W) or (n, H, W, C)")
    if kind == "query":
        ids = client.submit_queries(pixels, client=client_name)
    else:
        ids = client.submit_inserts(pixels, source=source, label=label, client=client_name)
    return [{"path": f"{path}[{i}]", "request_id": rid, "error": None, "result": None} for i, rid in enumerate(ids)]


@submit_app.command("query")
def query(
    paths: list[Path] = typer.Argument(..., exists=True, help="image files, directories of images, or .npy files of "
                                       "uint8 pixels (n, H, W[, C]) sent as pixel-array batches"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="wait for the verdicts"),
    timeout: float = typer.Option(60.0, help="seconds to wait for verdicts"),
    as_json: bool = typer.Option(False, "--json", help="print JSON on stdout instead of a table"),
    client_name: Optional[str] = typer.Option(None, "--client", help="client name recorded in the audit"),
    batch_size: int = typer.Option(BATCH_SIZE, "--batch-size", min=0, max=1024, help=BATCH_HELP),
) -> None:
    """Screen query images (queue detect); prints request ids and, when waiting, verdicts."""
    _run("query", paths, wait=wait, timeout=timeout, as_json=as_json, client_name=client_name, batch_size=batch_size)


@submit_app.command("insert")
def insert(
    paths: list[Path] = typer.Argument(..., exists=True, help="image files, directories of images, or .npy files of "
                                       "uint8 pixels (n, H, W[, C]) sent as pixel-array batches"),
    source: Optional[str] = typer.Option(None, "--source", help="where the images come from"),
    label: Optional[int] = typer.Option(None, "--label", help="class label of the images"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="wait for the verdicts"),
    timeout: float = typer.Option(60.0, help="seconds to wait for verdicts"),
    as_json: bool = typer.Option(False, "--json", help="print JSON on stdout instead of a table"),
    client_name: Optional[str] = typer.Option(None, "--client", help="client name recorded in the audit"),
    batch_size: int = typer.Option(BATCH_SIZE, "--batch-size", min=0, max=1024, help=BATCH_HELP),
) -> None:
    """Screen images for insertion (queue screen); benign ones join the database index."""
    _run("insert", paths, wait=wait, timeout=timeout, as_json=as_json, client_name=client_name,
         source=source, label=label, batch_size=batch_size)
