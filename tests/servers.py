"""Real Redis and PostgreSQL servers on free loopback ports, started and stopped by tests."""

from __future__ import annotations

import atexit
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"

_live: set = set()  # servers started by this process and not cleaned up yet


def _stop_all_at_exit() -> None:
    for server in list(_live):
        try:
            server.cleanup()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


atexit.register(_stop_all_at_exit)


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_open(port: int, host: str = LOOPBACK) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(port: int, host: str = LOOPBACK, timeout: float = 30.0, process=None) -> None:
    """Block until ``host:port`` accepts TCP connections; raise ``TimeoutError`` after ``timeout`` s.

    With ``process`` (a ``subprocess.Popen``), fail early with ``RuntimeError`` if it exits.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with code {process.returncode} before {host}:{port} opened")
        if port_is_open(port, host):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.005) -> bool:
    """Poll ``predicate()`` until it is true (True) or ``timeout`` s passed (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def wait_for_port_closed(port: int, host: str = LOOPBACK, timeout: float = 30.0) -> None:
    """Block until ``host:port`` refuses connections; raise ``TimeoutError`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not port_is_open(port, host):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} still accepts connections after {timeout:.0f} s")


def _log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- Redis


def redis_server_binary() -> str | None:
    """Path of Debian's ``redis-server`` (or whatever is on PATH), or None."""
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )


class RedisServer:
    """A ``redis-server`` on a free loopback port with its data in a private directory.

    ``url`` is ``redis://[:password@]127.0.0.1:PORT/0``. ``stop()`` shuts it down cleanly (SIGTERM,
    which flushes the AOF), ``kill()`` crashes it (SIGKILL), ``restart()`` and ``start()`` bring it
    back on the same port with the same data directory. Every instance is stopped at interpreter exit.
    """

    def __init__(
        self,
        port: int | None = None,
        appendonly: bool = True,
        password: str | None = None,
        dir: str | os.PathLike | None = None,  # noqa: A002 - the name redis itself uses
        extra_args: tuple[str, ...] = (),
        start: bool = True,
    ) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.port = port or free_port()
        self.password = password
        self.appendonly = appendonly
        self.extra_args = tuple(extra_args)
        self._own_dir = dir is None
        self.dir = Path(dir) if dir is not None else Path(tempfile.mkdtemp(prefix="umcd-redis-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "redis.log"
        self.process: subprocess.Popen | None = None
        _live.add(self)
        if start:
            self.start()

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def url(self) -> str:
        """``redis://`` URL of database 0 (with the password when one is set)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{LOOPBACK}:{self.port}/0"

    def url_for(self, db: int) -> str:
        """``redis://`` URL of database ``db``."""
        return self.url.rsplit("/", 1)[0] + f"/{db}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _args(self) -> list[str]:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", LOOPBACK,
            "--dir", str(self.dir),
            "--daemonize", "no",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--save", "",
            "--logfile", str(self.log_path),
            "--pidfile", str(self.dir / "redis.pid"),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        return args + list(self.extra_args)

    def start(self, timeout: float = 30.0) -> RedisServer:
        """Start the server (no-op if running) and wait until it answers PING."""
        if self.running:
            return self
        self.process = subprocess.Popen(
            self._args(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in the terminal reaches the tests, not the server
        )
        try:
            self.wait_ready(timeout)
        except Exception as exc:
            self.kill()
            raise RuntimeError(f"redis-server did not start on port {self.port}: {exc}\n{_log_tail(self.log_path)}") from exc
        return self

    def ping(self) -> bool:
        """Whether the server answers PING with PONG (after AUTH when a password is set)."""
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=1.0) as sock:
                request = b""
                if self.password:
                    pw = self.password.encode()
                    request += b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw)
                request += b"*1\r\n$4\r\nPING\r\n"
                sock.sendall(request)
                reply = b""
                while b"PONG" not in reply and not reply.startswith(b"-"):
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
                return b"+PONG" in reply
        except OSError:
            return False

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until PING answers PONG (the AOF is loaded); raise ``TimeoutError`` otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self.process.returncode}")
            if self.ping():
                return
            time.sleep(0.05)
        raise TimeoutError(f"redis-server on port {self.port} did not answer PING in {timeout:.0f} s")

    def stop(self, timeout: float = 30.0) -> None:
        """Shut down cleanly (SIGTERM: the AOF is flushed) and wait for the process to exit."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None
        wait_for_port_closed(self.port, timeout=timeout)

    def kill(self) -> None:
        """Crash the server (SIGKILL): whatever the AOF had not written yet is lost."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None
        wait_for_port_closed(self.port)

    def restart(self, timeout: float = 30.0) -> RedisServer:
        """Stop cleanly and start again on the same port with the same data directory."""
        self.stop()
        return self.start(timeout)

    def cleanup(self) -> None:
        """Stop, and delete the data directory if this object created it."""
        _live.discard(self)
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"RedisServer(port={self.port}, running={self.running}, dir={str(self.dir)!r})"


# --------------------------------------------------------------------------- PostgreSQL


def postgres_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` holding ``initdb`` and ``pg_ctl``, or None."""
    candidates = []
    for path in glob.glob("/usr/lib/postgresql/*/bin"):
        bindir = Path(path)
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            try:
                candidates.append((int(bindir.parent.name.split(".")[0]), bindir))
            except ValueError:
                candidates.append((0, bindir))
    if candidates:
        return max(candidates)[1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    """A private PostgreSQL cluster on a free port, listening on 127.0.0.1 only.

    The cluster belongs to the ``postgres`` OS user when the tests run as root (PostgreSQL refuses
    to run as root). TCP logins need a password (scram-sha-256); the role ``umcd`` (LOGIN, CREATEDB)
    owns the database ``umcd``; ``url`` is ``postgresql+psycopg://umcd:PASSWORD@127.0.0.1:PORT/umcd``.
    Administrative commands go through ``psql`` as ``postgres`` over the cluster's private unix socket.

    ``fast=True`` turns off fsync (commits still write their WAL before returning): a killed server
    (``kill()``) keeps everything committed; only an OS crash could lose data, which tests never do.
    """

    def __init__(
        self,
        port: int | None = None,
        user: str = "umcd",
        password: str | None = None,
        database: str = "umcd",
        dir: str | os.PathLike | None = None,  # noqa: A002
        fast: bool = True,
        max_connections: int = 200,
        start: bool = True,
    ) -> None:
        bindir = postgres_bin_dir()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL is not installed (apt-get install postgresql)")
        self.bindir = bindir
        self.port = port or free_port()
        self.user = user
        self.password = password or secrets.token_hex(12)
        self.database = database
        self.fast = fast
        self.max_connections = max_connections
        self._own_dir = dir is None
        self.dir = Path(dir) if dir is not None else Path(tempfile.mkdtemp(prefix="umcd-pg-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.dir / "data"
        self.socket_dir = self.dir
        self.log_path = self.dir / "postgres.log"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
            os.chmod(self.dir, 0o700)
        _live.add(self)
        if start:
            self.start()

    # ---- urls
    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``umcd`` database as the password-protected ``umcd`` role."""
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        """SQLAlchemy URL of another database of this cluster, as the ``umcd`` role."""
        return f"postgresql+psycopg://{self.user}:{self.password}@{LOOPBACK}:{self.port}/{database}"

    @property
    def running(self) -> bool:
        return self._pg_ctl_status()

    # ---- process control
    def _cmd(self, args: list[str]) -> list[str]:
        if self._as_postgres:
            return ["runuser", "-u", "postgres", "--", *args]
        return args

    def _run(self, args: list[str], check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            self._cmd(args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{Path(args[0]).name} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}\n"
                f"{_log_tail(self.log_path)}"
            )
        return proc

    def _pg_ctl_status(self) -> bool:
        if not (self.data_dir / "PG_VERSION").exists():
            return False
        return self._run([str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "status"], check=False).returncode == 0

    def _initdb(self) -> None:
        self._run([
            str(self.bindir / "initdb"),
            "-D", str(self.data_dir),
            "-U", "postgres",
            "-E", "UTF8",
            "--locale=C",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--no-sync",
        ])
        conf = [
            f"port = {self.port}",
            f"listen_addresses = '{LOOPBACK}'",
            f"unix_socket_directories = '{self.socket_dir}'",
            f"max_connections = {self.max_connections}",
            "shared_buffers = 32MB",
            "password_encryption = 'scram-sha-256'",
            "log_min_messages = warning",
            "log_connections = off",
        ]
        if self.fast:
            conf += ["fsync = off", "full_page_writes = off"]  # commits still reach the OS: a kill loses nothing
        with open(self.data_dir / "postgresql.auto.conf", "a", encoding="utf-8") as fh:
            fh.write("\n".join(conf) + "\n")

    def start(self, timeout: float = 60.0) -> PostgresServer:
        """Create the cluster on first use, start it (no-op if running), and wait for TCP logins."""
        fresh = not (self.data_dir / "PG_VERSION").exists()
        if fresh:
            self._initdb()
        if not self._pg_ctl_status():
            self._run([
                str(self.bindir / "pg_ctl"),
                "-D", str(self.data_dir),
                "-l", str(self.log_path),
                "-w", "-t", str(int(timeout)),
                "start",
            ], timeout=timeout + 30)
        wait_for_port(self.port, timeout=timeout)
        if fresh:
            self.psql(f"CREATE ROLE {self.user} LOGIN CREATEDB PASSWORD '{self.password}'")
            self.psql(f"CREATE DATABASE {self.database} OWNER {self.user}")
        return self

    def stop(self, mode: str = "fast", timeout: float = 60.0) -> None:
        """Shut down (``mode``: smart | fast | immediate) and wait until the port is closed."""
        if not self._pg_ctl_status():
            return
        self._run([
            str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "-t", str(int(timeout)), "stop",
        ], timeout=timeout + 30)
        wait_for_port_closed(self.port, timeout=timeout)

    def kill(self) -> None:
        """Crash-stop (``pg_ctl stop -m immediate``): no shutdown checkpoint, recovery on next start."""
        self.stop(mode="immediate")

    def restart(self, timeout: float = 60.0) -> PostgresServer:
        """Stop cleanly and start again on the same port and data directory."""
        self.stop()
        return self.start(timeout)

    def cleanup(self) -> None:
        """Stop, and delete the cluster directory if this object created it."""
        _live.discard(self)
        try:
            self.stop(mode="immediate")
        finally:
            if self._own_dir:
                shutil.rmtree(self.dir, ignore_errors=True)

    # ---- administration
    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` as the ``postgres`` superuser over the private unix socket; return stdout."""
        proc = self._run([
            str(self.bindir / "psql"),
            "-h", str(self.socket_dir), "-p", str(self.port), "-U", "postgres", "-d", database,
            "-v", "ON_ERROR_STOP=1", "-X", "-q", "-A", "-t", "-c", sql,
        ])
        return proc.stdout.strip()

    def create_database(self, name: str, template: str | None = None) -> str:
        """Create database ``name`` owned by the ``umcd`` role (a copy of ``template`` if given, which
        must have no open connections); return its SQLAlchemy URL."""
        for n in (name, template or "x"):
            if not n.replace("_", "").isalnum():
                raise ValueError(f"unsafe database name {n!r}")
        copy = f' TEMPLATE "{template}"' if template else ""
        self.psql(f'CREATE DATABASE "{name}" OWNER {self.user}{copy}')
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name``, closing whatever connections it still has."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"unsafe database name {name!r}")
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"PostgresServer(port={self.port}, dir={str(self.dir)!r})"
