"""The console scripts as real processes: ``relay serve`` and ``relay-agent run``.

Nothing in-process here: the relay, its embedded redis-server and the agent
run as the user runs them, and are killed for real.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from relay.store.embedded import safe_url
from tests.helpers import (
    Spawned,
    free_port,
    frozen,
    instance_view,
    offline,
    online,
    spawn,
    until_healthy,
    wait_until,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

HEARTBEAT_TIMEOUT = 1.0
#: A deadline for what must happen (never a bound on how fast): generous, machines are shared.
DEADLINE = 30.0
FAST = {"RELAY_HEARTBEAT_INTERVAL": "0.2", "RELAY_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
        "RELAY_LOG_LEVEL": "info"}


def Proc(args: list[str], env: dict[str, str]) -> Spawned:
    """Spawn one of our console scripts (``module``, args...) with its output collected."""
    return Spawned(" ".join(args), spawn(args, env=env))


def redis_servers_using(path: Path) -> list[int]:
    """Pids of redis-server processes whose command line mentions ``path``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((line for line in (entry / "status").read_text().splitlines()
                          if line.startswith("State:")), "")
        except OSError:
            continue
        if "redis-server" in cmdline and str(path) in cmdline and "zombie" not in state:
            pids.append(int(entry.name))
    return pids


async def start_relay(port: int, env: dict[str, str], *extra: str) -> Proc:
    relay = Proc(["relay.server.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *extra], env)
    try:
        await until_healthy(relay, f"http://127.0.0.1:{port}", timeout=DEADLINE)
    except BaseException:
        relay.stop(signal.SIGKILL)
        raise
    return relay


async def test_agent_registers_goes_online_and_offline_when_killed(redis_url, tmp_path):
    port = free_port()
    relay_url = f"http://127.0.0.1:{port}"
    creds_path = tmp_path / "config" / "agent.json"
    agent_env = {**FAST, "AGENT_CREDENTIALS": str(creds_path), "AGENT_DEMO_RATE": "0", "AGENT_TOKEN": ""}
    procs: list[Proc] = []
    try:
        relay = await start_relay(port, {**FAST, "REDIS_URL": redis_url})
        procs.append(relay)
        # The app names the Redis it uses (its output is read by a thread: wait for the line).
        await relay.wait_for_line("using redis " + re.escape(safe_url(redis_url)))
        assert "embedded redis-server" not in relay.output

        # First run, no token: the agent registers itself and says where to chat.
        agent = Proc(["agent.cli", "run", "--relay-url", relay_url, "--backend", "demo"], agent_env)
        procs.append(agent)
        registered = await agent.wait_for_line(r"registered instance ([0-9a-f]+)")
        instance_id = registered.group(1)
        chat_url = (await agent.wait_for_line(r"chat URL: (\S+)")).group(1)
        assert chat_url == f"{relay_url}/api/chat/{instance_id}"
        await agent.wait_for_line(r"connected to .* as instance " + instance_id)

        # Credentials: 0600, keyed by relay URL, holding the token.
        assert stat.S_IMODE(os.stat(creds_path).st_mode) == 0o600
        saved = json.loads(creds_path.read_text())[relay_url]
        assert saved["instance_id"] == instance_id
        assert saved["agent_token"].startswith("ira_")
        assert saved["agent_token"] not in agent.output  # the secret is never printed

        async with httpx.AsyncClient(base_url=relay_url, timeout=30) as client:
            await wait_until(lambda: online(client, instance_id), timeout=DEADLINE, what="instance online")
            response = await client.post(f"/api/chat/{instance_id}",
                                         json={"messages": [{"role": "user", "content": "hello"}], "stream": False})
            assert response.status_code == 200
            assert "You said: hello." in response.json()["choices"][0]["message"]["content"]

            # `relay-agent status` reads the saved instance.
            status = subprocess.run(
                [sys.executable, "-m", "agent.cli", "status", "--json", "--relay-url", relay_url],
                env={**os.environ, **agent_env}, capture_output=True, text=True, timeout=30)
            assert status.returncode == 0, status.stderr
            assert json.loads(status.stdout)["status"] == "online"

            # kill -9: no goodbye.  Status must turn offline on its own.
            agent.stop(signal.SIGKILL)
            await wait_until(lambda: offline(client, instance_id), timeout=DEADLINE, interval=0.1,
                             what="instance offline")
            response = await client.post(f"/api/chat/{instance_id}",
                                         json={"messages": [{"role": "user", "content": "hello"}]})
            assert response.status_code == 503

            # Second run: the saved credentials are reused, no new instance.
            agent2 = Proc(["agent.cli", "run", "--relay-url", relay_url, "--backend", "demo"], agent_env)
            procs.append(agent2)
            await agent2.wait_for_line(r"connected to .* as instance " + instance_id)
            assert "registered instance" not in agent2.output
            await wait_until(lambda: online(client, instance_id), timeout=DEADLINE, what="instance online again")
            listing = (await client.get("/api/instances")).json()
            assert [v["instance_id"] for v in listing["data"]] == [instance_id]
    finally:
        for proc in reversed(procs):
            proc.stop(signal.SIGKILL)


async def test_agent_silent_on_the_network_goes_offline_after_the_heartbeat_timeout(redis_url, tmp_path):
    # SIGSTOP freezes the agent with its socket open: no FIN reaches the
    # relay, only the missing heartbeats tell.
    port = free_port()
    relay_url = f"http://127.0.0.1:{port}"
    agent_env = {**FAST, "AGENT_CREDENTIALS": str(tmp_path / "agent.json"), "AGENT_TOKEN": ""}
    procs: list[Proc] = []
    try:
        relay = await start_relay(port, {**FAST, "REDIS_URL": redis_url})
        procs.append(relay)
        agent = Proc(["agent.cli", "run", "--relay-url", relay_url, "--backend", "demo"], agent_env)
        procs.append(agent)
        instance_id = (await agent.wait_for_line(r"registered instance ([0-9a-f]+)")).group(1)
        await agent.wait_for_line(r"connected to ")
        # A healthy neighbour on the same relay node, another instance.
        neighbour = Proc(["agent.cli", "run", "--relay-url", relay_url, "--backend", "demo"],
                         {**agent_env, "AGENT_CREDENTIALS": str(tmp_path / "neighbour.json")})
        procs.append(neighbour)
        neighbour_id = (await neighbour.wait_for_line(r"registered instance ([0-9a-f]+)")).group(1)
        await neighbour.wait_for_line(r"connected to ")
        async with httpx.AsyncClient(base_url=relay_url, timeout=30) as client:
            await wait_until(lambda: online(client, instance_id), timeout=DEADLINE, what="online")
            await wait_until(lambda: online(client, neighbour_id), timeout=DEADLINE, what="neighbour online")
            with frozen(agent):
                neighbour_seen: set[str] = set()

                async def frozen_one_offline():
                    neighbour_seen.add((await instance_view(client, neighbour_id))["status"])
                    return await offline(client, instance_id)

                await wait_until(frozen_one_offline, timeout=DEADLINE, interval=0.1,
                                 what="offline after missed heartbeats")
                # Dropping a frozen agent did not make the node look dead.
                assert neighbour_seen == {"online"}
                assert await online(client, neighbour_id)
            # Thawed, it notices, reconnects, and is online again.
            await wait_until(lambda: online(client, instance_id), timeout=DEADLINE, what="online again after SIGCONT")
    finally:
        for proc in reversed(procs):
            proc.stop(signal.SIGKILL)


async def test_relay_serve_without_redis_url_embeds_and_stops_redis(tmp_path):
    port = free_port()
    data_dir = tmp_path / "data"
    # Empty values hide any REDIS_URL the test runner itself has.
    env = {**FAST, "REDIS_URL": "", "RELAY_REDIS_URL": ""}
    relay = None
    try:
        relay = await start_relay(port, env, "--data-dir", str(data_dir))
        await relay.wait_for_line(r"embedded redis-server")
        await relay.wait_for_line(r"using redis unix://")
        assert re.search(r"using redis unix://\S*redis\.sock", relay.output)
        pids = redis_servers_using(data_dir)
        assert len(pids) == 1, pids

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            assert (await client.get("/readyz")).status_code == 200
            response = await client.post("/api/instances", json={"name": "persisted"})
            assert response.status_code == 201
            instance_id = response.json()["instance_id"]

        assert relay.stop(signal.SIGTERM) == 0, relay.output
        relay = None

        async def no_orphan():
            return not redis_servers_using(data_dir)

        await wait_until(no_orphan, timeout=DEADLINE, what="embedded redis-server to exit with the relay")
        assert any(p.name.startswith("appendonly") for p in (data_dir / "redis").iterdir()), \
            list((data_dir / "redis").iterdir())

        # Same data dir again: registrations survived the restart.
        relay = await start_relay(port, env, "--data-dir", str(data_dir))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            response = await client.get(f"/api/instances/{instance_id}")
            assert response.status_code == 200
            assert response.json()["name"] == "persisted"
        assert relay.stop(signal.SIGTERM) == 0
        relay = None
        await wait_until(no_orphan, timeout=DEADLINE, what="embedded redis-server to exit with the relay")
    finally:
        if relay is not None:
            relay.stop(signal.SIGKILL)
        for pid in redis_servers_using(data_dir):  # never leave a server behind, even on failure
            os.kill(pid, signal.SIGKILL)


async def test_agent_with_a_bad_token_stops_with_a_clear_message(redis_url, tmp_path):
    port = free_port()
    agent = None
    relay = None
    try:
        relay = await start_relay(port, {**FAST, "REDIS_URL": redis_url})
        agent = Proc(["agent.cli", "run", "--relay-url", f"http://127.0.0.1:{port}", "--backend", "demo",
                      "--token", "ira_not-a-real-token"],
                     {**FAST, "AGENT_CREDENTIALS": str(tmp_path / "agent.json")})
        await agent.wait_for_line(r"refused the agent token \(401\)")
        assert agent.popen.wait(DEADLINE) == 1  # retrying cannot help: it exits
        assert "ira_not-a-real-token" not in relay.output  # never logged
    finally:
        for proc in (agent, relay):
            if proc is not None:
                proc.stop(signal.SIGKILL)
