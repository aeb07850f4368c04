"""The compose stack's demo, without Docker: what compose hands each service, run on loopback.

The simulator runs with the entrypoint, command and environment ``docker compose config`` gives
it (its address moved to a free loopback port), the audience is loaded by ``docker/init.sh``'s
own commands, and ``airflow dags test triggers_pipeline`` runs with the Airflow services'
environment (the connections' hosts moved from ``simulator`` and ``mailpit`` to loopback, the
metadata and staging databases to SQLite files). Emails must reach the SMTP server: the
credentials, the OAuth flow, the simulator's population and the unsubscribe URL all agree.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from include.sandbox.net import free_port
from include.sandbox.smtp_server import LocalSmtpServer
from tests.compose.test_compose import ROOT, compose_config, environment_of, good_env, needs_compose

AIRFLOW = str(Path(sys.executable).with_name("airflow"))
EVENTS, PEOPLE = "3000", "600"
# what compose sets for the container's own paths and services, replaced for a run on this machine
CONTAINER_ONLY = (
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE",
    "AIRFLOW__CELERY__BROKER_URL",
    "AIRFLOW__CELERY__RESULT_BACKEND",
)


def _init_demo_commands() -> list[list[str]]:
    """The audience commands of docker/init.sh, with its variables and paths filled in."""
    script = (ROOT / "docker" / "init.sh").read_text()
    lines = [line.strip() for line in script.splitlines() if "python -m include.cli" in line]
    commands = [line for line in lines if " simulator audience " in line or " audience load " in line]
    assert len(commands) == 2, commands
    return [line.replace('"${SIMULATOR_PEOPLE}"', PEOPLE).split()[1:] for line in commands]


@needs_compose
def test_the_compose_demo_sends_emails(tmp_path: Path) -> None:
    # the simulator's own client secret, as in .env.example (good_env gives Adobe's a new one)
    values = good_env(
        SIMULATOR_EVENTS=EVENTS, SIMULATOR_PEOPLE=PEOPLE, SIMULATOR_RATE="0", ADOBE_CLIENT_SECRET="sim-secret"
    )
    services = compose_config(tmp_path, values)["services"]
    simulator_port = free_port("127.0.0.1")

    # the simulator as compose starts it, with only the environment compose gives it
    simulator = services["simulator"]
    args = [*simulator["entrypoint"], *simulator["command"]]
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = str(simulator_port)
    assert args[0] == "python"
    sim_env = {"PATH": os.environ["PATH"], **environment_of(simulator), "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, *args[1:]], env=sim_env, cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert "Adobe pipeline simulator at" in process.stdout.readline()
        with LocalSmtpServer() as smtp:
            env = _airflow_environment(services["airflow-scheduler"], tmp_path, simulator_port, smtp.port)
            for command in [["-m", "include.cli", "db", "upgrade"], *_init_demo_commands()]:
                command = [arg.replace("/tmp/", f"{tmp_path}/") for arg in command]
                subprocess.run([sys.executable, *command], env=env, cwd=ROOT, check=True, capture_output=True)
            subprocess.run([AIRFLOW, "db", "migrate"], env=env, check=True, capture_output=True)
            run = subprocess.run(
                [AIRFLOW, "dags", "test", "triggers_pipeline"], env=env, capture_output=True, text=True
            )
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
            assert len(smtp.messages) > 50, f"{len(smtp.messages)} emails"
            recipients = {str(message["To"]) for message in smtp.messages}
            assert all(re.search(r"\.\d+@", to) for to in recipients)  # the simulator's shoppers
            unsubscribe = str(smtp.messages[0]["List-Unsubscribe"])
            assert "http://localhost:8080/triggers/unsubscribe/" in unsubscribe
    finally:
        process.terminate()
        process.wait(timeout=30)


def _airflow_environment(
    scheduler: dict, tmp_path: Path, simulator_port: int, smtp_port: int
) -> dict[str, str]:
    env = {k: v for k, v in environment_of(scheduler).items() if k not in CONTAINER_ONLY}
    pipeline = json.loads(env["AIRFLOW_CONN_ADOBE_PIPELINE"])
    assert pipeline["extra"]["auth"] == "oauth"
    pipeline["host"] = pipeline["extra"]["ims_url"] = f"http://127.0.0.1:{simulator_port}"
    smtp = json.loads(env["AIRFLOW_CONN_SMTP_DEFAULT"])
    assert smtp["host"] == "mailpit"
    smtp["host"], smtp["port"] = "127.0.0.1", smtp_port
    env.update(
        AIRFLOW_CONN_ADOBE_PIPELINE=json.dumps(pipeline),
        AIRFLOW_CONN_SMTP_DEFAULT=json.dumps(smtp),
        AIRFLOW_HOME=str(tmp_path / "airflow"),
        AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(ROOT / "plugins"),
        AIRFLOW__LOGGING__LOGGING_LEVEL="WARNING",
        TRIGGERS_DB_URL=f"sqlite:///{tmp_path / 'triggers.db'}",
        TRIGGERS_CONFIG=str(ROOT / "include" / "triggers.yaml"),
        TRIGGERS_TEMPLATES=str(ROOT / "include" / "templates"),
        TRIGGERS_TOKEN_CACHE=str(tmp_path / "token-cache"),
        PYTHONPATH=str(ROOT),
        PATH=os.environ["PATH"],
        HOME=os.environ.get("HOME", "/root"),
    )
    return env
