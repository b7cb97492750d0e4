"""Parser-level checks of docker-compose.yml, the Dockerfiles, .env.example and the monitoring config."""

from __future__ import annotations

import ast
import copy
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_PATH = ROOT / "docker-compose.yml"
ENV_EXAMPLE_PATH = ROOT / ".env.example"
DOCKERIGNORE_PATH = ROOT / ".dockerignore"
DEPLOY = ROOT / "deploy"
METRICS_MD = DEPLOY / "METRICS.md"
PROMETHEUS_PATH = DEPLOY / "prometheus.yml"
DASHBOARD_PATH = DEPLOY / "grafana" / "dashboards" / "umcd-fleet.json"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"

FLEET_SERVICES = {"redis", "postgres", "migrate", "detect-worker", "cpu-worker", "gateway", "flower"}
MONITORING_SERVICES = {"prometheus", "grafana"}

#: variable names that hold secrets: never a default, never a literal
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|KEY|CREDENTIAL", re.IGNORECASE)

#: service properties of the Compose specification (a typo such as `healtcheck` is silently ignored
#: by nothing: compose rejects it, so catch it here first)
SERVICE_KEYS = set("""
annotations attach build blkio_config cap_add cap_drop cgroup cgroup_parent command configs container_name
cpu_count cpu_percent cpu_period cpu_quota cpu_rt_period cpu_rt_runtime cpu_shares cpus cpuset credential_spec
depends_on deploy develop device_cgroup_rules devices dns dns_opt dns_search domainname driver_opts entrypoint
env_file environment expose extends external_links extra_hosts gpus group_add healthcheck hostname image init
ipc isolation labels label_file links logging mac_address mem_limit mem_reservation mem_swappiness memswap_limit
models network_mode networks oom_kill_disable oom_score_adj pid pids_limit platform ports post_start pre_stop
privileged profiles provider pull_policy read_only restart runtime scale secrets security_opt shm_size
stdin_open stop_grace_period stop_signal storage_opt sysctls tmpfs tty ulimits use_api_socket user
userns_mode uts volumes volumes_from working_dir
""".split())
TOP_LEVEL_KEYS = {"version", "name", "services", "networks", "volumes", "secrets", "configs", "include", "models"}
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval", "disable"}
DURATION = re.compile(r"^(\d+(\.\d+)?(us|ms|s|m|h))+$")
RESTART_POLICIES = {"no", "always", "unless-stopped", "on-failure"}


# --------------------------------------------------------------------------- loading


def load_compose(text: str | None = None) -> dict:
    return yaml.safe_load(COMPOSE_PATH.read_text() if text is None else text)


def load_env_example(text: str | None = None) -> dict[str, str]:
    """``KEY=VALUE`` lines of a dotenv file (comments and blanks skipped)."""
    text = ENV_EXAMPLE_PATH.read_text() if text is None else text
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example line without '=': {line!r}"
            out[key.strip()] = value.strip()
    return out


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


# --------------------------------------------------------------------------- interpolation


@dataclass(frozen=True)
class Interpolation:
    """One ``$VAR`` / ``${VAR}`` / ``${VAR<op><arg>}`` of a compose string; op in '', '-', ':-', '?', ':?', '+', ':+'."""

    name: str
    op: str
    arg: str
    start: int
    end: int


def interpolations(text: str) -> list[Interpolation]:
    """Every interpolation in ``text`` (``$$`` is an escaped ``$``); ``ValueError`` on a malformed one."""
    out: list[Interpolation] = []
    i = 0
    while i < len(text):
        if text[i] != "$":
            i += 1
            continue
        if text.startswith("$$", i):
            i += 2
            continue
        if text.startswith("${", i):
            depth, j = 0, i + 1
            while j < len(text):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    break
                j += 1
            else:
                raise ValueError(f"unclosed interpolation in {text!r}")
            body = text[i + 2 : j]
            m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", body, re.DOTALL)
            if not m:
                raise ValueError(f"invalid interpolation ${{{body}}} in {text!r}")
            out.append(Interpolation(m[1], m[2] or "", m[3] or "", i, j + 1))
            if m[3]:
                out.extend(interpolations(m[3]))
            i = j + 1
            continue
        m = re.match(r"\$([A-Za-z_][A-Za-z0-9_]*)", text[i:])
        if not m:
            raise ValueError(f"a lone '$' in {text!r} (write '$$' for a literal dollar)")
        out.append(Interpolation(m[1], "", "", i, i + len(m[0])))
        i += len(m[0])
    return out


def masked(text: str) -> str:
    """``text`` with each top-level interpolation replaced by ``<VAR>`` and ``$$VAR`` by ``<$VAR>``."""
    out, last = [], 0
    for interp in interpolations(text):
        if interp.start < last:  # nested inside a default value
            continue
        out.append(text[last : interp.start])
        out.append(f"<{interp.name}>")
        last = interp.end
    out.append(text[last:])
    return re.sub(r"\$\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", r"<$\1>", "".join(out))


def strings(obj, path: str = ""):
    """Every string (keys and values) of a parsed YAML document, with a dotted path."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(key, str):
                yield f"{path}.{key}".lstrip("."), key
            yield from strings(value, f"{path}.{key}".lstrip("."))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from strings(value, f"{path}[{i}]")
    elif isinstance(obj, str):
        yield path, obj


# --------------------------------------------------------------------------- compose checks
# Each returns a list of problems: the real files must give none, the bad samples below some.


def check_top_level(doc: dict) -> list[str]:
    problems = [f"unknown top-level key {k!r}" for k in doc if k not in TOP_LEVEL_KEYS and not k.startswith("x-")]
    for name, svc in doc.get("services", {}).items():
        for key in svc:
            if key not in SERVICE_KEYS and not key.startswith("x-"):
                problems.append(f"{name}: unknown service key {key!r}")
        for key in svc.get("healthcheck", {}) or {}:
            if key not in HEALTHCHECK_KEYS:
                problems.append(f"{name}: unknown healthcheck key {key!r}")
    return problems


def dockerfile_of(svc: dict) -> Path | None:
    build = svc.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        return ROOT / build / "Dockerfile"
    return ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")


def check_images_and_builds(doc: dict) -> list[str]:
    problems = []
    for name, svc in doc["services"].items():
        if "image" not in svc and "build" not in svc:
            problems.append(f"{name}: neither image nor build")
        dockerfile = dockerfile_of(svc)
        if dockerfile is not None and not dockerfile.is_file():
            problems.append(f"{name}: build Dockerfile {dockerfile.relative_to(ROOT)} does not exist")
        if "image" in svc and "build" not in svc:
            image = masked(svc["image"])
            ref = image.split("@", 1)[0]
            tag = ref.rsplit("/", 1)[-1].partition(":")[2]
            if "@" not in image and (not tag or tag == "latest"):
                problems.append(f"{name}: image {svc['image']!r} is not pinned to a tag (or uses latest)")
    return problems


def check_interpolations_defined(doc: dict, defined: dict[str, str]) -> list[str]:
    problems = []
    for path, text in strings(doc):
        try:
            found = interpolations(text)
        except ValueError as exc:
            problems.append(f"{path}: {exc}")
            continue
        for interp in found:
            if interp.name not in defined:
                problems.append(f"{path}: ${{{interp.name}}} is not defined in .env.example")
    return problems


def check_secrets(doc: dict) -> list[str]:
    """Secrets: no defaults (``${X:?msg}`` only), no literal passwords anywhere."""
    problems = []
    for path, text in strings(doc):
        try:
            found = interpolations(text)
        except ValueError:
            continue  # reported by check_interpolations_defined
        for interp in found:
            if SECRET_NAME.search(interp.name) and interp.op != ":?":
                problems.append(
                    f"{path}: secret ${{{interp.name}{interp.op}{interp.arg}}} must be ${{{interp.name}:?...}} "
                    "(no default; fail loudly when unset or empty)"
                )
        plain = masked(text)
        for m in re.finditer(r"://([^/\s:@<>]*|<[^>]+>):([^@\s]*)@", plain):
            if not re.fullmatch(r"<\$?[A-Za-z_][A-Za-z0-9_]*>", m[2]):
                problems.append(f"{path}: URL with a literal password")
    for name, svc in doc["services"].items():
        env = svc.get("environment") or {}
        items = env.items() if isinstance(env, dict) else (e.partition("=")[::2] for e in env)
        for key, value in items:
            if SECRET_NAME.search(key) and not re.fullmatch(r"<[A-Za-z_][A-Za-z0-9_]*>", masked(str(value or ""))):
                problems.append(f"{name}: environment {key} must be exactly one ${{VAR:?...}}, not {value!r}")
        for part in _command_parts(svc):
            for flag_value in _secret_flag_values(part):
                if not re.fullmatch(r'"?<\$?[A-Za-z_][A-Za-z0-9_]*>"?(:"?<\$?[A-Za-z_][A-Za-z0-9_]*>"?)?', flag_value):
                    problems.append(f"{name}: a password flag has a literal value {flag_value!r}")
    return problems


def _command_parts(svc: dict) -> list[list[str]]:
    """Masked argv of the command and of the healthcheck (shell strings split on spaces)."""
    parts = []
    for value in (svc.get("command"), svc.get("entrypoint"), (svc.get("healthcheck") or {}).get("test")):
        if isinstance(value, str):
            parts.append(masked(value).split())
        elif isinstance(value, list):
            argv = []
            for arg in value:
                argv.extend(masked(arg).split() if isinstance(arg, str) else [str(arg)])
            parts.append(argv)
    return parts


def _secret_flag_values(argv: list[str]) -> list[str]:
    values = []
    for i, arg in enumerate(argv):
        if arg in ("--requirepass", "-a", "--pass", "--password", "--basic-auth") and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif arg.startswith(("--basic-auth=", "--password=", "--requirepass=")):
            values.append(arg.split("=", 1)[1])
    return values


def oneshot_services(doc: dict) -> set[str]:
    """Services others wait for with ``service_completed_successfully``, or declared ``restart: "no"``."""
    out = {name for name, svc in doc["services"].items() if svc.get("restart") == "no"}
    for svc in doc["services"].values():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, dict):
            out |= {d for d, spec in deps.items() if (spec or {}).get("condition") == "service_completed_successfully"}
    return out


def check_health_and_restart(doc: dict) -> list[str]:
    problems = []
    oneshots = oneshot_services(doc)
    for name, svc in doc["services"].items():
        restart = svc.get("restart")
        if restart is not None and not isinstance(restart, str):
            problems.append(f"{name}: restart {restart!r} is not a string (quote \"no\": YAML reads no as false)")
        elif restart is not None and restart.split(":")[0] not in RESTART_POLICIES:
            problems.append(f"{name}: unknown restart policy {restart!r}")
        if name in oneshots:
            if restart != "no":
                problems.append(f"{name}: one-shot service must declare restart: \"no\"")
            continue
        if restart in (None, "no"):
            problems.append(f"{name}: long-running service without a restart policy")
        hc = svc.get("healthcheck")
        if not hc or hc.get("disable"):
            problems.append(f"{name}: long-running service without a healthcheck")
            continue
        test = hc.get("test")
        if not (isinstance(test, list) and test and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1):
            problems.append(f"{name}: healthcheck test must be [\"CMD\", ...] or [\"CMD-SHELL\", \"...\"]")
        for key in ("interval", "timeout", "start_period", "start_interval"):
            if key in hc and not (isinstance(hc[key], str) and DURATION.match(hc[key])):
                problems.append(f"{name}: healthcheck {key} {hc[key]!r} is not a duration like 10s")
        if "retries" in hc and not isinstance(hc["retries"], int):
            problems.append(f"{name}: healthcheck retries must be an integer")
    return problems


def check_depends_on(doc: dict) -> list[str]:
    problems = []
    svcs = doc["services"]
    oneshots = oneshot_services(doc)
    for name, svc in svcs.items():
        deps = svc.get("depends_on")
        if deps is None:
            continue
        if not isinstance(deps, dict):
            problems.append(f"{name}: depends_on is a list (no condition): use {{service: {{condition: ...}}}}")
            continue
        for dep, spec in deps.items():
            if dep not in svcs:
                problems.append(f"{name}: depends_on names {dep!r}, which is not a service")
                continue
            condition = (spec or {}).get("condition")
            if condition == "service_healthy":
                if not svcs[dep].get("healthcheck"):
                    problems.append(f"{name}: waits for {dep} to be healthy, but {dep} has no healthcheck")
            elif condition == "service_completed_successfully":
                if dep not in oneshots or svcs[dep].get("restart") != "no":
                    problems.append(f"{name}: waits for {dep} to complete, but {dep} is not a one-shot")
            else:
                problems.append(f"{name}: depends_on {dep} without a condition (service_healthy, ...)")
            if svcs[dep].get("profiles") and not set(svcs[dep]["profiles"]) & set(svc.get("profiles") or []):
                if not svc.get("profiles"):
                    problems.append(f"{name}: always on, but depends on {dep}, which only runs under a profile")
    # no cycles
    graph = {n: set((s.get("depends_on") or {}) if isinstance(s.get("depends_on"), dict) else []) for n, s in svcs.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == 1:
            problems.append(f"depends_on cycle: {' -> '.join([*trail, node])}")
            return
        if state.get(node) == 2 or node not in graph:
            return
        state[node] = 1
        for nxt in graph[node]:
            visit(nxt, [*trail, node])
        state[node] = 2

    for node in graph:
        visit(node, [])
    return problems


def check_gpu_worker(doc: dict, name: str = "detect-worker") -> list[str]:
    svc = doc["services"].get(name)
    if svc is None:
        return [f"no {name} service"]
    problems = []
    devices = (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
    if devices != [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]:
        problems.append(f"{name}: deploy.resources.reservations.devices must reserve one nvidia gpu, got {devices!r}")
    # `docker compose up --scale detect-worker=N` needs replicas that do not clash
    if "container_name" in svc:
        problems.append(f"{name}: container_name prevents --scale")
    if svc.get("ports"):
        problems.append(f"{name}: a published host port prevents --scale (use expose)")
    if "%h" not in " ".join(map(str, svc.get("command") or [])):
        problems.append(f"{name}: worker node name must include %h so replicas differ")
    return problems


def check_ports_quoted(text: str) -> list[str]:
    """Short-syntax ports must be quoted strings (YAML 1.1 reads 22:22 as the number 1342)."""
    problems = []
    root = yaml.compose(text)
    services = next((v for k, v in root.value if k.value == "services"), None)
    for svc_key, svc in services.value if services is not None else []:
        for key, value in svc.value:
            if key.value not in ("ports", "expose"):
                continue
            for item in value.value:
                if isinstance(item, yaml.ScalarNode) and item.style not in ('"', "'"):
                    problems.append(f"{svc_key.value}: {key.value} entry {item.value} is not a quoted string")
    return problems


def check_environment_values(doc: dict) -> list[str]:
    problems = []
    for name, svc in doc["services"].items():
        env = svc.get("environment") or {}
        if isinstance(env, dict):
            for key, value in env.items():
                if value is not None and not isinstance(value, str):
                    problems.append(f"{name}: environment {key}={value!r} is a YAML {type(value).__name__}: quote it")
    return problems


def _volume_entries(svc: dict) -> list[tuple[str | None, str]]:
    out = []
    for vol in svc.get("volumes") or []:
        if isinstance(vol, dict):
            out.append((vol.get("source"), vol.get("target")))
        else:
            parts = vol.split(":")
            out.append((parts[0], parts[1]) if len(parts) > 1 else (None, parts[0]))
    return out


def check_volumes(doc: dict) -> list[str]:
    problems = []
    declared = set((doc.get("volumes") or {}).keys())
    used: set[str] = set()
    for name, svc in doc["services"].items():
        for source, target in _volume_entries(svc):
            if source is None:
                continue
            if source.startswith((".", "/", "~")):
                if source.startswith(".") and not (ROOT / source).exists():
                    problems.append(f"{name}: bind mount source {source} does not exist in the repository")
            elif source not in declared:
                problems.append(f"{name}: volume {source!r} is not declared under top-level volumes")
            else:
                used.add(source)
            if not target.startswith("/"):
                problems.append(f"{name}: volume target {target!r} is not absolute")
    problems += [f"volume {v!r} is declared but no service mounts it" for v in sorted(declared - used)]
    return problems


def check_flower_auth(doc: dict) -> list[str]:
    svc = doc["services"].get("flower")
    if svc is None:
        return ["no flower service"]
    command = svc.get("command") or []
    command = command if isinstance(command, list) else command.split()
    if any(a.startswith("--basic-auth") for a in command):  # argv is visible to every user of the host (ps)
        return ["flower: credentials on the command line (--basic-auth): give them as FLOWER_BASIC_AUTH"]
    auth = (svc.get("environment") or {}).get("FLOWER_BASIC_AUTH")
    if not auth:
        return ["flower: no FLOWER_BASIC_AUTH=USER:PASSWORD in its environment"]
    if not re.fullmatch(r"<[A-Za-z_][A-Za-z0-9_]*>:<[A-Za-z_][A-Za-z0-9_]*>", masked(str(auth))):
        return [f"flower: FLOWER_BASIC_AUTH must be ${{USER}}:${{PASSWORD}} from .env, got {auth!r}"]
    return []


COMPOSE_CHECKS = {
    "top_level": check_top_level,
    "images": check_images_and_builds,
    "secrets": check_secrets,
    "health": check_health_and_restart,
    "depends_on": check_depends_on,
    "gpu": check_gpu_worker,
    "environment": check_environment_values,
    "volumes": check_volumes,
    "flower": check_flower_auth,
}


# --------------------------------------------------------------------------- compose tests


def test_compose_declares_the_fleet_and_monitoring_services(services):
    assert FLEET_SERVICES | MONITORING_SERVICES == set(services)
    for name in MONITORING_SERVICES:
        assert services[name].get("profiles") == ["monitoring"], name
    for name in FLEET_SERVICES:
        assert not services[name].get("profiles"), f"{name} must run without a profile"


@pytest.mark.parametrize("check", sorted(COMPOSE_CHECKS))
def test_compose_passes_check(compose, check):
    assert COMPOSE_CHECKS[check](compose) == []


def test_every_interpolated_variable_is_defined_in_env_example(compose):
    assert check_interpolations_defined(compose, load_env_example()) == []


def test_ports_are_quoted_strings():
    assert check_ports_quoted(COMPOSE_PATH.read_text()) == []


def test_env_example_leaves_every_secret_empty_and_env_is_gitignored():
    env = load_env_example()
    secrets_ = {k: v for k, v in env.items() if SECRET_NAME.search(k)}
    assert {"REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_PASSWORD", "UMCD_API_KEY"} <= set(secrets_)
    assert {k: v for k, v in secrets_.items() if v} == {}, "commit no secret, not even a placeholder"
    gitignore = (ROOT / ".gitignore").read_text().split()
    assert ".env" in gitignore


def test_every_secret_used_by_compose_is_required(compose):
    used = {i.name for _, text in strings(compose) for i in interpolations(text)}
    required = {
        i.name for _, text in strings(compose) for i in interpolations(text) if i.op == ":?"
    }
    assert {n for n in used if SECRET_NAME.search(n)} <= required
    assert {"REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_PASSWORD"} <= required


def test_migrate_is_a_one_shot_that_fleet_services_wait_for(services):
    assert oneshot_services({"services": services}) == {"migrate"}
    assert services["migrate"]["command"] == ["python", "-m", "db.migrate"]
    for name in ("detect-worker", "cpu-worker", "gateway"):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        assert services[name]["depends_on"]["redis"] == {"condition": "service_healthy"}


def test_redis_is_append_only_with_a_password_and_postgres_reads_its_password_from_env(services):
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert masked(redis_cmd[redis_cmd.index("--requirepass") + 1]) == "<REDIS_PASSWORD>"
    probe = services["redis"]["healthcheck"]["test"][1]
    assert "REDISCLI_AUTH=" in probe and "redis-cli ping" in probe and " -a " not in probe  # no password in argv
    assert masked(services["postgres"]["environment"]["POSTGRES_PASSWORD"]) == "<POSTGRES_PASSWORD>"
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"][1]


def test_workers_and_gateway_share_the_artifacts_volume(services):
    for name in ("detect-worker", "cpu-worker", "gateway"):
        targets = dict(_volume_entries(services[name]))
        assert targets.get("artifacts") == services[name]["environment"]["UMCD_ARTIFACTS"], name
        assert targets.get("shared") == "/shared", name


def test_detect_worker_runs_on_the_gpu_image_with_gpu_settings(services):
    svc = services["detect-worker"]
    assert svc["build"]["dockerfile"] == "deploy/Dockerfile.cuda"
    env = svc["environment"]
    assert (env["UMCD_DEVICE"], env["UMCD_INDEX_BACKEND"], env["UMCD_METRICS_PORT"]) == ("cuda", "gpu", "9100")
    # the image's own command (a container started without compose) is compose's: the same reservations
    cmd = [line for line in (ROOT / "deploy/Dockerfile.cuda").read_text().splitlines() if line.startswith("CMD ")]
    assert len(cmd) == 1 and json.loads(cmd[0][len("CMD "):]) == svc["command"]


def _module_refs() -> list[tuple[str, str, str | None]]:
    """(service, module, attribute) for each module a compose command imports."""
    refs = []
    for name, svc in load_compose()["services"].items():
        cmd = svc.get("command") or []
        if not isinstance(cmd, list) or not cmd:
            continue
        if "-A" in cmd:
            refs.append((name, cmd[cmd.index("-A") + 1], None))
        if cmd[0] == "uvicorn":
            module, _, attr = cmd[1].partition(":")
            refs.append((name, module, attr or "app"))
        if cmd[:2] == ["python", "-m"]:
            refs.append((name, cmd[2], "__main__"))
    return refs


@pytest.mark.parametrize(("service", "module", "attr"), _module_refs(), ids=lambda v: str(v))
def test_compose_commands_import_modules_of_the_repository(service, module, attr):
    base = ROOT / module.replace(".", "/")
    path = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
    assert path.exists(), f"service {service} runs {module}, which is not in the repository ({base.relative_to(ROOT)}.py)"
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        names |= {t.id for t in targets if isinstance(t, ast.Name)}
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":  # PEP 562 lazy attributes
            names |= {c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    if attr is None:  # `celery -A module` loads module.app or module.celery
        assert names & {"app", "celery"}, f"{path.relative_to(ROOT)} defines neither `app` nor `celery`"
    elif attr == "__main__":
        runs_as_main = any(
            isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body
        ) or (base / "__main__.py").exists()
        assert runs_as_main, f"`python -m {module}` runs nothing: no `if __name__ == \"__main__\":`"
    else:
        assert attr in names, f"{path.relative_to(ROOT)} defines no `{attr}` for uvicorn"


def _without_node_name(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "-n":
            skip = True
        else:
            out.append(arg)
    return out


def test_local_fleet_runs_the_same_commands_as_compose(services, tmp_path):
    from umcd.fleet import Fleet

    fleet = Fleet(tmp_path, python="python")
    for service, local in (("detect-worker", fleet.detect_worker_argv(0)), ("cpu-worker", fleet.cpu_worker_argv())):
        compose_cmd = services[service]["command"]
        assert local[:3] == ["python", "-m", "celery"]
        assert _without_node_name(local[3:]) == _without_node_name(compose_cmd[1:]), service
        assert local[local.index("-n") + 1].split("@")[1] == compose_cmd[compose_cmd.index("-n") + 1].split("@")[1]
    assert fleet.gateway_argv(8000)[3] == services["gateway"]["command"][1]
    assert fleet.flower_argv(5555)[4] == services["flower"]["command"][2]
    assert ["python", "-m", fleet.migrate_module] == services["migrate"]["command"]


# bad samples: each mutation of the real compose file must be caught by the named check
def _mutate(doc: dict, path: str, value) -> dict:
    doc = copy.deepcopy(doc)
    keys = path.split("/")
    node = doc
    for key in keys[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return doc


_DELETE = object()
BAD_COMPOSE = [
    ("top_level", "services/redis/healtcheck", {"test": ["CMD", "true"]}),
    ("images", "services/redis/image", "redis:latest"),
    ("images", "services/postgres/image", "postgres"),
    ("images", "services/gateway/build", {"context": ".", "dockerfile": "deploy/Dockerfile.missing"}),
    ("secrets", "services/postgres/environment/POSTGRES_PASSWORD", "${POSTGRES_PASSWORD:-secret}"),
    ("secrets", "services/postgres/environment/POSTGRES_PASSWORD", "hunter2"),
    ("secrets", "services/gateway/environment/UMCD_BROKER_URL", "redis://:hunter2@redis:6379/0"),
    ("secrets", "services/redis/command", ["redis-server", "--requirepass", "hunter2"]),
    ("health", "services/gateway/healthcheck", _DELETE),
    ("health", "services/migrate/restart", False),
    ("health", "services/flower/restart", _DELETE),
    ("health", "services/redis/healthcheck/interval", 10),
    ("depends_on", "services/gateway/depends_on", ["redis", "postgres"]),
    ("depends_on", "services/gateway/depends_on/rabbitmq", {"condition": "service_healthy"}),
    ("depends_on", "services/gateway/depends_on/redis", {}),
    ("depends_on", "services/gateway/depends_on/grafana", {"condition": "service_healthy"}),
    ("gpu", "services/detect-worker/deploy", _DELETE),
    ("gpu", "services/detect-worker/container_name", "detect"),
    ("gpu", "services/detect-worker/ports", ["9100:9100"]),
    ("environment", "services/gateway/environment/UMCD_GATEWAY_PORT", 8000),
    ("volumes", "services/gateway/volumes", ["uploads:/shared"]),
    ("volumes", "services/prometheus/volumes", ["./deploy/missing.yml:/etc/prometheus/prometheus.yml:ro"]),
    ("flower", "services/flower/environment/FLOWER_BASIC_AUTH", _DELETE),
    ("flower", "services/flower/environment/FLOWER_BASIC_AUTH", "admin:admin"),
    ("flower", "services/flower/command", ["celery", "-A", "workers.app", "flower",
                                           "--basic-auth=${FLOWER_USER}:${FLOWER_PASSWORD}"]),
]


@pytest.mark.parametrize(("check", "path", "value"), BAD_COMPOSE, ids=[f"{c}:{p}" for c, p, _ in BAD_COMPOSE])
def test_compose_check_catches_bad_sample(compose, check, path, value):
    assert COMPOSE_CHECKS[check](_mutate(compose, path, value)), f"{check} missed {path} = {value!r}"


def test_interpolation_checks_catch_undefined_variables_and_lone_dollars(compose):
    bad = _mutate(compose, "services/gateway/environment/UMCD_EXTRA", "${NOT_IN_ENV_EXAMPLE}")
    assert check_interpolations_defined(bad, load_env_example())
    bad = _mutate(compose, "services/gateway/environment/UMCD_EXTRA", "costs $ 5")
    assert check_interpolations_defined(bad, load_env_example())
    assert [i.name for i in interpolations("a $$HOME ${A:-x${B}} $C")] == ["A", "B", "C"]


def test_ports_check_catches_unquoted_ports():
    text = "services:\n  web:\n    image: nginx:1.27.0\n    ports:\n      - 22:22\n      - \"8080:80\"\n"
    assert check_ports_quoted(text) == ["web: ports entry 22:22 is not a quoted string"]


# --------------------------------------------------------------------------- Dockerfile lint


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (default escape ``\\``)."""
    out: list[Instruction] = []
    buf, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and buf):
            continue  # comments (and blank lines) inside a continuation are skipped too
        if not stripped:
            continue
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        keyword, _, args = buf.partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
        buf = ""
    if buf:
        raise ValueError("Dockerfile ends inside a continuation line")
    return out


def dockerignore_patterns(text: str) -> list[tuple[bool, re.Pattern]]:
    """(negated, regex) per .dockerignore line, in order (the last match wins)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        out.append((negated, re.compile(regex + "(?:/.*)?$")))
    return out


def is_ignored(path: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    ignored = False
    for negated, regex in patterns:
        if regex.match(path.strip("/")):
            ignored = not negated
    return ignored


def _image_is_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    return bool(tag) and tag != "latest"


def _shell_segments(command: str) -> list[str]:
    return [s.strip() for s in re.split(r"&&|\|\||;|\|", command) if s.strip()]


def lint_dockerfile(text: str, context: Path, dockerignore: str = "") -> list[str]:
    """Problems of a Dockerfile, hadolint-style rule ids first (``DL-FROM: line 3: ...``)."""
    problems: list[str] = []
    instructions = parse_dockerfile(text)
    ignore = dockerignore_patterns(dockerignore)
    stages: list[str] = []
    final_user: str | None = None
    final_stage_start = max((i for i, ins in enumerate(instructions) if ins.keyword == "FROM"), default=0)

    def add(rule: str, ins: Instruction, message: str) -> None:
        problems.append(f"{rule}: line {ins.line}: {message}")

    for index, ins in enumerate(instructions):
        kw, args = ins.keyword, ins.args
        if kw == "FROM":
            words = [w for w in args.split() if not w.startswith("--platform")]
            image = words[0]
            if len(words) >= 3 and words[1].lower() == "as":
                stages.append(words[2].lower())
            if image.lower() not in stages and image != "scratch" and not _image_is_pinned(image):
                add("DL-FROM", ins, f"base image {image!r} is not pinned to a tag (or uses latest)")
        elif kw == "RUN":
            if re.search(r"\bapt(-get)? +install\b", args):
                if "--no-install-recommends" not in args:
                    add("DL-APT", ins, "apt-get install without --no-install-recommends")
                if not re.search(r"apt(-get)? +install\b[^&;]*\s(-y|--yes|-qq|--assume-yes)\b", args):
                    add("DL-APT", ins, "apt-get install without -y")
                if "rm -rf /var/lib/apt/lists" not in args:
                    add("DL-APT", ins, "apt-get install without rm -rf /var/lib/apt/lists/* in the same RUN")
                if not re.search(r"\bapt(-get)? +update\b", args):
                    add("DL-APT", ins, "apt-get install without apt-get update in the same RUN (stale cache)")
            for segment in _shell_segments(args):
                if re.search(r"\b(pip3?|python3? -m pip)( +-\S+)* +install\b", segment) and not segment.startswith("uv "):
                    if "--no-cache-dir" not in segment:
                        add("DL-PIP", ins, f"pip install without --no-cache-dir: {segment[:60]!r}")
                if re.match(r"uv +pip +install\b", segment) and "--no-cache" not in segment:
                    add("DL-PIP", ins, "uv pip install without --no-cache")
            if re.search(r"(^|\s|&&|;)sudo\s", args):
                add("DL-SUDO", ins, "sudo in RUN (build steps already run as root)")
        elif kw in ("COPY", "ADD"):
            if args.startswith("["):
                try:
                    words = json.loads(args)
                except json.JSONDecodeError:
                    add("DL-COPY", ins, "malformed JSON form")
                    continue
                flags = []
            else:
                words = args.split()
                flags = [w for w in words if w.startswith("--")]
                words = [w for w in words if not w.startswith("--")]
            sources = words[:-1]
            if not sources:
                add("DL-COPY", ins, f"{kw} needs a source and a destination")
            source_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
            if source_stage is not None:
                if source_stage.lower() not in stages and not _image_is_pinned(source_stage):
                    add("DL-FROM", ins, f"COPY --from={source_stage} names no earlier stage nor a pinned image")
                continue
            for source in sources:
                if re.match(r"^(https?|ftp|git)://|^git@", source):
                    add("DL-ADD", ins, f"{kw} of a URL {source!r}: download in a RUN and verify a checksum")
                    continue
                matches = sorted(context.glob(source)) if any(c in source for c in "*?[") else (
                    [context / source] if (context / source).exists() else []
                )
                if not matches:
                    add("DL-COPY", ins, f"source {source!r} does not exist in the build context")
                elif all(is_ignored(str(m.relative_to(context)), ignore) for m in matches):
                    add("DL-COPY", ins, f"source {source!r} is excluded by .dockerignore")
            if kw == "ADD" and not any(s.endswith((".tar", ".tar.gz", ".tgz", ".tar.xz")) for s in sources):
                add("DL-ADD", ins, "ADD of local files: use COPY")
        elif kw in ("CMD", "ENTRYPOINT"):
            try:
                value = json.loads(args)
                ok = isinstance(value, list) and value and all(isinstance(v, str) for v in value)
            except json.JSONDecodeError:
                ok = False
            if not ok:
                add("DL-JSON", ins, f"{kw} must use the JSON form [\"exe\", \"arg\"] (signals reach the process)")
        elif kw == "USER" and index > final_stage_start:
            final_user = args.split(":")[0]
        elif kw == "WORKDIR" and not args.startswith(("/", "$")):
            add("DL-WORKDIR", ins, f"WORKDIR {args!r} is not absolute")
        if kw in ("CMD", "ENTRYPOINT") and index > final_stage_start and final_user in (None, "root", "0"):
            add("DL-USER", ins, f"{kw} runs as root: add a non-root USER before it")
    if final_user in (None, "root", "0") and not any(p.startswith("DL-USER") for p in problems):
        last = instructions[-1] if instructions else Instruction(0, "", "")
        add("DL-USER", last, "the final stage runs as root: add USER <non-root>")
    return problems


DOCKERFILES = ["deploy/Dockerfile", "deploy/Dockerfile.cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_passes_lint(dockerfile):
    assert lint_dockerfile((ROOT / dockerfile).read_text(), ROOT, DOCKERIGNORE_PATH.read_text()) == []


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_pins_torch_like_pyproject_and_installs_the_project(dockerfile):
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    text = (ROOT / dockerfile).read_text()
    for package in ("torch", "torchvision"):
        pin = next(d for d in deps if re.match(rf"{package}==", d))
        assert re.search(rf"(?<![\w-]){re.escape(pin)}(?![\w.])", text), f"{dockerfile} must pin {pin}"
    assert "pyproject.toml" in text
    if dockerfile.endswith(".cuda"):
        assert '".[gpu]"' in text and "nvidia/cuda:" in text and "3.11" in text
    else:
        assert "python:3.11" in text


_GOOD = """FROM python:3.11.9-slim
WORKDIR /app
COPY app.py ./
RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir flask
USER app
CMD ["python", "app.py"]
"""
BAD_DOCKERFILES = [
    ("DL-FROM", _GOOD.replace("python:3.11.9-slim", "python:latest")),
    ("DL-FROM", _GOOD.replace("python:3.11.9-slim", "python")),
    ("DL-APT", _GOOD.replace("--no-install-recommends ", "")),
    ("DL-APT", _GOOD.replace(" && rm -rf /var/lib/apt/lists/*", "")),
    ("DL-APT", _GOOD.replace("apt-get update && ", "")),
    ("DL-PIP", _GOOD.replace("pip install --no-cache-dir flask", "pip install flask")),
    ("DL-PIP", _GOOD.replace("pip install --no-cache-dir flask", "python -m pip install -U flask")),
    ("DL-USER", _GOOD.replace("USER app\n", "")),
    ("DL-USER", _GOOD.replace("USER app", "USER root")),
    ("DL-USER", _GOOD.replace('USER app\nCMD ["python", "app.py"]', 'CMD ["python", "app.py"]\nUSER app')),
    ("DL-COPY", _GOOD.replace("COPY app.py", "COPY missing.py")),
    ("DL-COPY", _GOOD.replace("COPY app.py", "COPY secret.env")),
    ("DL-ADD", _GOOD.replace("COPY app.py ./", "ADD https://example.com/app.py ./")),
    ("DL-ADD", _GOOD.replace("COPY app.py ./", "ADD app.py ./")),
    ("DL-JSON", _GOOD.replace('CMD ["python", "app.py"]', "CMD python app.py")),
    ("DL-FROM", _GOOD.replace("COPY app.py ./", "COPY --from=builder /app.py ./")),
    ("DL-WORKDIR", _GOOD.replace("WORKDIR /app", "WORKDIR app")),
]


@pytest.fixture()
def lint_context(tmp_path):
    (tmp_path / "app.py").write_text("print('hi')\n")
    (tmp_path / "secret.env").write_text("PASSWORD=x\n")
    return tmp_path


def test_dockerfile_lint_accepts_the_good_sample(lint_context):
    assert lint_dockerfile(_GOOD, lint_context, "*.env\n") == []


@pytest.mark.parametrize(("rule", "text"), BAD_DOCKERFILES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(BAD_DOCKERFILES)])
def test_dockerfile_lint_catches_bad_sample(lint_context, rule, text):
    problems = lint_dockerfile(text, lint_context, "*.env\n")
    assert any(p.startswith(rule) for p in problems), problems


def test_dockerignore_keeps_secrets_environments_and_outputs_out_of_the_context():
    patterns = dockerignore_patterns(DOCKERIGNORE_PATH.read_text())
    for path in (".env", ".env.production", ".venv/bin/python", ".git/config", "artifacts/fleet/.env",
                 "core/__pycache__/x.pyc", "umcd_fleet.egg-info/PKG-INFO", "tests/unit/test_compose.py"):
        assert is_ignored(path, patterns), path
    for path in ("pyproject.toml", "README.md", "umcd/fleet.py", "core", "db", "workers", "producers", ".env.example"):
        assert not is_ignored(path, patterns), path


# --------------------------------------------------------------------------- monitoring


def documented_metrics() -> dict[str, str]:
    """Metric name -> type, from the tables of deploy/METRICS.md."""
    out = {}
    for m in re.finditer(r"^\|\s*`([A-Za-z_:][\w:]*)`\s*\|\s*(counter|gauge|histogram|summary)\s*\|", METRICS_MD.read_text(), re.M):
        out[m[1]] = m[2]
    return out


def allowed_series(metrics: dict[str, str]) -> set[str]:
    out = set()
    for name, kind in metrics.items():
        out.add(name)
        if kind in ("histogram", "summary"):
            out |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return out


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                "unless", "inf", "nan", "atan2"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, labels, keywords, durations removed)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"'(?:[^'\\]|\\.)*'", "''", s)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", s):
        if m[1].lower() not in PROMQL_WORDS:
            names.add(m[1])
    return names


def dashboard_queries(dashboard: dict) -> list[str]:
    exprs = []

    def walk(panels):
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        m = re.match(r"\s*label_values\(\s*([^,)]+)", query)
        if m:
            exprs.append(m[1])
        elif query and var.get("type") == "query":
            exprs.append(query)
    return exprs


def test_promql_metric_extractor_finds_selected_series_only():
    expr = ('histogram_quantile(0.9, sum by (le, queue) (rate(umcd_batch_size_bucket{queue=~"$queue"}[5m]))) '
            "/ on(instance) group_left(version) umcd_model_info offset 5m > bool 2")
    assert promql_metric_names(expr) == {"umcd_batch_size_bucket", "umcd_model_info"}
    assert promql_metric_names("count by (version) (umcd_model_info == 1)") == {"umcd_model_info"}
    assert promql_metric_names('sum(rate(typo_total{a="b"}[$__rate_interval]))') == {"typo_total"}


def test_metrics_md_lists_the_worker_metrics():
    metrics = documented_metrics()
    expected = {
        "umcd_requests_total": "counter", "umcd_batch_size": "histogram", "umcd_model_latency_seconds": "histogram",
        "umcd_search_latency_seconds": "histogram", "umcd_index_size": "gauge", "umcd_replica_lag_seconds": "gauge",
        "umcd_model_info": "gauge",
    }
    assert {k: metrics.get(k) for k in expected} == expected


def test_grafana_dashboard_parses_and_queries_only_documented_metrics():
    dashboard = json.loads(DASHBOARD_PATH.read_text())
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 10
    allowed = allowed_series(documented_metrics())
    used = set().union(*(promql_metric_names(q) for q in queries))
    assert used - allowed == set(), "dashboard queries metrics not listed in deploy/METRICS.md"
    # every umcd metric has a panel
    umcd = {n for n in documented_metrics() if n.startswith("umcd_")}
    covered = {n for n in umcd if any(u == n or u.startswith(n + "_") for u in used)}
    assert covered == umcd
    quantile_metrics = {m for q in queries if "histogram_quantile" in q for m in promql_metric_names(q)}
    assert {"umcd_batch_size_bucket", "umcd_model_latency_seconds_bucket", "umcd_search_latency_seconds_bucket"} <= quantile_metrics


def test_grafana_provisioning_matches_the_dashboard_and_compose(services):
    datasources = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD_PATH.read_text())

    def uids(panels):
        for panel in panels:
            if "datasource" in panel:
                yield panel["datasource"]["uid"]
            for target in panel.get("targets", []):
                yield target["datasource"]["uid"]
            yield from uids(panel.get("panels", []))

    assert set(uids(dashboard["panels"])) == {source["uid"]}
    providers = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "umcd.yml").read_text())["providers"]
    mounts = dict(_volume_entries(services["grafana"]))
    assert mounts["./deploy/grafana/dashboards"] == providers[0]["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{providers[0]['options']['path']}/{DASHBOARD_PATH.name}"


def _container_port(svc: dict) -> int | None:
    """The port a fleet service serves metrics on inside its container."""
    env = svc.get("environment") or {}
    if "UMCD_METRICS_PORT" in env:
        return int(env["UMCD_METRICS_PORT"])
    cmd = svc.get("command") or []
    for i, arg in enumerate(cmd):
        if arg == "--port":
            return int(cmd[i + 1])
        if arg.startswith("--port="):
            return int(arg.split("=", 1)[1])
    return None


def test_prometheus_config_parses_and_scrapes_workers_gateway_and_flower(services):
    config = yaml.safe_load(PROMETHEUS_PATH.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"detect-worker", "cpu-worker", "gateway", "flower"} <= set(jobs)
    targets: dict[str, list[tuple[str, int]]] = {}
    for name, job in jobs.items():
        assert job.get("metrics_path", "/metrics") == "/metrics", name
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                targets.setdefault(name, []).append((host, int(port)))
        for dns in job.get("dns_sd_configs", []):
            assert dns["type"] == "A"
            targets.setdefault(name, []).extend((host, int(dns["port"])) for host in dns["names"])
    for name, pairs in targets.items():
        for host, port in pairs:
            if host == "localhost":
                continue
            assert host in services, f"job {name} scrapes {host}, which is not a compose service"
            assert _container_port(services[host]) == port, f"job {name}: {host} serves metrics elsewhere"
    assert targets["detect-worker"] == [("detect-worker", 9100)]
    mounts = dict(_volume_entries(services["prometheus"]))
    config_file = next(a.split("=", 1)[1] for a in services["prometheus"]["command"] if a.startswith("--config.file="))
    assert mounts["./deploy/prometheus.yml"] == config_file


def test_a_detection_worker_started_by_hand_gets_the_threads_compose_and_the_fleet_give_it(services):
    from umcd.commands.worker import DEFAULT_DETECT_CONCURRENCY

    command = services["detect-worker"]["command"]
    assert int(command[command.index("--concurrency") + 1]) == DEFAULT_DETECT_CONCURRENCY
