"""Protocol versions and capabilities, against the real relay and the real agent.

Both directions of an upgrade: a version-1 agent on a version-2 relay keeps
serving chat (and is never given anything else); a version-2 agent on a
version-1 relay is refused with 4001, offers version 1 and serves chat; an
agent and a relay with no version in common stop with a message naming what
to upgrade.  Requests go only to agents that declared
the operation; the welcome tells an older agent that a newer one exists.
"""

from __future__ import annotations

import asyncio
import contextlib

import orjson
import pytest
import websockets

import wire
from agent.backoff import FatalAgentError
from agent.client import AgentClient, newer_version
from agent.demo_model import DemoBackend
from tests.helpers import free_port, running_agent, running_relay, sse_lines, wait_until
from tests.test_hostile_agent import chunk, raw_agent

pytestmark = pytest.mark.anyio

HELLO = {"messages": [{"role": "user", "content": "x"}]}


def v1_hello(agent_id: str = "old-agent") -> str:
    # Exactly what a 0.1 agent sent: no capabilities, no min_protocol.
    return orjson.dumps({"type": "hello", "protocol": 1, "agent_version": "0.1.0", "agent_id": agent_id,
                         "models": ["old-model"], "max_concurrency": 2}).decode()


async def test_a_version_1_agent_keeps_serving_chat(redis_url):
    async with running_relay(redis_url) as relay:
        instance_id, token = await relay.register()
        url = relay.url.replace("http://", "ws://") + "/api/agent/connect"
        async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
            await ws.send(v1_hello())
            welcome = wire.decode(await ws.recv())
            assert type(welcome) is wire.Welcome and welcome.protocol == 1
            # Welcome first, then the agent is recorded (gateway.py): wait for the record.
            (entry,) = await wait_until(lambda: relay.registry.live_agents(instance_id), what="the agent recorded")
            assert entry.capabilities == ("chat",)

            async def serve_one() -> wire.Request:
                request = wire.decode(await ws.recv())
                assert type(request) is wire.Request
                await ws.send(wire.encode_data(request.id, chunk("old but gold")))
                # A 0.1 agent ended with usage and model fields: still understood.
                await ws.send(orjson.dumps({"type": "end", "id": request.id, "usage": None, "model": None}).decode())
                return request

            server = asyncio.create_task(serve_one())
            async with relay.client() as client:
                response = await client.post(f"/api/chat/{instance_id}",
                                             json={"messages": [{"role": "user", "content": "hi"}]})
            request = await server
            assert response.status_code == 200
            assert "old but gold" in response.text and response.text.endswith("data: [DONE]\n\n")
            assert request.op == "chat" and request.body["model"] == "old-model"


async def test_a_version_1_agent_cannot_claim_capabilities(redis_url):
    # Capabilities arrived with version 2; a hello that says version 1 only is read as chat-only.
    hello = orjson.loads(v1_hello())
    hello["capabilities"] = ["images"]
    async with running_relay(redis_url) as relay:
        instance_id, token = await relay.register()
        url = relay.url.replace("http://", "ws://") + "/api/agent/connect"
        async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
            await ws.send(orjson.dumps(hello).decode())
            assert wire.decode(await ws.recv()).protocol == 1
            # Welcome first, then the agent is recorded (gateway.py): wait for the record.
            (entry,) = await wait_until(lambda: relay.registry.live_agents(instance_id), what="the agent recorded")
            assert entry.capabilities == ("chat",)


async def test_requests_go_only_to_agents_that_declared_the_operation(redis_url):
    async with running_relay(redis_url) as relay:
        instance_id, token = await relay.register()
        cannot_chat = wire.Hello(2, "raw", "imager", ("img-model",), 4, capabilities=("images",))
        async with raw_agent(relay.url, token, hello_event=cannot_chat), relay.client() as client:
            await wait_until(lambda: relay.registry.live_agents(instance_id), what="the agent recorded")
            response = await client.post(f"/api/chat/{instance_id}", json=HELLO)
            assert response.status_code == 501
            assert response.json()["error"]["code"] == "capability_not_supported"
            # A real agent joins: chat now goes to it, never to the image-only one.
            async with running_agent(relay.url, token):
                for _ in range(4):
                    ok = await client.post(f"/api/chat/{instance_id}", json={
                        "stream": False, "messages": [{"role": "user", "content": "x"}]})
                    assert ok.status_code == 200, ok.text
                    assert ok.json()["model"] == "demo"


async def test_an_agent_on_a_relay_too_old_for_it_falls_back_to_protocol_1():
    # What a 0.1 relay does: it reads only hello.protocol, refuses anything
    # but 1 with close code 4001, and speaks version 1 (no op, no capabilities).
    hellos: list[dict] = []
    answered = asyncio.get_running_loop().create_future()

    async def old_relay(ws) -> None:
        hello = orjson.loads(await ws.recv())
        hellos.append(hello)
        if hello["protocol"] != 1:
            await ws.close(4001, f"agent speaks protocol {hello['protocol']}; this relay speaks 1. "
                                 "Upgrade the agent (or the relay) so they match.")
            return
        await ws.send(orjson.dumps({"type": "welcome", "protocol": 1, "instance_id": "i", "node_id": "n",
                                    "heartbeat_interval": 5}).decode())
        body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
        await ws.send(orjson.dumps({"type": "request", "id": 1, "stream": False, "body": body}).decode())
        frames = []
        with contextlib.suppress(websockets.ConnectionClosed):
            while not frames or type(frames[-1]) is not wire.End:
                event = wire.decode(await ws.recv())
                if type(event) is not wire.Ping:
                    frames.append(event)
        answered.set_result(frames)
        await ws.wait_closed()

    port = free_port()
    lines: list[str] = []
    async with websockets.serve(old_relay, "127.0.0.1", port):
        client = AgentClient(relay_url=f"http://127.0.0.1:{port}", token="ira_x", backend=DemoBackend(rate=0),
                             models=["demo"], on_status=lines.append)
        task = asyncio.create_task(client.run())
        try:
            frames = await asyncio.wait_for(answered, 10)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert [h["protocol"] for h in hellos] == [2, 1]
    assert client.protocol == 1
    assert type(frames[0]) is wire.Data and b'"chat.completion"' in frames[0].payload
    assert type(frames[-1]) is wire.End
    assert any("offering protocol 1" in line for line in lines)


async def test_a_relay_that_speaks_none_of_the_agent_versions_stops_it():
    async def strict_relay(ws) -> None:
        hello = orjson.loads(await ws.recv())
        await ws.close(4001, f"agent speaks protocol {hello['protocol']}; upgrade the agent")

    with pytest.raises(FatalAgentError, match=r"4001.*protocol 1; upgrade the agent"):
        await run_agent_against(strict_relay)


async def test_a_relay_that_picks_a_version_the_agent_does_not_speak_is_left_for_good():
    async def odd_relay(ws) -> None:
        await ws.recv()
        await ws.send(wire.encode(wire.Welcome(7, "i", "n", 1.0)))
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.recv()

    with pytest.raises(FatalAgentError, match="protocol 7"):
        await run_agent_against(odd_relay)


async def run_agent_against(relay_handler) -> None:
    """Run a real agent against a hand-written relay until the agent gives up."""
    port = free_port()
    async with websockets.serve(relay_handler, "127.0.0.1", port):
        client = AgentClient(relay_url=f"http://127.0.0.1:{port}", token="ira_x", backend=DemoBackend(rate=0),
                             models=["demo"], on_status=lambda line: None)
        await asyncio.wait_for(client.run(), 10)


async def test_the_welcome_announces_a_newer_agent(redis_url, monkeypatch):
    lines: list[str] = []
    async with running_relay(redis_url) as relay:
        instance_id, token = await relay.register()
        monkeypatch.setattr(wire, "__version__", "99.0.0")  # what this relay ships, as the gateway reads it
        client = AgentClient(relay_url=relay.url, token=token, backend=DemoBackend(rate=0), models=["demo"],
                             on_status=lines.append)
        task = asyncio.create_task(client.run())
        try:
            await asyncio.wait_for(client.connected.wait(), 10)
            await wait_until(lambda: _true(any("upgrade available" in line for line in lines)), what="upgrade line")
            assert client.status.upgrade == "99.0.0"
            async with relay.client() as http:  # and it still works
                response = await http.post(f"/api/chat/{instance_id}", json=HELLO)
                assert (await sse_lines(response))[-1] == "[DONE]"
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize("latest, mine, newer", [
    ("0.3.0", "0.2.0", True), ("0.2.0", "0.2.0", False), ("0.1.9", "0.2.0", False), ("", "0.2.0", False),
    ("0.10.0", "0.9.0", True),
])
def test_newer_version(latest, mine, newer):
    assert newer_version(latest, mine) is newer
