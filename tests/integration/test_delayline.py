"""The TCP delay line (include/sandbox/delayline.py) in front of a local echo server: each byte
arrives ``delay`` later each way, in order, on many connections at once; a close goes through."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from include.sandbox.delayline import DelayLine

DELAY = 0.02


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture(scope="module")
def line() -> Iterator[DelayLine]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with DelayLine(server.server_address[1], DELAY) as delay_line:
        yield delay_line
    server.shutdown()
    server.server_close()


def receive(client: socket.socket, size: int) -> bytes:
    got = b""
    while len(got) < size:
        chunk = client.recv(65536)
        assert chunk, "closed early"
        got += chunk
    return got


def test_a_round_trip_takes_twice_the_delay(line: DelayLine) -> None:
    with socket.create_connection(("127.0.0.1", line.port)) as client:
        client.sendall(b"x")  # the line's connection to the server is open once this comes back
        receive(client, 1)
        started = time.perf_counter()
        client.sendall(b"ping")
        assert receive(client, 4) == b"ping"
        # the delay is a floor; how much later it comes depends on the machine's load
        assert 2 * DELAY <= time.perf_counter() - started


@settings(max_examples=20, deadline=None)
@given(chunks=st.lists(st.binary(min_size=1, max_size=5000), min_size=1, max_size=20))
def test_bytes_arrive_in_order_and_intact_whatever_the_chunks(line: DelayLine, chunks: list[bytes]) -> None:
    with socket.create_connection(("127.0.0.1", line.port)) as client:
        for chunk in chunks:
            client.sendall(chunk)
        assert receive(client, sum(map(len, chunks))) == b"".join(chunks)


def test_many_connections_at_once_each_get_their_own_bytes_back(line: DelayLine) -> None:
    results: dict[int, bytes] = {}

    def talk(i: int) -> None:
        with socket.create_connection(("127.0.0.1", line.port)) as client:
            payload = f"connection {i}|".encode() * 100
            client.sendall(payload)
            results[i] = receive(client, len(payload))

    started = time.perf_counter()
    threads = [threading.Thread(target=talk, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i: f"connection {i}|".encode() * 100 for i in range(50)}
    assert time.perf_counter() - started < 2.0  # concurrent, not one after the other (50 x 40 ms)


def test_a_close_on_one_side_reaches_the_other(line: DelayLine) -> None:
    with socket.create_connection(("127.0.0.1", line.port)) as client:
        client.sendall(b"last words")
        client.shutdown(socket.SHUT_WR)  # the echo server sees the end, closes, and so do we
        assert receive(client, 10) == b"last words"
        client.settimeout(2)
        assert client.recv(10) == b""
