"""Delivery throughput: deliver_pending (render + send + record) beside plain smtplib.

    python -m bench.bench_delivery [--messages 100000] [--db URL] [--connections 1,2,4] [--repeat 3]
                                   [--suppressions 1000000]

Starts a minimal SMTP sink in its own process (so it does not share the client's GIL), fills a
database with N recipients and N pending deliveries, then times on the same sink, in one run:

* ``plain smtplib``: the N messages rendered beforehand, sent with ``SMTP.sendmail`` on one
  connection (and on several threads, to show where the sink saturates);
* ``deliver_pending``: the real path (select, eligibility re-check, render in its render
  process(es), claim, send, record each 250) with its default window, on 1, 2, 4 connections
  (``--window1``: also 1 connection with ``window=1``, a commit before each next message).

Each round times plain smtplib on 1 connection, then for each connection count plain smtplib and
deliver_pending in turn, so a ratio compares runs that saw the same machine load. Prints each
round, then a table of medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# The sink: just enough SMTP for smtplib, as fast as asyncio allows
# ---------------------------------------------------------------------------------------------
class _SinkProtocol(asyncio.Protocol):
    received = 0
    ehlo = b"250-sink\r\n250-PIPELINING\r\n250 8BITMIME\r\n"  # as real relays (Postfix, SES...) do

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buffer = b""
        self.in_data = False
        self.transport.write(b"220 sink ESMTP\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out = []
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    break
                self.buffer = self.buffer[end + 5 :]
                self.in_data = False
                _SinkProtocol.received += 1
                out.append(b"250 2.0.0 OK\r\n")
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                break
            line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
            verb = line[:4].upper()
            if verb == b"EHLO":
                out.append(self.ehlo)
            elif verb == b"DATA":
                self.in_data = True
                out.append(b"354 go ahead\r\n")
                # the message may already be in the buffer; the loop handles it
            elif verb == b"QUIT":
                out.append(b"221 bye\r\n")
                self.transport.write(b"".join(out))  # type: ignore[attr-defined]
                self.transport.close()
                return
            else:
                out.append(b"250 OK\r\n")
        if out:
            self.transport.write(b"".join(out))  # type: ignore[attr-defined]


def run_sink(port: int, pipelining: bool) -> None:
    if not pipelining:
        _SinkProtocol.ehlo = b"250-sink\r\n250 8BITMIME\r\n"

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(_SinkProtocol, "127.0.0.1", port)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def start_sink(pipelining: bool = True) -> tuple[subprocess.Popen[str], int]:
    from include.sandbox.net import free_port

    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.bench_delivery",
            "--sink",
            str(port),
            *([] if pipelining else ["--no-pipelining"]),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return process, port


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
DOMAINS = ("gmail.com", "yahoo.fr", "orange.fr", "outlook.com", "example.org")


def fill_database(engine, config, count: int) -> None:
    from include.database.schema import deliveries, events_table, recipients
    from include.database.sql import bulk_write
    from include.operations.database import upgrade_database

    upgrade_database(engine, config.dimensions)
    table = events_table(config.dimensions)
    now = time.time()
    events = []
    for i in range(100):
        payload = {
            "triggerId": "3e8a2ba7-fccc-49bb-bdac-33ee33cf02bf",
            "timeGMT": 1767225201,
            "mcId": f"mc{i}",
            "enrichments": {
                "analyticsHitSummary": {
                    "dimensions": {
                        "eVar01": {
                            "type": "string",
                            "data": [f"SHOP-{i}"],
                            "name": "eVar01",
                            "source": "session summary",
                        },
                        "products": {
                            "type": "string",
                            "data": ["SKU-1042", f"SKU-{i}"],
                            "name": "products",
                            "source": "session summary",
                        },
                        "pageName": {
                            "type": "string",
                            "data": ["checkout:cart"],
                            "name": "pageName",
                            "source": "session summary",
                        },
                    }
                }
            },
        }
        events.append(
            (
                f"e{i}",
                str(i),
                "bench",
                payload["triggerId"],
                1767225201.0,
                now,
                "matched",
                json.dumps(payload),
            )
        )
    with engine.begin() as conn:
        bulk_write(
            conn,
            table,
            [
                "event_id",
                "position",
                "consumer",
                "trigger_id",
                "time_gmt",
                "received_at",
                "status",
                "payload",
            ],
            events,
        )
        for start in range(0, count, 20_000):
            chunk = range(start, min(count, start + 20_000))
            bulk_write(
                conn,
                recipients,
                ["recipient_id", "email", "first_name", "last_name", "locale", "shopper_id", "opted_out"],
                [
                    (
                        f"r{i}",
                        f"user{i}@{DOMAINS[i % len(DOMAINS)]}",
                        "Camille",
                        "Martin",
                        "fr_FR" if i % 2 else "en_US",
                        f"SHOP-{i}",
                        False,
                    )
                    for i in chunk
                ],
            )
            bulk_write(
                conn,
                deliveries,
                [
                    "delivery_id",
                    "campaign_id",
                    "recipient_id",
                    "email",
                    "event_id",
                    "event_time",
                    "decided_at",
                    "status",
                    "attempts",
                ],
                [
                    (
                        f"d{i:07d}",
                        "cart_abandonment",
                        f"r{i}",
                        f"user{i}@{DOMAINS[i % len(DOMAINS)]}",
                        f"e{i % 100}",
                        1767225201.0,
                        now,
                        "pending",
                        0,
                    )
                    for i in chunk
                ],
            )


def load_suppressions(engine, count: int) -> float:
    """``count`` suppressed addresses, none of them a recipient's (every reason, every campaign);
    returns the seconds the import took (add_many: COPY on PostgreSQL)."""
    from include.suppressions.store import REASONS, Suppression, add_many

    clear_suppressions(engine)
    started = time.perf_counter()
    for start in range(0, count, 200_000):
        part = [
            Suppression(f"gone{i}@{DOMAINS[i % len(DOMAINS)]}", REASONS[i % len(REASONS)], source="bench")
            for i in range(start, min(count, start + 200_000))
        ]
        with engine.begin() as conn:
            add_many(conn, part)
    took = time.perf_counter() - started
    settle(engine)
    return took


def clear_suppressions(engine) -> None:
    from sqlalchemy import text

    with engine.begin() as conn:
        conn.execute(text("DELETE FROM suppressions"))
    settle(engine)


def settle(engine) -> None:
    """After a million-row write: SQLite's write-ahead log folded in, PostgreSQL's statistics
    fresh, so that the timed run does not pay for the load."""
    from sqlalchemy import text

    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        else:
            conn.execute(text("ANALYZE suppressions"))


def reset_deliveries(engine) -> None:
    from sqlalchemy import text

    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE deliveries SET status = 'pending', attempts = 0, claimed_at = NULL, claimed_by = NULL, "
                "sent_at = NULL, smtp_reply = NULL, reason = NULL"
            )
        )


def pre_render(config, count: int):
    from include.delivery.render import Renderer, event_context, unsubscribe_url_for
    from include.staging.parser import dimension_values

    renderer = Renderer(ROOT / "include" / "templates")
    campaign = config.campaigns[0]
    dimensions = {"products": ["SKU-1042", "SKU-7"], "eVar01": ["SHOP-7"], "pageName": ["checkout:cart"]}
    assert dimension_values  # the delivery path parses each payload; the plain path is given them
    started = time.perf_counter()
    messages = []
    for i in range(count):
        recipient = {
            "recipient_id": f"r{i}",
            "email": f"user{i}@{DOMAINS[i % len(DOMAINS)]}",
            "first_name": "Camille",
            "last_name": "Martin",
            "locale": "fr_FR" if i % 2 else "en_US",
        }
        event = event_context("3e8a2ba7", 1767225201.0, dimensions)
        messages.append(
            renderer.render_bytes(
                campaign, recipient, event, f"d{i:07d}", unsubscribe_url_for(f"d{i:07d}", campaign.id)
            )
        )
    return messages, count / (time.perf_counter() - started)


def plain_smtplib(port: int, messages, connections: int = 1) -> float:
    def send(part) -> None:
        client = smtplib.SMTP("127.0.0.1", port)
        for message in part:
            client.sendmail(message.envelope_from, [message.envelope_to], message.data)
        client.quit()

    parts = [messages[i::connections] for i in range(connections)]
    started = time.perf_counter()
    threads = [threading.Thread(target=send, args=(part,)) for part in parts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(messages) / (time.perf_counter() - started)


def delivery_path(
    engine, config, port: int, count: int, connections: int, window: int | None = None
) -> float:
    from include.delivery.options import DeliveryOptions
    from include.delivery.run import deliver_pending
    from include.delivery.smtp import SmtpSettings

    # what PipeliningSmtpHook reads from {"disable_ssl": true, "disable_tls": true}, built here so
    # that Airflow (a large heap for the garbage collector) stays out of the measured process
    smtp = SmtpSettings(host="127.0.0.1", port=port, use_ssl=False, starttls=False)
    reset_deliveries(engine)
    options = DeliveryOptions(
        templates_dir=ROOT / "include" / "templates",
        worker_id="bench",
        connections=connections,
        batch_size=1000,
        **({} if window is None else {"window": window}),
    )
    started = time.perf_counter()
    counts = deliver_pending(engine, config, smtp, options)
    elapsed = time.perf_counter() - started
    assert counts.get("sent") == count, counts
    return count / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--db", default=None, help="database URL (default: a new SQLite file)")
    parser.add_argument("--connections", default="1,2,4", help="connection counts to time, comma-separated")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the table shows medians")
    parser.add_argument("--window1", action="store_true", help="also time 1 connection with window=1")
    parser.add_argument(
        "--suppressions",
        type=int,
        default=0,
        help="also time 1 connection with this many suppressed addresses loaded, and right after without",
    )
    parser.add_argument(
        "--no-pipelining", action="store_true", help="the sink does not offer PIPELINING (RFC 2920)"
    )
    parser.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        run_sink(args.sink, not args.no_pipelining)
        return 0
    os.environ.setdefault("TRIGGERS_TEMPLATES", str(ROOT / "include" / "templates"))
    from include.config import load_config
    from include.database.engine import make_engine
    from include.delivery.render_pool import default_render_processes

    config = load_config(ROOT / "include" / "triggers.yaml", ROOT / "include" / "templates")
    config = config.model_copy(
        update={"limits": config.limits.model_copy(update={"rate": None})}
    )  # measure, not throttle
    count = args.messages
    counts = [int(c) for c in args.connections.split(",")]
    tmp = tempfile.TemporaryDirectory()
    engine = make_engine(args.db or f"sqlite:///{tmp.name}/bench.db")
    print(
        f"{count:,} messages, database {engine.dialect.name}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}, sink in its own process, {default_render_processes()} render process(es)",
        flush=True,
    )
    fill_database(engine, config, count)
    sink, port = start_sink(not args.no_pipelining)
    plain: dict[int, list[float]] = {n: [] for n in counts}
    path: dict[int, list[float]] = {n: [] for n in counts}
    ratio: dict[int, list[float]] = {n: [] for n in counts}  # deliver_pending on n / plain on 1, same round
    window1: list[float] = []
    suppressed: dict[str, list[float]] = {"with": [], "without": []}
    try:
        messages, render_rate = pre_render(config, count)
        size = statistics.median(len(m.data) for m in messages[:1000])
        print(
            f"render only (Renderer.render_bytes, 1 process): {render_rate:,.0f} messages/s (median message {size:,.0f} bytes)",
            flush=True,
        )
        for round_ in range(1, args.repeat + 1):
            one = plain_smtplib(port, messages, 1)
            for n in counts:  # plain and the path in turn, so both see the same machine load
                plain[n].append(one if n == 1 else plain_smtplib(port, messages, n))
                path[n].append(delivery_path(engine, config, port, count, n))
                ratio[n].append(path[n][-1] / one)
                print(
                    f"round {round_}: {n} connection(s): plain smtplib {plain[n][-1]:8,.0f}/s, deliver_pending "
                    f"{path[n][-1]:8,.0f}/s, ratio to plain on 1 connection {ratio[n][-1]:.2f}",
                    flush=True,
                )
            if args.window1:
                window1.append(delivery_path(engine, config, port, count, 1, 1) / one)
                print(f"round {round_}: 1 connection, window=1: ratio {window1[-1]:.2f}", flush=True)
            if args.suppressions:  # with then without, then the other way round: both see the same load
                if round_ % 2 == 0:
                    suppressed["without"].append(delivery_path(engine, config, port, count, 1))
                took = load_suppressions(engine, args.suppressions)
                suppressed["with"].append(delivery_path(engine, config, port, count, 1))
                clear_suppressions(engine)
                if round_ % 2 == 1:
                    suppressed["without"].append(delivery_path(engine, config, port, count, 1))
                print(
                    f"round {round_}: 1 connection, {args.suppressions:,} suppressions (loaded in {took:.1f} s): "
                    f"{suppressed['with'][-1]:,.0f}/s, without: {suppressed['without'][-1]:,.0f}/s",
                    flush=True,
                )
    finally:
        sink.terminate()
        sink.wait()
        engine.dispose()
        tmp.cleanup()
    med = statistics.median
    print(
        f"\nmedians of {args.repeat} round(s), {count:,} messages, {engine.dialect.name}; ratios are taken within each round"
    )
    print(
        f"{'connections':>11} | {'plain smtplib msg/s':>19} | {'deliver_pending msg/s':>21} | {'deliver / plain on 1 conn':>25} | {'deliver / plain, same conns':>27}"
    )
    print("-" * 11 + "-+-" + "-" * 19 + "-+-" + "-" * 21 + "-+-" + "-" * 25 + "-+-" + "-" * 27)
    for n in counts:
        same = med([p / q for p, q in zip(path[n], plain[n], strict=True)])
        print(
            f"{n:>11} | {med(plain[n]):>19,.0f} | {med(path[n]):>21,.0f} | {med(ratio[n]):>25.2f} | {same:>27.2f}"
        )
    if window1:
        print(
            f"1 connection, window=1 (a commit before each next message): {med(window1):.2f} of plain on 1 connection"
        )
    if args.suppressions:
        change = med([w / o for w, o in zip(suppressed["with"], suppressed["without"], strict=True)])
        print(
            f"1 connection with {args.suppressions:,} suppressions: {med(suppressed['with']):,.0f} msg/s, without: "
            f"{med(suppressed['without']):,.0f} msg/s (with / without, same round: {change:.2f})"
        )
    print("goal (issue 4): deliver_pending on 1 connection >= 0.80 of plain smtplib on 1 connection")
    return 0


if __name__ == "__main__":
    sys.exit(main())
