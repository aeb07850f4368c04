"""docker-compose.yaml as compose reads it, and the init check that refuses example secrets.

``docker compose config`` (or Debian's ``docker-compose``, the same file format) interpolates the
file with an env file and validates it; no daemon is needed and no image is pulled. Where neither
tool is installed, the tests that need one skip and say why; the rest read the file as data.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from include.adobe.auth import PipelineCredentials

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "docker" / "check_secrets.py"
AIRFLOW_SERVICES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer")
SANDBOX_SERVICES = ("simulator", "mailpit")
LONG_RUNNING = (*AIRFLOW_SERVICES, "postgres", *SANDBOX_SERVICES)
CELERY_SERVICES = ("redis", "airflow-worker")
SECRET_NAMES = (
    "AIRFLOW_JWT_SECRET",
    "AIRFLOW_API_SECRET_KEY",
    "AIRFLOW_FERNET_KEY",
    "_AIRFLOW_WWW_USER_PASSWORD",
    "POSTGRES_PASSWORD",
    "ADOBE_CLIENT_SECRET",
    "SMTP_PASSWORD",
)


def _compose_command() -> list[str] | None:
    if shutil.which("docker") is None:
        return None
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if probe.returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


COMPOSE = _compose_command()
needs_compose = pytest.mark.skipif(
    COMPOSE is None,
    reason="neither `docker compose` nor `docker-compose` is installed "
    "(Debian: apt-get install docker-compose); the file is still read as data below",
)


def example_env() -> dict[str, str]:
    values = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            values[key] = value
    return values


def good_env(**changes: str) -> dict[str, str]:
    """.env.example with every secret given a fresh value (what a user does), then ``changes``."""
    values = example_env()
    for name in (
        "AIRFLOW_JWT_SECRET",
        "AIRFLOW_API_SECRET_KEY",
        "_AIRFLOW_WWW_USER_PASSWORD",
        "POSTGRES_PASSWORD",
    ):
        values[name] = secrets.token_urlsafe(32)
    values["AIRFLOW_FERNET_KEY"] = base64.urlsafe_b64encode(os.urandom(32)).decode()
    values["ADOBE_CLIENT_SECRET"] = "adobe-" + secrets.token_hex(16)
    values["SMTP_PASSWORD"] = "relay-" + secrets.token_hex(16)
    values.update(changes)
    return values


def write_env(path: Path, values: dict[str, str]) -> Path:
    path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    return path


def compose_config(tmp_path: Path, values: dict[str, str], *options: str) -> dict:
    """The file as compose resolves it with ``values`` as .env (the env file the services get too)."""
    env_file = write_env(tmp_path / "compose.env", values)
    environment = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
    environment["TRIGGERS_ENV_FILE"] = str(env_file)
    run = subprocess.run(
        [*COMPOSE, "--env-file", str(env_file), *options, "config"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    return yaml.safe_load(run.stdout)


def published(service: dict) -> list[tuple[str, str, str]]:
    """(host address, host port, container port) of each port, in either syntax compose prints."""
    ports = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):  # docker compose v2: the long syntax
            ports.append((port.get("host_ip", ""), str(port.get("published", "")), str(port["target"])))
        else:  # docker-compose 1.x: "127.0.0.1:8080:8080/tcp"
            parts = str(port).split("/")[0].rsplit(":", 2)
            ports.append(tuple(parts) if len(parts) == 3 else ("", *parts))
    return ports


def environment_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


# --- compose's own reading of the file ---------------------------------------------------------


@needs_compose
def test_config_validates_with_the_example_env(tmp_path: Path) -> None:
    config = compose_config(tmp_path, example_env())
    # docker-compose 1.x lists the services of every profile; compose v2 those of active ones
    assert (
        {*LONG_RUNNING, "airflow-init"}
        <= set(config["services"])
        <= {
            *LONG_RUNNING,
            "airflow-init",
            *CELERY_SERVICES,
        }
    )


@needs_compose
def test_every_published_port_is_on_loopback_by_default(tmp_path: Path) -> None:
    values = {k: v for k, v in good_env().items() if not k.endswith("_BIND_ADDRESS")}
    config = compose_config(tmp_path, values, "--profile", "celery")
    ports = {name: published(service) for name, service in config["services"].items()}
    assert ports["airflow-apiserver"] == [("127.0.0.1", "8080", "8080")]
    assert sorted(ports["mailpit"]) == [("127.0.0.1", "1025", "1025"), ("127.0.0.1", "8025", "8025")]
    assert ports["simulator"] == [("127.0.0.1", "8765", "8765")]
    for name, bindings in ports.items():
        assert all(address == "127.0.0.1" for address, _, _ in bindings), (name, bindings)


@needs_compose
def test_the_bind_addresses_open_the_ui_and_mailpit_but_never_the_simulator(tmp_path: Path) -> None:
    values = good_env(TRIGGERS_BIND_ADDRESS="0.0.0.0", MAILPIT_BIND_ADDRESS="192.0.2.10")
    services = compose_config(tmp_path, values)["services"]
    assert published(services["airflow-apiserver"]) == [("0.0.0.0", "8080", "8080")]
    assert {address for address, _, _ in published(services["mailpit"])} == {"192.0.2.10"}
    assert published(services["simulator"]) == [("127.0.0.1", "8765", "8765")]  # the fault switches


@needs_compose
def test_the_simulator_and_mailpit_hold_no_airflow_secret_nor_key(tmp_path: Path) -> None:
    values = good_env()
    services = compose_config(tmp_path, values)["services"]
    secret_values = [values[name] for name in SECRET_NAMES]
    for name in SANDBOX_SERVICES:
        service = services[name]
        dumped = json.dumps(service)
        leaked = [key for key, value in zip(SECRET_NAMES, secret_values, strict=True) if value in dumped]
        assert not leaked, f"{name} receives {leaked}"
        env = environment_of(service)
        assert not [
            key for key in env if key.startswith(("AIRFLOW", "_AIRFLOW", "TRIGGERS_", "ADOBE_", "SMTP_"))
        ]
        assert "env_file" not in service
        for volume in service.get("volumes") or []:
            spec = volume if isinstance(volume, str) else f"{volume['source']}:{volume['target']}"
            assert not re.search(r"config|keys|secret|\.pem|\.env", spec), (name, spec)
    # the Airflow services do get them (the check above could not pass by accident)
    scheduler = json.dumps(services["airflow-scheduler"])
    assert values["AIRFLOW_JWT_SECRET"] in scheduler and values["ADOBE_CLIENT_SECRET"] in scheduler


@needs_compose
def test_the_connections_default_to_the_simulator_over_oauth_and_to_mailpit(tmp_path: Path) -> None:
    env = environment_of(compose_config(tmp_path, good_env())["services"]["airflow-scheduler"])
    pipeline = _pipeline_credentials(env)
    assert (pipeline.pipeline_url, pipeline.ims_url, pipeline.auth) == (
        "http://simulator:8765",
        "http://simulator:8765",
        "oauth",
    )
    smtp = json.loads(env["AIRFLOW_CONN_SMTP_DEFAULT"])
    assert (smtp["host"], smtp["port"], smtp["login"]) == ("mailpit", 1025, "")
    assert smtp["extra"]["disable_tls"] is True
    assert env["TRIGGERS_UNSUBSCRIBE_URL"].endswith("/triggers/unsubscribe/{token}")
    assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"


@needs_compose
def test_adobe_and_a_real_relay_are_env_lines(tmp_path: Path) -> None:
    values = good_env(
        ADOBE_PIPELINE_URL="https://pipeline.example",
        ADOBE_IMS_URL="https://ims-na1.adobelogin.com",
        ADOBE_CLIENT_ID="0123abcd",
        ADOBE_SCOPES="openid,AdobeID,read_organizations",
        SMTP_HOST="smtp.sendgrid.net",
        SMTP_PORT="587",
        SMTP_LOGIN="apikey",
        SMTP_DISABLE_TLS="false",
        TRIGGERS_UNSUBSCRIBE_URL="https://shop.example/triggers/unsubscribe/{token}",
    )
    env = environment_of(compose_config(tmp_path, values)["services"]["airflow-scheduler"])
    pipeline = _pipeline_credentials(env)
    assert (pipeline.pipeline_url, pipeline.ims_url, pipeline.client_id) == (
        "https://pipeline.example",
        "https://ims-na1.adobelogin.com",
        "0123abcd",
    )
    assert pipeline.client_secret == values["ADOBE_CLIENT_SECRET"]
    assert pipeline.scopes == ("openid", "AdobeID", "read_organizations")
    smtp = json.loads(env["AIRFLOW_CONN_SMTP_DEFAULT"])
    assert (smtp["host"], smtp["port"], smtp["login"], smtp["password"]) == (
        "smtp.sendgrid.net",
        587,
        "apikey",
        values["SMTP_PASSWORD"],
    )
    assert smtp["extra"]["disable_tls"] is False
    assert env["ADOBE_PIPELINE_URL"] == "https://pipeline.example"  # init.sh: no demo audience


@needs_compose
def test_the_celery_profile_adds_redis_and_workers(tmp_path: Path) -> None:
    config = compose_config(tmp_path, good_env(AIRFLOW_EXECUTOR="CeleryExecutor"), "--profile", "celery")
    services = config["services"]
    assert set(CELERY_SERVICES) <= set(services)
    for name in (*AIRFLOW_SERVICES, "airflow-worker"):
        env = environment_of(services[name])
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://:@redis:6379/0"
    for name in CELERY_SERVICES:  # started only with --profile celery
        assert services[name]["profiles"] == ["celery"]


@needs_compose
def test_a_worker_without_the_celery_executor_stops_and_says_why(tmp_path: Path) -> None:
    worker = compose_config(tmp_path, good_env(), "--profile", "celery")["services"]["airflow-worker"]
    command = worker["command"]
    assert command[:2] == ["bash", "-c"]
    run = subprocess.run(
        ["bash", "-c", command[2]],
        env={"PATH": os.environ["PATH"], "AIRFLOW__CORE__EXECUTOR": "LocalExecutor"},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    assert "needs AIRFLOW_EXECUTOR=CeleryExecutor in .env" in run.stderr


def _pipeline_credentials(env: dict[str, str]) -> PipelineCredentials:
    conn = json.loads(env["AIRFLOW_CONN_ADOBE_PIPELINE"])
    return PipelineCredentials.from_connection(
        SimpleNamespace(
            conn_id="adobe_pipeline",
            host=conn["host"],
            login=conn["login"],
            password=conn["password"],
            extra_dejson=conn["extra"],
        )
    )


# --- the init check: example secrets refused --------------------------------------------------


def run_check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CHECK), *args],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], **(env or {})},
    )


def test_the_init_check_refuses_the_example_env() -> None:
    run = run_check("--env-file", str(ROOT / ".env.example"))
    assert run.returncode == 1
    for name in ("AIRFLOW_JWT_SECRET", "AIRFLOW_API_SECRET_KEY", "AIRFLOW_FERNET_KEY"):
        assert f"{name} in .env is an example value" in run.stderr
    assert "_AIRFLOW_WWW_USER_PASSWORD" in run.stderr and "POSTGRES_PASSWORD" in run.stderr
    assert "secrets.token_urlsafe(32)" in run.stderr  # how to make one
    assert "urlsafe_b64encode(os.urandom(32))" in run.stderr  # the Fernet key's
    assert "change-me" not in run.stderr  # values are never printed


def test_the_init_check_accepts_fresh_secrets_and_names_each_weak_one(tmp_path: Path) -> None:
    good = write_env(tmp_path / "good.env", good_env())
    run = run_check("--env-file", str(good))
    assert run.returncode == 0, run.stderr
    weak = good_env(
        AIRFLOW_JWT_SECRET="short",
        AIRFLOW_FERNET_KEY="x" * 44,
        POSTGRES_PASSWORD="airflow",
    )
    run = run_check("--env-file", str(write_env(tmp_path / "weak.env", weak)))
    assert run.returncode == 1
    lines = run.stderr.splitlines()
    assert any(
        line.startswith("check_secrets: AIRFLOW_JWT_SECRET in .env is shorter than 32") for line in lines
    )
    assert any("AIRFLOW_FERNET_KEY in .env is not a Fernet key" in line for line in lines)
    assert any("POSTGRES_PASSWORD in .env is an example value" in line for line in lines)
    assert not any("AIRFLOW_API_SECRET_KEY" in line for line in lines)


def test_the_init_check_reads_the_container_names_and_reports_the_env_names(tmp_path: Path) -> None:
    """Inside airflow-init the secrets arrive as Airflow's variables; the message names .env's."""
    values = good_env()
    container = {
        "AIRFLOW__API_AUTH__JWT_SECRET": "change-me",  # the example value, under Airflow's name
        "AIRFLOW__API__SECRET_KEY": values["AIRFLOW_API_SECRET_KEY"],
        "AIRFLOW__CORE__FERNET_KEY": values["AIRFLOW_FERNET_KEY"],
        "_AIRFLOW_WWW_USER_PASSWORD": values["_AIRFLOW_WWW_USER_PASSWORD"],
        "POSTGRES_PASSWORD": values["POSTGRES_PASSWORD"],
    }
    run = run_check(env=container)
    assert run.returncode == 1
    assert run.stderr.splitlines()[0].startswith(
        "check_secrets: AIRFLOW_JWT_SECRET in .env is an example value"
    )
    container["AIRFLOW__API_AUTH__JWT_SECRET"] = values["AIRFLOW_JWT_SECRET"]
    assert run_check(env=container).returncode == 0


def test_a_real_relay_needs_a_public_unsubscribe_url(tmp_path: Path) -> None:
    local = good_env(SMTP_HOST="smtp.sendgrid.net")  # the example's localhost link kept
    run = run_check("--env-file", str(write_env(tmp_path / "local.env", local)))
    assert run.returncode == 1
    assert "TRIGGERS_UNSUBSCRIBE_URL in .env points at this machine" in run.stderr
    public = dict(local, TRIGGERS_UNSUBSCRIBE_URL="https://shop.example/triggers/unsubscribe/{token}")
    assert run_check("--env-file", str(write_env(tmp_path / "public.env", public))).returncode == 0


@pytest.mark.parametrize(
    ("name", "value", "breaks"),
    [
        ("POSTGRES_PASSWORD", "p@ss/word#" + "x" * 20, "the database URLs"),
        ("POSTGRES_PASSWORD", "a%20b?c" + "x" * 20, "the database URLs"),
        ("ADOBE_CLIENT_SECRET", 'p8e-"quoted"-secret', "AIRFLOW_CONN_ADOBE_PIPELINE"),
        ("SMTP_PASSWORD", "back\\slash-secret", "AIRFLOW_CONN_SMTP_DEFAULT"),
    ],
)
def test_the_init_check_refuses_characters_that_break_the_urls_and_json(
    tmp_path: Path, name: str, value: str, breaks: str
) -> None:
    run = run_check("--env-file", str(write_env(tmp_path / "bad.env", good_env(**{name: value}))))
    assert run.returncode == 1
    (line,) = [line for line in run.stderr.splitlines() if line.startswith(f"check_secrets: {name} ")]
    assert breaks in line and "secrets.token_urlsafe(32)" in line  # what breaks, how to make one
    assert value not in run.stderr  # never the value


def _check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_secrets", CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@settings(max_examples=200, deadline=None)
@given(value=st.text(min_size=12, max_size=40).filter(lambda v: "\n" not in v))
def test_a_postgres_password_passes_only_when_the_urls_it_goes_into_keep_it_whole(value: str) -> None:
    """Whatever the value, the check passes only if the URL compose builds parses back to it."""
    from urllib.parse import urlsplit

    module = _check_module()
    found = module._character_problems({"POSTGRES_PASSWORD": value})
    try:
        url = urlsplit(f"postgresql://airflow:{value}@postgres/airflow")
        whole = url.password == value and url.hostname == "postgres" and url.path == "/airflow"
    except ValueError:
        whole = False
    if not found:
        assert whole and "%" not in value and "$" not in value  # a URL decodes "%"; compose reads "$"


@settings(max_examples=200, deadline=None)
@given(value=st.text(min_size=1, max_size=40))
def test_a_smtp_password_passes_only_when_the_json_connection_holds_it(value: str) -> None:
    module = _check_module()
    found = module._character_problems({"SMTP_PASSWORD": value})
    try:
        kept = json.loads(f'{{"password": "{value}"}}')["password"] == value
    except ValueError:
        kept = False
    if not found:
        assert kept and "$" not in value  # compose reads "$" as a variable
    if not kept:
        assert found


def test_inside_init_a_broken_json_connection_is_named(tmp_path: Path) -> None:
    values = good_env()
    container = {
        "AIRFLOW__API_AUTH__JWT_SECRET": values["AIRFLOW_JWT_SECRET"],
        "AIRFLOW__API__SECRET_KEY": values["AIRFLOW_API_SECRET_KEY"],
        "AIRFLOW__CORE__FERNET_KEY": values["AIRFLOW_FERNET_KEY"],
        "_AIRFLOW_WWW_USER_PASSWORD": values["_AIRFLOW_WWW_USER_PASSWORD"],
        "POSTGRES_PASSWORD": values["POSTGRES_PASSWORD"],
        "AIRFLOW_CONN_SMTP_DEFAULT": '{"conn_type": "smtp", "password": "a"b"}',
    }
    run = run_check(env=container)
    assert run.returncode == 1
    assert "AIRFLOW_CONN_SMTP_DEFAULT is not valid JSON: SMTP_LOGIN or SMTP_PASSWORD" in run.stderr
    container["AIRFLOW_CONN_SMTP_DEFAULT"] = '{"conn_type": "smtp", "password": "ab"}'
    assert run_check(env=container).returncode == 0


def test_init_checks_the_secrets_before_anything_else() -> None:
    script = (ROOT / "docker" / "init.sh").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "docker" / "init.sh")]).returncode == 0
    commands = [line for line in script.splitlines() if line and not line.startswith(("#", "set "))]
    assert commands[0] == "python /opt/airflow/docker/check_secrets.py"
    assert "airflow dags unpause triggers_pipeline" in script  # the demo starts by itself
    assert "simulator audience" in script and "audience load" in script


# --- the file read as data (no tool needed) ---------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yaml").read_text())


@pytest.mark.parametrize("name", (*LONG_RUNNING, *CELERY_SERVICES))
def test_long_running_services_have_a_health_check(compose: dict, name: str) -> None:
    check = compose["services"][name]["healthcheck"]
    assert check["test"] and check["interval"] and check["retries"] >= 3


def test_airflow_services_wait_for_init_and_share_one_environment(compose: dict) -> None:
    for name in (*AIRFLOW_SERVICES, "airflow-worker", "airflow-init"):
        service = compose["services"][name]
        env = service["environment"]
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"].startswith("${AIRFLOW_JWT_SECRET:?")
        assert env["AIRFLOW__CORE__FERNET_KEY"].startswith("${AIRFLOW_FERNET_KEY:?")
        assert env["TRIGGERS_DB_URL"].endswith("@postgres/triggers")
        assert service["build"] == "."
        if name != "airflow-init":
            assert service["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
            assert service["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_the_sandbox_services_do_not_inherit_airflow_settings(compose: dict) -> None:
    """Read as data too: no merge key, no env_file (the anchors would bring Airflow's secrets)."""
    text = (ROOT / "docker-compose.yaml").read_text()
    for name in SANDBOX_SERVICES:
        block = re.search(rf"^  {name}:\n(.*?)(?=^  \S|^\S)", text, re.MULTILINE | re.DOTALL).group(1)
        assert "<<:" not in block and "*airflow" not in block and "env_file" not in block
    simulator = " ".join(
        compose["services"]["simulator"]["entrypoint"] + compose["services"]["simulator"]["command"]
    )
    assert simulator.startswith("python -m include.cli simulator serve")
    assert "--public-key" not in simulator  # OAuth: the demo needs no key pair


def test_dockerfile_installs_the_pinned_requirements() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM apache/airflow:3\.3\.2-python3\.11$", dockerfile, re.MULTILINE)
    logical_lines = dockerfile.replace("\\\n", " ").splitlines()
    (install,) = [line for line in logical_lines if line.startswith("RUN pip install")]
    assert "-r /opt/airflow/requirements/requirements.txt" in install
    assert "-c /opt/airflow/requirements/constraints.txt" in install
    assert "COPY --chown=airflow:0 docker /opt/airflow/docker" in dockerfile


def test_env_example_documents_every_variable_the_file_reads() -> None:
    example = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^#? ?([A-Z_]+)=", example, re.MULTILINE))  # set or shown commented
    compose_text = (ROOT / "docker-compose.yaml").read_text()
    required = set(re.findall(r"(?<!\$)\$\{([A-Z_]+):\?", compose_text))
    assert required <= set(example_env()), f"set in .env.example: {sorted(required - set(example_env()))}"
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_]+)[:}]", compose_text))
    internal = {"AIRFLOW_PROJ_DIR", "TRIGGERS_ENV_FILE", "TRIGGERS_IMAGE_NAME", "MAILPIT_IMAGE"}
    assert not used - documented - internal, f"add to .env.example: {sorted(used - documented - internal)}"
