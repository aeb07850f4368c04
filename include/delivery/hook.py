"""Airflow hook for the ``smtp_default`` connection: the SMTP provider's hook, our sessions."""

from __future__ import annotations

import smtplib
from typing import Any

from airflow.providers.smtp.hooks.smtp import SmtpHook

from include.delivery.smtp import SmtpSettings, open_client
from include.errors import SmtpUnavailableError

_FALSE_WORDS = {"0", "false", "no", "off"}


class PipeliningSmtpHook(SmtpHook):
    """The provider's :class:`SmtpHook` reads the connection (host, port, login, password and the
    extras ``disable_ssl``, ``disable_tls``, ``timeout``, ``retry_limit``, ``from_email``,
    ``ssl_context``); :meth:`session_settings` hands that reading to the sender, whose sessions
    pipeline (RFC 2920) where the provider's client sends one command at a time.

    Two differences from the provider's own ``get_conn``, which still works for plain alerts:
    STARTTLS is never attempted inside an SSL connection, and a flag written as the string
    ``"false"`` (which the provider reads as true) is refused rather than silently turning TLS off.
    """

    hook_name = "SMTP (pipelining sender)"

    @classmethod
    def for_connection(cls, connection: Any) -> PipeliningSmtpHook:
        """A hook on a connection already at hand (an Airflow Connection or anything with its
        fields: tests, benches): no lookup."""
        hook = cls()
        hook.smtp_connection = connection
        return hook

    def session_settings(self) -> SmtpSettings:
        """What a sending session needs, as the provider reads the connection."""
        if self.smtp_connection is None:
            self.smtp_connection = self.get_connection(self.smtp_conn_id)
        self._refuse_ambiguous_extras()
        return SmtpSettings(
            host=self.host or "localhost",
            port=int(self.port) if self.port else None,
            login=self.smtp_user,
            password=self.smtp_password,
            use_ssl=self.use_ssl,
            starttls=self.smtp_starttls,
            timeout=float(self.conn.extra_dejson.get("timeout", 30)),  # the provider truncates to int
            retry_limit=self.smtp_retry_limit,
            from_email=self.from_email,
            verify_certificates=self.ssl_context != "none",
            max_connections=self._max_connections(),
        )

    def _max_connections(self) -> int | None:
        """extra ``max_connections``: how many sessions the relay lets one client open at once."""
        value = self.conn.extra_dejson.get("max_connections")
        if value is None:
            return None
        if isinstance(value, bool) or not str(value).strip().isdigit() or int(value) < 1:
            raise SmtpUnavailableError(
                f"{self.smtp_conn_id} extra max_connections must be a whole number of 1 or more, not {value!r}"
            )
        return int(value)

    def _refuse_ambiguous_extras(self) -> None:
        if self.smtp_user and not self.smtp_password:  # else every message would meet a 530
            raise SmtpUnavailableError(
                f"{self.smtp_conn_id} has the login {self.smtp_user!r} but no password: set its password, "
                "or remove the login for a relay that needs none"
            )
        if self.auth_type != "basic":
            raise SmtpUnavailableError(
                f"{self.smtp_conn_id} extra auth_type {self.auth_type!r} is not supported by the sender: "
                "use a login and password (auth_type basic, the default)"
            )
        if self.ssl_context not in (None, "default", "none"):
            raise SmtpUnavailableError(
                f"{self.smtp_conn_id} extra ssl_context must be 'default' or 'none', not {self.ssl_context!r}"
            )
        for name in ("disable_ssl", "disable_tls"):
            value = self.conn.extra_dejson.get(name)
            if isinstance(value, str) and value.strip().lower() in _FALSE_WORDS:
                raise SmtpUnavailableError(
                    f"{self.smtp_conn_id} extra {name} is the string {value!r}, which the SMTP provider reads as "
                    f"true; write {name}: false (a JSON boolean) or leave it out"
                )

    def connect(self) -> smtplib.SMTP:
        """A new connected, greeted and logged-in client, as a sending session opens it."""
        return open_client(self.session_settings())

    def test_connection(self) -> tuple[bool, str]:
        """Connect as a sending session does, then NOOP."""
        try:
            client = self.connect()
            try:
                code, _ = client.noop()
            finally:
                client.quit()
        except Exception as error:  # the UI shows why
            return False, str(error)
        return code == 250, f"the relay answered NOOP with {code}"
