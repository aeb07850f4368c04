"""Delivery through a relay 50 ms away: deliver_pending on 1, 2, 4 workers beside the ceiling.

    python -m bench.bench_far_relay [--messages 5000] [--db URL] [--workers 1,2,4] [--repeat 3]
                                    [--modes pipelining,chunking,plain] [--delay 0.025] [--profile]

The relay is the local SMTP server (aiosmtpd, :mod:`include.sandbox.smtp_server`) in its own
process, behind the delay line (:mod:`include.sandbox.delayline`, 25 ms each way) in another. For
each mode (the server offers PIPELINING; PIPELINING and CHUNKING; neither) and worker count, in the
same round: ``deliver_pending`` in N worker processes on one PostgreSQL database (each a claimer
of the same queue, its pool sized as it would be in production: far and no rate, the cap of 32
sessions), then the ceiling: as many sessions (32 x N) sending the messages rendered beforehand
with plain smtplib through the same line, with the best the server offers (the next message's
commands behind each body; BDAT with two messages in flight; one command at a time without
PIPELINING), no database, no rendering. Prints each round, a table of medians, and the CPU each
part used (workers, relay, line). ``--profile``: a sampling profile of the threads of one worker
(where they are, every 10 ms).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import smtplib
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SESSIONS = 32  # pool.DEFAULT_MAX_CONNECTIONS: far and no rate, a worker opens the cap
MODES = {
    "pipelining": ["--pipelining"],
    "chunking": ["--pipelining", "--chunking"],
    "plain": [],
}


# ---------------------------------------------------------------------------------------------
# The relay and the line, each in a process of its own
# ---------------------------------------------------------------------------------------------
def run_relay(port: int, pipelining: bool, chunking: bool) -> None:
    from include.sandbox.smtp_server import LocalSmtpServer

    server = LocalSmtpServer(port=port, pipelining=pipelining, chunking=chunking).start()
    print("ready", flush=True)
    while True:  # keep no history: a bench run sends hundreds of thousands of messages
        time.sleep(1)
        server.messages.clear()
        server.replies.clear()


def start(args: list[str], stdin: int | None = None) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        stdin=stdin,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith(("ready", "listening")), line
    process.first_line = line.strip()  # type: ignore[attr-defined]
    return process


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# A worker: deliver_pending in its own process, started on "go"
# ---------------------------------------------------------------------------------------------
def run_worker(url: str, port: int, name: str, profile: bool) -> None:
    os.environ.setdefault("TRIGGERS_TEMPLATES", str(ROOT / "include" / "templates"))
    from include.config import load_config
    from include.database.engine import make_engine
    from include.delivery.options import DeliveryOptions
    from include.delivery.run import deliver_pending
    from include.delivery.smtp import SmtpSettings

    config = load_config(ROOT / "include" / "triggers.yaml", ROOT / "include" / "templates")
    config = config.model_copy(update={"limits": config.limits.model_copy(update={"rate": None})})
    engine = make_engine(url)
    smtp = SmtpSettings(host="127.0.0.1", port=port, use_ssl=False, starttls=False)
    options = DeliveryOptions(
        templates_dir=ROOT / "include" / "templates", worker_id=name, connections=0, batch_size=500
    )
    print("ready", flush=True)
    sys.stdin.readline()
    sampler = Sampler() if profile else None
    started, cpu = time.perf_counter(), time.process_time()
    counts = deliver_pending(engine, config, smtp, options)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    report = {"counts": counts, "seconds": elapsed, "cpu": cpu}
    if sampler is not None:
        report["profile"] = sampler.stop()
    print(json.dumps(report), flush=True)


class Sampler:
    """Where each thread is, every 10 ms: the innermost frame of this project or of the standard
    library's socket, ssl, smtplib, threading, queue modules (a blocked thread shows where it waits)."""

    def __init__(self) -> None:
        self.seen: collections.Counter[str] = collections.Counter()
        self.running = True
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        me = threading.get_ident()
        while self.running:
            for ident, frame in sys._current_frames().items():
                if ident != me:
                    self.seen[self.place(frame)] += 1
            time.sleep(0.01)

    @staticmethod
    def place(frame: object) -> str:
        stack = traceback.extract_stack(frame)  # type: ignore[arg-type]
        inner = stack[-1]
        ours = next((f for f in reversed(stack) if "/include/" in f.filename), inner)
        return f"{Path(inner.filename).name}:{inner.name} <- {Path(ours.filename).name}:{ours.name}"

    def stop(self) -> list[tuple[str, int]]:
        self.running = False
        self.thread.join()
        return self.seen.most_common(12)


def deliver(url: str, port: int, workers: int, profile: bool = False) -> tuple[float, float, list[dict]]:
    """(messages/s, wall seconds, the workers' reports) of N workers run together."""
    processes = [
        start(
            [
                "-m",
                "bench.bench_far_relay",
                "--worker",
                url,
                str(port),
                f"w{i}",
                *(["--profile"] if profile and i == 0 else []),
            ],
            stdin=subprocess.PIPE,
        )
        for i in range(workers)
    ]
    started = time.perf_counter()
    for process in processes:  # every worker imported and connected to the database: go
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    reports = []
    for process in processes:
        out, _ = process.communicate(timeout=1800)
        assert process.returncode == 0, out
        reports.append(json.loads(out.strip().splitlines()[-1]))
    elapsed = time.perf_counter() - started
    sent = sum(r["counts"].get("sent", 0) for r in reports)
    return sent / elapsed, elapsed, reports


# ---------------------------------------------------------------------------------------------
# The ceiling: pre-rendered messages, plain smtplib, as many sessions, no database
# ---------------------------------------------------------------------------------------------
def ceiling(port: int, messages: list, sessions: int, mode: str) -> float:
    parts = [messages[i::sessions] for i in range(sessions)]
    send = {"pipelining": _chained, "chunking": _chunked, "plain": _one_at_a_time}[mode]
    threads = [threading.Thread(target=send, args=(port, part)) for part in parts if part]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(messages) / (time.perf_counter() - started)


def _commands(message) -> tuple[bytes, bytes, bytes]:
    """MAIL, RCPT and DATA as the product writes them (its envelope sender: the message's)."""
    from include.delivery.smtp import SmtpSession, SmtpSettings

    return SmtpSession(SmtpSettings(), None, lambda key: None).commands(message)


def _one_at_a_time(port: int, part: list) -> None:
    client = smtplib.SMTP("127.0.0.1", port)
    for message in part:
        client.sendmail(message.envelope_from, [message.envelope_to], message.data)
    client.quit()


def _chained(port: int, part: list) -> None:
    """One round trip a message: each body goes with the next message's MAIL, RCPT and DATA."""
    client = smtplib.SMTP("127.0.0.1", port)
    client.ehlo()
    from include.delivery.smtp import _dot_stuffed

    client.send(b"".join(_commands(part[0])))
    for i, message in enumerate(part):
        replies = [client.getreply() for _ in range(3)]
        assert [code for code, _ in replies] == [250, 250, 354], replies
        following = b"".join(_commands(part[i + 1])) if i + 1 < len(part) else b""
        client.send(_dot_stuffed(message.data) + following)
        assert client.getreply()[0] == 250
    client.quit()


def _chunked(port: int, part: list, window: int = 2) -> None:
    """BDAT: each message whole, ``window`` in flight, replies read in order."""
    from include.delivery.smtp import chunked_message

    client = smtplib.SMTP("127.0.0.1", port)
    client.ehlo()
    inflight = 0
    for message in part:
        if inflight == window:
            assert [client.getreply()[0] for _ in range(3)] == [250, 250, 250]
            inflight -= 1
        client.send(chunked_message(_commands(message), message.data))
        inflight += 1
    for _ in range(inflight):
        assert [client.getreply()[0] for _ in range(3)] == [250, 250, 250]
    client.quit()


# ---------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--db", default=None, help="PostgreSQL URL (default: a new database farrelay_bench)")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--modes", default="pipelining,chunking,plain")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--delay", type=float, default=0.025, help="seconds each way (default 0.025)")
    parser.add_argument("--profile", action="store_true", help="profile one worker's threads (last round)")
    parser.add_argument("--relay", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pipelining", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunking", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.relay:
        run_relay(args.relay, args.pipelining, args.chunking)
        return 0
    if args.worker:
        run_worker(args.worker[0], int(args.worker[1]), args.worker[2], args.profile)
        return 0
    return bench(args)


class Figures:
    """What the rounds measured, by (mode, workers): deliver_pending's rate, the ceiling's, the
    CPU (workers, relay, line); and the profiles taken."""

    def __init__(self) -> None:
        self.path: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
        self.plain: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
        self.cpu: dict[tuple[str, int], list[tuple[float, float, float]]] = collections.defaultdict(list)
        self.profiles: list[tuple[str, list]] = []


def bench(args: argparse.Namespace) -> int:
    os.environ.setdefault("TRIGGERS_TEMPLATES", str(ROOT / "include" / "templates"))
    from bench.bench_delivery import fill_database, pre_render
    from include.config import load_config

    config = load_config(ROOT / "include" / "triggers.yaml", ROOT / "include" / "templates")
    config = config.model_copy(update={"limits": config.limits.model_copy(update={"rate": None})})
    url, engine = _database(args.db)
    count, workers = args.messages, [int(n) for n in args.workers.split(",")]
    print(
        f"{count:,} messages, relay {2 * args.delay * 1000:.0f} ms away, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}, database {engine.dialect.name}",
        flush=True,
    )
    fill_database(engine, config, count)
    messages, _ = pre_render(config, count)
    figures = Figures()
    for mode in args.modes.split(","):
        _bench_mode(args, mode, url, engine, workers, messages, figures)
    engine.dispose()
    report(args, workers, figures)
    return 0


def _database(db: str | None):
    """The bench's database URL and engine: ``db``, else a new PostgreSQL database of its own."""
    from sqlalchemy import create_engine, text

    from include.database.engine import make_engine

    url = db or "postgresql://postgres@127.0.0.1:5432/farrelay_bench"
    if db is None:
        admin = create_engine(
            "postgresql+psycopg://postgres@127.0.0.1:5432/postgres", isolation_level="AUTOCOMMIT"
        )
        with admin.connect() as conn:
            conn.execute(text("DROP DATABASE IF EXISTS farrelay_bench"))
            conn.execute(text("CREATE DATABASE farrelay_bench"))
        admin.dispose()
    return url, make_engine(url)


def _bench_mode(
    args, mode: str, url: str, engine, workers: list[int], messages: list, figures: Figures
) -> None:
    """The rounds of one mode: its relay and delay line started, each worker count in turn."""
    from include.sandbox.net import free_port

    relay_port = free_port()
    relay = start(["-m", "bench.bench_far_relay", "--relay", str(relay_port), *MODES[mode]])
    line = start(
        ["-m", "include.sandbox.delayline", "--target", f"127.0.0.1:{relay_port}", "--delay", str(args.delay)]
    )
    port = int(line.first_line.rsplit(":", 1)[1])  # type: ignore[attr-defined]  # listening on HOST:PORT
    try:
        for round_ in range(1, args.repeat + 1):
            for n in workers:
                profile = args.profile and round_ == args.repeat and n == 1
                _round(round_, mode, n, url, port, engine, messages, (relay, line), profile, figures)
    finally:
        for process in (line, relay):
            process.terminate()
            process.wait()


def _round(round_, mode, n, url, port, engine, messages, processes, profile, figures: Figures) -> None:
    """deliver_pending on ``n`` workers, then the ceiling with as many plain sessions; printed."""
    from bench.bench_delivery import reset_deliveries

    relay, line = processes
    reset_deliveries(engine)
    before = (cpu_seconds(relay.pid), cpu_seconds(line.pid))
    rate, elapsed, reports = deliver(url, port, n, profile=profile)
    if profile:
        figures.profiles.append((mode, reports[0].get("profile") or []))
    used = (
        sum(r["cpu"] for r in reports) / elapsed,
        (cpu_seconds(relay.pid) - before[0]) / elapsed,
        (cpu_seconds(line.pid) - before[1]) / elapsed,
    )
    ceiling_rate = ceiling(port, messages, SESSIONS * n, mode)
    figures.path[mode, n].append(rate)
    figures.plain[mode, n].append(ceiling_rate)
    figures.cpu[mode, n].append(used)
    print(
        f"round {round_}: {mode:10} {n} worker(s): deliver_pending {rate:7,.0f}/s, ceiling "
        f"({SESSIONS * n} plain sessions) {ceiling_rate:7,.0f}/s, ratio {rate / ceiling_rate:.2f}; "
        f"CPU (cores) workers {used[0]:.2f}, relay {used[1]:.2f}, line {used[2]:.2f}",
        flush=True,
    )


GOAL_RATE, GOAL_RATIO = 278.0, 0.80  # issue 16: one worker, PIPELINING relay 50 ms away


def report(args, workers, figures: Figures) -> None:
    med = statistics.median
    path, plain, cpu = figures.path, figures.plain, figures.cpu
    print(
        f"\nmedians of {args.repeat} round(s), {args.messages:,} messages, relay {2 * args.delay * 1000:.0f} ms away"
    )
    print(
        f"{'mode':>10} | {'workers':>7} | {'deliver_pending msg/s':>21} | {'ceiling msg/s':>13} | {'ratio':>5} | CPU workers / relay / line"
    )
    for mode in args.modes.split(","):
        for n in workers:
            ratio = med([p / c for p, c in zip(path[mode, n], plain[mode, n], strict=True)])
            used = [med([c[i] for c in cpu[mode, n]]) for i in range(3)]
            print(
                f"{mode:>10} | {n:>7} | {med(path[mode, n]):>21,.0f} | {med(plain[mode, n]):>13,.0f} | {ratio:>5.2f} | "
                f"{used[0]:.2f} / {used[1]:.2f} / {used[2]:.2f}"
            )
    goal = f"goal (issue 16): one worker, PIPELINING relay 50 ms away: >= {GOAL_RATE:.0f} msg/s and >= {GOAL_RATIO:.2f} of the ceiling"
    if path.get(("pipelining", 1)) and args.delay == 0.025:
        rate = med(path["pipelining", 1])
        ratio = med([p / c for p, c in zip(path["pipelining", 1], plain["pipelining", 1], strict=True)])
        met = rate >= GOAL_RATE and ratio >= GOAL_RATIO
        print(f"{goal}: {'MET' if met else 'MISSED'} ({rate:,.0f} msg/s, {ratio:.2f} of the ceiling)")
    else:
        print(f"{goal}: not measured (needs --modes with pipelining, --workers with 1, --delay 0.025)")
    for mode, seen in figures.profiles:
        total = sum(n for _, n in seen) or 1
        print(f"\nwhere one worker's threads are ({mode}, samples every 10 ms, top 12):")
        for place, n in seen:
            print(f"  {100 * n / total:5.1f}%  {place}")


if __name__ == "__main__":
    sys.exit(main())
