"""Airflow hook for the `adobe_pipeline` connection, in the provider shape."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

from include.adobe.auth import ImsAuthenticator, PipelineCredentials
from include.errors import TriggersError


class AdobePipelineHook(BaseHook):
    """Authenticates to Adobe IMS with the `adobe_pipeline` connection (SPEC section 1).

    ``get_conn()`` returns an :class:`~include.adobe.auth.ImsAuthenticator` whose token is cached
    across tasks and runs until shortly before it expires.
    """

    conn_name_attr = "adobe_pipeline_conn_id"
    default_conn_name = "adobe_pipeline"
    conn_type = "http"
    hook_name = "Adobe Experience Cloud pipeline"

    def __init__(self, adobe_pipeline_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.adobe_pipeline_conn_id = adobe_pipeline_conn_id
        self._authenticator: ImsAuthenticator | None = None

    def get_conn(self) -> ImsAuthenticator:
        if self._authenticator is None:
            connection = self.get_connection(self.adobe_pipeline_conn_id)
            self._authenticator = ImsAuthenticator(PipelineCredentials.from_connection(connection))
        return self._authenticator

    def test_connection(self) -> tuple[bool, str]:
        try:
            info = self.get_conn().token_info()
        except TriggersError as error:
            return False, str(error)
        return True, f"IMS issued a {info['auth']} token for client {info['client_id']}"

    def __enter__(self) -> AdobePipelineHook:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._authenticator is not None:
            self._authenticator.session.close()
