"""A TCP delay line: a relay that seems far away, in front of a local server (tests, benches).

Each byte arrives ``delay`` seconds after it was sent, in each direction (25 ms each way: a 50 ms
round trip), in order, with no bandwidth cap, on as many connections as are opened; an end of
stream or a close on one side reaches the other ``delay`` later. ::

    python -m include.sandbox.delayline --target 127.0.0.1:8025 --delay 0.025 [--port 9025]

prints ``listening on 127.0.0.1:PORT`` and forwards until interrupted. From Python,
``DelayLine(target_port, delay).start()`` runs it in a thread of its own (``.port``, ``.stop()``).

Cheap on CPU: one asyncio loop, protocols rather than streams, and per direction one timer at a
time over a queue of chunks (a timer per chunk would cost a heap entry each and could reorder
chunks due at the same instant).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import threading
from typing import Any

_EOF = b""  # queued after the last chunk: the other side's write end closes then


class _Direction:
    """One way of one connection: chunks queued with the time they are due at ``sink``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self.loop = loop
        self.delay = delay
        self.sink: asyncio.Transport | None = None
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False

    def put(self, data: bytes) -> None:
        due = self.loop.time() + self.delay
        self.queue.append((due, data))
        if self.timer is None and self.sink is not None:
            self.timer = self.loop.call_at(due, self.flush)

    def attach(self, sink: asyncio.Transport) -> None:
        self.sink = sink
        if self.queue and self.timer is None:
            self.timer = self.loop.call_at(self.queue[0][0], self.flush)

    def flush(self) -> None:
        self.timer = None
        now, queue, sink = self.loop.time(), self.queue, self.sink
        if sink is None or self.closed:
            return
        ready = []
        while queue and queue[0][0] <= now:
            data = queue.popleft()[1]
            if data is _EOF or not data:
                if ready:
                    sink.write(b"".join(ready))
                self.closed = True
                if sink.can_write_eof():
                    sink.write_eof()
                else:
                    sink.close()
                return
            ready.append(data)
        if ready:
            sink.write(b"".join(ready))
        if queue:
            self.timer = self.loop.call_at(queue[0][0], self.flush)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _Upstream(asyncio.Protocol):
    """The line's connection to the target: what it reads goes back to the client, delayed."""

    def __init__(self, client: _Client) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client.upstream_made(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.client.back.put(data)

    def eof_received(self) -> bool:
        self.client.back.put(_EOF)
        return True  # keep our write end open: the client may still be sending

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.upstream_lost()


class _Client(asyncio.Protocol):
    """A connection accepted by the line; its bytes go to the target, delayed."""

    def __init__(self, line: DelayLine) -> None:
        self.line = line
        self.loop = line.loop
        assert self.loop is not None
        self.forth = _Direction(self.loop, line.delay)  # client -> target
        self.back = _Direction(self.loop, line.delay)  # target -> client
        self.transport: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.both_closed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.back.attach(self.transport)  # type: ignore[arg-type]
        self.line.connections += 1
        task = self.loop.create_task(
            self.loop.create_connection(lambda: _Upstream(self), self.line.target_host, self.line.target_port)
        )
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is not None:
            if self.transport is not None:
                self.transport.close()  # the target refused: so does the line

    def upstream_made(self, transport: asyncio.Transport) -> None:
        self.upstream = transport
        self.forth.attach(transport)

    def data_received(self, data: bytes) -> None:
        self.forth.put(data)

    def eof_received(self) -> bool:
        self.forth.put(_EOF)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        # the client is gone: whatever it sent still reaches the target, then the target's side closes
        self.forth.put(_EOF)
        self.back.cancel()
        self.back.closed = True
        self._later_close_upstream()

    def _later_close_upstream(self) -> None:
        self.loop.call_later(self.line.delay + 0.001, self._close_upstream)

    def _close_upstream(self) -> None:
        if self.upstream is not None and not self.forth.queue:
            self.upstream.close()
        elif self.upstream is not None:
            self.loop.call_later(self.line.delay, self._close_upstream)

    def upstream_lost(self) -> None:
        self.forth.cancel()
        self.forth.closed = True
        self.back.put(_EOF)
        self.loop.call_later(self.line.delay + 0.001, self._close_client)

    def _close_client(self) -> None:
        if self.transport is not None and not self.back.queue:
            self.transport.close()
        elif self.transport is not None:
            self.loop.call_later(self.line.delay, self._close_client)


class DelayLine:
    """The line, listening on ``host:port`` and forwarding to ``target_host:target_port``."""

    def __init__(
        self,
        target_port: int,
        delay: float,
        *,
        target_host: str = "127.0.0.1",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if delay < 0:
            raise ValueError("delay must be 0 or more seconds")
        self.target_host = target_host
        self.target_port = target_port
        self.delay = delay
        self.host = host
        self.port = port  # 0: the OS picks a free one when it listens (no race with other users)
        self.connections = 0  # accepted so far
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.error: OSError | None = None

    async def serve(self) -> None:
        """Listen until cancelled (in the caller's loop)."""
        self.loop = asyncio.get_running_loop()
        try:
            self._server = await self.loop.create_server(lambda: _Client(self), self.host, self.port)
        except OSError as error:
            self.error = error
            self._ready.set()
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        async with self._server:
            await self._server.serve_forever()

    def start(self) -> DelayLine:
        """Run in a daemon thread; returns once it listens."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name="delay-line", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self.error is not None:
            raise RuntimeError(
                f"the delay line did not start listening on {self.host}:{self.port}: {self.error}"
            )
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self.serve())
        except (asyncio.CancelledError, OSError):
            pass  # stopped, or could not listen (start() raises it)

    def stop(self) -> None:
        loop, server = self.loop, self._server
        if loop is not None and server is not None and self._thread is not None:
            loop.call_soon_threadsafe(server.close)
            for task in asyncio.all_tasks(loop):
                loop.call_soon_threadsafe(task.cancel)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> DelayLine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a TCP delay line in front of a local server")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay", type=float, default=0.025, help="seconds each way (default 0.025)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    line = DelayLine(int(port), args.delay, target_host=host or "127.0.0.1", host=args.host, port=args.port)

    async def serve() -> None:
        task = asyncio.ensure_future(line.serve())
        while not line._ready.is_set() and not task.done():
            await asyncio.sleep(0.01)
        print(f"listening on {line.host}:{line.port}", flush=True)
        await task

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
