"""Real processes for multi-node and fault tests: relay nodes and agents.

``Cluster`` spawns ``relay serve`` and ``relay-agent run`` as subprocesses
(same interpreter, see ``helpers.spawn``), drains their output on a thread so a
chatty process never blocks on a full pipe, and kills every one of them when
the test ends, whatever happened.  ``Stopwatch`` prints the recovery times the
fault tests measure (run pytest with ``-s`` to see them); nothing asserts on them.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import httpx

from tests.helpers import Spawned, Stopwatch, free_port, instance_view, spawn

__all__ = ["FAST_RELAY_ENV", "Cluster", "Proc", "Stopwatch", "chat_body", "register", "status", "wait_ready"]

#: Relay settings for every spawned node: heartbeats every 0.2 s, an agent or
#: node silent for 1 s is dead.  Tests override single values as they need.
FAST_RELAY_ENV = {
    "RELAY_HEARTBEAT_INTERVAL": "0.2",
    "RELAY_HEARTBEAT_TIMEOUT": "1",
    "RELAY_FIRST_CHUNK_TIMEOUT": "5",
    "RELAY_IDLE_TIMEOUT": "5",
    "RELAY_STALL_TIMEOUT": "5",
    "RELAY_DRAIN_TIMEOUT": "10",
    "RELAY_REDIS_TIMEOUT": "1",
    "RELAY_LOG_LEVEL": "info",
    # These tests send bursts from one client: the abuse limits (tested on
    # their own) would turn some answers into 429s.
    "RELAY_RATE_PER_CALLER": "0",
    "RELAY_RATE_PER_INSTANCE": "0",
    "RELAY_MAX_STREAMS_PER_CALLER": "0",
    "RELAY_MAX_STREAMS_PER_INSTANCE": "0",
}


Proc = Spawned  # one subprocess and everything it printed so far


class Cluster:
    """Spawn relay nodes and agents; ``close()`` kills whatever still runs."""

    def __init__(self, redis_url: str):
        self.redis_url = redis_url
        self.procs: list[Proc] = []

    def relay(self, name: str = "relay", port: int | None = None, **env: str) -> Proc:
        port = port or free_port()
        full_env = {**FAST_RELAY_ENV, "REDIS_URL": self.redis_url, **env}
        proc = Proc(name, spawn(["relay.server.cli", "serve", "--port", str(port)], env=full_env),
                    f"http://127.0.0.1:{port}")
        self.procs.append(proc)
        return proc

    async def nodes(self, *names: str, **env: str) -> list[Proc]:
        """Relay nodes, one per name, all ready."""
        nodes = [self.relay(name, **env) for name in names]
        await wait_ready(*nodes)
        return nodes

    def agent(self, relay_urls: str, token: str, *args: str, name: str = "agent", **env: str) -> Proc:
        full_env = {"AGENT_MAX_BACKOFF": "1", "AGENT_CREDENTIALS": os.devnull, **env}
        proc = Proc(name, spawn(["agent.cli", "run", "--relay-url", relay_urls, "--token", token, *args],
                                env=full_env))
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            try:
                proc.kill()
            except Exception:  # already gone, or stuck: keep killing the others
                pass

    async def __aenter__(self) -> Cluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        if exc[0] is not None:
            # The processes' own words are the best clue to a failure.
            for proc in self.procs:
                print(f"----- {proc.name} (pid {proc.pid}, rc {proc.popen.returncode}) -----\n{proc.output}")


# -- talking to nodes -------------------------------------------------------------


async def wait_ready(*nodes: Proc, timeout: float = 30.0) -> None:
    """Wait until every node answers ``/readyz`` with 200."""
    async with httpx.AsyncClient(timeout=2) as client:
        for node in nodes:
            deadline = time.monotonic() + timeout
            while True:
                if node.popen.poll() is not None:
                    raise AssertionError(f"{node.name} exited ({node.popen.returncode}):\n{node.output}")
                try:
                    if (await client.get(node.url + "/readyz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"{node.name} not ready within {timeout}s:\n{node.output}")
                await asyncio.sleep(0.05)


async def register(url: str, name: str = "test") -> tuple[str, str]:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(url + "/api/instances", json={"name": name})
        response.raise_for_status()
        data = response.json()
    return data["instance_id"], data["agent_token"]


status = instance_view  # GET /api/instances/{id} at a node


def chat_body(text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], **extra}
