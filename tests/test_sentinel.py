"""The relay on Redis Sentinel: the URL, serving through the master, and a failover.

A real Sentinel set (``tests/redis_servers.py``: master, replica, three
sentinels from Debian's packages) behind two in-process relay nodes.  The
failover test kills the master with SIGKILL and measures how long until new
chats work again (printed with ``-s``; never asserted on).
"""

from __future__ import annotations

import asyncio
import contextlib

import orjson
import pytest

from relay.settings import RelaySettings
from relay.store import connection
from relay.store.connection import SentinelURL
from relay.store.embedded import safe_url
from tests.helpers import (
    FakeUpstream,
    Stopwatch,
    assert_serve_refuses_url,
    chat_ok,
    frozen,
    offline,
    online,
    openai_backend,
    running_agent,
    running_relay,
    running_upstream,
    stream_in_flight,
    wait_until,
)
from tests.redis_servers import SentinelSet

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def test_sentinel_urls_parse_and_refuse_clearly():
    url = SentinelURL.parse("redis+sentinel://app:s%40cret@10.0.0.1:26379,[::1]:26380/main/2?sentinel_password=x")
    assert url.sentinels == [("10.0.0.1", 26379), ("::1", 26380)]
    assert (url.service, url.db, url.username, url.password, url.sentinel_password, url.ssl) == (
        "main", 2, "app", "s@cret", "x", False)
    assert SentinelURL.parse("rediss+sentinel://s1:26379/main").ssl
    for bad, says in [("redis+sentinel://s1:26379", "must name the master"),
                      ("redis+sentinel://s1/main", "not host:port"),
                      ("redis+sentinel://s1:26379/main/x", "must name the master"),
                      ("redis://s1:6379/0", "not a Sentinel URL")]:
        with pytest.raises(ValueError, match=says):
            SentinelURL.parse(bad)
    assert safe_url("redis+sentinel://app:pw@s1:1/main?sentinel_password=x") == \
        "redis+sentinel://***@s1:1/main?sentinel_password=***"
    assert safe_url("redis://:p@ss@host:6379/0") == "redis://***@host:6379/0"  # the last @ ends the user part


async def test_a_burst_past_the_pool_waits_its_turn_on_sentinel(sentinels):
    # As with one Redis: past redis_max_connections, commands wait for a connection rather than fail.
    client = connection.connect(sentinels.url, RelaySettings(redis_max_connections=2))
    try:
        script = client.register_script("return redis.call('INCR', KEYS[1])")
        results = await asyncio.gather(*(script(keys=["burst"]) for _ in range(40)))
        assert sorted(results) == list(range(1, 41))
    finally:
        await connection.close(client)


@pytest.fixture
def sentinels(tmp_path):
    servers = SentinelSet(tmp_path).start()
    yield servers
    servers.stop()




async def test_two_nodes_on_sentinel_serve_across_nodes_and_survive_a_failover(sentinels):
    upstream = FakeUpstream(chunks=3)
    async with running_upstream(upstream), running_relay(sentinels.url) as node_a, \
            running_relay(sentinels.url) as node_b:
        instance_id, token = await node_a.register()
        async with running_agent(node_b.url, token, openai_backend(upstream)), node_a.client() as client:
            await wait_until(lambda: online(node_a, instance_id), what="the agent online, seen from node A")
            url = f"/api/chat/{instance_id}"
            assert await chat_ok(client, url)  # caller on A, agent on B: the bus runs through the master
            # The registration is on the replica before the master dies (replication is asynchronous).
            assert sentinels.master.client().execute_command("WAIT", 1, 5000) == 1

            clock = Stopwatch("sentinel failover (master SIGKILLed)")
            sentinels.master.kill()
            await asyncio.to_thread(sentinels.wait_for, lambda: sentinels.master_port() == sentinels.replica.port,
                                    "the replica promoted")
            clock.lap("replica promoted")
            await wait_until(lambda: chat_ok(client, url), 60, 0.1, "a chat across nodes on the new master")
            clock.lap("chats across nodes work again")
            assert (await online(node_b, instance_id)) is not None  # no instance stuck offline
            # Both nodes write to the new master: its keys are theirs now.
            promoted = sentinels.replica.client()
            assert promoted.execute_command("ROLE")[0] == b"master"
            assert promoted.zcard("ir:nodes") == 2
        # No instance stuck online: the agent leaves, and both nodes see it offline.
        await wait_until(lambda: offline(node_a, instance_id), 30, what="the instance offline after its agent left")


async def test_a_stream_in_flight_when_the_master_dies_ends_cleanly(sentinels):
    # The stream's frames do not touch Redis (agent and caller on one node), so it
    # finishes; its end (lease release) fails quietly and the lease expires by itself.
    upstream = FakeUpstream(chunks=20, hold_after=2)
    async with running_upstream(upstream), running_relay(sentinels.url) as relay:
        instance_id, token = await relay.register()
        async with running_agent(relay.url, token, openai_backend(upstream)), relay.client() as client:
            await wait_until(lambda: online(relay, instance_id), what="the agent online")
            async with client.stream("POST", f"/api/chat/{instance_id}", json={**CHAT, "stream": True}) as response:
                assert response.status_code == 200
                lines = response.aiter_lines()
                first = await anext(lines)
                assert first.startswith("data: ")
                sentinels.master.kill()
                upstream.release()
                rest = [line async for line in lines if line.startswith("data: ")]
            assert rest[-1] == "data: [DONE]"
            assert not any('"error"' in line for line in rest)
            await wait_until(lambda: chat_ok(client, f"/api/chat/{instance_id}"), 60, 0.1,
                             "chats working again after the failover")


@pytest.mark.parametrize("url", ["redis+sentinel://s1/main", "redis+sentinel://s1:26379", "mongodb://x:1/0"])
def test_relay_serve_refuses_a_bad_redis_url_clearly(url, capsys, tmp_path):
    assert_serve_refuses_url(url, tmp_path, capsys)


@pytest.mark.parametrize("fault", ["killed", "frozen"])
async def test_a_cross_node_stream_when_the_master_fails_finishes_or_ends_with_an_error(sentinels, fault):
    # Caller on A, agent on B: the stream's frames ride the master's pub/sub.  Killed
    # (connections reset) or frozen (SIGSTOP: connections open and silent, the nastier
    # case), the stream must end, whole or with an error event, never hang; then chats
    # across nodes work again on the promoted replica.
    upstream = FakeUpstream(chunks=20, hold_after=2)
    async with running_upstream(upstream), running_relay(sentinels.url, redis_timeout=1.0) as node_a, \
            running_relay(sentinels.url, redis_timeout=1.0) as node_b:
        instance_id, token = await node_a.register()
        async with running_agent(node_b.url, token, openai_backend(upstream)), node_a.client() as client:
            await wait_until(lambda: online(node_a, instance_id), what="the agent online, seen from A")
            assert sentinels.master.client().execute_command("WAIT", 1, 5000) == 1
            url = f"/api/chat/{instance_id}"
            clock = Stopwatch(f"sentinel failover, master {fault}, stream across nodes in flight")
            with contextlib.ExitStack() as fault_scope:
                async with stream_in_flight(client, url, {**CHAT, "stream": True}) as stream:
                    if fault == "killed":
                        sentinels.master.kill()
                    else:
                        fault_scope.enter_context(frozen(sentinels.master.process))  # resumed at the end
                    upstream.release()
                    events = await stream.rest(60)
                clock.lap("the stream in flight ended")
                assert events[-1] == "[DONE]"
                whole = len(events) == 20 + 2  # 20 words, the finish chunk, [DONE]
                assert whole or "error" in orjson.loads(events[-2]), events[-3:]
                await asyncio.to_thread(sentinels.wait_for, lambda: sentinels.master_port() == sentinels.replica.port,
                                        "the replica promoted")
                clock.lap("replica promoted")
                await wait_until(lambda: chat_ok(client, url), 60, 0.1, "a chat across nodes on the new master")
                clock.lap("chats across nodes work again")
