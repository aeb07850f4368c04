"""One-click unsubscribe (RFC 8058) on SQLite and PostgreSQL: the handler, the standalone server
over real HTTP, the secret kept in the database, and hostile requests that never record."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from include.config import load_config
from include.database.schema import deliveries
from include.database.sql import bulk_write
from include.errors import ConfigError
from include.suppressions.endpoint import answer
from include.suppressions.server import make_server
from include.suppressions.unsubscribe import (
    SECRET_ENV,
    TOKEN_LIFETIME,
    make_token,
    record_unsubscribe,
    unsubscribe_secret,
)
from tests.conftest import ROOT, serving, upgrade_schema

ONE_CLICK = b"List-Unsubscribe=One-Click"
FORM = "application/x-www-form-urlencoded"


def add_delivery(
    engine: Engine, delivery_id: str = "d1", email: str = "Ann@Example.com", campaign: str = "cart"
) -> None:
    with engine.begin() as conn:
        bulk_write(
            conn,
            deliveries,
            [
                "delivery_id",
                "campaign_id",
                "recipient_id",
                "email",
                "event_id",
                "event_time",
                "decided_at",
                "status",
                "attempts",
            ],
            [(delivery_id, campaign, "r1", email, "e1", 1.0, 1.0, "sent", 1)],
        )


def suppressions(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(text("SELECT email, campaign_id, reason, source FROM suppressions"))
        ]


@pytest.fixture
def site(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Engine:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    upgrade_schema(engine, load_config().dimensions)
    add_delivery(engine)
    return engine


def token_for(
    engine: Engine, delivery_id: str = "d1", email: str = "ann@example.com", campaign: str = "cart", **kw: Any
) -> str:
    return make_token(unsubscribe_secret(engine), delivery_id, email, campaign, **kw)


def test_the_secret_is_generated_once_even_by_callers_at_once(
    site: Engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    found: list[bytes] = []
    threads = [threading.Thread(target=lambda: found.append(unsubscribe_secret(site))) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(found)) == 1 and len(found[0]) >= 32
    with site.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM triggers_secrets")).scalar_one() == 1
    if site.dialect.name == "sqlite":  # the file was made with the usual umask: readable by others
        assert "chmod 600 it, or set TRIGGERS_UNSUBSCRIBE_SECRET" in caplog.text
    assert found[0].decode() not in caplog.text
    monkeypatch.setenv(SECRET_ENV, "short")
    with pytest.raises(ConfigError, match=f"{SECRET_ENV} is shorter than 16"):
        unsubscribe_secret(site)
    monkeypatch.setenv(SECRET_ENV, "a-configured-secret-of-some-length")
    assert unsubscribe_secret(site) == b"a-configured-secret-of-some-length"


def test_get_shows_a_button_post_records_once(site: Engine) -> None:
    token = token_for(site)
    page = answer(site, "GET", token)
    assert page.status == 200 and 'name="List-Unsubscribe" value="One-Click"' in page.body
    assert "ann@example.com" not in page.body.lower()  # the page shows no address
    assert answer(site, "HEAD", token).status == 200
    assert suppressions(site) == []  # a scanner following the link changes nothing
    assert answer(site, "POST", token, b"", FORM).status == 400  # no one-click field
    assert suppressions(site) == []
    done = answer(site, "POST", token, ONE_CLICK, FORM)
    assert done.status == 200 and "Unsubscribed" in done.body
    again = answer(site, "POST", token, ONE_CLICK, FORM)  # a replay: the same answer, one row
    assert again.status == 200
    assert suppressions(site) == [("ann@example.com", "", "unsubscribed", "one-click d1")]
    assert answer(site, "PUT", token, ONE_CLICK, FORM).status == 405


def test_forged_altered_and_expired_tokens_record_nothing(site: Engine) -> None:
    add_delivery(site, "d2", "bob@example.com", "cart")
    good = token_for(site)
    ident, issued, signature = good.split(".")
    other_ident = token_for(site, "d2", "bob@example.com").split(".")[0]
    forged = [
        make_token(b"not-the-secret-at-all-0123456789", "d1", "ann@example.com", "cart"),
        f"{other_ident}.{issued}.{signature}",  # another delivery with this link's signature
        f"{ident}.{int(issued) + 1}.{signature}",  # a later issue time
        # a character inside the signature (the last one also holds padding bits a decoder ignores)
        f"{ident}.{issued}.{signature[:-5]}{'A' if signature[-5] != 'A' else 'B'}{signature[-4:]}",
        token_for(site, email="eve@example.com"),  # signed for another address
        token_for(site, issued=time.time() + 3600),  # from the future
    ]
    for token in forged:
        assert answer(site, "POST", token, ONE_CLICK, FORM).status == 400, token
        assert answer(site, "GET", token).status == 400
    without_body = answer(site, "POST", forged[0], b"", FORM)
    assert without_body.status == 400 and "One-Click" not in without_body.body  # no button for a bad link
    expired = token_for(site, issued=time.time() - TOKEN_LIFETIME - 60)
    assert answer(site, "POST", expired, ONE_CLICK, FORM).status == 410
    unknown = make_token(unsubscribe_secret(site), "purged", "ann@example.com", "cart")
    assert answer(site, "POST", unknown, ONE_CLICK, FORM).status == 410
    assert suppressions(site) == []


def test_a_secret_misconfigured_is_a_503_that_records_nothing(
    site: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = token_for(site)
    monkeypatch.setenv(SECRET_ENV, "short")
    result = answer(site, "POST", token, ONE_CLICK, FORM)
    assert result.status == 503 and "short" not in result.body
    assert suppressions(site) == []


def test_record_unsubscribe_says_what_it_did(site: Engine) -> None:
    with site.begin() as conn:
        first = record_unsubscribe(conn, "d1")
        second = record_unsubscribe(conn, "d1")
    assert (first.email, first.campaign_id, first.added, second.added) == (
        "ann@example.com",
        "cart",
        True,
        False,
    )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["GET", "POST", "HEAD", "PUT", "post", "DELETE"]),
    token=st.one_of(st.text(max_size=200), st.binary(max_size=200)),
    body=st.one_of(st.binary(max_size=300), st.just(ONE_CLICK)),
    content_type=st.one_of(
        st.none(), st.just(FORM), st.just("multipart/form-data; boundary=x"), st.text(max_size=40)
    ),
)
def test_any_request_gets_a_4xx_or_a_page_and_records_nothing(
    site: Engine, method: str, token: str | bytes, body: bytes, content_type: str | None
) -> None:
    result = answer(site, method, token, body, content_type)
    assert result.status in (400, 405, 410, 413)
    assert suppressions(site) == []


def http(url: str, data: bytes | None = None, content_type: str = FORM) -> tuple[int, str]:
    request = urllib.request.Request(url, data, {"Content-Type": content_type} if data is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.mark.parametrize(
    "template", ["http://127.0.0.1/u/{token}", "http://127.0.0.1/unsub?t={token}&c={campaign_id}"]
)
def test_the_standalone_server_answers_at_the_path_of_the_url(site: Engine, template: str) -> None:
    token = token_for(site)
    with serving(make_server(site, template, "127.0.0.1", 0)) as server:
        base = f"http://127.0.0.1:{server.server_port}"
        url = base + template.removeprefix("http://127.0.0.1").format(token=token, campaign_id="cart")
        status, page = http(url)
        assert status == 200 and '<form method="post">' in page and suppressions(site) == []
        assert http(url, ONE_CLICK)[0] == 200
        assert http(url, ONE_CLICK)[0] == 200  # replayed: idempotent
        assert http(url, b"")[0] == 400
        assert http(base + "/elsewhere")[0] == 404
        forged = url.replace(token, token_for(site, email="eve@example.com"))
        assert http(forged, ONE_CLICK)[0] == 400
        assert http(url, b"x" * 70_000)[0] == 413
    assert suppressions(site) == [("ann@example.com", "", "unsubscribed", "one-click d1")]
    with pytest.raises(ConfigError, match=r"\{token\}"):
        make_server(site, "http://127.0.0.1/u?d={delivery_id}", "127.0.0.1", 0)


def test_the_serve_command_answers_until_stopped(site: Engine, db_url: str) -> None:
    from include.sandbox.net import free_port

    port = free_port()
    template = "https://unsubscribe.shop.example/u/{token}"  # the public URL; served at its path
    env = {
        **os.environ,
        "TRIGGERS_DB_URL": db_url,
        "TRIGGERS_UNSUBSCRIBE_URL": template,
        "PYTHONPATH": str(ROOT),
    }
    env.pop(SECRET_ENV, None)
    command = [
        sys.executable,
        "-m",
        "include.cli",
        "unsubscribe",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    server = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert "unsubscribe endpoint on http://127.0.0.1:" in server.stdout.readline()
        link = f"http://127.0.0.1:{port}/u/{token_for(site)}"
        assert http(link)[0] == 200
        assert http(link, ONE_CLICK)[0] == 200
    finally:
        server.terminate()
        server.wait(timeout=10)
    log = server.stderr.read()
    assert "unsubscribe POST -> 200" in log
    assert token_for(site).split(".")[2] not in log  # the access log leaves the token out
    assert suppressions(site) == [("ann@example.com", "", "unsubscribed", "one-click d1")]
