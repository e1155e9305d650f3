"""What the bound tests share: a relay node as its own process, and its memory measured.

A bound is only shown by pushing past it while watching the node: each test
in ``test_bounds_*.py`` starts ``relay serve`` as a real process (so its
resident memory is the node's alone, not the test's), does what a hostile
caller or agent would, and asserts that the node's peak RSS grew by less than
a stated amount while it happened.  Memory is read from ``/proc`` (Linux, as
on every machine the suite runs on).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.helpers import Spawned, free_port, register_at, spawn, until_healthy

#: A deadline for what must happen (never a bound on how fast): machines are shared.
DEADLINE = 30.0
MiB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    """The resident set size of process ``pid`` now."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class RssWatch:
    """The peak RSS of a process while a block runs, sampled every 20 ms, against its RSS before.

    ``growth`` is peak minus baseline: what the block made the process hold at
    its worst, which is what a bound promises (CPython seldom gives memory
    back, so the level after the block says little).
    """

    def __init__(self, pid: int):
        self.pid = pid
        self.baseline = rss_bytes(pid)
        self.peak = self.baseline
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes(self.pid))
            await asyncio.sleep(0.02)

    async def __aenter__(self) -> RssWatch:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.peak = max(self.peak, rss_bytes(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def assert_within(self, limit: int, what: str) -> None:
        print(f"\n[rss] {what}: baseline {self.baseline / MiB:.1f} MiB, peak {self.peak / MiB:.1f} MiB, "
              f"growth {self.growth / MiB:.1f} MiB (bound {limit / MiB:.0f} MiB)")
        assert self.growth < limit, (f"{what}: the node's RSS grew {self.growth / MiB:.1f} MiB "
                                     f"(from {self.baseline / MiB:.1f} MiB), over the {limit / MiB:.0f} MiB bound")


@dataclass
class Node:
    """A ``relay serve`` process: its URL, and its output for log assertions."""

    url: str
    port: int
    proc: Spawned

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self, **kwargs: object) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=kwargs.pop("timeout", 30), **kwargs)  # type: ignore[arg-type]

    def watch(self) -> RssWatch:
        return RssWatch(self.pid)

    async def register(self, name: str = "bounds") -> tuple[str, str]:
        return await register_at(self.url, name)


@contextlib.asynccontextmanager
async def relay_process(redis_url: str, **env: str) -> AsyncIterator[Node]:
    """``relay serve`` on ``redis_url`` as its own process, with ``RELAY_*`` overrides in ``env``.

    Short heartbeats (so raw test agents are dropped quickly) and abuse limits
    that a test does not name are left at their defaults: what is measured is
    the node as an operator runs it.
    """
    port = free_port()
    full_env = {"RELAY_HEARTBEAT_INTERVAL": "0.5", "RELAY_HEARTBEAT_TIMEOUT": "3", "RELAY_LOG_LEVEL": "info",
                "RELAY_REDIS_URL": redis_url, **env}
    proc = Spawned(f"relay:{port}", spawn(["relay.server.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                                          env=full_env))
    node = Node(f"http://127.0.0.1:{port}", port, proc)

    try:
        await until_healthy(proc, node.url, "/readyz", DEADLINE)
        yield node
    finally:
        proc.stop(signal.SIGTERM, timeout=10)
