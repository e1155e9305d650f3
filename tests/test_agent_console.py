"""What ``relay-agent`` shows: a live status line on a terminal, plain lines otherwise,
and ``relay-agent status`` for people (or ``--json``) with a scriptable exit code."""

from __future__ import annotations

import asyncio
import io
import os
import pty
import signal
import subprocess
import sys

import pytest

from agent.client import AgentStatus
from agent.console import Console, format_status, status_line
from tests.helpers import running_agent, running_relay, spawn, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def test_status_line_online_and_offline():
    status = AgentStatus(connected=True, relay_url="http://r:8080", instance_id="abc123", served=12, inflight=1)
    assert status_line(status) == "● online  relay http://r:8080  instance abc123  served 12  in flight 1"
    assert status_line(AgentStatus(relay_url="http://r")).startswith("○ connecting  relay http://r")
    status.connected, status.last_error, status.inflight, status.failed = False, "cannot reach relay", 0, 2
    line = status_line(status)
    assert line.startswith("○ offline  relay http://r:8080")
    assert "failed 2" in line and line.endswith("(cannot reach relay)")


def test_console_without_terminal_prints_plain_lines():
    out = io.StringIO()
    console = Console(out)  # StringIO is not a tty
    assert not console.live
    console.attach(AgentStatus(connected=True, relay_url="http://r"))
    console.event("connected to http://r")
    console.close()
    assert out.getvalue() == "relay-agent: connected to http://r\n"


def test_console_on_terminal_redraws_one_line():
    out = io.StringIO()
    console = Console(out, live=True)
    status = AgentStatus(connected=True, relay_url="http://r", instance_id="i1")
    console.attach(status)
    status.served = 3
    console.redraw()
    console.event("something happened")
    console.close()
    text = out.getvalue()
    assert "relay-agent: something happened\n" in text
    # Each redraw starts by erasing the line; the event line is printed after an erase too.
    assert text.count("\r\x1b[2K") >= 4
    assert "served 3" in text.rsplit("something happened", 1)[1]
    assert text.endswith("\n")


def test_format_status_for_people():
    now = 1_700_000_000.0
    online = format_status({"instance_id": "i1", "name": "llama", "status": "online", "agents": 2,
                            "models": ["a", "b"], "last_seen": now, "created_at": now - 7200,
                            "chat_url": "http://r/api/chat/i1"}, now=now)
    assert "status     online, 2 agents connected" in online
    assert "models     a, b" in online and "chat URL   http://r/api/chat/i1" in online
    assert "(2 h ago)" in online
    offline = format_status({"instance_id": "i1", "name": "x", "status": "offline", "agents": 0, "models": [],
                             "last_seen": None, "created_at": now}, now=now)
    assert "status     offline" in offline and "last seen  never" in offline


async def test_run_on_a_terminal_shows_live_status(redis_url, tmp_path):
    async with running_relay(redis_url) as relay:
        instance_id, token = await relay.register()
        master, slave = pty.openpty()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "AGENT_RELAY_URL": relay.url, "AGENT_TOKEN": token,
               "AGENT_CREDENTIALS": str(tmp_path / "a.json"), "COLUMNS": "200"}
        agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--backend", "demo", "--demo-rate", "0"],
                                 env=env, stdin=slave, stdout=slave, stderr=slave)
        os.close(slave)
        os.set_blocking(master, False)
        screen = bytearray()

        async def shows(text: str) -> bool:
            try:
                while chunk := os.read(master, 65536):
                    screen.extend(chunk)
            except (BlockingIOError, OSError):
                pass
            return text.encode() in screen

        try:
            await wait_until(lambda: shows(f"instance {instance_id}  served 0  in flight 0"), timeout=20,
                             what="live status line")
            assert b"online  relay" in screen and b"\x1b[32m" in screen  # green on a terminal
            async with relay.client() as client:
                response = await client.post(f"/api/chat/{instance_id}",
                                             json={"messages": [{"role": "user", "content": "hi"}]})
                assert response.status_code == 200
            await wait_until(lambda: shows("served 1  in flight 0"), timeout=10, what="counter to move")
            assert b"\r\x1b[2K" in screen  # redrawn in place
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=10)
            os.close(master)


async def test_run_without_a_terminal_prints_plain_lines(redis_url, tmp_path):
    async with running_relay(redis_url) as relay:
        instance_id, token = await relay.register()
        agent = spawn(["agent.cli", "run", "--backend", "demo"],
                      env={"AGENT_RELAY_URL": relay.url, "AGENT_TOKEN": token,
                           "AGENT_CREDENTIALS": str(tmp_path / "a.json")})
        try:
            async with relay.client() as client:
                async def online() -> bool:
                    return (await client.get(f"/api/instances/{instance_id}")).json()["status"] == "online"

                await wait_until(online, timeout=20, what="agent online")
            await asyncio.sleep(1.2)  # a live line would have been redrawn by now
        finally:
            agent.send_signal(signal.SIGTERM)
            output, _ = agent.communicate(timeout=10)
    text = output.decode()
    assert "\x1b" not in text and "\r" not in text
    assert f"as instance {instance_id}" in text
    assert all(line.startswith("relay-agent: ") for line in text.splitlines())


async def test_status_command_summary_json_and_exit_code(redis_url, tmp_path):
    async with running_relay(redis_url) as relay:
        instance_id, token = await relay.register("status-test")

        def status(*flags: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "agent.cli", "status", "--relay-url", relay.url,
                 "--instance-id", instance_id, *flags],
                capture_output=True, text=True, timeout=30,
                env={**os.environ, "AGENT_CREDENTIALS": str(tmp_path / "none.json")})

        offline = await asyncio.to_thread(status)
        assert offline.returncode == 3, offline.stderr
        assert "status     offline" in offline.stdout and "(status-test)" in offline.stdout
        async with running_agent(relay.url, token):
            online = await asyncio.to_thread(status)
            raw = await asyncio.to_thread(status, "--json")
        assert online.returncode == 0 and "online, 1 agent connected" in online.stdout
        assert f"chat URL   {relay.url}/api/chat/{instance_id}" in online.stdout
        assert raw.returncode == 0 and '"status": "online"' in raw.stdout
        missing = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "agent.cli", "status", "--relay-url", relay.url, "--instance-id", "nope"],
            capture_output=True, text=True, timeout=30)
        assert missing.returncode == 1 and "404" in missing.stderr
