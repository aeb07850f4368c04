"""docker-compose.yaml and the Dockerfile, read as data (Docker does not run in the test suite)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
AIRFLOW_SERVICES = ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer")
ONE_SHOT = ("airflow-init", "keys-init")  # they finish; the others wait for service_completed_successfully
LONG_RUNNING = (*AIRFLOW_SERVICES, "postgres", "simulator", "mailpit")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yaml").read_text())


def _interpolate_defaults(value: str) -> str:
    """What compose makes of ``${VAR:-default}`` with VAR unset (enough to parse the JSON)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_every_service_is_there(compose: dict) -> None:
    assert set(compose["services"]) == {*LONG_RUNNING, *ONE_SHOT}


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_services_have_a_health_check(compose: dict, name: str) -> None:
    check = compose["services"][name]["healthcheck"]
    assert check["test"] and check["interval"] and check["retries"] >= 3


def test_one_shot_services_are_awaited(compose: dict) -> None:
    waits = {
        dependency: condition["condition"]
        for service in compose["services"].values()
        for dependency, condition in (service.get("depends_on") or {}).items()
    }
    assert waits["airflow-init"] == waits["keys-init"] == "service_completed_successfully"
    for name in AIRFLOW_SERVICES:
        assert (
            compose["services"][name]["depends_on"]["airflow-init"]["condition"]
            == "service_completed_successfully"
        )
        assert compose["services"][name]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_airflow_services_share_one_environment(compose: dict) -> None:
    for name in (*AIRFLOW_SERVICES, "airflow-init"):
        service = compose["services"][name]
        env = service["environment"]
        assert (
            env["AIRFLOW__API_AUTH__JWT_SECRET"]
            == "${AIRFLOW_JWT_SECRET:?set AIRFLOW_JWT_SECRET in .env (see .env.example)}"
        )
        assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "false"
        assert env["TRIGGERS_DB_URL"].endswith("@postgres/triggers")
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@postgres/airflow")
        assert service["build"] == "."
        assert "/opt/airflow/dags" in " ".join(service["volumes"])


def test_connections_point_at_the_simulator_and_mailpit(compose: dict) -> None:
    env = compose["x-airflow-common"]["environment"]
    pipeline = json.loads(_interpolate_defaults(env["AIRFLOW_CONN_ADOBE_PIPELINE"]))
    assert pipeline["host"] == pipeline["extra"]["ims_url"] == "http://simulator:8765"
    assert pipeline["extra"]["private_key_path"] == "/keys/private.pem"
    assert "private_key" not in pipeline["extra"]  # the key stays in its volume, not in the environment
    smtp = json.loads(env["AIRFLOW_CONN_SMTP_DEFAULT"])
    assert (smtp["conn_type"], smtp["host"], smtp["port"]) == ("smtp", "mailpit", 1025)


def test_simulator_mailpit_and_keys(compose: dict) -> None:
    services = compose["services"]
    simulator = " ".join(services["simulator"]["entrypoint"] + services["simulator"]["command"])
    assert simulator.startswith("python -m include.cli simulator serve")
    assert "--port 8765" in simulator and "--events 100000" in simulator and "--rate 50" in simulator
    assert "--public-key /keys/public.pem" in simulator
    assert "python -m include.cli keys create /keys" in services["keys-init"]["command"][-1]
    mailpit = services["mailpit"]
    assert "axllent/mailpit" in mailpit["image"]
    assert {"8025:8025", "1025:1025"} <= set(mailpit["ports"])
    assert "triggers" in services["airflow-init"]["command"][-1]  # creates the staging database


def test_dockerfile_installs_the_pinned_requirements() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM apache/airflow:3\.3\.2-python3\.11$", dockerfile, re.MULTILINE)
    logical_lines = dockerfile.replace("\\\n", " ").splitlines()
    (install,) = [line for line in logical_lines if line.startswith("RUN pip install")]
    assert "-r /opt/airflow/requirements/requirements.txt" in install
    assert "-c /opt/airflow/requirements/constraints.txt" in install
    assert "COPY --chown=airflow:0 requirements.txt constraints.txt /opt/airflow/requirements/" in dockerfile


def test_env_example_holds_placeholders_only() -> None:
    values = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert values["AIRFLOW_JWT_SECRET"] == values["_AIRFLOW_WWW_USER_PASSWORD"] == "change-me"
    assert values["AIRFLOW_FERNET_KEY"] == ""
    compose_text = (ROOT / "docker-compose.yaml").read_text()
    required = set(re.findall(r"\$\{([A-Z_]+):\?", compose_text))
    assert required <= set(values), f"documented in .env.example: {sorted(required - set(values))}"
