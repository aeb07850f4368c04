"""Rendering (SPEC section 6): MIME structure, headers, autoescaping, locales, header injection."""

from __future__ import annotations

from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from include.config import DEFAULT_TEMPLATES_DIR
from include.delivery.render import (
    Renderer,
    event_context,
    message_id_for,
    normalize_email,
    unsubscribe_url_for,
)
from include.errors import InvalidEmailError, TemplateRenderError

CAMPAIGN = SimpleNamespace(
    id="cart_abandonment", template="cart_abandonment", sender="Shop <shop@example.com>"
)
EVENT = event_context(
    "3e8a2ba7", 1767225912.0, {" products": ["SKU-1042", "<script>alert(1)</script>"], "eVar01": ["SHOP-1"]}
)
EXPECTED_HEADERS = {
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "x-campaign-id",
    "mime-version",
    "content-type",
}


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer(DEFAULT_TEMPLATES_DIR)


def recipient(**columns: object) -> dict[str, object]:
    base = {
        "recipient_id": "r1",
        "email": "camille@example.org",
        "first_name": "Camille",
        "last_name": "Martin",
        "locale": None,
        "shopper_id": "SHOP-1",
        "mc_id": None,
        "opted_out": False,
    }
    return {**base, **columns}


def parse(data: bytes) -> EmailMessage:
    message = message_from_bytes(data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def test_message_is_multipart_alternative_with_the_required_headers(renderer: Renderer) -> None:
    url = unsubscribe_url_for("d-1", CAMPAIGN.id, token="t.1")
    rendered = renderer.render_bytes(CAMPAIGN, recipient(), EVENT, "d-1", url)
    message = parse(rendered.data)
    assert message.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain", "text/html"]
    assert {k.lower() for k in message.keys()} == EXPECTED_HEADERS
    assert message["Message-ID"] == "<d-1@example.com>" == rendered.message_id
    assert message["List-Unsubscribe"] == "<https://example.com/unsubscribe/t.1>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message["X-Campaign-Id"] == "cart_abandonment"
    assert message["To"].addresses[0].addr_spec == "camille@example.org"
    assert message["Subject"] == "Camille, your cart is waiting (2 items)"
    assert (rendered.envelope_from, rendered.envelope_to) == ("shop@example.com", "camille@example.org")
    assert not message.defects and all(not part.defects for part in message.walk())
    assert b"\r\n" in rendered.data and b"\n" not in rendered.data.replace(b"\r\n", b"")
    text = message.get_body(("plain",)).get_content()
    assert "SKU-1042" in text and url in text
    # render() gives the same message as an EmailMessage
    assert renderer.render(CAMPAIGN, recipient(), EVENT, "d-1", url)["Message-ID"] == "<d-1@example.com>"


def test_html_part_is_autoescaped_and_text_part_is_not(renderer: Renderer) -> None:
    message = parse(
        renderer.render_bytes(
            CAMPAIGN, recipient(first_name="<b>Bob</b>"), EVENT, "d-2", "https://x.example/u"
        ).data
    )
    html = message.get_body(("html",)).get_content()
    text = message.get_body(("plain",)).get_content()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>" not in html
    assert "&lt;b&gt;Bob&lt;/b&gt;" in html
    assert "<script>alert(1)</script>" in text  # plain text is not HTML: no entities there
    assert message["Subject"].startswith("<b>Bob</b>,")  # a subject is text too


def test_locale_picks_the_localised_set_and_falls_back(renderer: Renderer) -> None:
    def subject(locale: object) -> str:
        return parse(
            renderer.render_bytes(CAMPAIGN, recipient(locale=locale), EVENT, "d", "https://x.example/u").data
        )["Subject"]

    assert subject("fr_FR") == "Camille, votre panier vous attend (2 articles)"
    assert subject("fr-fr") == subject("fr_FR")
    assert subject("en_US") == subject(None) == "Camille, your cart is waiting (2 items)"
    assert subject("../../etc/passwd") == subject(None)  # never a path
    french = parse(
        renderer.render_bytes(CAMPAIGN, recipient(locale="fr_FR"), EVENT, "d", "https://x.example/u").data
    )
    assert "Vous avez laissé ces articles" in french.get_body(("plain",)).get_content()
    assert 'lang="fr"' in french.get_body(("html",)).get_content()


@pytest.mark.parametrize(
    "email",
    [
        "camille@example.org\r\nBcc: spy@evil.example",
        "camille@example.org\nRCPT TO:<spy@evil.example>",
        "camille@example.org, spy@evil.example",
        "Camille <camille@example.org>",
        "camille@example.org>\r\n",
        '"spy@evil.example"@example.org',
        "camille@@example.org",
        "camille example@example.org",
        "camille@example",
        "",
        None,
    ],
)
def test_an_email_that_is_not_one_plain_address_is_refused(renderer: Renderer, email: object) -> None:
    with pytest.raises(InvalidEmailError):
        renderer.render_bytes(CAMPAIGN, recipient(email=email), EVENT, "d", "https://x.example/u")


def test_addresses_are_normalised() -> None:
    assert normalize_email("  Camille.Martin+shop@Example.ORG ") == "Camille.Martin+shop@example.org"
    assert normalize_email("jose@bücher.example") == "jose@xn--bcher-kva.example"


@settings(max_examples=200, deadline=None)
@given(first=st.text(max_size=60), last=st.text(max_size=60))
def test_names_can_never_add_a_header_or_a_recipient(first: str, last: str) -> None:
    renderer = _shared_renderer()
    rendered = renderer.render_bytes(
        CAMPAIGN, recipient(first_name=first, last_name=last), EVENT, "d-9", "https://x.example/u"
    )
    message = parse(rendered.data)
    assert {k.lower() for k in message.keys()} == EXPECTED_HEADERS
    addresses = message["To"].addresses
    assert len(addresses) == 1 and addresses[0].addr_spec == "camille@example.org"
    assert message["Message-ID"] == "<d-9@example.com>"
    assert rendered.envelope_to == "camille@example.org"
    assert not message.defects
    # what the person sees is their name, minus control characters
    expected = " ".join(f"{first} {last}".translate({c: " " for c in range(32)}).split())
    if expected and all(ord(c) >= 0xA0 or 0x20 <= ord(c) < 0x7F for c in expected):
        # (the standard parser keeps the space between two encoded words; mail clients drop it)
        assert "".join(addresses[0].display_name.split()) == "".join(expected.split())


_RENDERER: list[Renderer] = []


def _shared_renderer() -> Renderer:
    if not _RENDERER:
        _RENDERER.append(Renderer(DEFAULT_TEMPLATES_DIR))
    return _RENDERER[0]


def test_non_ascii_subject_and_name_are_encoded_words(renderer: Renderer) -> None:
    rendered = renderer.render_bytes(
        CAMPAIGN,
        recipient(first_name="Zoë", last_name="Ångström", locale="fr_FR"),
        EVENT,
        "d",
        "https://x.example/u",
    )
    assert rendered.data.split(b"\r\n\r\n", 1)[0].isascii()
    message = parse(rendered.data)
    assert message["To"].addresses[0].display_name == "Zoë Ångström"
    assert message["Subject"] == "Zoë, votre panier vous attend (2 articles)"


def test_a_failing_template_raises_a_render_error_naming_it(tmp_path: Path) -> None:
    for part, body in (("subject", "Hi {{ recipient.nickname }}"), ("txt", "t"), ("html", "<p>h</p>")):
        (tmp_path / f"broken.{part}.j2").write_text(body)
    broken = SimpleNamespace(id="c", template="broken", sender="Shop <shop@example.com>")
    with pytest.raises(TemplateRenderError, match="broken.*nickname"):
        Renderer(tmp_path).render_bytes(broken, recipient(), EVENT, "d", "https://x.example/u")
    missing = SimpleNamespace(id="c", template="nowhere", sender="Shop <shop@example.com>")
    with pytest.raises(TemplateRenderError, match="'nowhere' not found"):
        Renderer(tmp_path).render_bytes(missing, recipient(), EVENT, "d", "https://x.example/u")


def test_message_id_and_unsubscribe_url_are_stable_and_safe() -> None:
    assert message_id_for("abc.123", "example.com") == "<abc.123@example.com>"
    odd = message_id_for("a b<c>", "example.com")
    assert odd == message_id_for("a b<c>", "example.com") and " " not in odd and odd.count("<") == 1
    assert unsubscribe_url_for(
        "a b&c", "camp", template="https://u.example/{campaign_id}?d={delivery_id}"
    ) == ("https://u.example/camp?d=a%20b%26c")


def test_event_context_gives_an_aware_utc_time_and_trimmed_dimension_names() -> None:
    assert EVENT["time"].isoformat() == "2026-01-01T00:05:12+00:00"
    assert set(EVENT["dimensions"]) == {"products", "eVar01"}


def test_the_mailto_unsubscribe_carries_the_signed_token_not_the_delivery_id() -> None:
    """The delivery id is in the Message-ID of every reply and forward: the mailto must not be
    enough with it alone. Without a token (no signing key) the mailto is left out."""
    mailing = Renderer(DEFAULT_TEMPLATES_DIR, unsubscribe_mailto="unsubscribe@shop.example")
    url = unsubscribe_url_for("d-1", CAMPAIGN.id, token="ZC0x.1767225912.c2ln")
    signed = parse(
        mailing.render_bytes(CAMPAIGN, recipient(), EVENT, "d-1", url, "ZC0x.1767225912.c2ln").data
    )
    assert signed["List-Unsubscribe"] == (
        "<https://example.com/unsubscribe/ZC0x.1767225912.c2ln>, "
        "<mailto:unsubscribe@shop.example?subject=unsubscribe-ZC0x.1767225912.c2ln>"
    )
    unsigned = parse(mailing.render_bytes(CAMPAIGN, recipient(), EVENT, "d-1", url).data)
    assert "mailto:" not in unsigned["List-Unsubscribe"] and "d-1" not in unsigned["List-Unsubscribe"]
