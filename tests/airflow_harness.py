"""Airflow on loopback for the end-to-end tests, run as a person would run it locally.

A temporary ``AIRFLOW_HOME`` with a fresh SQLite metadata database, the simple auth manager
with a known admin password, the project's ``dags/`` and ``plugins/`` folders, and the
components (``api-server``, ``scheduler``, ``dag-processor``) as child processes in their own
process groups, all logging to one file and all stopped on exit::

    with AirflowHarness(tmp_path / "airflow", env={"TRIGGERS_DB_URL": url}) as airflow:
        airflow.cli("db", "migrate")
        airflow.start("api-server", "scheduler")
        airflow.wait_until_healthy()
        airflow.cli("backfill", "create", ...)
        runs = airflow.api("/dags/triggers_pipeline/dagRuns")

Airflow 3 task processes reach the metadata database only through the api-server's Execution
API, so the scheduler's tasks need the api-server up, ``[core] execution_api_server_url``
pointing at it and the same ``[api_auth] jwt_secret`` in every component.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from include.sandbox.net import free_port

ROOT = Path(__file__).resolve().parents[1]
AIRFLOW_BIN = str(Path(sys.executable).parent / "airflow")
T = TypeVar("T")


def wait_for(
    what: str,
    check: Callable[[], T | None],
    timeout: float,
    *,
    processes: list[subprocess.Popen] | tuple = (),
    explain: Callable[[], str] | None = None,
    interval: float = 0.5,
) -> T:
    """Poll ``check`` until it returns something truthy; fail clearly on timeout or a dead process."""
    deadline = time.monotonic() + timeout
    while True:
        for process in processes:
            if process.poll() is not None:
                detail = f"\n{explain()}" if explain else ""
                raise AssertionError(
                    f"`airflow {process.args[1]}` exited with {process.returncode} "
                    f"while waiting for {what}{detail}"
                )
        try:
            result = check()
        except (OSError, urllib.error.URLError):
            result = None
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = f"\n{explain()}" if explain else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{detail}")
        time.sleep(interval)


class AirflowHarness:
    """A throw-away Airflow installation: settings, CLI calls, components, REST API."""

    def __init__(self, home: Path, *, env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.password = secrets.token_urlsafe(12)
        (self.home / "passwords.json").write_text(json.dumps({"admin": self.password}))
        self.log_path = self.home / "components.log"
        self.processes: list[subprocess.Popen] = []  # the long-running components
        self._children: list[subprocess.Popen] = []  # everything started, killed by stop()
        self._token: str | None = None
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.home / 'airflow.db'}",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),  # >= 64 bytes: no PyJWT warning
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.base_url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        for name in ("TRIGGERS_CONFIG", "TRIGGERS_TEMPLATES", "TRIGGERS_DB_URL", "TRIGGERS_SCHEDULE"):
            self.env.pop(name, None)  # the caller's own shell settings must not leak in
        self.env.update(env or {})

    # -- the CLI ---------------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``airflow ARGS`` to completion; on failure raise with its output."""
        done = subprocess.run(
            [AIRFLOW_BIN, *args], env=self.env, cwd=self.home, capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"`airflow {' '.join(args)}` exited with {done.returncode}:\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done

    def cli_in_background(self, *args: str) -> subprocess.Popen:
        """Start ``airflow ARGS`` (e.g. ``db migrate``) while the caller prepares something else."""
        return self._spawn(list(args))

    # -- components ------------------------------------------------------------------------
    def start(self, *components: str) -> None:
        """Start long-running components: "api-server", "scheduler", "dag-processor", "triggerer"."""
        for component in components:
            args = [component]
            if component == "api-server":
                args += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
            self.processes.append(self._spawn(args))

    def _spawn(self, args: list[str]) -> subprocess.Popen:
        with self.log_path.open("ab") as log:
            log.write(f"\n===== airflow {' '.join(args)} =====\n".encode())
            log.flush()
            process = subprocess.Popen(
                [AIRFLOW_BIN, *args],
                env=self.env,
                cwd=self.home,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._children.append(process)
        return process

    def wait_until_healthy(self, timeout: float = 90) -> None:
        """The api-server answers and every started component is still alive."""
        wait_for(
            "the api-server's health endpoint",
            lambda: self._http("GET", "/api/v2/monitor/health"),
            timeout,
            processes=self.processes,
            explain=self.log_tail,
        )

    def log_tail(self, chars: int = 6000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"--- last {chars} characters of {self.log_path} ---\n{text[-chars:]}"

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM every child's process group, then SIGKILL what is left after ``grace`` seconds
        (the installation is thrown away: no need for Airflow's slow graceful shutdown)."""
        for process in self._children:
            if process.poll() is None:
                _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self._children:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process, signal.SIGKILL)  # also any task process left in the group
            process.wait()
        self._children.clear()
        self.processes.clear()

    def __enter__(self) -> AirflowHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the REST API ----------------------------------------------------------------------
    def api(self, path: str, data: dict[str, Any] | None = None, method: str | None = None) -> Any:
        """``/api/v2{path}`` as the admin user; JSON in and out."""
        return self._http(
            method or ("POST" if data is not None else "GET"), f"/api/v2{path}", data, self.api_token()
        )

    def api_token(self) -> str:
        """A bearer token of the admin user (fetched once)."""
        if self._token is None:
            self._token = self._http("POST", "/auth/token", {"username": "admin", "password": self.password})[
                "access_token"
            ]
        return self._token

    def _http(
        self, method: str, path: str, data: dict[str, Any] | None = None, token: str | None = None
    ) -> Any:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        body = json.dumps(data).encode() if data is not None else None
        request = urllib.request.Request(f"{self.base_url}{path}", body, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=20) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            raise ApiError(
                error.code, f"{method} {path}: {error.code} {error.read().decode(errors='replace')[:2000]}"
            ) from None


class ApiError(urllib.error.URLError):
    """An HTTP error answer of the api-server, with its body (``wait_for`` retries on it)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
