"""The service account's RSA key pair and the `adobe_pipeline` connection that uses it (SPEC section 1).

``python -m include.cli keys create var/keys`` writes ``private.pem`` (PKCS#8, mode 0600) and
``public.pem``, and prints the ``AIRFLOW_CONN_ADOBE_PIPELINE='...'`` line for the local simulator
(also written to ``var/keys/adobe_pipeline.env``). With Adobe, upload the public key (or a
certificate made from it) to the Developer Console and use the console's ids instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from collections.abc import Sequence
from pathlib import Path

from include.errors import CredentialsError

PRIVATE_KEY_NAME = "private.pem"
PUBLIC_KEY_NAME = "public.pem"
ENV_FILE_NAME = "adobe_pipeline.env"
DEFAULT_SCOPES = ("ent_analytics_bulk_ingest_sdk",)
SIMULATOR_URL = "http://127.0.0.1:8765"


def create_key_pair(directory: str | os.PathLike[str], overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new RSA 2048 key pair into ``directory``: (private PEM path, public PEM path).

    The private key is PKCS#8 PEM, created with mode 0600 (never readable by others, not even
    briefly); a new ``directory`` is created mode 0700. An existing private key is kept unless
    ``overwrite``: replacing it would lock out every system that trusts its public half.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    directory = Path(directory)
    private_path, public_path = directory / PRIVATE_KEY_NAME, directory / PUBLIC_KEY_NAME
    if private_path.exists() and not overwrite:
        raise CredentialsError(
            f"{private_path} already exists; keep it, or pass --force to replace the key pair "
            f"(the old public key then stops working)"
        )
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    write_private(private_path, private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def write_private(path: Path, data: bytes) -> None:
    """Write ``path`` as a new file of mode 0600: readable by its owner from its creation on.

    An existing file is removed first: ``O_CREAT`` would keep its mode, and a ``chmod`` after the
    write would leave a window in which others can read it.
    """
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def connection_json(
    host: str,
    client_id: str,
    client_secret: str,
    org_id: str,
    technical_account_id: str,
    private_key_path: str | os.PathLike[str] | None,
    auth: str = "jwt",
    scopes: Sequence[str] = DEFAULT_SCOPES,
    ims_url: str | None = None,
) -> str:
    """The `adobe_pipeline` Airflow connection in its JSON form (``AIRFLOW_CONN_ADOBE_PIPELINE``)."""
    if auth not in ("jwt", "oauth"):
        raise CredentialsError(f"auth must be 'jwt' or 'oauth', not {auth!r}")
    extra: dict[str, object] = {
        "ims_url": (ims_url or host).rstrip("/"),
        "org_id": org_id,
        "technical_account_id": technical_account_id,
        "auth": auth,
    }
    if auth == "jwt":
        if private_key_path is None:
            raise CredentialsError("auth 'jwt' needs private_key_path (the PEM the JWT is signed with)")
        extra["private_key_path"] = str(Path(private_key_path).resolve())
    extra["scopes"] = list(scopes)
    connection = {
        "conn_type": "http",
        "host": host.rstrip("/"),
        "login": client_id,
        "password": client_secret,
        "extra": extra,
    }
    return json.dumps(connection)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from include.sandbox.simulator.options import SimulatorOptions

    defaults = SimulatorOptions()
    commands = parser.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = commands.add_parser(
        "create", help="write private.pem + public.pem into DIR and print the matching connection"
    )
    create.add_argument("directory", type=Path, metavar="DIR")
    create.add_argument("--host", default=SIMULATOR_URL, help=f"pipeline base URL (default {SIMULATOR_URL})")
    create.add_argument("--ims-url", help="IMS base URL (default: the same as --host, as for the simulator)")
    create.add_argument("--client-id", default=defaults.client_id)
    create.add_argument("--client-secret", default=defaults.client_secret)
    create.add_argument("--org-id", default=defaults.org_id)
    create.add_argument("--technical-account-id", default=defaults.technical_account_id)
    create.add_argument("--auth", choices=("jwt", "oauth"), default="jwt")
    create.add_argument("--scope", action="append", dest="scopes", help="metascope (repeatable)")
    create.add_argument("--force", action="store_true", help="replace an existing key pair")


def main(args: argparse.Namespace) -> int:
    private_path, public_path = create_key_pair(args.directory, overwrite=args.force)
    connection = connection_json(
        args.host,
        args.client_id,
        args.client_secret,
        args.org_id,
        args.technical_account_id,
        private_path,
        auth=args.auth,
        scopes=tuple(args.scopes or DEFAULT_SCOPES),
        ims_url=args.ims_url,
    )
    line = f"AIRFLOW_CONN_ADOBE_PIPELINE={shlex.quote(connection)}"
    env_path = args.directory / ENV_FILE_NAME
    write_private(env_path, (line + "\n").encode())  # it holds the client secret
    print(f"wrote {private_path} (private, mode 0600) and {public_path}")
    print(f"wrote {env_path}; the connection:")
    print(line)
    print(f"start the simulator with: python -m include.cli simulator serve --public-key {public_path}")
    return 0
