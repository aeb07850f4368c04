"""The project's named errors. Each message says what is wrong and how to fix it, never a secret."""

from __future__ import annotations


class TriggersError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(TriggersError):
    """The YAML configuration or an environment setting is invalid; raised at load time."""


class CredentialsError(TriggersError):
    """The `adobe_pipeline` connection is incomplete or its key cannot be read."""


class AuthenticationError(TriggersError):
    """IMS refused the credentials (bad signature, unknown client, wrong secret...)."""


class PipelineRequestError(TriggersError):
    """The pipeline answered 400: the request itself is wrong."""


class NotEntitledError(TriggersError):
    """The pipeline answered 403: valid credentials, but not for this consumer."""


class JournalGoneError(TriggersError):
    """The pipeline answered 410: the stored position is older than the journal retention."""


class PipelineUnavailableError(TriggersError):
    """Transient failures (429, 5xx, timeouts) lasted longer than `retry_validity`."""


class InvalidEmailError(TriggersError, ValueError):
    """A recipient (or sender) address is not one plain valid address; the delivery is not sent."""


class TemplateRenderError(TriggersError):
    """A campaign's template set is missing or failed to render; that delivery fails, not the batch."""


class SmtpUnavailableError(TriggersError):
    """The SMTP relay of `smtp_default` could not be reached or logged into after the retries."""


class RelayRefusedError(SmtpUnavailableError):
    """The relay refuses every message, not one (authentication required or refused, sender or
    relaying denied, the same 5xx again and again): the claimed deliveries went back to pending."""


class AudienceError(TriggersError):
    """The audience (a CSV file, a query) cannot be read or its columns are wrong; nothing was loaded."""


class RemovalRefusedError(AudienceError):
    """An audience sync would remove more recipients than allowed; retrying cannot help."""


class SchemaOutOfDateError(TriggersError):
    """The staging database's schema is not the one this code needs (behind, ahead, or missing the
    configured dimension columns); the message names the database and the command that fixes it."""


class RunLockTimeoutError(TriggersError):
    """Another run of the same stage held its lock on the database for longer than this run waits."""


class UnreadablePageError(TriggersError):
    """A journal page whose structure cannot be read at all (no ``{"events": [``); the drain stops
    at its position, and ``drain --skip-unreadable-page`` quarantines it and goes on."""


class PositionMovedError(TriggersError):
    """The stored journal position moved while this drain ran (another drain); its batch rolled back."""


class SuppressionFileError(TriggersError):
    """A suppressions CSV cannot be read at all (missing file, no header, unknown columns); a bad
    line alone is reported with its number and never stops the import."""


class UnsubscribeTokenError(TriggersError):
    """An unsubscribe link's token is malformed, forged, altered, expired, or names no delivery we
    keep; nothing is recorded (the endpoint answers 4xx)."""


class PreviewError(TriggersError):
    """A preview, test send or dry run cannot be built: unknown campaign, recipient or event; the
    message names what to pass instead."""


class MailboxUnavailableError(TriggersError):
    """The bounce mailbox of ``imap_default`` cannot be reached, logged into or changed (the message
    names the connection and the server's answer, never the password); nothing was lost: a report
    is moved only once what it says is recorded."""
