"""A real IMAP server for the bounce tests: Debian's Dovecot, started per test on a free port.

The configuration is temporary: plain login over loopback, one passwd-file user, a Maildir
(``LAYOUT=fs``: folders nest with ``/``), no system service. As root (``./run tests``, CI),
Dovecot refuses to give mail to uid 0, so the Maildir belongs to ``nobody`` and sits with the
server's sockets in a directory of its own under the system temp dir (pytest's is private to
root); as another user everything runs as that user. Where Dovecot is not installed or does not
start, the test is skipped with the reason (``./run tests`` installs it as root).

``message_from_fixture`` fills in a real-world message of ``tests/fixtures/bounces``.
"""

from __future__ import annotations

import grp
import imaplib
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from include.sandbox.net import free_port

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "bounces"
USER, PASSWORD = "bounces", "imap-test-password"


def message_from_fixture(name: str, **values: str) -> bytes:
    """``tests/fixtures/bounces/<name>.eml`` with ``{key}`` filled in from ``values``, CRLF lines."""
    text = (FIXTURES / f"{name}.eml").read_text()
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")


class Dovecot:
    """A running server, and what the tests do with its mailbox (appending, looking)."""

    def __init__(self, port: int) -> None:
        self.host = "127.0.0.1"
        self.port = port

    def connection(self) -> dict[str, Any]:
        """``imap_default`` as Airflow reads it (AIRFLOW_CONN_IMAP_DEFAULT)."""
        return {
            "conn_type": "imap",
            "host": self.host,
            "port": self.port,
            "login": USER,
            "password": PASSWORD,
            "extra": {"use_ssl": False},
        }

    def use_as_imap_default(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("AIRFLOW_CONN_IMAP_DEFAULT", json.dumps(self.connection()))

    def client(self) -> imaplib.IMAP4:
        client = imaplib.IMAP4(self.host, self.port, timeout=10)
        client.login(USER, PASSWORD)
        return client

    def append(self, *messages: bytes, folder: str = "INBOX") -> None:
        client = self.client()
        try:
            for message in messages:
                typ, data = client.append(f'"{folder}"', None, None, message)
                assert typ == "OK", data
        finally:
            client.logout()

    def folder(self, name: str = "INBOX") -> list[tuple[bytes, bytes]]:
        """(flags, message) of each message in the folder, oldest first; [] when it does not exist."""
        client = self.client()
        try:
            typ, _ = client.select(f'"{name}"', readonly=True)
            if typ != "OK":
                return []
            _, found = client.uid("SEARCH", None, "ALL")
            uids = found[0].split() if found and found[0] else []
            out = []
            for uid in uids:
                _, data = client.uid("FETCH", uid, "(FLAGS BODY.PEEK[])")
                out.append((data[0][0], data[0][1]))
            return out
        finally:
            client.logout()

    def messages(self, name: str = "INBOX") -> list[bytes]:
        return [message for _, message in self.folder(name)]


def _config(workdir: Path, mail: Path, port: int, uid: int, gid: int, user: str | None) -> str:
    as_user = ""
    if user:  # not root: every process runs as this user, its sockets in its group
        group = grp.getgrgid(gid).gr_name
        as_user = (
            f"default_internal_user = {user}\ndefault_login_user = {user}\ndefault_internal_group = {group}\n"
        )
    return f"""
base_dir = {workdir}/run
state_dir = {workdir}/state
log_path = {workdir}/dovecot.log
{as_user}protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
first_valid_uid = 1
mail_location = maildir:{mail}/%u:LAYOUT=fs
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {workdir}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={mail}/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
  chroot =
}}
service anvil {{
  chroot =
}}
"""


def _binary() -> str:
    found = shutil.which("dovecot") or ("/usr/sbin/dovecot" if Path("/usr/sbin/dovecot").exists() else None)
    if found is None:
        pytest.skip("Dovecot is not installed: apt-get install dovecot-imapd (as root; ./run tests does)")
    return found


def _wait_for_greeting(port: int, process: subprocess.Popen[bytes], workdir: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
                if probe.recv(100).startswith(b"* OK"):
                    return
        except OSError:
            time.sleep(0.05)
    logs = [workdir / "output.log", workdir / "dovecot.log"]
    output = " ".join(log.read_text()[-800:] for log in logs if log.exists())
    pytest.skip(f"Dovecot did not start on port {port}: {output or 'no output'}")


@pytest.fixture(name="dovecot")
def dovecot_server(tmp_path: Path) -> Iterator[Dovecot]:
    binary = _binary()
    root = os.getuid() == 0
    workdir = Path(tempfile.mkdtemp(prefix="triggers-dovecot-")) if root else tmp_path / "dovecot"
    workdir.mkdir(exist_ok=True)
    workdir.chmod(0o755)  # Dovecot's login processes (another user, as root) reach its sockets
    mail = workdir / "mail"
    mail.mkdir()
    if root:
        owner = pwd.getpwnam("nobody")
        os.chown(mail, owner.pw_uid, owner.pw_gid)
        uid, gid, user = owner.pw_uid, owner.pw_gid, None
    else:
        uid, gid, user = os.getuid(), os.getgid(), pwd.getpwuid(os.getuid()).pw_name
    (workdir / "passwd").write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
    (workdir / "passwd").chmod(0o600)
    if root:  # read by Dovecot's auth process, which runs as its internal user
        internal = pwd.getpwnam("dovecot")
        os.chown(workdir / "passwd", internal.pw_uid, internal.pw_gid)
    port = free_port("127.0.0.1")
    config = workdir / "dovecot.conf"
    config.write_text(_config(workdir, mail, port, uid, gid, user))
    output = (workdir / "output.log").open("wb")
    process = subprocess.Popen([binary, "-F", "-c", str(config)], stdout=output, stderr=subprocess.STDOUT)
    try:
        _wait_for_greeting(port, process, workdir)
        yield Dovecot(port)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        output.close()
        if root:
            shutil.rmtree(workdir, ignore_errors=True)
