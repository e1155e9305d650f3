"""One relay node cut off from Redis while the others still reach it.

Node A reaches Redis through a link the test can cut (``PartitionableLink``),
node B directly.  The agent is on A.  While A is cut off, B must see the
instance offline (A's liveness key expires: nobody is sent to an agent no
node can vouch for) and callers at A get 503s, not hangs; once the link is
back, A re-asserts its agents and requests cross nodes again, without the
agent reconnecting.  Recovery times are printed with ``-s``, never asserted.
"""

from __future__ import annotations

import contextlib

import httpx
import pytest

from tests.helpers import (
    FakeUpstream,
    Stopwatch,
    offline,
    online,
    openai_backend,
    running_agent,
    running_relay,
    running_upstream,
    wait_until,
)
from tests.redis_servers import PartitionableLink

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CHAT = {"messages": [{"role": "user", "content": "hi"}], "stream": False}


@contextlib.asynccontextmanager
async def agent_behind_a_link(redis_server, redis_url):
    """Node A on Redis through a link the test can break, node B directly, the agent on A,
    one chat B -> bus -> A -> agent served: yields (link, node A, node B, the agent, a
    client of B, the chat URL)."""
    upstream = FakeUpstream(chunks=3)
    link = await PartitionableLink(str(redis_server.socket_path)).start()
    try:
        async with running_upstream(upstream), running_relay(link.url, redis_timeout=1.0) as node_a, \
                running_relay(redis_url, redis_timeout=1.0) as node_b:
            instance_id, token = await node_b.register()
            async with running_agent(node_a.url, token, openai_backend(upstream)) as agent, \
                    node_b.client() as at_b:
                url = f"/api/chat/{instance_id}"
                await wait_until(lambda: online(node_b, instance_id), what="the agent online, seen from B")
                assert (await at_b.post(url, json=CHAT)).status_code == 200
                yield link, node_a, node_b, agent, at_b, url
    finally:
        await link.stop()


async def served(client: httpx.AsyncClient, url: str) -> bool:
    return (await client.post(url, json=CHAT)).status_code == 200


async def test_a_node_cut_off_from_redis_goes_dark_then_comes_back(redis_server, redis_url):
    async with agent_behind_a_link(redis_server, redis_url) as (link, node_a, node_b, agent, at_b, url), \
            node_a.client() as at_a:
        instance_id = url.rsplit("/", 1)[1]
        link.cut()
        clock = Stopwatch("one node cut off from redis")
        await wait_until(lambda: offline(node_b, instance_id), 30, what="B to see the instance offline")
        clock.lap("the other node sees the instance offline")
        refused = await at_b.post(url, json=CHAT)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "instance_offline", refused.text
        try:
            at_a_now = await at_a.post(url, json=CHAT)
        except httpx.HTTPError as exc:  # a hang would surface here as a timeout
            raise AssertionError(f"node A did not answer while cut off: {exc!r}") from None
        assert at_a_now.status_code == 503, at_a_now.text
        clock.lap("callers at the cut-off node get 503")

        link.heal()
        clock = Stopwatch("link back")
        await wait_until(lambda: online(node_b, instance_id), 30, what="the instance online again at B")
        clock.lap("presence re-asserted")
        await wait_until(lambda: served(at_b, url), 30, what="a chat at B served by the agent on A again")
        clock.lap("chats across nodes again")
        assert agent.connected.is_set()  # the agent rode it out on its websocket


async def test_a_subscription_that_goes_silent_is_rebuilt(redis_server, redis_url):
    # Node A's connections all go quiet at once, the subscription's included, and stay
    # open; new connections work (as after a failover to a master that answers when
    # the old one's host vanished).  Commands time out and reconnect by themselves; the
    # subscription only reads, so it must be probed, or A would never hear B again.
    async with agent_behind_a_link(redis_server, redis_url) as (link, _, _, _, at_b, url):
        link.silence()
        clock = Stopwatch("node A's redis connections gone silent")
        await wait_until(lambda: served(at_b, url), 60, 0.2, "a chat at B reaching the agent on A again")
        clock.lap("chats across nodes again (subscription rebuilt)")
