"""Reading the bounce mailbox over IMAP: ``python -m include.cli bounces read [--limit N]``.

The connection is Airflow's ``imap_default`` (the IMAP provider's :class:`ImapHook` connects and
logs in: host, port, login, password, extra ``use_ssl``); the commands are the standard
library's ``imaplib`` on the hook's client. Each message of ``TRIGGERS_FEEDBACK_FOLDER`` (default
``INBOX``) is parsed (:mod:`~include.bounces.reports`), applied (:mod:`~include.bounces.apply`),
then, only once that is committed:

* a handled report (or one read before) is moved to ``TRIGGERS_FEEDBACK_PROCESSED_FOLDER``
  (default ``Triggers/Processed``);
* a report we cannot act on (unparsed, no delivery we sent, an unsubscribe without a valid
  token) is moved to ``TRIGGERS_FEEDBACK_UNPROCESSED_FOLDER`` (default ``Triggers/Unprocessed``):
  put it back in the inbox to have it read again;
* a report about a delivery whose send is not recorded yet (``pending``, ``sending``) stays in
  the inbox as it is, counted ``waiting``: a later read applies it;
* any other message is left where it is, unread, and given the keyword ``$TriggersIgnored``
  so that later reads skip it (where the server allows keywords; else it is counted again).

Folder names use ``/`` between levels whatever the server's separator. A crash between the
commit and the move leaves the report in the inbox: the next read finds it recorded
(``duplicate``), changes nothing and moves it.
"""

from __future__ import annotations

import argparse
import imaplib
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Engine

from include.bounces.apply import LEFT_ALONE, PROCESSED, WAITING, apply_report
from include.bounces.reports import parse_report
from include.bounces.verp import bounce_address_template
from include.errors import ConfigError, MailboxUnavailableError

log = logging.getLogger(__name__)

IGNORED_KEYWORD = "$TriggersIgnored"
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # read of one message at most: the report parts come first
_FOLDER_SETTINGS = {
    "folder": ("TRIGGERS_FEEDBACK_FOLDER", "INBOX"),
    "processed_folder": ("TRIGGERS_FEEDBACK_PROCESSED_FOLDER", "Triggers/Processed"),
    "unprocessed_folder": ("TRIGGERS_FEEDBACK_UNPROCESSED_FOLDER", "Triggers/Unprocessed"),
}
_FOLDER_NAME = re.compile(r"[A-Za-z0-9 _.+/-]{1,200}")
_LIST_DELIMITER = re.compile(rb'\([^)]*\)\s+(?:"((?:[^"\\]|\\.)*)"|NIL)', re.IGNORECASE)


@dataclass(frozen=True)
class MailboxOptions:
    """Where reports are read and put; ``bounce_address`` is the VERP template (or None)."""

    conn_id: str = "imap_default"
    folder: str = "INBOX"
    processed_folder: str = "Triggers/Processed"
    unprocessed_folder: str = "Triggers/Unprocessed"
    bounce_address: str | None = None
    limit: int | None = None
    timeout: float = 60.0

    @classmethod
    def from_env(cls, limit: int | None = None) -> MailboxOptions:
        """The settings of the environment, checked: :class:`ConfigError` names a bad one."""
        folders = {}
        for field_name, (env, default) in _FOLDER_SETTINGS.items():
            value = (os.environ.get(env) or default).strip()
            if not _FOLDER_NAME.fullmatch(value) or "//" in value or value.startswith("/"):
                raise ConfigError(
                    f"{env} {value[:100]!r}: use letters, digits, spaces and _ . + - with / between levels, "
                    f"e.g. {default}"
                )
            folders[field_name] = value
        if len(set(folders.values())) < 3:
            raise ConfigError(
                "TRIGGERS_FEEDBACK_FOLDER, TRIGGERS_FEEDBACK_PROCESSED_FOLDER and "
                "TRIGGERS_FEEDBACK_UNPROCESSED_FOLDER must be three different folders"
            )
        if limit is not None and limit < 1:
            raise ConfigError(f"--limit {limit}: read at least 1 message, or leave it out for all")
        return cls(bounce_address=bounce_address_template(), limit=limit, **folders)


@contextmanager
def open_mailbox(conn_id: str, timeout: float = 60.0) -> Iterator[imaplib.IMAP4]:
    """The logged-in ``imaplib`` client of the provider's hook on ``conn_id``; logged out on exit."""
    from airflow.providers.imap.hooks.imap import ImapHook

    hook = ImapHook(imap_conn_id=conn_id)
    try:
        hook.get_conn()
    except (OSError, imaplib.IMAP4.error) as error:
        raise MailboxUnavailableError(
            f"cannot open the mailbox of the {conn_id} connection ({type(error).__name__}: {error}); "
            "check its host, port, login, password and extra use_ssl"
        ) from None
    except Exception as error:
        if type(error).__name__ != "AirflowNotFoundException":
            raise
        raise MailboxUnavailableError(
            f"no Airflow connection {conn_id!r}: define it (AIRFLOW_CONN_{conn_id.upper()}, "
            "conn_type imap) to read bounces and complaints"
        ) from None
    client = hook.mail_client
    assert client is not None
    client.sock.settimeout(timeout)
    try:
        yield client
    finally:
        try:
            client.logout()
        except (OSError, imaplib.IMAP4.error):
            pass


def read_mailbox(
    engine: Engine, client: imaplib.IMAP4, options: MailboxOptions, now: float | None = None
) -> dict[str, int]:
    """Read, apply and file the messages of ``options.folder`` (at most ``options.limit``), oldest
    first; return the counts: ``read``, one per outcome (``hard_bounce``, ``complaint``...),
    ``processed``, ``set_aside``, ``left_alone``, ``waiting``. An IMAP failure raises
    :class:`MailboxUnavailableError`; what was committed before it stays, and its message is read
    again (as a duplicate) next time."""
    try:
        return _Reader(engine, client, options, now).read()
    except (OSError, imaplib.IMAP4.error) as error:
        raise MailboxUnavailableError(
            f"the mailbox of {options.conn_id} failed mid-read ({type(error).__name__}: {error}); "
            "what was read so far is recorded, the rest is read next time"
        ) from None


class _Reader:
    """One read of the mailbox."""

    def __init__(self, engine: Engine, client: imaplib.IMAP4, options: MailboxOptions, now: float | None):
        self.engine = engine
        self.client = client
        self.options = options
        self.now = now
        self.counts: Counter[str] = Counter()
        self.capabilities = _capabilities(client)
        self.move = "MOVE" in self.capabilities
        self.copied: list[bytes] = []  # without MOVE: copied and flagged \Deleted, expunged at the end

    def read(self) -> dict[str, int]:
        delimiter = self._delimiter()
        processed = self._ensure_folder(self.options.processed_folder, delimiter)
        set_aside = self._ensure_folder(self.options.unprocessed_folder, delimiter)
        self._ok(self.client.select(_quoted(self.options.folder.replace("/", delimiter))), "SELECT")
        keywords = b"\\*" in b" ".join(
            d for d in self.client.untagged_responses.get("PERMANENTFLAGS", []) if d
        )
        for uid in self._waiting(keywords):
            data = self._fetch(uid)
            if data is None:
                continue  # expunged meanwhile by another client
            report = parse_report(data, self.options.bounce_address)
            applied = apply_report(self.engine, report, self.now)
            self.counts["read"] += 1
            self.counts[applied.outcome] += 1
            if applied.outcome in PROCESSED:
                self.counts["processed"] += 1
                self._move(uid, processed)
            elif applied.outcome in WAITING:
                self.counts["waiting"] += 1
            elif applied.outcome in LEFT_ALONE:
                self.counts["left_alone"] += 1
                if keywords:
                    self._ok(self.client.uid("STORE", uid, "+FLAGS.SILENT", f"({IGNORED_KEYWORD})"), "STORE")
            else:
                self.counts["set_aside"] += 1
                log.warning("report %s moved aside: %s %s", report.report_id, applied.outcome, applied.detail)
                self._move(uid, set_aside)
        self._expunge_copied()
        return dict(sorted(self.counts.items()))

    def _waiting(self, keywords: bool) -> list[bytes]:
        criteria = ["UNDELETED", "UNKEYWORD", IGNORED_KEYWORD] if keywords else ["UNDELETED"]
        found = self._ok(self.client.uid("SEARCH", None, *criteria), "SEARCH")
        uids = sorted({int(u) for line in found if line for u in line.split()})
        if self.options.limit is not None:
            uids = uids[: self.options.limit]
        return [str(u).encode("ascii") for u in uids]

    def _fetch(self, uid: bytes) -> bytes | None:
        """The message's first MAX_MESSAGE_BYTES, without setting \\Seen (BODY.PEEK)."""
        found = self._ok(self.client.uid("FETCH", uid, f"(BODY.PEEK[]<0.{MAX_MESSAGE_BYTES}>)"), "FETCH")
        for item in found:
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], bytes):
                return item[1]
        return None

    def _move(self, uid: bytes, folder: str) -> None:
        if self.move:
            self._ok(self.client.uid("MOVE", uid, _quoted(folder)), "MOVE")
            return
        self._ok(self.client.uid("COPY", uid, _quoted(folder)), "COPY")
        self._ok(self.client.uid("STORE", uid, "+FLAGS.SILENT", "(\\Deleted)"), "STORE")
        self.copied.append(uid)

    def _expunge_copied(self) -> None:
        """Only the messages this read copied: UID EXPUNGE (UIDPLUS); without it they stay flagged
        \\Deleted (and skipped), as a plain EXPUNGE would also remove what someone else deleted."""
        if self.copied and "UIDPLUS" in self.capabilities:
            self._ok(self.client.uid("EXPUNGE", b",".join(self.copied).decode("ascii")), "EXPUNGE")

    def _delimiter(self) -> str:
        """The server's hierarchy separator (``LIST "" ""``), ``/`` when it has none."""
        found = self._ok(self.client.list('""', '""'), "LIST")
        match = _LIST_DELIMITER.match(found[0] or b"") if found else None
        if match is None or match.group(1) is None:
            return "/"
        return match.group(1).decode("ascii", "replace").replace("\\\\", "\\") or "/"

    def _ensure_folder(self, folder: str, delimiter: str) -> str:
        """The folder's name on this server, created (with its parents) when missing."""
        name = folder.replace("/", delimiter)
        found = self._ok(self.client.list('""', _quoted(name)), "LIST")
        if not any(found):
            typ, data = self.client.create(_quoted(name))
            if typ != "OK" and not any(b"ALREADYEXISTS" in (d or b"").upper() for d in data):
                raise MailboxUnavailableError(
                    f"cannot create the folder {folder!r} in the mailbox of {self.options.conn_id}: "
                    f"{_answer(data)}; create it by hand or choose another in its setting"
                )
        return name

    def _ok(self, answer: tuple[str, list], command: str) -> list:
        typ, data = answer
        if typ != "OK":
            raise MailboxUnavailableError(
                f"the mailbox of {self.options.conn_id} refused {command}: {_answer(data)}"
            )
        return data


def _capabilities(client: imaplib.IMAP4) -> set[str]:
    """What the server offers once logged in (the greeting's list lacks MOVE, UIDPLUS...)."""
    typ, data = client.capability()
    if typ == "OK" and data and isinstance(data[0], bytes):
        return set(data[0].decode("ascii", "replace").upper().split())
    return {str(c).upper() for c in client.capabilities}


def _quoted(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _answer(data: list) -> str:
    return " ".join(d.decode("utf-8", "replace") if isinstance(d, bytes) else str(d) for d in data)[:200]


# ---------------------------------------------------------------------------------------------
# Command line: python -m include.cli bounces read
# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bounces_command", required=True, metavar="SUBCOMMAND")
    read = sub.add_parser("read", help="read bounces, complaints and mailto unsubscribes from imap_default")
    read.add_argument("--limit", type=int, default=None, help="read at most this many messages")


def main(args: argparse.Namespace) -> int:
    """Read the bounce mailbox once and print the counts (JSON)."""
    from include.resources import open_resources

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    options = MailboxOptions.from_env(limit=args.limit)
    started = time.monotonic()
    with open_resources() as res, open_mailbox(options.conn_id, options.timeout) as client:
        counts = read_mailbox(res.engine, client, options)
    log.info("read the bounce mailbox in %.1f s", time.monotonic() - started)
    print(json.dumps(counts, sort_keys=True))
    return 0
