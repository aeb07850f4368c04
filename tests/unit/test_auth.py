"""IMS authentication (SPEC section 1) through ImsAuthenticator's injection points: a fake IMS
session and a fake clock, no network and no sleeping."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from include.adobe.auth import JWT_LIFETIME, REFRESH_MARGIN, ImsAuthenticator, PipelineCredentials
from include.errors import AuthenticationError, CredentialsError

IMS = "https://ims.test"
SECRET = "client-secret-not-to-be-shown"
NOW = 1_800_000_000.0


def pem(key: rsa.RSAPrivateKey, form: serialization.PrivateFormat) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption())


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(autouse=True)
def no_token_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokens are kept in memory only, unless a test passes its own ``cache_dir``."""
    monkeypatch.setenv("TRIGGERS_TOKEN_CACHE", "off")


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeIms(requests.Session):
    """Answers each POST with the next of ``answers`` (the last one repeats) and keeps the forms."""

    def __init__(self, *answers: tuple[int, dict[str, Any]] | Exception) -> None:
        super().__init__()
        self.answers = list(answers)
        self.posts: list[tuple[str, dict[str, str]]] = []

    def post(self, url: str, data: dict[str, str] | None = None, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        self.posts.append((url, dict(data or {})))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        status, body = answer
        response = requests.Response()
        response.status_code, response.reason = (
            status,
            {200: "OK", 400: "Bad Request"}.get(status, "Unauthorized"),
        )
        response._content = json.dumps(body).encode()
        return response


def issued(token: str, expires_in: float) -> tuple[int, dict[str, Any]]:
    return 200, {"token_type": "bearer", "access_token": token, "expires_in": expires_in}


def credentials(key: rsa.RSAPrivateKey, auth: str = "jwt", **overrides: Any) -> PipelineCredentials:
    fields: dict[str, Any] = dict(
        pipeline_url="https://pipeline.test",
        ims_url=IMS,
        client_id="cid",
        client_secret=SECRET,
        org_id="12345@AdobeOrg",
        technical_account_id="abcd@techacct.adobe.com",
        auth=auth,
        private_key=pem(key, serialization.PrivateFormat.PKCS8) if auth == "jwt" else b"",
        scopes=("ent_analytics_bulk_ingest_sdk", "ent_campaign_sdk"),
    )
    fields.update(overrides)
    return PipelineCredentials(**fields)


def test_the_jwt_carries_the_claims_of_spec_1_1_signed_by_the_private_key(key):
    ims = FakeIms(issued("token-1", 86_400_000))
    assert ImsAuthenticator(credentials(key), session=ims, clock=FakeClock()).token() == "token-1"

    [(url, form)] = ims.posts
    assert url == f"{IMS}/ims/exchange/jwt"
    assert (form["client_id"], form["client_secret"]) == ("cid", SECRET)
    assert jwt.get_unverified_header(form["jwt_token"])["alg"] == "RS256"
    claims = jwt.decode(
        form["jwt_token"],
        key.public_key(),
        algorithms=["RS256"],
        audience=f"{IMS}/c/cid",
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims["iss"] == "12345@AdobeOrg" and claims["sub"] == "abcd@techacct.adobe.com"
    assert claims["iat"] == int(NOW) and claims["exp"] == int(NOW) + JWT_LIFETIME <= int(NOW) + 86_400
    assert (
        claims[f"{IMS}/s/ent_analytics_bulk_ingest_sdk"] is True
        and claims[f"{IMS}/s/ent_campaign_sdk"] is True
    )

    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(
            form["jwt_token"],
            other.public_key(),
            algorithms=["RS256"],
            audience=f"{IMS}/c/cid",
            options={"verify_exp": False, "verify_iat": False},
        )


def test_oauth_mode_asks_for_client_credentials_without_a_jwt(key):
    ims = FakeIms(issued("token-1", 3600))
    ImsAuthenticator(credentials(key, "oauth"), session=ims, clock=FakeClock()).token()
    assert ims.posts == [
        (
            f"{IMS}/ims/token/v3",
            {
                "grant_type": "client_credentials",
                "client_id": "cid",
                "client_secret": SECRET,
                "scope": "ent_analytics_bulk_ingest_sdk,ent_campaign_sdk",
            },
        )
    ]


@pytest.mark.parametrize(("auth", "expires_in"), [("jwt", 3_600_000), ("oauth", 3600)])
def test_expires_in_is_milliseconds_for_the_jwt_exchange_and_seconds_for_oauth(key, auth, expires_in):
    authenticator = ImsAuthenticator(
        credentials(key, auth), session=FakeIms(issued("t", expires_in)), clock=FakeClock()
    )
    info = authenticator.token_info()
    assert info == {
        "auth": auth,
        "client_id": "cid",
        "expires_at": NOW + 3600,
    }  # one hour either way, no token


@pytest.mark.parametrize(("lifetime", "margin"), [(3600, REFRESH_MARGIN), (600, 60)])
def test_the_token_is_reused_until_the_refresh_margin_before_it_expires(key, lifetime, margin):
    """The margin is REFRESH_MARGIN, or a tenth of a shorter lifetime."""
    clock = FakeClock()
    ims = FakeIms(issued("token-1", lifetime), issued("token-2", lifetime))
    authenticator = ImsAuthenticator(credentials(key, "oauth"), session=ims, clock=clock)
    assert authenticator.token() == "token-1"
    clock.now = NOW + lifetime - margin - 1
    assert authenticator.token() == "token-1" and len(ims.posts) == 1
    clock.now = NOW + lifetime - margin
    assert authenticator.token() == "token-2" and len(ims.posts) == 2
    assert authenticator.fetches == 2


def test_invalidate_forgets_the_token(key):
    ims = FakeIms(issued("token-1", 3600), issued("token-2", 3600))
    authenticator = ImsAuthenticator(credentials(key, "oauth"), session=ims, clock=FakeClock())
    authenticator.token()
    authenticator.invalidate()
    assert authenticator.token() == "token-2"


def test_the_file_cache_is_private_and_shared_only_by_the_same_credentials(key, tmp_path, monkeypatch):
    monkeypatch.delenv("TRIGGERS_TOKEN_CACHE")
    clock = FakeClock()
    first = ImsAuthenticator(
        credentials(key), session=FakeIms(issued("token-1", 3_600_000)), cache_dir=tmp_path, clock=clock
    )
    assert first.token() == "token-1"
    [cache_file] = tmp_path.iterdir()
    assert stat.S_IMODE(cache_file.stat().st_mode) == 0o600 and SECRET not in cache_file.read_text()

    clock.now += 60  # another task, a minute later: no request to IMS
    refused = FakeIms((401, {"error": "invalid_client"}))
    assert (
        ImsAuthenticator(credentials(key), session=refused, cache_dir=tmp_path, clock=clock).token()
        == "token-1"
    )
    assert refused.posts == []

    changed = FakeIms(issued("token-other", 3_600_000))
    other = ImsAuthenticator(
        credentials(key, client_secret="rotated-secret"), session=changed, cache_dir=tmp_path, clock=clock
    )
    assert other.token() == "token-other" and len(list(tmp_path.iterdir())) == 2

    first.invalidate()
    assert not cache_file.exists()


@pytest.mark.parametrize(
    ("status", "error", "hint"),
    [
        (400, "invalid_signature", "private key"),
        (401, "invalid_client", "client secret"),
        (400, "expired_token", "clock"),
        (400, "invalid_scope", "extra.scopes"),
    ],
)
def test_an_ims_refusal_names_the_error_and_the_fix_without_a_secret(key, caplog, status, error, hint):
    caplog.set_level(logging.DEBUG)
    ims = FakeIms((status, {"error": error, "error_description": "refused by the test"}))
    with pytest.raises(AuthenticationError) as raised:
        ImsAuthenticator(credentials(key), session=ims, clock=FakeClock()).token()
    message = str(raised.value)
    assert f"({status} {error}: refused by the test)" in message and hint in message
    private_key_line = pem(key, serialization.PrivateFormat.PKCS8).decode().splitlines()[1]
    for secret in (SECRET, private_key_line, ims.posts[0][1]["jwt_token"]):
        assert secret not in message and secret not in caplog.text


def test_an_answer_without_a_token_or_no_answer_is_an_authentication_error(key):
    with pytest.raises(AuthenticationError, match="no error code"):
        ImsAuthenticator(
            credentials(key), session=FakeIms((200, {"token_type": "bearer"})), clock=FakeClock()
        ).token()
    unreachable = FakeIms(requests.ConnectionError("refused"))
    with pytest.raises(
        AuthenticationError, match=f"cannot reach IMS at {IMS}/ims/exchange/jwt: ConnectionError"
    ):
        ImsAuthenticator(credentials(key), session=unreachable, clock=FakeClock()).token()


class Connection:
    def __init__(self, extra: dict[str, Any], host: str = "pipeline.test") -> None:
        self.conn_id, self.host, self.login, self.password = "adobe_pipeline", host, "cid", SECRET
        self.extra_dejson = {"org_id": "o@AdobeOrg", "technical_account_id": "t@techacct.adobe.com", **extra}


@pytest.mark.parametrize(
    "form", [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL]
)
def test_a_connection_with_a_pkcs8_or_pkcs1_key_file(key, tmp_path: Path, form):
    path = tmp_path / "private.pem"
    path.write_bytes(pem(key, form))
    loaded = PipelineCredentials.from_connection(
        Connection({"private_key_path": str(path), "scopes": "a, b"})
    )
    assert (
        loaded.pipeline_url == "https://pipeline.test" and loaded.ims_url == "https://ims-na1.adobelogin.com"
    )
    assert loaded.private_key == pem(key, form) and loaded.scopes == ("a", "b") and loaded.auth == "jwt"
    assert SECRET not in repr(loaded) and "PRIVATE KEY" not in repr(loaded)


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({}, "needs extra.private_key_path"),
        ({"private_key": "not a key"}, "not an unencrypted PEM"),
        ({"private_key_path": "/nonexistent/key.pem"}, "cannot read extra.private_key_path"),
        ({"auth": "basic"}, "use 'jwt' or 'oauth'"),
    ],
)
def test_an_incomplete_connection_says_what_to_set(extra, problem):
    with pytest.raises(CredentialsError, match=problem):
        PipelineCredentials.from_connection(Connection(extra))


def test_oauth_needs_no_key_and_no_technical_account():
    connection = Connection({"auth": "oauth", "technical_account_id": None})
    assert PipelineCredentials.from_connection(connection).private_key == b""
