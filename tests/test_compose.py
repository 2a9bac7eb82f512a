"""docker-compose.yml, checked offline against the real code (no Docker engine needed).

Every command must name a real entry point with options that exist, every worker must serve a
configured model on a GPU, and no secret may have a default. `scripts/validate-compose.sh`
(make compose-check) adds Compose's own schema check with the docker-compose binary.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import httpx
import pytest
import yaml

from inferq.cli import main
from router.config import load_config
from tests.conftest import free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]

# ${NAME}, ${NAME:-default}, ${NAME:?message}, ... and bare $NAME ($$ is a literal dollar).
INTERPOLATION = re.compile(r"(?<!\$)\$(?:\{(?P<braced>\w+)(?P<rest>[^}]*)\}|(?P<bare>\w+))")
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|BASIC_AUTH", re.IGNORECASE)


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's substitution: ``${NAME}``, ``${NAME:-default}``, ``${NAME:?message}``."""

    def value(match: re.Match[str]) -> str:
        name, rest = match["braced"] or match["bare"], match["rest"] or ""
        if env.get(name):
            return env[name]
        assert rest.startswith(":-"), f"{match[0]}: not set and no default"
        return rest[2:]

    return INTERPOLATION.sub(value, text)


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else [str(arg) for arg in command]


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def inferq_services() -> list[str]:
    return sorted(name for name, svc in SERVICES.items() if command_of(svc)[:1] == ["inferq"])


def worker_services() -> list[str]:
    return [name for name in inferq_services() if command_of(SERVICES[name])[1:2] == ["worker"]]


def _consume_group_option(group: click.Group, args: list[str]) -> list[str]:
    """Check one option of a group (before its subcommand) exists; return what follows it."""
    flag = args[0].split("=", 1)[0]
    param = next((p for p in group.params if flag in (*p.opts, *p.secondary_opts)), None)
    assert param is not None, f"inferq group {group.name!r} has no option {flag}"
    takes_value = isinstance(param, click.Option) and not param.is_flag and "=" not in args[0]
    return args[2:] if takes_value else args[1:]


def parse_inferq(args: list[str]) -> click.Context:
    """Resolve `inferq ...` against the real click tree and parse the leaf command's options.

    Click's own parser rejects unknown options, bad types and missing required options; the
    command's callback is not run.
    """
    assert args[:1] == ["inferq"]
    command: click.Command = main
    path, rest = ["inferq"], args[1:]
    while isinstance(command, click.Group):
        if rest and rest[0].startswith("-"):
            rest = _consume_group_option(command, rest)
            continue
        assert rest, f"{' '.join(path)} needs a subcommand"
        subcommand = command.commands.get(rest[0])
        assert subcommand is not None, f"{' '.join(path)} has no subcommand {rest[0]!r}"
        command, path, rest = subcommand, [*path, rest[0]], rest[1:]
    try:
        return command.make_context(" ".join(path), list(rest))
    except click.UsageError as exc:
        pytest.fail(f"`{' '.join(args)}`: {exc.format_message()}")


def mounted_config_path(service: dict[str, Any]) -> Path:
    """The host file mounted where the service's INFERQ_CONFIG points."""
    target = environment_of(service)["INFERQ_CONFIG"]
    for volume in service.get("volumes", []):
        source, _, rest = str(volume).partition(":")
        if rest.split(":")[0] == target:
            assert source.startswith("."), f"{volume}: the config must be a file in the repo"
            return (COMPOSE_FILE.parent / source).resolve()
    pytest.fail(f"INFERQ_CONFIG={target} but nothing is mounted there")


def test_required_services_exist() -> None:
    assert {"redis", "postgres", "migrate", "api", "flower"} <= set(SERVICES)
    assert worker_services(), "at least one `inferq worker --model NAME` service"


@pytest.mark.parametrize("name", inferq_services())
def test_inferq_command_resolves_against_cli(name: str) -> None:
    assert [e.value for e in entry_points(group="console_scripts", name="inferq")] == [
        "inferq.cli:main"
    ]
    parse_inferq(command_of(SERVICES[name]))


def test_roles_run_the_expected_subcommands() -> None:
    assert command_of(SERVICES["migrate"])[:2] == ["inferq", "migrate"]
    api = parse_inferq(command_of(SERVICES["api"]))
    assert api.command.name == "api"
    assert api.params["host"] == "0.0.0.0", "the API must listen beyond the container"
    assert f"{api.params['port']}" in [p.split(":")[-1] for p in SERVICES["api"]["ports"]]


@pytest.mark.parametrize("name", worker_services())
def test_worker_reserves_an_nvidia_gpu(name: str) -> None:
    devices = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and d.get("count")
        for d in devices
    ), f"{name}: needs deploy.resources.reservations.devices with an nvidia GPU"


@pytest.mark.parametrize("name", worker_services())
def test_worker_serves_a_model_of_the_mounted_config(name: str) -> None:
    service = SERVICES[name]
    model = parse_inferq(command_of(service)).params["model"]
    config = load_config(mounted_config_path(service))
    assert model in config.models, f"{name}: model {model!r} not in {list(config.models)}"
    assert name == f"worker-{model}", "name workers worker-<model>"


# After SIGTERM a worker lets what is in its engine finish: up to its model's timeout_s. Then
# it commits, acknowledges and closes the engine; stopping the engine thread is bounded at 30 s.
COMMIT_AND_CLOSE_S = 30


def drain_seconds(model: str, config_path: Path) -> float:
    """How long a worker for ``model`` may need between SIGTERM and its exit."""
    timeout_s = load_config(config_path).models[model].timeout_s
    assert timeout_s is not None, f"{model}: no timeout_s, so no bound on a worker's drain"
    return timeout_s + COMMIT_AND_CLOSE_S


def compose_duration_s(value: str) -> float:
    """Compose's durations: 150s, 2m30s, 1h, 1.5s, 500ms."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a duration: {value!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


def webhook_services() -> list[str]:
    return [name for name in inferq_services() if command_of(SERVICES[name])[1:2] == ["webhooks"]]


@pytest.mark.parametrize("name", worker_services())
def test_worker_stop_grace_period_is_its_drain_time(name: str) -> None:
    """Compose's default is 10 s: it would kill a worker mid-drain and its work would wait
    for a lease to run out before another worker runs it."""
    service = SERVICES[name]
    model = parse_inferq(command_of(service)).params["model"]
    assert "stop_grace_period" in service, f"{name}: set stop_grace_period"
    grace = compose_duration_s(str(service["stop_grace_period"]))
    assert grace == drain_seconds(model, mounted_config_path(service))
    assert service.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_webhook_sender_outlasts_an_attempt() -> None:
    from core.settings import Settings

    assert webhook_services(), "nothing runs `inferq webhooks`: callbacks are never sent"
    for name in webhook_services():
        grace = compose_duration_s(str(SERVICES[name].get("stop_grace_period", "10s")))
        assert grace > Settings.model_fields["webhook_deadline_s"].default, name


def test_every_configured_model_has_a_worker() -> None:
    config = load_config(mounted_config_path(SERVICES["api"]))
    served = {parse_inferq(command_of(SERVICES[n])).params["model"] for n in worker_services()}
    assert set(config.models) <= served, "a configured model with no worker queues forever"


@pytest.mark.parametrize("name", inferq_services())
def test_inferq_services_share_settings_and_model_cache(name: str) -> None:
    service = SERVICES[name]
    env = environment_of(service)
    assert env == COMPOSE["x-inferq-env"], f"{name}: use the shared x-inferq-env settings"
    assert mounted_config_path(service).is_file()
    cache = env["INFERQ_CACHE_DIR"]
    named = [v.split(":")[0] for v in service["volumes"] if v.split(":")[1] == cache]
    assert named and named[0] in COMPOSE["volumes"], f"{name}: cache must be a named volume"


def test_flower_runs_celery_flower_behind_basic_auth() -> None:
    from celery.bin.celery import celery as celery_cli
    from flower.options import options as flower_options

    flower = SERVICES["flower"]
    args = command_of(flower)
    assert args[0] == "celery" and "flower" in args
    assert entry_points(group="console_scripts", name="celery")
    assert entry_points(group="celery.commands", name="flower"), "flower is not installed"
    split = args.index("flower")
    for arg in [a for a in args[1:split] if a.startswith("-")]:
        flag = arg.split("=", 1)[0]
        assert any(flag in p.opts for p in celery_cli.params), f"celery has no option {flag}"
    for arg in [a for a in args[split + 1 :] if a.startswith("--")]:
        name = arg[2:].split("=", 1)[0]
        assert name in flower_options, f"flower has no option --{name}"
    # The broker URL carries the Redis password: environment, not command line (`ps`).
    assert (
        environment_of(flower)["CELERY_BROKER_URL"] == COMPOSE["x-inferq-env"]["INFERQ_BROKER_URL"]
    )
    assert not [a for a in args if "redis://" in a or a.startswith(("-b", "--broker"))]

    assert "basic_auth" in flower_options
    in_args = [a.split("=", 1)[1] for a in args if a.startswith("--basic-auth=")]
    auth = in_args or [environment_of(flower).get("FLOWER_BASIC_AUTH", "")]
    # user:password, both required variables: no literal credentials, no defaults.
    required = r"\$\{\w+:\?[^}]*\}"
    assert re.fullmatch(f"{required}:{required}", auth[0]), f"flower basic auth: {auth[0]!r}"


def test_api_and_flower_have_healthchecks_on_real_endpoints() -> None:
    from api.routes import router

    paths = {getattr(route, "path", None) for route in router.routes}
    api_check = " ".join(SERVICES["api"]["healthcheck"]["test"])
    assert "/healthz" in api_check and "/healthz" in paths
    assert f":{parse_inferq(command_of(SERVICES['api'])).params['port']}/" in api_check
    assert "/healthcheck" in " ".join(SERVICES["flower"]["healthcheck"]["test"])
    for name in ("redis", "postgres"):
        assert SERVICES[name]["healthcheck"]["test"], f"{name}: healthcheck"


def _dependencies() -> list[tuple[str, str, str]]:
    found = []
    for name, service in SERVICES.items():
        depends = service.get("depends_on", {})
        if isinstance(depends, list):
            depends = {dep: {"condition": "service_started"} for dep in depends}
        found += [(name, dep, spec["condition"]) for dep, spec in depends.items()]
    return found


@pytest.mark.parametrize(("name", "dep", "condition"), _dependencies())
def test_depends_on_conditions_can_be_met(name: str, dep: str, condition: str) -> None:
    assert dep in SERVICES
    if condition == "service_healthy":
        assert SERVICES[dep].get("healthcheck"), f"{name} waits for {dep}'s health: none defined"
    if condition == "service_completed_successfully":
        assert SERVICES[dep].get("restart") == "no", f"{dep} must run once"


def test_start_order() -> None:
    deps = {(name, dep): cond for name, dep, cond in _dependencies()}
    assert deps[("migrate", "postgres")] == "service_healthy"
    for name in ["api", *worker_services(), *webhook_services()]:
        assert deps[(name, "migrate")] == "service_completed_successfully"
        assert deps[(name, "redis")] == "service_healthy"


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in (*_strings(key), *_strings(value))]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    return [node] if isinstance(node, str) else []


def test_secrets_are_required_variables_without_defaults() -> None:
    secret_refs = [
        match
        for text in _strings(COMPOSE)
        for match in INTERPOLATION.finditer(text)
        if SECRET_NAME.search(match["braced"] or match["bare"])
    ]
    assert secret_refs, "expected ${POSTGRES_PASSWORD:?...} and the Flower password"
    for match in secret_refs:
        assert match["braced"] and match["rest"].startswith(":?"), (
            f"{match[0]}: write secrets as ${{NAME:?message}} (required, no default)"
        )
    for name, service in SERVICES.items():
        for key, value in environment_of(service).items():
            if SECRET_NAME.search(key):
                assert INTERPOLATION.search(value), f"{name}: {key} is a literal"


@pytest.mark.parametrize("name", ["flower", "prometheus"])
def test_dashboards_listen_on_localhost_unless_told(name: str) -> None:
    ports = SERVICES[name]["ports"]
    assert ports and all(p.startswith("${INFERQ_BIND:-127.0.0.1}:") for p in ports), ports
    assert all(interpolate(p, {}).startswith("127.0.0.1:") for p in ports)
    opened = [interpolate(p, {"INFERQ_BIND": "0.0.0.0"}) for p in ports]
    assert all(p.startswith("0.0.0.0:") for p in opened), "INFERQ_BIND=0.0.0.0 opens them"


def test_only_the_api_is_published_on_every_interface() -> None:
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            if name != "api":
                bound = interpolate(str(port), {}).split(":")
                assert len(bound) == 3 and bound[0], f"{name}: {port} binds every interface"


def test_redis_requires_the_password_its_clients_send() -> None:
    redis_service = SERVICES["redis"]
    command = command_of(redis_service)
    assert command[0] == "redis-server"
    password = command[command.index("--requirepass") + 1]
    assert re.fullmatch(r"\$\{REDIS_PASSWORD:\?[^}]*\}", password), password
    # The healthcheck's redis-cli authenticates from REDISCLI_AUTH.
    assert environment_of(redis_service)["REDISCLI_AUTH"] == password
    assert "redis-cli" in SERVICES["redis"]["healthcheck"]["test"]
    given = {"REDIS_PASSWORD": "s3cret"}
    for url in (
        COMPOSE["x-inferq-env"]["INFERQ_BROKER_URL"],
        environment_of(SERVICES["flower"])["CELERY_BROKER_URL"],
    ):
        parsed = urlsplit(interpolate(url, given))
        assert (parsed.scheme, parsed.password, parsed.hostname) == ("redis", "s3cret", "redis")
    assert "REDIS_PASSWORD" in (ROOT / "scripts" / "validate-compose.sh").read_text()


def test_dockerfile_matches_commands() -> None:
    """Commands name their program (inferq, celery), so the image must not add an ENTRYPOINT."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    instructions = [line.split()[0].upper() for line in dockerfile.splitlines() if line.strip()]
    assert "ENTRYPOINT" not in instructions
    assert "USER" in instructions, "run as a non-root user"
    for name, service in SERVICES.items():
        if "build" in service:
            assert service["build"] in (".", {"context": "."}), name


def test_flower_as_composed_refuses_callers_without_its_credentials(
    broker_url: str, tmp_path: Path
) -> None:
    """Run Flower with the compose file's command and environment (its variables set to test
    values): pages need the credentials, only the healthcheck answers without them."""
    flower = SERVICES["flower"]
    given = {
        "FLOWER_USER": "ops",
        "FLOWER_PASSWORD": f"pw-{uuid.uuid4().hex}",
        "REDIS_PASSWORD": "x",
    }
    env = {key: interpolate(value, given) for key, value in environment_of(flower).items()}
    assert env["FLOWER_BASIC_AUTH"] == f"ops:{given['FLOWER_PASSWORD']}"
    assert env["CELERY_BROKER_URL"] == "redis://:x@redis:6379/0"
    env["CELERY_BROKER_URL"] = broker_url  # the test Redis, which has no password
    port = free_port()
    args = [f"--port={port}" if a.startswith("--port=") else a for a in command_of(flower)[1:]]
    log = (tmp_path / "flower.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", *args],
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(proc, f"{url}/healthcheck"), timeout=120, what="flower")
        logged = (tmp_path / "flower.log").read_text
        wait_for(lambda: "Broker:" in logged(), timeout=60, what="flower to name its broker")
        where = urlsplit(broker_url)  # Flower masks any password it logs: compare the rest
        named = re.escape(f"{where.hostname}:{where.port}{where.path}")
        assert re.search(rf"Broker: redis://(\S*@)?{named}\s", logged()), "no CELERY_BROKER_URL"
        assert httpx.get(f"{url}/").status_code == 401
        assert httpx.get(f"{url}/", auth=("ops", "wrong")).status_code == 401
        assert httpx.get(f"{url}/workers", auth=("ops", "wrong")).status_code == 401
        assert httpx.get(f"{url}/", auth=("ops", given["FLOWER_PASSWORD"])).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _answers(proc: subprocess.Popen[bytes], url: str) -> bool:
    if proc.poll() is not None:
        pytest.fail(f"flower exited with {proc.returncode}")
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
