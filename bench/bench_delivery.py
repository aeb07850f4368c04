"""Delivery throughput: deliver_pending (render + send + record) beside plain smtplib.

    python -m bench.bench_delivery [--messages 100000] [--db URL] [--connections 1,2,4,8]

Starts a minimal SMTP sink in its own process (so it does not share the client's GIL), fills a
database with N recipients and N pending deliveries, then times on the same sink, in one run:

* ``plain smtplib``: the N messages rendered beforehand, sent with ``SMTP.sendmail`` on one
  connection (and on several threads, to show where the sink saturates);
* ``deliver_pending``: the real path (select, eligibility re-check, render, claim, send, record
  each 250) on 1, 2, 4, 8 connections, and on 1 connection with ``window=1`` (a commit before
  each next message).

Prints messages/s and the ratio to plain smtplib on one connection.
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
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# The sink: just enough SMTP for smtplib, as fast as asyncio allows
# ---------------------------------------------------------------------------------------------
class _SinkProtocol(asyncio.Protocol):
    received = 0

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
                self.buffer = self.buffer[end + 5:]
                self.in_data = False
                _SinkProtocol.received += 1
                out.append(b"250 2.0.0 OK\r\n")
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                break
            line, self.buffer = self.buffer[:end], self.buffer[end + 2:]
            verb = line[:4].upper()
            if verb == b"EHLO":
                out.append(b"250-sink\r\n250 8BITMIME\r\n")
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


def run_sink(port: int) -> None:
    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(_SinkProtocol, "127.0.0.1", port)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def start_sink() -> tuple[subprocess.Popen[str], int]:
    from include.smtp_server import free_port

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_delivery", "--sink", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return process, port


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
DOMAINS = ("gmail.com", "yahoo.fr", "orange.fr", "outlook.com", "example.org")


def fill_database(engine, config, count: int) -> None:
    from include.db import bulk_write, deliveries, ensure_schema, recipients

    table = ensure_schema(engine, config.dimensions)
    now = time.time()
    events = []
    for i in range(100):
        payload = {"triggerId": "3e8a2ba7-fccc-49bb-bdac-33ee33cf02bf", "timeGMT": 1767225201, "mcId": f"mc{i}",
                   "enrichments": {"analyticsHitSummary": {"dimensions": {
                       "eVar01": {"type": "string", "data": [f"SHOP-{i}"], "name": "eVar01", "source": "session summary"},
                       "products": {"type": "string", "data": ["SKU-1042", f"SKU-{i}"], "name": "products", "source": "session summary"},
                       "pageName": {"type": "string", "data": ["checkout:cart"], "name": "pageName", "source": "session summary"}}}}}
        events.append((f"e{i}", str(i), "bench", payload["triggerId"], 1767225201.0, now, "matched", json.dumps(payload)))
    with engine.begin() as conn:
        bulk_write(conn, table, ["event_id", "position", "consumer", "trigger_id", "time_gmt", "received_at", "status", "payload"], events)
        for start in range(0, count, 20_000):
            chunk = range(start, min(count, start + 20_000))
            bulk_write(conn, recipients, ["recipient_id", "email", "first_name", "last_name", "locale", "shopper_id", "opted_out"],
                       [(f"r{i}", f"user{i}@{DOMAINS[i % len(DOMAINS)]}", "Camille", "Martin", "fr_FR" if i % 2 else "en_US", f"SHOP-{i}", False) for i in chunk])
            bulk_write(conn, deliveries, ["delivery_id", "campaign_id", "recipient_id", "email", "event_id", "event_time", "decided_at", "status", "attempts"],
                       [(f"d{i:07d}", "cart_abandonment", f"r{i}", f"user{i}@{DOMAINS[i % len(DOMAINS)]}", f"e{i % 100}", 1767225201.0, now, "pending", 0) for i in chunk])


def reset_deliveries(engine) -> None:
    from sqlalchemy import text

    with engine.begin() as conn:
        conn.execute(text("UPDATE deliveries SET status = 'pending', attempts = 0, claimed_at = NULL, claimed_by = NULL, "
                          "sent_at = NULL, smtp_reply = NULL, reason = NULL"))


def pre_render(config, count: int):
    from include.events import dimension_values
    from include.render import Renderer, event_context, unsubscribe_url_for

    renderer = Renderer(ROOT / "include" / "templates")
    campaign = config.campaigns[0]
    dimensions = {"products": ["SKU-1042", "SKU-7"], "eVar01": ["SHOP-7"], "pageName": ["checkout:cart"]}
    assert dimension_values  # the delivery path parses each payload; the plain path is given them
    started = time.perf_counter()
    messages = []
    for i in range(count):
        recipient = {"recipient_id": f"r{i}", "email": f"user{i}@{DOMAINS[i % len(DOMAINS)]}", "first_name": "Camille",
                     "last_name": "Martin", "locale": "fr_FR" if i % 2 else "en_US"}
        event = event_context("3e8a2ba7", 1767225201.0, dimensions)
        messages.append(renderer.render_bytes(campaign, recipient, event, f"d{i:07d}", unsubscribe_url_for(f"d{i:07d}", campaign.id)))
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


def delivery_path(engine, config, port: int, count: int, connections: int, window: int) -> float:
    from include.delivery import SmtpSettings, deliver_pending

    smtp = SmtpSettings.from_connection(SimpleNamespace(
        host="127.0.0.1", port=port, login=None, password=None, extra_dejson={"disable_ssl": True, "disable_tls": True}))
    reset_deliveries(engine)
    started = time.perf_counter()
    counts = deliver_pending(engine, config, smtp, templates_dir=ROOT / "include" / "templates", worker_id="bench",
                             connections=connections, window=window, batch_size=1000)
    elapsed = time.perf_counter() - started
    assert counts.get("sent") == count, counts
    return count / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--db", default=None, help="database URL (default: a new SQLite file)")
    parser.add_argument("--connections", default="1,2,4,8")
    parser.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        run_sink(args.sink)
        return 0
    os.environ.setdefault("TRIGGERS_TEMPLATES", str(ROOT / "include" / "templates"))
    from include.config import load_config
    from include.db import make_engine

    config = load_config(ROOT / "include" / "triggers.yaml", ROOT / "include" / "templates")
    config = config.model_copy(update={"limits": config.limits.model_copy(update={"rate": None})})  # measure, not throttle
    count = args.messages
    tmp = tempfile.TemporaryDirectory()
    engine = make_engine(args.db or f"sqlite:///{tmp.name}/bench.db")
    print(f"{count:,} messages, database {engine.dialect.name}, {os.cpu_count()} cores, sink in its own process")
    fill_database(engine, config, count)
    sink, port = start_sink()
    try:
        messages, render_rate = pre_render(config, count)
        size = statistics.median(len(m.data) for m in messages[:1000])
        print(f"render only (Renderer.render_bytes): {render_rate:9,.0f} messages/s  (median message {size:,.0f} bytes)")
        plain = plain_smtplib(port, messages)
        print(f"plain smtplib, 1 connection:         {plain:9,.0f} messages/s  (1.00)")
        for n in (2, 4):
            rate = plain_smtplib(port, messages, n)
            print(f"plain smtplib, {n} connections:        {rate:9,.0f} messages/s  ({rate / plain:.2f})")
        del messages
        rate = delivery_path(engine, config, port, count, 1, 1)
        print(f"deliver_pending, 1 connection, window=1 (commit before next): {rate:9,.0f} messages/s  ({rate / plain:.2f})")
        for n in (int(c) for c in args.connections.split(",")):
            rate = delivery_path(engine, config, port, count, n, 8)
            print(f"deliver_pending, {n} connection(s), window=8: {rate:9,.0f} messages/s  ({rate / plain:.2f})")
    finally:
        sink.terminate()
        sink.wait()
        engine.dispose()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
