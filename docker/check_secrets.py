"""Refuse to start the docker-compose stack on example or weak secrets.

The first step of ``airflow-init``: it reads the secrets from the environment compose gave the
container (``AIRFLOW__API_AUTH__JWT_SECRET`` ...) and names each bad one by its ``.env`` variable,
with the command that makes a good value. Run it on an ``.env`` file before ``docker compose up``:

    python docker/check_secrets.py --env-file .env

Exit status 0 when every secret is usable, 1 (and one line per problem on stderr) otherwise.
Values are never printed. Standard library only: it runs outside the image too.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

TOKEN = 'python3 -c "import secrets; print(secrets.token_urlsafe(32))"'
FERNET = 'python3 -c "import base64, os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())"'

# .env variable -> (the variable airflow-init sees it as, minimum length, how to make one)
SECRETS = {
    "AIRFLOW_JWT_SECRET": ("AIRFLOW__API_AUTH__JWT_SECRET", 32, TOKEN),
    "AIRFLOW_API_SECRET_KEY": ("AIRFLOW__API__SECRET_KEY", 32, TOKEN),
    "AIRFLOW_FERNET_KEY": ("AIRFLOW__CORE__FERNET_KEY", 44, FERNET),
    "_AIRFLOW_WWW_USER_PASSWORD": ("_AIRFLOW_WWW_USER_PASSWORD", 12, TOKEN),
    "POSTGRES_PASSWORD": ("POSTGRES_PASSWORD", 12, TOKEN),
}
# placeholders and values published in tutorials and example files, whatever .env.example says
KNOWN_PUBLIC = {
    "",
    "change-me",
    "changeme",
    "change_me",
    "secret",
    "password",
    "admin",
    "airflow",
    "postgres",
    "example",
    "your-secret-key",
    "temporary_key",
    # Airflow's own docs and many tutorials show this Fernet key
    "46BKJoQYlPPOexq0OhDZnIlNepKFf87WFwLbfzqDDho=",
}
# the relay of the demo stack, on the compose network: the only one for which a localhost
# unsubscribe link is acceptable (nobody outside this machine receives its mail)
DEMO_RELAY = "mailpit"
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}
# characters that break what compose builds from a value: the database URLs hold POSTGRES_PASSWORD
# unquoted (user:password@host/db), the JSON connections hold the others inside "..."; compose reads
# "$" as a variable in both; control characters and spaces (below "!") break both
URL_BREAKERS = "@/#%?[]$"
JSON_BREAKERS = '"\\$'
BREAKERS = {
    "POSTGRES_PASSWORD": (URL_BREAKERS, "the database URLs"),
    "ADOBE_CLIENT_ID": (JSON_BREAKERS, "AIRFLOW_CONN_ADOBE_PIPELINE (JSON)"),
    "ADOBE_CLIENT_SECRET": (JSON_BREAKERS, "AIRFLOW_CONN_ADOBE_PIPELINE (JSON)"),
    "SMTP_LOGIN": (JSON_BREAKERS, "AIRFLOW_CONN_SMTP_DEFAULT (JSON)"),
    "SMTP_PASSWORD": (JSON_BREAKERS, "AIRFLOW_CONN_SMTP_DEFAULT (JSON)"),
}
# the connections compose builds, as airflow-init sees them: unparsable when a value above broke them
CONNECTIONS = {
    "AIRFLOW_CONN_ADOBE_PIPELINE": "ADOBE_CLIENT_ID or ADOBE_CLIENT_SECRET",
    "AIRFLOW_CONN_SMTP_DEFAULT": "SMTP_LOGIN or SMTP_PASSWORD",
}


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines as compose reads them (comments, blank lines and quotes handled)."""
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        key = key.strip().removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:  # an unquoted value ends at a comment
            value = value.split(" #", 1)[0].rstrip()
        values[key] = value
    return values


def example_values(example: Path | None) -> set[str]:
    """Every value of ``.env.example``: published with the project, so never a secret."""
    if example is None or not example.is_file():
        return set()
    return {value for value in read_env_file(example).values() if value}


def problems(values: dict[str, str], public: set[str]) -> list[str]:
    """One sentence per unusable secret, naming its ``.env`` variable and the fix."""
    found = []
    for name, (_, minimum, how) in SECRETS.items():
        value = values.get(name, "")
        if value.strip().lower() in {known.lower() for known in public}:
            what = "is empty" if not value else "is an example value (from .env.example or a tutorial)"
        elif len(value) < minimum:
            what = f"is shorter than {minimum} characters"
        elif name == "AIRFLOW_FERNET_KEY" and not _is_fernet_key(value):
            what = "is not a Fernet key (32 bytes, URL-safe base64)"
        else:
            continue
        found.append(f"{name} in .env {what}: set it to a new value made with: {how}")
    found.extend(_character_problems(values))
    found.extend(_unsubscribe_problems(values))
    return found


def _character_problems(values: dict[str, str]) -> list[str]:
    """A value holding a character that breaks the URL or JSON compose puts it in (never printed:
    only which characters are refused)."""
    found = []
    for name, (refused, where) in BREAKERS.items():
        if any(char in refused or char <= " " or char == "\x7f" for char in values.get(name, "")):
            found.append(
                f"{name} in .env holds a space, a control character or one of {' '.join(refused)}, "
                f"which break {where}: use a value "
                f"without them (a password you choose: {TOKEN}; a provider's secret: make a new one)"
            )
    for variable, names in CONNECTIONS.items():
        raw = values.get(variable)
        if raw is None:
            continue
        try:
            json.loads(raw)
        except ValueError:
            found.append(
                f'{variable} is not valid JSON: {names} in .env holds a " or \\ (refused); '
                f"a password you choose can be made with: {TOKEN}"
            )
    return found


def _is_fernet_key(value: str) -> bool:
    try:
        return len(base64.urlsafe_b64decode(value.encode("ascii"))) == 32
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return False


def _unsubscribe_problems(values: dict[str, str]) -> list[str]:
    """A real relay with an unsubscribe link on localhost: every recipient would get a dead link."""
    relay = values.get("SMTP_HOST", DEMO_RELAY) or DEMO_RELAY
    if relay == DEMO_RELAY:
        return []
    url = values.get("TRIGGERS_UNSUBSCRIBE_URL", "")
    host = (urlsplit(url).hostname or "") if url else ""
    if url and host not in LOCAL_HOSTS and not host.endswith(".localhost"):
        return []
    return [
        f"TRIGGERS_UNSUBSCRIBE_URL in .env {'is not set' if not url else 'points at this machine'} while "
        f"SMTP_HOST is a real relay ({relay}): set it to the public address of the unsubscribe "
        "endpoint, e.g. https://airflow.example.com/triggers/unsubscribe/{token}"
    ]


def from_environment() -> dict[str, str]:
    """The values as airflow-init sees them, under their ``.env`` names."""
    values = {name: os.environ.get(container, "") for name, (container, _, _) in SECRETS.items()}
    for name in ("SMTP_HOST", "TRIGGERS_UNSUBSCRIBE_URL", *CONNECTIONS):
        if name in os.environ:
            values[name] = os.environ[name]
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env-file", type=Path, help="check this .env file instead of the environment")
    parser.add_argument(
        "--example",
        type=Path,
        default=Path(__file__).resolve().parent.parent / ".env.example",
        help="whose values are refused (default: the project's .env.example)",
    )
    args = parser.parse_args(argv)
    values = read_env_file(args.env_file) if args.env_file else from_environment()
    found = problems(values, KNOWN_PUBLIC | example_values(args.example))
    for line in found:
        print(f"check_secrets: {line}", file=sys.stderr)
    if found:
        print(
            "check_secrets: the stack was not started; edit .env, then `docker compose up` again",
            file=sys.stderr,
        )
        return 1
    print("check_secrets: every secret is set and none is an example value")
    return 0


if __name__ == "__main__":
    sys.exit(main())
