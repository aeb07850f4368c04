"""Delivery rules that need no server: the smtp_default conventions, rate limits, orphaned claims."""

from __future__ import annotations

import os
import smtplib
import socket
from types import SimpleNamespace

import pytest
from airflow.providers.smtp.hooks.smtp import SmtpHook
from hypothesis import given
from hypothesis import strategies as st

from include.delivery.hook import PipeliningSmtpHook
from include.delivery.recovery import _claim_is_orphaned
from include.delivery.smtp import SmtpSettings, _dot_stuffed
from include.errors import SmtpUnavailableError


def connection(**fields: object) -> SimpleNamespace:
    base = {"host": "smtp.example.com", "port": None, "login": None, "password": None, "extra_dejson": {}}
    return SimpleNamespace(**{**base, **fields})


def settings_of(connection: SimpleNamespace) -> SmtpSettings:
    return PipeliningSmtpHook.for_connection(connection).session_settings()


def test_smtp_settings_follow_the_provider_defaults_and_extras() -> None:
    default = settings_of(connection())
    assert (default.use_ssl, default.starttls, default.timeout, default.retry_limit) == (True, True, 30.0, 5)
    assert default.address == "smtp.example.com:465"
    relay = settings_of(
        connection(
            port=587,
            login="apikey",
            password="secret",
            extra_dejson={
                "disable_ssl": "true",
                "disable_tls": False,
                "timeout": 10,
                "retry_limit": 2,
                "from_email": "bounces@shop.example",
            },
        )
    )
    assert (relay.use_ssl, relay.starttls, relay.address, relay.from_email) == (
        False,
        True,
        "smtp.example.com:587",
        "bounces@shop.example",
    )
    assert "secret" not in repr(relay)
    with pytest.raises(SmtpUnavailableError, match="ssl_context"):
        settings_of(connection(extra_dejson={"ssl_context": "insecure"}))


def test_the_hook_is_the_providers_and_refuses_a_flag_it_would_misread() -> None:
    assert issubclass(PipeliningSmtpHook, SmtpHook) and PipeliningSmtpHook.default_conn_name == "smtp_default"
    with pytest.raises(
        SmtpUnavailableError, match="disable_tls"
    ):  # the provider reads any non-empty string as true
        settings_of(connection(extra_dejson={"disable_ssl": True, "disable_tls": "false"}))
    assert settings_of(connection(extra_dejson={"disable_ssl": "true", "disable_tls": ""})).starttls


def test_a_claim_is_orphaned_only_when_its_worker_is_surely_gone() -> None:
    host = socket.gethostname()
    now = 10_000.0
    live = f"run|{host}|1|abc"  # pid 1 always runs
    assert not _claim_is_orphaned(live, now - 5, lease=600, now=now)
    assert _claim_is_orphaned(live, now - 601, lease=600, now=now)  # lease expired
    assert _claim_is_orphaned(
        f"run|{host}|{os.getpid()}|not-running", now - 5, lease=600, now=now
    )  # this process, not a running call
    assert not _claim_is_orphaned(
        "run|other-host|12345|abc", now - 5, lease=600, now=now
    )  # cannot tell: wait for the lease


@given(st.lists(st.sampled_from([b".", b"..", b"\r\n", b"\n", b"a", b" "]), max_size=30).map(b"".join))
def test_the_data_on_the_wire_is_what_smtplib_would_send(data: bytes) -> None:
    wire = smtplib._quote_periods(data)  # smtplib.SMTP.data, for bytes
    wire += (b"" if wire.endswith(b"\r\n") else b"\r\n") + b".\r\n"
    assert _dot_stuffed(data) == wire
