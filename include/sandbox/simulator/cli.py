"""The ``simulator`` command: ``serve`` IMS and the journal until Ctrl-C, or write the ``audience``
CSV of the simulated shoppers.

    python -m include.cli simulator serve --events 10000 --public-key var/keys/public.pem
"""

from __future__ import annotations

import argparse
import time
from dataclasses import fields
from pathlib import Path

from include.errors import ConfigError
from include.sandbox.simulator.options import SimulatorOptions
from include.sandbox.simulator.population import write_audience_csv
from include.sandbox.simulator.server import Simulator


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="simulator_command", required=True, metavar="ACTION")
    defaults = SimulatorOptions()
    _add_serve_arguments(
        commands.add_parser("serve", help="serve IMS and the journal on 127.0.0.1 until Ctrl-C")
    )
    audience = commands.add_parser("audience", help="write the recipients CSV of the simulated population")
    audience.add_argument("path", type=Path)
    audience.add_argument("--people", type=int, default=defaults.people)
    audience.add_argument("--seed", type=int, default=1)
    audience.add_argument("--opted-out-share", type=float, default=0.02)
    audience.add_argument("--invalid-email-share", type=float, default=0.01)


def _add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    defaults = SimulatorOptions()
    serve.add_argument("--port", type=int, default=8765, help="0 picks a free port (default 8765)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (docker-compose: 0.0.0.0)")
    serve.add_argument("--events", type=int, default=defaults.events, help="events published at start")
    serve.add_argument(
        "--rate", type=float, default=defaults.rate, help="events per second published after start"
    )
    serve.add_argument("--people", type=int, default=defaults.people, help="population size")
    serve.add_argument("--malformed-share", type=float, default=defaults.malformed_share)
    serve.add_argument("--duplicate-share", type=float, default=defaults.duplicate_share)
    serve.add_argument("--unknown-trigger-share", type=float, default=defaults.unknown_trigger_share)
    serve.add_argument("--bare-share", type=float, default=defaults.bare_share)
    serve.add_argument(
        "--time-span",
        type=float,
        default=defaults.time_span,
        help="seconds over which the start events' trigger times spread",
    )
    serve.add_argument("--token-lifetime", type=float, default=defaults.token_lifetime, help="seconds")
    serve.add_argument("--public-key", type=Path, help="public key or certificate PEM that verifies JWTs")
    serve.add_argument("--client-id", default=defaults.client_id)
    serve.add_argument("--client-secret", default=defaults.client_secret)
    serve.add_argument("--org-id", default=defaults.org_id)
    serve.add_argument("--technical-account-id", default=defaults.technical_account_id)
    serve.add_argument("--consumer", default=defaults.consumer)
    serve.add_argument("--retention", type=int, help="keep only the newest N events")
    serve.add_argument("--seed", type=int, default=defaults.seed)


def main(args: argparse.Namespace) -> int:
    if args.simulator_command == "audience":
        path = write_audience_csv(
            args.path, args.people, args.seed, args.opted_out_share, args.invalid_email_share
        )
        print(f"wrote {args.people} recipients to {path}")
        return 0
    return _serve(args)


def _options_from(args: argparse.Namespace) -> SimulatorOptions:
    public_key = None
    if args.public_key is not None:
        try:
            public_key = args.public_key.read_bytes()
        except OSError as error:
            raise ConfigError(
                f"--public-key {args.public_key}: cannot read it ({error.strerror}); "
                f"create a key pair with: python -m include.cli keys create DIR"
            ) from None
    # every option that has a flag of the same name (public_key_pem is read from --public-key)
    settings = {
        field.name: getattr(args, field.name)
        for field in fields(SimulatorOptions)
        if hasattr(args, field.name)
    }
    return SimulatorOptions(public_key_pem=public_key, **settings)


def _serve(args: argparse.Namespace) -> int:
    options = _options_from(args)
    simulator = Simulator(options)
    try:
        url = simulator.start(args.port, args.host)
    except OSError as error:
        raise ConfigError(
            f"cannot listen on {args.host}:{args.port} ({error}); pick another --port"
        ) from None
    try:  # from the first line printed: an interrupt may come as soon as the URL is known
        print(
            f"Adobe pipeline simulator at {url}  (IMS and journal; consumer {options.consumer})", flush=True
        )
        rate = f"  +{options.rate:g}/s" if options.rate else ""
        print(
            f"  journal: {url}/journal/{options.consumer}   events: {simulator.journal.length}{rate}",
            flush=True,
        )
        if options.public_key_pem is None:
            print("  no --public-key: JWT exchange refused; OAuth (auth=oauth) works", flush=True)
        faults = f"""curl -d '{{"status": 503, "count": 3}}' {url}/_sim/faults"""
        print(f"  faults:  {faults}   stats: {url}/_sim/stats", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        simulator.stop()
    return 0
