"""Unsubscribe tokens and request parsing without a database: signing, tampering, the one-click
body (RFC 8058), where a token sits in a URL, and the placeholder URL refused for a real relay."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from include.delivery.render import (
    DEFAULT_UNSUBSCRIBE_URL,
    check_delivery_settings,
    check_unsubscribe_url_is_set,
    unsubscribe_url_for,
)
from include.errors import ConfigError, UnsubscribeTokenError
from include.suppressions.addresses import normalize_email
from include.suppressions.endpoint import is_one_click, token_from_request
from include.suppressions.unsubscribe import _signature, make_token, read_token

SECRET = b"k" * 32


def test_a_token_carries_its_delivery_and_time_and_is_url_safe() -> None:
    token = make_token(SECRET, "d-1", "Ann@Example.com", "cart", issued=1_767_225_600)
    parts = read_token(token)
    assert (parts.delivery_id, parts.issued) == ("d-1", 1_767_225_600)
    # the signature covers the address (any case) and the campaign: another address or campaign fails
    assert parts.signature == _signature(SECRET, "d-1", "ann@example.com", "cart", 1_767_225_600)
    assert parts.signature != _signature(SECRET, "d-1", "bob@example.com", "cart", 1_767_225_600)
    assert parts.signature != _signature(SECRET, "d-1", "ann@example.com", "browse", 1_767_225_600)
    assert parts.signature != _signature(b"x" * 32, "d-1", "ann@example.com", "cart", 1_767_225_600)
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
    url = unsubscribe_url_for("d-1", "cart", template="https://u.example/u/{token}", token=token)
    assert url == f"https://u.example/u/{token}"  # nothing to quote


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b.c", "ZC0x.12x.AAAA", "ZC0x..AAAA", "ZC0x.1.AAAA", "....", "ZC0x.1." + "A" * 43 + "=="],
)
def test_malformed_tokens_are_a_named_error(token: str) -> None:
    with pytest.raises(UnsubscribeTokenError, match="link"):
        read_token(token)


@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_any_string_or_bytes_as_a_token_is_read_or_refused_by_name(token: str | bytes) -> None:
    try:
        parts = read_token(token)
    except UnsubscribeTokenError:
        return
    assert parts.delivery_id and len(parts.signature) == 32


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        (b"List-Unsubscribe=One-Click", "application/x-www-form-urlencoded", True),
        (b"List-Unsubscribe=One-Click", None, True),
        (b"a=1&List-Unsubscribe=One-Click", "application/x-www-form-urlencoded; charset=utf-8", True),
        (b"List-Unsubscribe=One-Clack", "application/x-www-form-urlencoded", False),
        (b"", "application/x-www-form-urlencoded", False),
        (b"\xff\xfe", None, False),
        (
            b'--XX\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n\r\nOne-Click\r\n--XX--\r\n',
            "multipart/form-data; boundary=XX",
            True,
        ),
        (
            b'--XX\r\nContent-Disposition: form-data; name="other"\r\n\r\nOne-Click\r\n--XX--\r\n',
            "multipart/form-data; boundary=XX",
            False,
        ),
    ],
)
def test_the_one_click_body(body: bytes, content_type: str | None, expected: bool) -> None:
    assert is_one_click(body, content_type) is expected


@given(st.binary(max_size=2000), st.sampled_from([None, "multipart/form-data; boundary=XX", "text/plain"]))
def test_any_body_is_read_without_raising(body: bytes, content_type: str | None) -> None:
    assert is_one_click(body, content_type) in (True, False)


def test_the_token_is_found_where_the_url_template_puts_it() -> None:
    assert token_from_request("https://s.example/u/{token}", "/u/abc.1.x", "") == "abc.1.x"
    assert token_from_request("https://s.example/u/{token}", "/other/abc", "") is None
    assert token_from_request("https://s.example/u/{token}", "/u/a/b", "") is None
    assert token_from_request("https://s.example/unsub?t={token}", "/unsub", "t=abc.1.x&z=2") == "abc.1.x"
    assert token_from_request("https://s.example/unsub?t={token}", "/unsub", "") == ""
    assert token_from_request("https://s.example/c/{campaign_id}/{token}", "/c/cart/tok", "") == "tok"


def test_the_url_must_hold_the_token_and_the_placeholder_only_reaches_loopback() -> None:
    with pytest.raises(ConfigError, match=r"TRIGGERS_UNSUBSCRIBE_URL .*\{token\}"):
        check_delivery_settings("https://s.example/u?d={delivery_id}", None, {}, None)
    check_delivery_settings("https://s.example/u/{token}?d={delivery_id}", None, {}, None)
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        check_unsubscribe_url_is_set(DEFAULT_UNSUBSCRIBE_URL, host)
    for host in ("smtp.example.com", "10.0.0.5", ""):
        with pytest.raises(ConfigError, match="TRIGGERS_UNSUBSCRIBE_URL is not set"):
            check_unsubscribe_url_is_set(DEFAULT_UNSUBSCRIBE_URL, host)
    check_unsubscribe_url_is_set("https://shop.example/u/{token}", "smtp.example.com")


def test_normalize_email_is_shared_by_the_layers() -> None:
    from include.delivery import render

    assert render.normalize_email is normalize_email
    assert normalize_email("  Ann@Bücher.Example ") == "Ann@xn--bcher-kva.example"
