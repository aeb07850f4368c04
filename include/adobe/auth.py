"""Adobe IMS authentication (SPEC section 1): service-account JWT and OAuth Server-to-Server.

The access token is cached in memory and in a private file (created mode 0600) so that the
tasks of a run, and the runs that follow, reuse it until shortly before it expires. The cache
file's name is a digest of every credential, so changed credentials never reuse an old token.
In an Airflow process the token is registered with Airflow's secrets masker, so a log line that
carries it shows ``***``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jwt
import requests
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from include.errors import AuthenticationError, CredentialsError

log = logging.getLogger(__name__)

JWT_LIFETIME = 600  # seconds; the assertion is exchanged at once, IMS allows up to 24 h
REFRESH_MARGIN = 300  # renew this long before expiry (or 10% of a shorter lifetime)
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "airflow-adobe-triggers"
# an IMS answer without a usable expires_in: the token is reused this long, not fetched per request
MIN_TOKEN_LIFETIME = 60.0
MAX_TOKEN_LIFETIME = 86_400.0  # IMS tokens live 24 h at most; a larger answer is a mistake
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_URL_PARTS = re.compile(r"([^/?#]*)([^?#]*)(.*)", re.DOTALL)  # authority, path, query and fragment


@dataclass(frozen=True)
class PipelineCredentials:
    """The `adobe_pipeline` connection, validated. Secrets are kept out of ``repr``."""

    pipeline_url: str
    ims_url: str
    client_id: str
    org_id: str
    client_secret: str = field(repr=False)
    auth: Literal["jwt", "oauth"] = "jwt"
    technical_account_id: str = ""
    private_key: bytes = field(default=b"", repr=False)
    scopes: tuple[str, ...] = ("ent_analytics_bulk_ingest_sdk",)

    @classmethod
    def from_connection(cls, conn: Any) -> PipelineCredentials:
        """Build from an Airflow connection (anything with host/login/password/extra_dejson)."""
        extra = dict(getattr(conn, "extra_dejson", None) or {})
        conn_id = getattr(conn, "conn_id", None) or "adobe_pipeline"

        def required(value: Any, name: str) -> str:
            if not value:
                raise CredentialsError(f"connection {conn_id!r} has no {name}; set it (SPEC section 1)")
            return str(value)

        auth = extra.get("auth", "jwt")
        if auth not in ("jwt", "oauth"):
            raise CredentialsError(f"connection {conn_id!r}: extra.auth is {auth!r}; use 'jwt' or 'oauth'")
        scopes = extra.get("scopes") or ["ent_analytics_bulk_ingest_sdk"]
        if isinstance(scopes, str):
            scopes = [s.strip() for s in scopes.split(",") if s.strip()]
        private_key = b""
        if auth == "jwt":
            private_key = _read_private_key(extra, conn_id)
        host = required(getattr(conn, "host", None), "host (the pipeline URL)")
        if "://" not in host:
            host = f"https://{host}"
        return cls(
            pipeline_url=host.rstrip("/"),
            ims_url=str(extra.get("ims_url") or "https://ims-na1.adobelogin.com").rstrip("/"),
            client_id=required(getattr(conn, "login", None), "login (the client id)"),
            client_secret=required(getattr(conn, "password", None), "password (the client secret)"),
            org_id=required(extra.get("org_id"), "extra.org_id"),
            technical_account_id=required(extra.get("technical_account_id"), "extra.technical_account_id")
            if auth == "jwt"
            else str(extra.get("technical_account_id") or ""),
            auth=auth,
            private_key=private_key,
            scopes=tuple(scopes),
        )

    def fingerprint(self) -> str:
        """A digest of every credential: the token cache key."""
        digest = hashlib.sha256()
        for part in (
            self.ims_url,
            self.client_id,
            self.client_secret,
            self.org_id,
            self.auth,
            self.technical_account_id,
            ",".join(self.scopes),
        ):
            digest.update(part.encode() + b"\0")
        digest.update(self.private_key)
        return digest.hexdigest()[:32]


def _read_private_key(extra: dict[str, Any], conn_id: str) -> bytes:
    if extra.get("private_key"):
        pem, origin = str(extra["private_key"]).encode(), "extra.private_key"
    elif extra.get("private_key_path"):
        path = Path(str(extra["private_key_path"])).expanduser()
        try:
            pem = path.read_bytes()
        except OSError as error:
            raise CredentialsError(
                f"connection {conn_id!r}: cannot read extra.private_key_path {path}: {error.strerror}"
            ) from None
        origin = f"extra.private_key_path {path}"
    else:
        raise CredentialsError(
            f"connection {conn_id!r}: auth 'jwt' needs extra.private_key_path (or extra.private_key)"
        )
    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise CredentialsError(
            f"connection {conn_id!r}: {origin} is not an unencrypted PEM private key "
            "(PKCS#1 'BEGIN RSA PRIVATE KEY' or PKCS#8 'BEGIN PRIVATE KEY')"
        ) from None
    if not isinstance(key, RSAPrivateKey):
        raise CredentialsError(f"connection {conn_id!r}: {origin} is not an RSA key; IMS signs with RS256")
    return pem


@dataclass(frozen=True)
class AccessToken:
    value: str = field(repr=False)
    expires_at: float
    refresh_at: float

    def fresh(self, now: float) -> bool:
        return now < self.refresh_at


def build_jwt(credentials: PipelineCredentials, now: float) -> str:
    """The signed service-account assertion of SPEC 1.1."""
    claims: dict[str, Any] = {
        "iss": credentials.org_id,
        "sub": credentials.technical_account_id,
        "aud": f"{credentials.ims_url}/c/{credentials.client_id}",
        "iat": int(now),
        "exp": int(now) + JWT_LIFETIME,
    }
    for scope in credentials.scopes:
        claims[f"{credentials.ims_url}/s/{scope}"] = True
    return jwt.encode(claims, credentials.private_key, algorithm="RS256")


class ImsAuthenticator:
    """Hands out a valid bearer token, fetching a new one only when the cached one is stale."""

    def __init__(
        self,
        credentials: PipelineCredentials,
        *,
        session: requests.Session | None = None,
        cache_dir: Path | None = None,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.credentials = credentials
        self.session = session or requests.Session()
        self.timeout = timeout
        self.clock = clock  # unix seconds: token expiry and the JWT's iat/exp
        cache_setting = os.environ.get("TRIGGERS_TOKEN_CACHE", "")
        if cache_setting == "off":
            self.cache_file: Path | None = None
        else:
            folder = cache_dir or Path(cache_setting or DEFAULT_CACHE_DIR)
            self.cache_file = folder / f"ims-{credentials.fingerprint()}.json"
        self._token: AccessToken | None = None
        self.fetches = 0  # tokens obtained from IMS by this instance

    def token(self) -> str:
        now = self.clock()
        if self._token is None or not self._token.fresh(now):
            self._token = self._read_cache(now) or self._fetch(now)
            _mask_in_airflow(self._token.value)
        return self._token.value

    def token_info(self) -> dict[str, Any]:
        """What may be shown (XCom, logs): never the token itself."""
        self.token()
        assert self._token is not None
        return {
            "auth": self.credentials.auth,
            "client_id": self.credentials.client_id,
            "expires_at": self._token.expires_at,
        }

    def invalidate(self) -> None:
        """Forget the token (the pipeline answered 401)."""
        self._token = None
        if self.cache_file is not None:
            self.cache_file.unlink(missing_ok=True)

    def _fetch(self, now: float) -> AccessToken:
        c = self.credentials
        if c.auth == "jwt":
            url = f"{c.ims_url}/ims/exchange/jwt"
            form = {
                "client_id": c.client_id,
                "client_secret": c.client_secret,
                "jwt_token": build_jwt(c, now),
            }
        else:
            url = f"{c.ims_url}/ims/token/v3"
            form = {
                "grant_type": "client_credentials",
                "client_id": c.client_id,
                "client_secret": c.client_secret,
                "scope": ",".join(c.scopes),
            }
        try:
            response = self.session.post(url, data=form, timeout=self.timeout)
        except requests.RequestException as error:
            raise AuthenticationError(f"cannot reach IMS at {url}: {type(error).__name__}") from None
        body = _json_or_empty(response)
        if response.status_code != 200 or "access_token" not in body:
            raise AuthenticationError(
                f"IMS refused the {c.auth} credentials of client {c.client_id} ({response.status_code} "
                f"{body.get('error', 'no error code')}: {body.get('error_description', response.reason)}). "
                + _AUTH_HINTS.get(str(body.get("error")), "Check the adobe_pipeline connection.")
            )
        lifetime = token_lifetime(body.get("expires_in"), c.auth)
        margin = min(REFRESH_MARGIN, lifetime * 0.1)
        token = AccessToken(str(body["access_token"]), now + lifetime, now + lifetime - margin)
        self.fetches += 1
        log.info("IMS issued a %s token for client %s, valid %.0f s", c.auth, c.client_id, lifetime)
        self._write_cache(token)
        return token

    def _read_cache(self, now: float) -> AccessToken | None:
        if self.cache_file is None:
            return None
        try:
            data = json.loads(self.cache_file.read_text())
            token = AccessToken(data["access_token"], float(data["expires_at"]), float(data["refresh_at"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return token if token.fresh(now) else None

    def _write_cache(self, token: AccessToken) -> None:
        if self.cache_file is None:
            return
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            temporary = self.cache_file.with_suffix(f".{os.getpid()}.tmp")
            temporary.unlink(missing_ok=True)  # O_CREAT keeps an existing file's mode: always a new one
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                json.dump(
                    {
                        "access_token": token.value,
                        "expires_at": token.expires_at,
                        "refresh_at": token.refresh_at,
                    },
                    handle,
                )
            os.replace(temporary, self.cache_file)
        except OSError as error:  # a cache is an optimisation; tokens still work without it
            log.warning("cannot write the token cache %s: %s", self.cache_file.parent, error.strerror)


def token_lifetime(expires_in: Any, auth: str) -> float:
    """Seconds a token lives from IMS's ``expires_in`` (milliseconds for the JWT exchange, seconds
    for OAuth), within [MIN_TOKEN_LIFETIME, MAX_TOKEN_LIFETIME]. A missing, non-numeric,
    non-finite or non-positive value gets the floor, with a warning: the token works, and
    fetching one per request would flood IMS."""
    usable = isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool)
    seconds = float(expires_in) / (1000.0 if auth == "jwt" else 1.0) if usable else math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        log.warning(
            "IMS answered without a usable expires_in (%.40r); the token is reused for %.0f s",
            expires_in,
            MIN_TOKEN_LIFETIME,
        )
        return MIN_TOKEN_LIFETIME
    return min(max(seconds, MIN_TOKEN_LIFETIME), MAX_TOKEN_LIFETIME)


def _mask_in_airflow(secret: str) -> None:
    """Register ``secret`` with Airflow's secrets masker in an Airflow process (one that has
    loaded airflow.sdk); elsewhere (the CLI) Airflow is not imported for it."""
    if "airflow.sdk" not in sys.modules:
        return
    try:
        from airflow.sdk.log import mask_secret
    except ImportError:  # an Airflow without the Task SDK's masker: nothing to register with
        return
    mask_secret(secret)


def without_credentials(url: str | None) -> str | None:
    """``url`` (or a bare ``host[:port]``) without a user, password, query or fragment: what may
    be stored and shown of where the pipeline is. None when an ``@`` follows the host (a password
    holding an unescaped ``/``, ``?`` or ``#``, or an ``@`` in the path or query): any cut could
    show part of a secret."""
    if not url:
        return url
    scheme = _SCHEME.match(url)
    rest = url[scheme.end() :] if scheme else url
    authority, path, after = _URL_PARTS.match(rest).groups()
    if "@" in path + after:
        return None
    return (scheme.group() if scheme else "") + authority.rpartition("@")[2] + path


_AUTH_HINTS = {
    "invalid_signature": "The private key does not match the public key registered for this client: "
    "check extra.private_key_path.",
    "invalid_client": "The client id or client secret is wrong: check login and password.",
    "expired_token": "The JWT was rejected as expired: check this machine's clock.",
    "invalid_scope": "A metascope in extra.scopes is not granted to this integration.",
}


def _json_or_empty(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
