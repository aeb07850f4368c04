"""Airflow hook for the `adobe_pipeline` connection, in the provider shape."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

from include.adobe.auth import ImsAuthenticator, PipelineCredentials
from include.adobe.journal import DEFAULT_RETRY_VALIDITY, JournalClient
from include.config import TriggersConfig
from include.errors import TriggersError


class AdobePipelineHook(BaseHook):
    """The pipeline journal (SPEC section 2) through the `adobe_pipeline` connection (section 1).

    ``get_conn()`` returns a :class:`~include.adobe.journal.JournalClient` for ``consumer``, made
    once per hook; it owns an :class:`~include.adobe.auth.ImsAuthenticator` whose token is
    cached across tasks and runs until shortly before it expires. ``consumer`` and
    ``retry_validity`` are the configuration's ``pipeline.consumer`` and
    ``pipeline.retry_validity``; a hook without a consumer can authenticate but not fetch. As a
    context manager, the hook closes the client's HTTP session on exit.
    """

    conn_name_attr = "adobe_pipeline_conn_id"
    default_conn_name = "adobe_pipeline"
    conn_type = "http"
    hook_name = "Adobe Experience Cloud pipeline"

    def __init__(
        self,
        adobe_pipeline_conn_id: str = default_conn_name,
        *,
        consumer: str | None = None,
        retry_validity: float = DEFAULT_RETRY_VALIDITY,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.adobe_pipeline_conn_id = adobe_pipeline_conn_id
        self.consumer = consumer
        self.retry_validity = retry_validity
        self._client: JournalClient | None = None

    @classmethod
    def for_config(
        cls, config: TriggersConfig, adobe_pipeline_conn_id: str = default_conn_name
    ) -> AdobePipelineHook:
        """The hook for the configuration's consumer and retry_validity, on the connection that
        ``Settings.pipeline_conn_id`` names."""
        pipeline = config.pipeline
        return cls(adobe_pipeline_conn_id, consumer=pipeline.consumer, retry_validity=pipeline.retry_validity)

    def get_conn(self) -> JournalClient:
        if self._client is None:
            connection = self.get_connection(self.adobe_pipeline_conn_id)
            authenticator = ImsAuthenticator(PipelineCredentials.from_connection(connection))
            self._client = JournalClient(authenticator, self.consumer, retry_validity=self.retry_validity)
        return self._client

    def test_connection(self) -> tuple[bool, str]:
        try:
            info = self.get_conn().authenticator.token_info()
        except TriggersError as error:
            return False, str(error)
        return True, f"IMS issued a {info['auth']} token for client {info['client_id']}"

    def __enter__(self) -> AdobePipelineHook:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._client is not None:
            self._client.close()
