"""Several relay nodes on one Redis, several agents per instance: real processes.

The first tests spawn real ``relay serve`` nodes and real ``relay-agent``
processes against the session's real Redis; only the model is faked
(``FakeUpstream``, served by the test's own event loop).  The last ones need
to reach inside a node, and run the nodes in-process.  (A caller hanging up
at one node while the agent is on another: ``test_e2e``, with the same test
on one node.)
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

import wire
from agent.client import AgentClient, websocket_url
from agent.demo_model import DemoBackend
from relay.store import keys
from tests.cluster import Cluster, chat_body, register
from tests.helpers import (
    FakeUpstream,
    Stopwatch,
    instance_view,
    online,
    redis_client,
    running_relay,
    running_upstream,
    sse_lines,
    wait_until,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def _load(redis_url: str, instance_id: str) -> dict[str, int]:
    """Requests in flight per agent session, as the routing script counts them."""
    client = redis_client(redis_url)
    try:
        raw = await client.hgetall(keys.load(instance_id))
    finally:
        await client.aclose()
    return {k.decode(): int(v) for k, v in raw.items()}


async def _slots_free(redis_url: str, instance_id: str) -> bool:
    return set((await _load(redis_url, instance_id)).values()) <= {0}


async def test_request_at_node_a_served_by_agent_on_node_b(redis_url):
    """Streaming, non-streaming and an upstream error all cross nodes intact."""
    async with running_upstream(FakeUpstream(chunks=30)) as upstream, Cluster(redis_url) as cluster:
        node_a, node_b = await cluster.nodes("node-a", "node-b")
        instance_id, token = await register(node_a.url)
        agent = cluster.agent(node_b.url, token, "--backend", "openai", "--upstream-url", upstream.url)
        assert node_b.url in (await agent.wait_for_line(r"connected to http://127\.0\.0\.1")).string

        view = await wait_until(lambda: online(node_a, instance_id), 15, what="instance online as seen from node A")
        assert view["agents"] == 1 and view["models"] == ["fake-model"]

        async with httpx.AsyncClient(base_url=node_a.url, timeout=30) as client:
            # Streaming: every chunk in order, then [DONE].
            async with client.stream("POST", f"/api/chat/{instance_id}/chat/completions",
                                     json=chat_body()) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                events = await sse_lines(response)
            assert events[-1] == "[DONE]"
            text = "".join(orjson.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
            assert text == "".join(f"w{i} " for i in range(30))

            # Non-streaming: one chat.completion with usage.
            response = await client.post(f"/api/chat/{instance_id}", json=chat_body(stream=False))
            assert response.status_code == 200, response.text
            completion = response.json()
            assert completion["object"] == "chat.completion"
            assert completion["choices"][0]["message"]["content"].startswith("w0 w1")
            assert completion["usage"]["completion_tokens"] == 30

            # The model fails: the caller at node A gets the error, in OpenAI's shape.
            upstream.fail_status = 500
            for stream in (True, False):
                response = await client.post(f"/api/chat/{instance_id}", json=chat_body(stream=stream))
                assert response.status_code == 502, response.text
                error = response.json()["error"]
                assert "fake failure" in error["message"]
                assert error["code"] == "upstream_error"
        assert len(upstream.requests) == 4
        # Every slot taken by those requests was given back (just after each
        # caller had its answer, so wait for it).
        await wait_until(lambda: _slots_free(redis_url, instance_id), 15, what="every slot given back")

        # The session's Redis persists nothing, and both nodes said so at startup, once.
        for node in (node_a, node_b):
            await node.wait_for_line("redis persists nothing")
            assert node.count("redis persists nothing") == 1, node.output


async def test_two_replicas_share_load_and_survive_one_killed(redis_url):
    """Two agent processes with one token, on two nodes: both serve; kill -9 one, nothing fails."""
    async with running_upstream(FakeUpstream(chunks=5, delay=0.05, model="m")) as up1, \
            running_upstream(FakeUpstream(chunks=5, delay=0.05, model="m")) as up2, \
            Cluster(redis_url) as cluster:
        node_a, node_b = await cluster.nodes("node-a", "node-b")
        instance_id, token = await register(node_a.url)
        agent1 = cluster.agent(node_a.url, token, "--backend", "openai", "--upstream-url", up1.url,
                               "--max-concurrency", "4", name="agent-1")
        agent2 = cluster.agent(node_b.url, token, "--backend", "openai", "--upstream-url", up2.url,
                               "--max-concurrency", "4", name="agent-2")
        await agent1.wait_for_line("connected to")
        await agent2.wait_for_line("connected to")
        await wait_until(lambda: online(node_a, instance_id, agents=2), 15, what="agents: 2")
        assert (await instance_view(node_b, instance_id))["agents"] == 2

        async with httpx.AsyncClient(timeout=30) as client:

            async def ask(node_url: str) -> int:
                async with client.stream("POST", f"{node_url}/api/chat/{instance_id}", json=chat_body()) as response:
                    events = await sse_lines(response) if response.status_code == 200 else []
                assert events[-1:] == ["[DONE]"], (response.status_code, events)
                return response.status_code

            # Eight concurrent requests, half at each node: the least-busy pick
            # spreads them over both replicas (exactly 4 each when they all
            # overlap; a loaded test machine may skew them, never to one side).
            codes = await asyncio.gather(*(ask(node.url) for node in (node_a, node_b) * 4))
            assert codes == [200] * 8
            assert len(up1.requests) + len(up2.requests) == 8
            assert len(up1.requests) >= 1 and len(up2.requests) >= 1, (len(up1.requests), len(up2.requests))

            # Sequential requests share the load too (ties are not always won by the same agent).
            up1.delay = up2.delay = 0
            before = len(up1.requests), len(up2.requests)
            for _ in range(10):
                await ask(node_a.url)
            assert len(up1.requests) > before[0] and len(up2.requests) > before[1]

            # kill -9 the replica on node A while requests keep coming: every one is
            # answered, before the status stops counting the dead replica and after.
            agent1.kill()
            clock = Stopwatch("replica killed (SIGKILL)")
            asked = 0

            async def answered_until_one_agent() -> dict | None:
                nonlocal asked
                await ask(node_a.url)  # fails the test if a request is not answered in full
                asked += 1
                view = await instance_view(node_a, instance_id)
                return view if view["agents"] == 1 else None

            view = await wait_until(answered_until_one_agent, 30, interval=0, what="status to show agents: 1")
            assert view["status"] == "online"
            clock.lap(f"status shows agents: 1 (online); {asked} requests answered meanwhile")
            for _ in range(5):
                await ask(node_a.url)
            assert (await instance_view(node_b, instance_id))["agents"] == 1


async def recorded_sessions(node, instance_id: str, *, but=None) -> list:
    """``node``'s sessions of the instance that Redis lists as its live agents (other than ``but``)."""
    live = {entry.session for entry in await node.registry.live_agents(instance_id)}
    return [s for s in node.services.sessions.all()
            if s.instance_id == instance_id and s.session_id in live and s is not but]


@pytest.mark.parametrize("where", ["same node", "other node"])
async def test_reconnecting_agent_replaces_its_stale_session_at_once(redis_url, monkeypatch, where):
    """Same agent id, new connection: the old session is closed now, not after a heartbeat timeout.

    The stale session is a raw websocket that said hello and then went quiet
    (its process "lost the network"); heartbeats are set slow enough here that
    only the replacement can explain it going away, and the close code says so.
    """
    slow = dict(heartbeat_interval=5.0, heartbeat_timeout=120.0)
    async with running_relay(redis_url, **slow) as node_a, running_relay(redis_url, **slow) as node_b:
        instance_id, token = await node_a.register()
        # Node A's handling of each agent disconnect, recorded when it is complete.
        presence = node_a.services.presence
        disconnected, cleaned_up = presence.disconnected, []

        async def recording_disconnected(session) -> None:
            await disconnected(session)
            cleaned_up.append(session)

        monkeypatch.setattr(presence, "disconnected", recording_disconnected)
        stale = await ws_connect(websocket_url(node_a.url), additional_headers={"Authorization": f"Bearer {token}"},
                                 ping_interval=None)
        try:
            await stale.send(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, "test", "agent-x", ("demo",), 4)))
            assert type(wire.decode(await stale.recv())) is wire.Welcome
            [stale_session] = await wait_until(lambda: recorded_sessions(node_a, instance_id), 15,
                                               what="the first session recorded")

            target = node_a if where == "same node" else node_b
            backend = DemoBackend(rate=0)
            client = AgentClient(relay_url=target.url, token=token, backend=backend, models=["demo"],
                                 max_concurrency=4, max_backoff=1.0, on_status=lambda line: None)
            client.agent_id = "agent-x"
            task = asyncio.create_task(client.run())
            try:
                await asyncio.wait_for(client.connected.wait(), 15)
                clock = Stopwatch(f"agent reconnected on the {where}")
                with pytest.raises(ConnectionClosed) as closed:
                    async with asyncio.timeout(60):  # a deadline, half the heartbeat timeout
                        while True:
                            await stale.recv()
                clock.lap("stale session closed")
                assert closed.value.rcvd is not None and closed.value.rcvd.code == wire.CloseCode.REPLACED

                [new_session] = await wait_until(
                    lambda: recorded_sessions(target, instance_id, but=stale_session), 15,
                    what="the new session recorded")
                view = await node_b.registry.view(instance_id)
                assert view["status"] == "online" and view["agents"] == 1
                # Requests reach the new session, through either node.
                for node in (node_a, node_b):
                    async with node.client() as http:
                        response = await http.post(f"/api/chat/{instance_id}", json=chat_body(stream=False))
                    assert response.status_code == 200, response.text
                # The stale session's late disconnect must not remove the new entry.
                await wait_until(lambda: stale_session in cleaned_up, 15, what="node A done with the stale session")
                live = await node_a.registry.live_agents(instance_id)
                assert [entry.session for entry in live] == [new_session.session_id]
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        finally:
            await stale.close()


async def test_no_request_reaches_a_reconnecting_agent_before_its_welcome(redis_url, monkeypatch):
    """An agent reconnecting under load: it must get its welcome before any request.

    The handshake is held, once the agent is recorded in Redis (routable),
    until a request has been routed to it: a request is sure to reach the new
    session while its handshake is still finishing.
    """
    async with running_relay(redis_url) as relay:
        instance_id, token = await relay.register()
        registry = relay.services.registry
        add_agent = registry.add_agent
        routable = asyncio.Event()

        async def add_agent_then_hold(*args, **kwargs):
            result = await add_agent(*args, **kwargs)
            routable.set()  # listed here and in Redis: requests reach the session from now on
            await wait_until(lambda: any(s.streams for s in relay.services.sessions.all()), 30,
                             what="a request routed to the session")
            return result

        monkeypatch.setattr(registry, "add_agent", add_agent_then_hold)
        async with ws_connect(websocket_url(relay.url), additional_headers={"Authorization": f"Bearer {token}"},
                              ping_interval=None) as agent_ws:
            await agent_ws.send(wire.encode(wire.Hello(wire.PROTOCOL_VERSION, "test", "agent-y", ("demo",), 4)))

            async def caller() -> None:
                await routable.wait()
                async with relay.client() as http:
                    await http.post(f"/api/chat/{instance_id}", json=chat_body(stream=False), timeout=60)

            request = asyncio.create_task(caller())
            try:
                first = wire.decode(await asyncio.wait_for(agent_ws.recv(), 30))
                assert type(first) is wire.Welcome, f"the agent got {type(first).__name__} before its welcome"
                second = wire.decode(await asyncio.wait_for(agent_ws.recv(), 30))
                assert type(second) is wire.Request
            finally:
                request.cancel()
                with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                    await request
