"""Secrets and limits: the IMS token is masked in Airflow's logs, an IMS answer without a usable
``expires_in`` never makes a token fetch per request (a real HTTP server on loopback), and key,
env and token cache files are private from their creation on."""

from __future__ import annotations

import argparse
import json
import math
import os
import stat
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from include.adobe.auth import MIN_TOKEN_LIFETIME, ImsAuthenticator, PipelineCredentials, without_credentials
from include.sandbox import keys

MISSING = object()


class LocalIms:
    """An IMS token endpoint on loopback: answers every POST with ``answer``, counts the POSTs."""

    def __init__(self) -> None:
        self.answer: dict[str, Any] = {}
        self.posts = 0
        ims = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the http.server name)
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                ims.posts += 1
                body = json.dumps(ims.answer).encode()  # NaN and Infinity as JavaScript writes them
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def ims() -> Iterator[LocalIms]:
    server = LocalIms()
    yield server
    server.close()


def oauth_credentials(ims_url: str) -> PipelineCredentials:
    return PipelineCredentials(
        pipeline_url="https://pipeline.test",
        ims_url=ims_url,
        client_id="cid",
        org_id="org@AdobeOrg",
        client_secret="client-secret",
        auth="oauth",
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


EXPIRES_IN = st.one_of(
    st.just(MISSING),
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(expires_in=EXPIRES_IN)
def test_any_expires_in_gives_a_token_reused_for_at_least_the_floor(ims, monkeypatch, expires_in):
    monkeypatch.setenv("TRIGGERS_TOKEN_CACHE", "off")
    ims.answer = {"access_token": "token-abcdef", "token_type": "bearer"}
    if expires_in is not MISSING:
        ims.answer["expires_in"] = expires_in
    ims.posts = 0
    clock = Clock()
    authenticator = ImsAuthenticator(oauth_credentials(ims.url), clock=clock)
    started = clock.now
    for _ in range(5):  # one request after another, as the drain makes them
        assert authenticator.token() == "token-abcdef"
        clock.now += 1
    clock.now = started + MIN_TOKEN_LIFETIME * 0.9 - 1  # within the floor, less its 10 % margin
    authenticator.token()
    assert ims.posts == 1
    expires_at = authenticator.token_info()["expires_at"]
    assert math.isfinite(expires_at) and expires_at >= started + MIN_TOKEN_LIFETIME


def test_the_token_is_registered_with_airflows_secrets_masker(ims, monkeypatch):
    from airflow.sdk.log import redact  # an Airflow process: airflow.sdk is loaded

    monkeypatch.setenv("TRIGGERS_TOKEN_CACHE", "off")
    ims.answer = {"access_token": "ims-token-to-be-masked-7f3a", "expires_in": 3600}
    ImsAuthenticator(oauth_credentials(ims.url)).token()
    assert redact("Authorization: Bearer ims-token-to-be-masked-7f3a") == "Authorization: Bearer ***"


def test_auth_imports_without_airflow():
    """The CLI's drain and status import include.adobe.auth; it must not need Airflow."""
    import subprocess
    import sys

    probe = "import sys, include.adobe.auth; sys.exit('airflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).parents[2]).returncode == 0


@pytest.fixture
def no_chmod(monkeypatch: pytest.MonkeyPatch) -> None:
    """A file's mode as created: a chmod after the write would come after a readable window."""
    monkeypatch.setattr(os, "chmod", lambda *args, **kwargs: None)
    monkeypatch.setattr(Path, "chmod", lambda *args, **kwargs: None)
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_and_env_files_are_created_private(tmp_path, no_chmod, capsys):
    directory = tmp_path / "keys"
    directory.mkdir()
    (directory / keys.ENV_FILE_NAME).write_text("an older, readable file\n")  # replaced, not reused
    args = argparse.Namespace(
        directory=directory,
        force=False,
        host=keys.SIMULATOR_URL,
        ims_url=None,
        client_id="cid",
        client_secret="client-secret",
        org_id="org@AdobeOrg",
        technical_account_id="tech@techacct.adobe.com",
        auth="jwt",
        scopes=None,
    )
    assert keys.main(args) == 0
    assert mode(directory / keys.PRIVATE_KEY_NAME) == 0o600
    assert mode(directory / keys.ENV_FILE_NAME) == 0o600
    assert "client-secret" in (directory / keys.ENV_FILE_NAME).read_text()
    new_directory = tmp_path / "new" / "keys"
    keys.create_key_pair(new_directory)
    assert mode(new_directory) == 0o700


def test_the_token_cache_file_is_created_private(ims, tmp_path, no_chmod, monkeypatch):
    monkeypatch.delenv("TRIGGERS_TOKEN_CACHE", raising=False)
    ims.answer = {"access_token": "cached-token-abcdef", "expires_in": 3600}
    authenticator = ImsAuthenticator(oauth_credentials(ims.url), cache_dir=tmp_path / "cache")
    assert authenticator.cache_file is not None
    leftover = authenticator.cache_file.with_suffix(f".{os.getpid()}.tmp")  # from a crashed write
    leftover.parent.mkdir(mode=0o700)
    leftover.write_text("{}")
    authenticator.token()
    assert mode(authenticator.cache_file) == 0o600


@pytest.mark.parametrize(
    ("given_host", "stored"),
    [
        ("reader:s3cret@pipeline.example:8443", "pipeline.example:8443"),
        (
            "https://reader:s3cret@pipeline.example:8443/base?token=s3cret#s3cret",
            "https://pipeline.example:8443/base",
        ),
        ("pipeline.example?key=s3cret", "pipeline.example"),
        ("user:pa/ss?w#rd@pipeline.example", None),  # ambiguous: nothing rather than a piece of it
        ("user:p@ss@pipeline.example", "pipeline.example"),
        ("pipeline.example", "pipeline.example"),
    ],
)
def test_the_stored_host_has_no_credentials(given_host, stored):
    assert without_credentials(given_host) == stored


@given(
    user=st.text(max_size=10),
    password=st.text(min_size=1, max_size=20),
    host=st.from_regex(r"[a-z0-9.-]{1,20}(:[0-9]{1,5})?", fullmatch=True),
    scheme=st.sampled_from(["", "https://", "http://"]),
    query=st.text(max_size=20),
)
def test_no_password_or_query_survives(user, password, host, scheme, query):
    secret = f"\x00{password}"  # a marker that no host, scheme or path holds
    shown = without_credentials(f"{scheme}{user}:{secret}@{host}/p?{query}{secret}")
    assert shown is None or secret not in shown
    if "@" not in query + password and not set(user + password) & set("/?#"):
        assert shown == f"{scheme}{host}/p"
