"""Thousands of idle agents in one process: real websockets, real handshake, real heartbeats.

Each connection does what ``relay-agent`` does minus the model: connects to
``/api/agent/connect`` with its ``Authorization: Bearer`` token, sends the
protocol's ``hello``, waits for ``welcome``, then sends a ``ping`` every
``heartbeat_interval`` seconds (the interval the relay announced; the first
one at a random phase so they do not all fire together) and reads the
``pong`` answers.  It uses the websockets library and :mod:`wire` (the protocol package)
directly, so one process can hold ten thousand of them.

Driven over stdin/stdout by the benchmark runner, one JSON object per line::

    {"cmd": "grow", "to": 1000}   -> {"event": "grown", "connected": 1000, "failed": 0, "seconds": 3.2}
    {"cmd": "stats"}             -> {"event": "stats", "connected": ..., "pings": ..., "pongs": ..., "closed": ...}
    {"cmd": "stop"}              -> closes every connection, {"event": "stopped"}, exits

Usage: ``python -m bench.agents --url ws://127.0.0.1:PORT/api/agent/connect --tokens FILE``
(one agent token per line; agent ``i`` uses token ``i``).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
import uuid

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import wire
from bench.loadgen import check_loopback


class IdleAgents:
    def __init__(self, url: str, tokens: list[str], *, handshake_concurrency: int = 64):
        host = url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]
        check_loopback(host)
        self.url = url
        self.tokens = tokens
        self.sem = asyncio.Semaphore(handshake_concurrency)
        self.conns: set[ClientConnection] = set()
        self.next_index = 0
        self.tasks: list[asyncio.Task] = []
        self.failed = 0
        self.closed = 0
        self.pings = 0
        self.pongs = 0
        self.errors: list[str] = []

    async def _connect(self, token: str) -> ClientConnection | None:
        async with self.sem:
            try:
                ws = await connect(
                    self.url,
                    additional_headers={"Authorization": f"Bearer {token}"},
                    compression=None,
                    ping_interval=None,
                    open_timeout=30,
                    close_timeout=2,
                    max_size=None,
                )
                hello = wire.Hello(wire.PROTOCOL_VERSION, "bench-idle", uuid.uuid4().hex, ("bench",), 1)
                await ws.send(wire.encode(hello))
                welcome = wire.decode(await asyncio.wait_for(ws.recv(), 30))
                if type(welcome) is not wire.Welcome:
                    raise wire.ProtocolError(f"expected welcome, got {type(welcome).__name__}")
            except (OSError, TimeoutError, ConnectionClosed, InvalidStatus, wire.ProtocolError) as exc:
                self.failed += 1
                if len(self.errors) < 5:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                return None
        self.tasks.append(asyncio.create_task(self._live(ws, welcome.heartbeat_interval)))
        return ws

    async def _live(self, ws: ClientConnection, interval: float) -> None:
        async def heartbeat() -> None:
            await asyncio.sleep(random.uniform(0, interval))
            while True:
                await ws.send(wire.encode(wire.Ping(time.time())))
                self.pings += 1
                await asyncio.sleep(interval)

        beat = asyncio.create_task(heartbeat())
        try:
            async for message in ws:
                if type(wire.decode(message)) is wire.Pong:
                    self.pongs += 1
        except (ConnectionClosed, wire.ProtocolError):
            pass
        finally:
            beat.cancel()
            if ws in self.conns:
                self.closed += 1
                self.conns.discard(ws)

    async def grow(self, to: int) -> dict:
        t0 = time.perf_counter()
        start, target = self.next_index, min(to, len(self.tokens))
        self.next_index = max(start, target)
        results = await asyncio.gather(*(self._connect(self.tokens[i]) for i in range(start, target)))
        self.conns.update(ws for ws in results if ws is not None)
        return {"event": "grown", "connected": len(self.conns), "failed": self.failed,
                "seconds": round(time.perf_counter() - t0, 3), "errors": self.errors[:5]}

    def stats(self) -> dict:
        return {"event": "stats", "connected": len(self.conns), "failed": self.failed, "closed": self.closed,
                "pings": self.pings, "pongs": self.pongs}

    async def stop(self) -> None:
        conns, self.conns = list(self.conns), set()
        await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _drive(url: str, tokens: list[str]) -> None:
    agents = IdleAgents(url, tokens)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(obj: dict) -> None:
        sys.stdout.write(orjson.dumps(obj).decode() + "\n")
        sys.stdout.flush()

    try:
        while line := await reader.readline():
            cmd = orjson.loads(line)
            if cmd["cmd"] == "grow":
                say(await agents.grow(int(cmd["to"])))
            elif cmd["cmd"] == "stats":
                say(agents.stats())
            elif cmd["cmd"] == "stop":
                break
    finally:
        await agents.stop()
        say({"event": "stopped"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.agents")
    parser.add_argument("--url", required=True, help="ws://127.0.0.1:PORT/api/agent/connect")
    parser.add_argument("--tokens", required=True, help="file with one agent token per line")
    args = parser.parse_args(argv)
    with open(args.tokens) as f:
        tokens = [line.strip() for line in f if line.strip()]
    from bench._loop import run

    run(_drive(args.url, tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
