"""The fleet as local processes, without Docker: Redis, PostgreSQL, migrations, workers, gateway, Flower."""

from __future__ import annotations

import glob
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

from umcd.settings import format_cpu_list, redact_url

LOOPBACK = "127.0.0.1"
STATE_VERSION = 1

#: Worker arguments after ``celery -A <app>``, the same as docker-compose.yml's (tests pin it).
DETECT_WORKER_ARGS: tuple[str, ...] = (
    "worker", "-Q", "detect,screen", "-P", "threads", "--concurrency", "16", "--prefetch-multiplier", "1",
)
CPU_WORKER_ARGS: tuple[str, ...] = ("worker", "-Q", "train,attack,eval", "-P", "solo")

#: secrets read from the environment, else from ``<artifacts>/fleet/.env``, else generated
SECRET_NAMES: tuple[str, ...] = ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_PASSWORD", "UMCD_API_KEY")
#: non-secret names with their defaults (same variables as .env.example)
NAME_DEFAULTS: dict[str, str] = {"POSTGRES_USER": "umcd", "POSTGRES_DB": "umcd", "FLOWER_USER": "admin"}

#: inherited variables that would silently override what the fleet sets for its children
_SCRUBBED_ENV = re.compile(r"^(FLOWER_.*|CELERY_BROKER_URL|CELERY_RESULT_BACKEND|UMCD_METRICS_PORT)$")
#: the variables of the shell running ``up`` that set how the fleet's processes behave (UMCD_DETECTOR,
#: UMCD_VISIBILITY_TIMEOUT_S, ... and the thread and device choices): kept in ``.env`` (some are secret, e.g.
#: UMCD_DETECTOR_SECRET), so that ``restart`` starts a process with them, whatever the shell running it holds
_SETTINGS_ENV = re.compile(r"^(UMCD_.*|OMP_NUM_THREADS|MKL_NUM_THREADS|CUDA_VISIBLE_DEVICES)$")
#: what the fleet sets itself, per fleet or per service (never taken from the shell as a setting)
_FLEET_OWN_ENV = frozenset({"UMCD_ARTIFACTS", "UMCD_BROKER_URL", "UMCD_RESULT_BACKEND", "UMCD_DATABASE_URL",
                            "UMCD_API_KEY", "UMCD_FLOWER_USER", "UMCD_FLOWER_PASSWORD", "UMCD_FLEET",
                            "UMCD_METRICS_PORT", "UMCD_WORKER_CPUS", "UMCD_GATEWAY_HOST", "UMCD_GATEWAY_PORT"})
_PLAIN_ENV_VALUE = re.compile(r"^[A-Za-z0-9_@%+=:,./-]*$")
ENV_FILE_NAME = ".env"


def worker_cpu_lists(workers: int, available=None) -> list[str | None]:
    """Each of ``workers`` workers' share of the CPUs this process may use, as CPU lists: contiguous equal
    shares, CPUs left over going to no worker; all None when there are more workers than CPUs, or where the OS
    has no CPU affinity."""
    if available is None:
        if not hasattr(os, "sched_getaffinity"):
            return [None] * workers
        available = os.sched_getaffinity(0)
    cpus = sorted(available)
    if workers <= 0 or workers > len(cpus):
        return [None] * max(workers, 0)
    share = len(cpus) // workers
    return [format_cpu_list(cpus[i * share:(i + 1) * share]) for i in range(workers)]


class FleetError(RuntimeError):
    """A fleet operation failed; the message says which service and ends with its log tail."""


@dataclass
class ServiceRecord:
    """One running process of the fleet, as recorded in ``state.json``.

    ``url`` never holds a credential (passwords are ``***``); ``create_time`` (seconds since the
    epoch, from the kernel) tells our process apart from a later one that reused ``pid``.
    """

    name: str
    kind: str  # redis | postgres | worker | gateway | flower
    pid: int
    create_time: float
    log: str
    url: str
    port: int | None = None
    health: str | None = None  # URL polled for health, for HTTP services
    argv: list[str] = field(default_factory=list)
    #: the service's own environment variables beyond the fleet's shared ones, none secret (metrics port, pinned
    #: CPUs, gateway address): what ``restart`` needs to start it again as it was
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class ServiceStatus:
    """What ``Fleet.status()`` reports for one service; ``healthy`` is None when not probed."""

    name: str
    kind: str
    pid: int
    alive: bool
    healthy: bool | None
    url: str
    log: str
    #: the model version a detection worker serves (its ``umcd_model_info`` metric); None when it serves none yet,
    #: for other services, or when not probed
    model: str | None = None


@dataclass
class FleetState:
    """The content of ``<artifacts>/fleet/state.json``: every service, in start order."""

    artifacts: str
    started_at: float
    services: list[ServiceRecord]
    database: str  # redacted URL of the audit store
    oneshots: dict[str, dict] = field(default_factory=dict)  # name -> {"rc", "log"}
    version: int = STATE_VERSION
    #: names of the shell's settings variables ``up`` gave the fleet (their values are in ``.env``); None in a
    #: state written by an older umcd
    settings: list[str] | None = None

    def service(self, name: str) -> ServiceRecord:
        """The record called ``name``; ``KeyError`` if there is none."""
        for record in self.services:
            if record.name == name:
                return record
        raise KeyError(name)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> FleetState:
        data = json.loads(text)
        data["services"] = [ServiceRecord(**s) for s in data.get("services", [])]
        return cls(**data)


# --------------------------------------------------------------------------- small helpers


def free_port(host: str = LOOPBACK, avoid: set[int] | None = None) -> int:
    """A TCP port on ``host`` that nothing listens on now (chosen by the OS), not in ``avoid``."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if not avoid or port not in avoid:
            if avoid is not None:
                avoid.add(port)
            return port
    raise FleetError("no free TCP port found")  # pragma: no cover


def port_is_open(port: int, host: str = LOOPBACK) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def log_tail(path: str | Path, n: int = 30) -> str:
    """The last ``n`` lines of a log file (or a note that there is none)."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(lines[-n:])


def read_env_file(path: str | Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of a dotenv file (comments, blanks and ``export`` prefixes ignored)."""
    values: dict[str, str] = {}
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        key = key.removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1].replace("'\\''", "'")
        elif len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        values[key] = value
    return values


def write_private_file(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by its owner only (mode 600)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _env_line(key: str, value: str) -> str:
    if any(c in value for c in "\n\r\0"):  # .env is read line by line: such a value would come back cut, or as
        # another variable (a line of it that looks like KEY=VALUE)
        raise FleetError(f"{key} holds a line break or NUL: the fleet keeps it in {ENV_FILE_NAME}, one line a "
                         "variable; give it on one line")
    if _PLAIN_ENV_VALUE.match(value):
        return f"{key}={value}"
    return f"{key}='" + value.replace("'", "'\\''") + "'"


def _redis_quoted(value: str) -> str:
    """``value`` as a double-quoted redis.conf argument."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def redacted(argv: list[str], secret_values: list[str]) -> list[str]:
    """``argv`` with every occurrence of a secret replaced by ``***``."""
    out = []
    for arg in argv:
        for value in secret_values:
            if value:
                arg = arg.replace(value, "***")
        out.append(arg)
    return out


def postgres_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` holding ``initdb`` and ``pg_ctl``, else PATH's, else None."""
    candidates = []
    for path in glob.glob("/usr/lib/postgresql/*/bin"):
        bindir = Path(path)
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            version = bindir.parent.name.split(".")[0]
            candidates.append((int(version) if version.isdigit() else 0, bindir))
    if candidates:
        return max(candidates)[1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _process(pid: int, create_time: float):
    """The live ``psutil.Process`` with this pid and start time, or None (gone, reused pid, zombie)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > 1.0:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback URL we built
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


_MODEL_INFO = re.compile(r'^umcd_model_info\{version="([^"\\]*)"\} 1(?:\.0)?$', re.M)


def served_model(metrics_url: str, timeout: float = 2.0) -> str | None:
    """The model version a detection worker's Prometheus endpoint says it serves, or None."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout) as response:  # noqa: S310 - loopback URL we built
            text = response.read(4 * 2**20).decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError):
        return None
    found = _MODEL_INFO.findall(text)
    return found[0] if len(found) == 1 else None


# --------------------------------------------------------------------------- the fleet


class Fleet:
    """Starts and stops the whole fleet as local processes under ``<artifacts>/fleet``.

    ``up()`` starts, in order: ``redis-server`` (append-only, password), a PostgreSQL cluster
    (``initdb`` on first use, as the ``postgres`` OS user when run as root; 127.0.0.1 only), the
    one-shot ``python -m <migrate_module>``, ``workers`` detection workers (queues detect, screen),
    one cpu worker (train, attack, eval), the gateway (uvicorn) and Flower (basic auth); every port
    is a free loopback port. It waits until each answers (PING, SQL login, worker ping through the
    broker, HTTP health), records every pid, log and URL in ``state.json``, and on any failure stops
    what it started and raises :class:`FleetError`. ``down()`` stops the recorded processes by pid
    (SIGTERM to each process group, SIGKILL after ``stop_grace_s``; ``pg_ctl stop`` for PostgreSQL).

    Secrets (``REDIS_PASSWORD``, ``POSTGRES_PASSWORD``, ``FLOWER_PASSWORD``, ``UMCD_API_KEY``) come
    from ``env`` (default: ``os.environ``), else from ``<artifacts>/fleet/.env``, else are generated;
    they are kept in that ``.env`` (mode 600) with the client URLs (``UMCD_BROKER_URL`` ...), so a
    second ``up`` reuses the same cluster and passwords. ``client_env()`` returns those variables.

    ``celery_app``, ``gateway_app`` and ``migrate_module`` name what the processes import; tests
    point them at small probes. Set ``postgres=False`` for a SQLite audit store in ``artifacts``.
    """

    def __init__(
        self,
        artifacts: str | os.PathLike = "artifacts",
        *,
        workers: int = 1,
        postgres: bool = True,
        migrate: bool = True,
        cpu_worker: bool = True,
        gateway: bool = True,
        flower: bool = True,
        celery_app: str = "workers.app",
        gateway_app: str = "producers.gateway:app",
        migrate_module: str = "db.migrate",
        python: str | None = None,
        workdir: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
        ready_timeout_s: float = 180.0,
        stop_grace_s: float = 15.0,
        progress: Callable[[str], None] | None = None,
        pin_workers: bool = True,
    ) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.artifacts = Path(artifacts).resolve()
        self.workers = workers
        #: each detection worker's CPUs (UMCD_WORKER_CPUS): an equal share of this process's CPUs each when
        #: ``pin_workers`` and there are no more workers than CPUs, else None (the OS schedules them anywhere)
        self.worker_cpus: list[str | None] = worker_cpu_lists(workers) if pin_workers else [None] * workers
        self.postgres = postgres
        self.migrate = migrate
        self.cpu_worker = cpu_worker
        self.gateway = gateway
        self.flower = flower
        self.celery_app = celery_app
        self.gateway_app = gateway_app
        self.migrate_module = migrate_module
        self.python = python or sys.executable
        self.workdir = Path(workdir).resolve() if workdir is not None else Path.cwd()
        self.env = dict(os.environ if env is None else env)
        self.ready_timeout_s = ready_timeout_s
        self.stop_grace_s = stop_grace_s
        self._progress = progress or (lambda message: None)
        self._popen: dict[int, subprocess.Popen] = {}  # children started by this object, by pid
        self._ports: set[int] = set()

    # ---- paths
    @property
    def root(self) -> Path:
        """``<artifacts>/fleet``: state, secrets, logs and server data."""
        return self.artifacts / "fleet"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def env_path(self) -> Path:
        return self.root / ".env"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def pg_dir(self) -> Path:
        return self.root / "pg"

    @property
    def pg_data(self) -> Path:
        return self.pg_dir / "data"

    # ---- command lines (pure; pinned against docker-compose.yml by the tests)
    def celery_argv(self, *args: str) -> list[str]:
        """``python -m celery -A <celery_app> <args>``."""
        return [self.python, "-m", "celery", "-A", self.celery_app, *args]

    def detect_worker_argv(self, index: int) -> list[str]:
        """Detection worker ``index`` (queues detect, screen; one process, a thread pool)."""
        return self.celery_argv(*DETECT_WORKER_ARGS, "-n", f"detect{index}@%h", "-E")

    def cpu_worker_argv(self) -> list[str]:
        """The cpu worker (queues train, attack, eval; solo pool)."""
        return self.celery_argv(*CPU_WORKER_ARGS, "-n", "cpu@%h", "-E")

    def gateway_argv(self, port: int) -> list[str]:
        """The HTTP gateway on ``127.0.0.1:port``."""
        return [self.python, "-m", "uvicorn", self.gateway_app, "--host", LOOPBACK, "--port", str(port)]

    def flower_argv(self, port: int) -> list[str]:
        """Flower on ``127.0.0.1:port``; its basic auth comes from ``FLOWER_BASIC_AUTH`` (not argv)."""
        return self.celery_argv("flower", f"--address={LOOPBACK}", f"--port={port}")

    # ---- state
    def read_state(self) -> FleetState | None:
        """The recorded state, or None when no fleet was started under these artifacts."""
        try:
            return FleetState.from_json(self.state_path.read_text())
        except FileNotFoundError:
            return None

    def _write_state(self, state: FleetState) -> None:
        write_private_file(self.state_path, state.to_json())

    def is_up(self) -> bool:
        """Whether any recorded process is still running."""
        state = self.read_state()
        return state is not None and any(self._alive(r) for r in state.services)

    def client_env(self) -> dict[str, str]:
        """Variables a client needs to talk to the running fleet (URLs with passwords, API key)."""
        if not self.env_path.exists():
            raise FleetError(f"no fleet secrets at {self.env_path}: run `umcd fleet up` first")
        stored = read_env_file(self.env_path)
        return {k: v for k, v in stored.items() if k.startswith("UMCD_")}

    # ---- up
    def up(self) -> FleetState:
        """Start every service, wait until each answers, record them; return the state."""
        if self.is_up():
            raise FleetError(f"a fleet is already running from {self.state_path}: run `umcd fleet down` first")
        self.state_path.unlink(missing_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(exist_ok=True)
        settings = {k: v for k, v in self.env.items() if _SETTINGS_ENV.match(k) and k not in _FLEET_OWN_ENV}
        for key, value in settings.items():  # one that .env cannot keep is refused before anything starts
            _env_line(key, value)
        values = self._secrets()
        secret_values = [values[name] for name in SECRET_NAMES]
        state = FleetState(artifacts=str(self.artifacts), started_at=time.time(), services=[], database="",
                           settings=sorted(settings))
        try:
            redis_port = free_port(avoid=self._ports)
            self._progress(f"starting redis-server on port {redis_port}")
            state.services.append(self._start_redis(redis_port, values["REDIS_PASSWORD"]))
            self._write_state(state)
            password = quote(values["REDIS_PASSWORD"], safe="")
            broker = f"redis://:{password}@{LOOPBACK}:{redis_port}/0"
            backend = f"redis://:{password}@{LOOPBACK}:{redis_port}/1"

            if self.postgres:
                self._progress("starting PostgreSQL")
                record, database_url = self._start_postgres(values)
                state.services.append(record)
                self._write_state(state)
            else:
                database_url = f"sqlite:///{self.artifacts / 'audit.db'}"
            state.database = redact_url(database_url)

            client = {
                "UMCD_ARTIFACTS": str(self.artifacts),
                "UMCD_BROKER_URL": broker,
                "UMCD_RESULT_BACKEND": backend,
                "UMCD_DATABASE_URL": database_url,
                "UMCD_API_KEY": values["UMCD_API_KEY"],
                "UMCD_FLOWER_USER": values["FLOWER_USER"],
                "UMCD_FLOWER_PASSWORD": values["FLOWER_PASSWORD"],
            }
            self._write_env_file(values, client, settings)
            base_env = self._child_env(client)

            if self.migrate:
                self._progress(f"running python -m {self.migrate_module}")
                state.oneshots["migrate"] = self._run_migrate(base_env)
                self._write_state(state)

            # each process joins state.services as soon as it is spawned, so a failure stops it too
            if any(self.worker_cpus):
                self._progress("detection workers pinned to CPUs " + " | ".join(map(str, self.worker_cpus)))
            for i in range(self.workers):
                port = free_port(avoid=self._ports)
                own = {"UMCD_METRICS_PORT": str(port)}
                if self.worker_cpus[i]:
                    own["UMCD_WORKER_CPUS"] = self.worker_cpus[i]
                state.services.append(self._spawn(
                    f"detect{i}", "worker", self.detect_worker_argv(i), {**base_env, **own},
                    url=f"http://{LOOPBACK}:{port}/metrics", port=port, secret_values=secret_values, own_env=own,
                ))
            if self.cpu_worker:
                port = free_port(avoid=self._ports)
                own = {"UMCD_METRICS_PORT": str(port)}
                state.services.append(self._spawn(
                    "cpu", "worker", self.cpu_worker_argv(), {**base_env, **own},
                    url=f"http://{LOOPBACK}:{port}/metrics", port=port, secret_values=secret_values, own_env=own,
                ))
            if self.gateway:
                port = free_port(avoid=self._ports)
                own = {"UMCD_GATEWAY_HOST": LOOPBACK, "UMCD_GATEWAY_PORT": str(port)}
                state.services.append(self._spawn(
                    "gateway", "gateway", self.gateway_argv(port), {**base_env, **own}, url=f"http://{LOOPBACK}:{port}",
                    port=port, health=f"http://{LOOPBACK}:{port}/healthz", secret_values=secret_values, own_env=own,
                ))
            if self.flower:
                port = free_port(avoid=self._ports)
                state.services.append(self._spawn(
                    "flower", "flower", self.flower_argv(port), {**base_env, **self._flower_auth(values)},
                    url=f"http://{LOOPBACK}:{port}", port=port, health=f"http://{LOOPBACK}:{port}/healthcheck",
                    secret_values=secret_values,
                ))
            self._write_state(state)
            self._progress("starting workers, gateway and Flower; waiting for their answers")
            self._wait_ready([r for r in state.services if r.kind in ("worker", "gateway", "flower")], broker)
        except BaseException:
            self._stop(state.services)
            self.state_path.unlink(missing_ok=True)
            raise
        return state

    def _secrets(self) -> dict[str, str]:
        stored = read_env_file(self.env_path) if self.env_path.exists() else {}
        values: dict[str, str] = {}
        for name in SECRET_NAMES:
            values[name] = self.env.get(name) or stored.get(name) or secrets.token_urlsafe(24)
        for name, default in NAME_DEFAULTS.items():
            values[name] = self.env.get(name) or stored.get(name) or default
        for name in ("FLOWER_USER", "FLOWER_PASSWORD"):
            if ":" in values[name] or "," in values[name]:
                raise FleetError(f"{name} must not contain ':' or ',' (Flower's basic-auth syntax)")
        self._write_env_file(values, {})
        return values

    def _write_env_file(self, values: Mapping[str, str], client: Mapping[str, str],
                        settings: Mapping[str, str] | None = None) -> None:
        lines = [
            "# Secrets and URLs of the local fleet (umcd fleet up). Keep private: mode 600.",
            "# Load into a shell with:  set -a; . " + str(self.env_path) + "; set +a",
        ]
        lines += [_env_line(k, v) for k, v in {**values, **client}.items()]
        if settings:
            lines.append("# the settings of the shell that ran `umcd fleet up` (`umcd fleet restart` starts with them)")
            lines += [_env_line(k, v) for k, v in settings.items()]
        write_private_file(self.env_path, "\n".join(lines) + "\n")

    def _child_env(self, client: Mapping[str, str], *, shell_settings: bool = True) -> dict[str, str]:
        """The environment of a child: this process's (without what would override the fleet's own variables,
        and without its settings variables unless ``shell_settings``), then ``client``."""
        env = {k: v for k, v in self.env.items()
               if not _SCRUBBED_ENV.match(k) and (shell_settings or not _SETTINGS_ENV.match(k))}
        env.update(client)
        env["UMCD_FLEET"] = str(self.root)
        env["UMCD_METRICS_PORT"] = "0"
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _spawn(
        self,
        name: str,
        kind: str,
        argv: list[str],
        env: Mapping[str, str],
        *,
        url: str,
        port: int | None,
        secret_values: list[str],
        health: str | None = None,
        log: Path | None = None,
        cwd: Path | None = None,
        own_env: Mapping[str, str] | None = None,
    ) -> ServiceRecord:
        """Start ``argv`` with ``env`` in its own session, output appended to its log; ``own_env`` (no secrets) is
        recorded for ``restart``."""
        import psutil

        log = log or self.logs_dir / f"{name}.log"
        shown = redacted(argv, secret_values)
        with open(log, "ab") as fh:
            fh.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} umcd fleet starts: {' '.join(shown)}\n".encode())
            fh.flush()
            proc = subprocess.Popen(
                argv, cwd=cwd or self.workdir, env=dict(env), stdin=subprocess.DEVNULL, stdout=fh,
                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
            )
        self._popen[proc.pid] = proc
        try:
            create_time = psutil.Process(proc.pid).create_time()
        except psutil.NoSuchProcess:
            proc.wait()
            raise FleetError(f"{name} exited at once ({proc.returncode}):\n{log_tail(log)}") from None
        return ServiceRecord(
            name=name, kind=kind, pid=proc.pid, create_time=create_time, log=str(log), url=url, port=port,
            health=health, argv=shown, env=dict(own_env or {}),
        )

    @staticmethod
    def _flower_auth(values: Mapping[str, str]) -> dict[str, str]:
        """Flower's basic auth, from the environment (never its command line)."""
        return {"FLOWER_BASIC_AUTH": f"{values['FLOWER_USER']}:{values['FLOWER_PASSWORD']}"}

    # ---- restart
    def restart(self, name: str) -> ServiceRecord:
        """Stop the worker, gateway or Flower called ``name`` if it still runs, start it again as ``up`` did (same
        command line, port, CPUs, secrets and settings: the ``UMCD_*`` and thread variables of the shell that ran
        ``up``, not those of this one), wait until it answers, and record it; return its new record.

        Redis and PostgreSQL hold the fleet's state and every URL names their ports: restart those with ``down``
        and ``up`` (their data are kept).
        """
        state = self.read_state()
        if state is None:
            raise FleetError(f"no fleet recorded in {self.state_path}: run `umcd fleet up`")
        names = [r.name for r in state.services]
        if name not in names:
            raise FleetError(f"no service {name!r} in this fleet (services: {', '.join(names)})")
        old = state.service(name)
        if old.kind in ("redis", "postgres"):
            raise FleetError(f"{name} holds the fleet's state: restart the whole fleet with `umcd fleet down` and "
                             "`umcd fleet up` (its data are kept)")
        if not old.argv or (old.kind == "worker" and "UMCD_METRICS_PORT" not in old.env) or state.settings is None:
            raise FleetError(f"{name} was recorded by an older umcd without what a restart needs: restart the whole "
                             "fleet with `umcd fleet down` and `umcd fleet up`")
        if any("***" in arg for arg in old.argv):  # a secret value occurs in its command line: recorded redacted
            raise FleetError(f"{name}'s recorded command line has a redacted part (a secret equal to part of it): "
                             "restart the whole fleet with `umcd fleet down` and `umcd fleet up`")
        stored = read_env_file(self.env_path) if self.env_path.exists() else {}
        broker = stored.get("UMCD_BROKER_URL")
        if not broker:
            raise FleetError(f"no fleet secrets at {self.env_path}: restart the whole fleet")
        self._terminate([old])
        # the fleet's variables and the settings `up` was given, not those of the shell running this restart
        recorded = {k: v for k, v in stored.items() if k.startswith("UMCD_") or k in state.settings}
        env = {**self._child_env(recorded, shell_settings=False), **old.env}
        if old.kind == "flower":
            env.update(self._flower_auth({**NAME_DEFAULTS, **stored}))
        new = self._spawn(name, old.kind, old.argv, env, url=old.url, port=old.port, health=old.health,
                          secret_values=[stored[k] for k in SECRET_NAMES if stored.get(k)], log=Path(old.log),
                          own_env=old.env)
        state.services[names.index(name)] = new
        self._write_state(state)
        self._wait_ready([new], broker)
        return new

    # ---- redis
    def _start_redis(self, port: int, password: str) -> ServiceRecord:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.access(binary, os.X_OK):
            raise FleetError("redis-server is not installed: run `make services` (apt-get install redis-server)")
        data = self.root / "redis"
        data.mkdir(exist_ok=True)
        conf = self.root / "redis.conf"
        write_private_file(conf, "\n".join([
            f"bind {LOOPBACK}",
            f"port {port}",
            "protected-mode yes",
            "daemonize no",
            f"dir {_redis_quoted(str(data))}",
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
            'logfile ""',
            f"requirepass {_redis_quoted(password)}",
        ]) + "\n")
        record = self._spawn(
            "redis", "redis", [binary, str(conf)], self._child_env_minimal(), url=f"redis://:***@{LOOPBACK}:{port}/0",
            port=port, secret_values=[password], cwd=data,
        )
        deadline = time.monotonic() + 30
        while not self._redis_ping(port, password):
            self._fail_if_dead(record)
            if time.monotonic() > deadline:
                raise FleetError(f"redis-server did not answer PING on port {port}:\n{log_tail(record.log)}")
            time.sleep(0.05)
        return record

    def _child_env_minimal(self) -> dict[str, str]:
        env = {k: v for k, v in self.env.items() if k in ("PATH", "LANG", "LC_ALL", "HOME", "TZ")}
        env["UMCD_FLEET"] = str(self.root)  # marks every process of this fleet (see `started_by`)
        return env

    def started_by(self, pid: int) -> bool:
        """Whether process ``pid`` (alive, not a zombie) belongs to a fleet under this root.

        Python processes carry ``UMCD_FLEET=<root>`` in their environment; redis-server and
        PostgreSQL rewrite their process title over it, and are known by their working directory
        (their data folder under the root).
        """
        import psutil

        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
            if Path(proc.cwd()).is_relative_to(self.root):
                return True
            return proc.environ().get("UMCD_FLEET") == str(self.root)
        except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
            return False

    @staticmethod
    def _redis_ping(port: int, password: str) -> bool:
        import redis

        try:
            client = redis.Redis(host=LOOPBACK, port=port, password=password, socket_timeout=1.0)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except redis.RedisError:
            return False

    # ---- postgres
    def _pg_user(self) -> tuple[int, int] | None:
        """(uid, gid) of the ``postgres`` OS user when running as root (PostgreSQL refuses root)."""
        if os.geteuid() != 0:
            return None
        import pwd

        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            raise FleetError(
                "running as root, PostgreSQL needs the `postgres` OS user (apt-get install postgresql), "
                "or use --no-postgres"
            ) from None
        return entry.pw_uid, entry.pw_gid

    def _pg_run(self, argv: list[str], *, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
        ids = self._pg_user()
        kwargs = {"user": ids[0], "group": ids[1], "extra_groups": []} if ids else {}
        proc = subprocess.run(
            argv, cwd=self.pg_dir, env=self._child_env_minimal(), capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL, **kwargs,
        )
        if check and proc.returncode != 0:
            raise FleetError(
                f"{Path(argv[0]).name} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()}\n"
                f"{log_tail(self.pg_dir / 'postgres.log')}"
            )
        return proc

    def _check_reachable_by(self, uid: int, gid: int, path: Path) -> None:
        for parent in [*reversed(path.parents)]:
            st = parent.stat()
            if st.st_uid == uid:
                ok = st.st_mode & 0o100
            elif st.st_gid == gid:
                ok = st.st_mode & 0o010
            else:
                ok = st.st_mode & 0o001
            if not ok:
                raise FleetError(
                    f"PostgreSQL runs as the `postgres` OS user, which cannot enter {parent} "
                    f"(mode {oct(st.st_mode & 0o777)}): choose --artifacts under a traversable folder, "
                    "run `chmod o+x` on it, or use --no-postgres"
                )

    def _start_postgres(self, values: Mapping[str, str]) -> tuple[ServiceRecord, str]:
        bindir = postgres_bin_dir()
        if bindir is None:
            raise FleetError("PostgreSQL is not installed: run `make services` (apt-get install postgresql)")
        ids = self._pg_user()
        self.pg_dir.mkdir(exist_ok=True)
        if ids:
            self._check_reachable_by(*ids, self.pg_dir)
            os.chown(self.pg_dir, *ids)
        os.chmod(self.pg_dir, 0o700)
        user, password, database = values["POSTGRES_USER"], values["POSTGRES_PASSWORD"], values["POSTGRES_DB"]
        if not (self.pg_data / "PG_VERSION").exists():
            pwfile = self.pg_dir / "initdb.pw"
            write_private_file(pwfile, password + "\n")
            if ids:
                os.chown(pwfile, *ids)
            try:
                self._pg_run([
                    str(bindir / "initdb"), "-D", str(self.pg_data), "-U", user, "-E", "UTF8", "--locale=C",
                    "--auth=scram-sha-256", f"--pwfile={pwfile}",
                    # an empty new cluster: skipping initdb's fsyncs saves seconds, and only an OS
                    # crash in the next moments could cost it (delete artifacts/fleet/pg then)
                    "--no-sync",
                ])
            finally:
                pwfile.unlink(missing_ok=True)
            with open(self.pg_data / "postgresql.conf", "a", encoding="utf-8") as fh:
                fh.write("\n# umcd fleet: port and addresses are rewritten by every `umcd fleet up`\n")
                fh.write("include_if_exists = 'umcd_fleet.conf'\n")
        port = free_port(avoid=self._ports)
        conf = self.pg_data / "umcd_fleet.conf"
        conf.write_text("\n".join([
            f"port = {port}",
            f"listen_addresses = '{LOOPBACK}'",
            "unix_socket_directories = ''",  # TCP only: no socket path length limit, no peer logins
            "password_encryption = 'scram-sha-256'",
        ]) + "\n")
        if ids:
            os.chown(conf, *ids)
        log = self.pg_dir / "postgres.log"
        self._pg_run([
            str(bindir / "pg_ctl"), "-D", str(self.pg_data), "-l", str(log), "-w", "-t",
            str(int(self.ready_timeout_s)), "start",
        ], timeout=self.ready_timeout_s + 30)
        import psutil

        pid = int((self.pg_data / "postmaster.pid").read_text().splitlines()[0])
        record = ServiceRecord(
            name="postgres", kind="postgres", pid=pid, create_time=psutil.Process(pid).create_time(),
            log=str(log), url=f"postgresql://{user}:***@{LOOPBACK}:{port}/{database}", port=port,
            argv=[str(bindir / "postgres"), "-D", str(self.pg_data)],
        )
        try:
            self._ensure_database(port, user, password, database)
        except BaseException:
            self._stop_postgres(record)
            raise
        q = quote(password, safe="")
        return record, f"postgresql+psycopg://{quote(user, safe='')}:{q}@{LOOPBACK}:{port}/{quote(database, safe='')}"

    def _ensure_database(self, port: int, user: str, password: str, database: str) -> None:
        import psycopg
        from psycopg import sql

        deadline = time.monotonic() + 30
        while True:
            try:
                conn = psycopg.connect(
                    host=LOOPBACK, port=port, user=user, password=password, dbname="postgres",
                    autocommit=True, connect_timeout=5,
                )
                break
            except psycopg.OperationalError as exc:
                if "password authentication failed" in str(exc):
                    raise FleetError(
                        f"the cluster in {self.pg_data} was created with another password for {user!r}: "
                        f"use the POSTGRES_PASSWORD kept in {self.env_path}, or delete {self.pg_dir}"
                    ) from None
                if time.monotonic() > deadline:
                    raise FleetError(f"cannot log in to PostgreSQL on port {port}: {exc}") from exc
                time.sleep(0.2)
        with conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))

    # ---- migrate
    def _run_migrate(self, env: Mapping[str, str]) -> dict:
        log = self.logs_dir / "migrate.log"
        with open(log, "ab") as fh:
            fh.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} umcd fleet runs: python -m {self.migrate_module}\n".encode())
            fh.flush()
            try:
                proc = subprocess.run(
                    [self.python, "-m", self.migrate_module], cwd=self.workdir, env=dict(env),
                    stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, timeout=self.ready_timeout_s,
                )
            except subprocess.TimeoutExpired:
                raise FleetError(f"migrations ran past {self.ready_timeout_s:.0f} s:\n{log_tail(log)}") from None
        if proc.returncode != 0:
            raise FleetError(f"migrations failed ({proc.returncode}):\n{log_tail(log)}")
        return {"rc": proc.returncode, "log": str(log)}

    # ---- readiness
    def _fail_if_dead(self, record: ServiceRecord) -> None:
        proc = self._popen.get(record.pid)
        if proc is not None and proc.poll() is not None:
            raise FleetError(f"{record.name} exited with code {proc.returncode}:\n{log_tail(record.log)}")
        if proc is None and not self._alive(record):
            raise FleetError(f"{record.name} is not running:\n{log_tail(record.log)}")

    def _wait_ready(self, records: list[ServiceRecord], broker: str) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        waiting = {r.name: r for r in records}
        workers = {r.name for r in records if r.kind == "worker"}
        control = None
        try:
            while waiting:
                for record in list(waiting.values()):
                    self._fail_if_dead(record)
                    if record.health and _http_ok(record.health):
                        del waiting[record.name]
                if workers & waiting.keys():
                    if control is None:
                        import celery

                        control = celery.Celery("umcd-fleet-probe", broker=broker, set_as_current=False)
                        control.conf.broker_connection_retry_on_startup = True
                    replies = control.control.ping(timeout=1.0) or []
                    answered = {node.split("@", 1)[0] for reply in replies for node in reply}
                    for name in workers & answered:
                        waiting.pop(name, None)
                elif waiting:
                    time.sleep(0.2)
                if waiting and time.monotonic() > deadline:
                    name, record = next(iter(waiting.items()))
                    raise FleetError(
                        f"{', '.join(waiting)} did not answer within {self.ready_timeout_s:.0f} s; "
                        f"{name} log:\n{log_tail(record.log)}"
                    )
        finally:
            if control is not None:
                control.close()

    # ---- status
    def _alive(self, record: ServiceRecord) -> bool:
        proc = self._popen.get(record.pid)
        if proc is not None and proc.poll() is not None:
            return False
        return _process(record.pid, record.create_time) is not None

    def status(self, probe: bool = True) -> list[ServiceStatus]:
        """Each recorded service: alive (same pid and start time), and with ``probe`` its health.

        Health: HTTP services answer their health URL, Redis answers PING, PostgreSQL accepts TCP;
        workers are reported alive only (their answer needs the broker: see ``up()``).
        """
        state = self.read_state()
        if state is None:
            return []
        stored = read_env_file(self.env_path) if self.env_path.exists() else {}
        out = []
        for record in state.services:
            alive = self._alive(record)
            healthy: bool | None = None
            if probe and alive:
                if record.health:
                    healthy = _http_ok(record.health)
                elif record.kind == "redis" and record.port:
                    healthy = self._redis_ping(record.port, stored.get("REDIS_PASSWORD", ""))
                elif record.kind == "postgres" and record.port:
                    healthy = port_is_open(record.port)
            model = served_model(record.url) if probe and alive and record.kind == "worker" and record.url else None
            out.append(ServiceStatus(record.name, record.kind, record.pid, alive, healthy, record.url, record.log,
                                     model))
        return out

    # ---- down
    def down(self) -> list[str]:
        """Stop every recorded process and remove ``state.json``; return the names stopped."""
        state = self.read_state()
        if state is None:
            return []
        stopped = self._stop(state.services)
        self.state_path.unlink(missing_ok=True)
        return stopped

    def _signal_group(self, record: ServiceRecord, sig: int) -> None:
        try:
            if os.getpgid(record.pid) == record.pid:  # started with its own session: its group is its pid
                os.killpg(record.pid, sig)
            else:
                os.kill(record.pid, sig)
        except ProcessLookupError:
            pass

    def _wait_gone(self, records: list[ServiceRecord], timeout: float) -> list[ServiceRecord]:
        deadline = time.monotonic() + timeout
        left = list(records)
        while left:
            left = [r for r in left if self._alive(r)]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return left

    def _terminate(self, records: list[ServiceRecord]) -> None:
        live = [r for r in records if self._alive(r)]
        for record in live:
            self._signal_group(record, signal.SIGTERM)
        for record in self._wait_gone(live, self.stop_grace_s):
            if self._alive(record):  # identity checked again right before the kill
                self._signal_group(record, signal.SIGKILL)
        self._wait_gone(live, 10.0)
        for record in records:
            proc = self._popen.pop(record.pid, None)
            if proc is not None:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL already sent
                    pass

    def _stop_postgres(self, record: ServiceRecord) -> None:
        if not self._alive(record):
            return
        bindir = postgres_bin_dir()
        if bindir is not None and (self.pg_data / "PG_VERSION").exists():
            self._pg_run(
                [str(bindir / "pg_ctl"), "-D", str(self.pg_data), "-m", "fast", "-w", "-t",
                 str(int(self.stop_grace_s) + 15), "stop"],
                timeout=self.stop_grace_s + 45, check=False,
            )
        if self._wait_gone([record], 5.0):
            self._terminate([record])

    def _stop(self, records: list[ServiceRecord]) -> list[str]:
        names = [r.name for r in records if self._alive(r)]
        apps = [r for r in records if r.kind not in ("redis", "postgres")]
        self._terminate(apps)
        for record in records:
            if record.kind == "postgres":
                self._stop_postgres(record)
        self._terminate([r for r in records if r.kind == "redis"])
        return names

