"""Cross-node streams with real Redis pub/sub: frames in, frames out, nothing fatal.

Two in-process relay nodes share the session's Redis; the agent sits on
node B and callers talk to node A, so every stream crosses the bus.
"""

from __future__ import annotations

import asyncio

import anyio
import orjson
import pytest
from redis.asyncio import Redis

import wire
from relay.serving.crossnode import CrossNode, RemoteLink
from relay.serving.inflight import Stream
from relay.serving.sessions import SessionManager
from relay.serving.subscriber import Subscriber
from relay.store import connection, keys
from relay.store.registry import InstanceRegistry
from tests.helpers import (
    FakeUpstream,
    openai_backend,
    redis_client,
    running_agent,
    running_relay,
    running_upstream,
    sse_lines,
    wait_until,
)

pytestmark = pytest.mark.anyio

GARBAGE = [
    b"",
    b"x",
    b"I",
    b"I\x07\x05nodeA\x00{}",  # unknown envelope version
    b"I\x01\xffnodeA",  # truncated
    b"I\x01\x05nodeA\x00{not json",
    b"I\x01\x05nodeA\x00" + orjson.dumps({"type": "error", "id": 1, "status": "x", "message": 1}),
    b"I\x01\x05nodeA\x00" + orjson.dumps({"type": "hello", "protocol": 2}),
    # well-formed, but not a cross-node frame, or for streams that do not exist
    wire.encode_envelope("nodeZ", wire.Hello(2, "x", "a", ("m",), 1)),
    wire.encode_envelope("nodeZ", wire.Ping(1.0)),
    wire.encode_envelope("nodeZ", wire.Data(999, b"data: {}\n\n")),
    wire.encode_envelope("nodeZ", wire.StreamError(999, 502, "x")),
    wire.encode_envelope("nodeZ", wire.Credit(999, 10)),
    wire.encode_envelope("nodeZ", wire.Cancel(999)),
    wire.encode_envelope("nodeZ", wire.Kick(), "no-such-session"),
    # a request for a session that is not here: answered with an error to a node that is not there
    wire.encode_envelope("nodeZ", wire.Request(1, {"model": "m"}, True), "no-such-session"),
    # the old unversioned 0.1 codec
    b"O" + b"0" * 16 + b'{"iid": "x"}',
    b"C" + b"0" * 16 + b"not a number",
    b"X" + b"0" * 16 + b"{}",
]


@pytest.mark.slow
async def test_malformed_cross_node_messages_are_dropped_and_the_node_keeps_working(redis_url, caplog):
    # Bug: one malformed message (orjson.loads, int(...), err["status"]
    # unguarded) escaped the pub/sub loop into the task group that also runs
    # the heartbeat and lease renewal.
    async with running_relay(redis_url) as node_a, running_relay(redis_url) as node_b:
        instance_id, token = await node_a.register()
        async with running_agent(node_b.url, token), node_a.client() as client:
            redis = redis_client(redis_url)
            try:
                for message in GARBAGE:
                    await redis.publish(keys.inbox(node_a.services.node.node_id), message)
                    await redis.publish(keys.inbox(node_b.services.node.node_id), message)
                # Node A still serves a stream that crosses to node B, after all of it.
                for _ in range(3):
                    response = await client.post(f"/api/chat/{instance_id}",
                                                 json={"messages": [{"role": "user", "content": "still there?"}]})
                    assert response.status_code == 200
                    assert (await sse_lines(response))[-1] == "[DONE]"
                assert node_a.services.bus.forwarded_out >= 3
                # Both nodes' housekeeping still runs: their liveness gets refreshed.
                for node in (node_a, node_b):
                    node_id = node.services.node.node_id
                    before = await redis.zscore(keys.NODES, node_id)
                    await wait_until(lambda: _changed(redis, node_id, before), timeout=10, what="liveness refreshed")
            finally:
                await redis.aclose()
    assert any("dropping malformed cross-node message" in r.getMessage() for r in caplog.records)


async def _changed(redis: Redis, node_id: str, before: float | None) -> bool:
    return (await redis.zscore(keys.NODES, node_id)) not in (None, before)


async def test_a_credit_that_cannot_be_published_fails_the_stream(redis):
    # Bug: publishing a credit to the agent's node failed (that node gone) and
    # the caller's stream just stopped.  Now the stream fails, so the caller
    # reads an error event and the end.
    registry = InstanceRegistry(redis, heartbeat_timeout=1.0, base_url="http://relay")
    bus = CrossNode(redis, "node-a", SessionManager(), registry, heartbeat_timeout=1.0, window=100)
    stream = Stream(RemoteLink(bus, "node-nobody-listens-to"), 1, 100)
    stream.feed(wire.Data(1, b"x" * 60))
    assert await stream.next(1) == [b"x" * 60]
    await stream.consumed(60)  # due a credit; PUBLISH reaches no subscriber
    (error,) = await stream.next(1)
    assert type(error) is wire.StreamError and error.code == "agent_disconnected"
    assert "is gone" in error.message


async def test_the_frames_on_the_bus_are_the_agent_frames(redis_url):
    """Watch the inbox of node A while a stream crosses: request out, data and end back, all enveloped."""
    async with running_relay(redis_url) as node_a, running_relay(redis_url) as node_b:
        instance_id, token = await node_a.register()
        a_id, b_id = node_a.services.node.node_id, node_b.services.node.node_id
        seen: list[tuple[str, wire.Envelope]] = []

        def watcher(channel: str):
            return lambda data: seen.append((channel, wire.decode_envelope(data)))

        # A third subscriber on both inboxes (the relay's own Subscriber: shard channels on a cluster).
        redis = redis_client(redis_url)
        watch = Subscriber(redis, {keys.inbox(a_id): watcher(keys.inbox(a_id)),
                                   keys.inbox(b_id): watcher(keys.inbox(b_id))},
                           on_subscribed=_nothing, on_lost=lambda channels: None)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch.run)
                await watch.listening.wait()
                async with running_agent(node_b.url, token), node_a.client() as client:
                    response = await client.post(f"/api/chat/{instance_id}", json={
                        "stream": False, "messages": [{"role": "user", "content": "x"}]})
                    assert response.status_code == 200
                await wait_until(lambda: any(type(e.event) is wire.End for _, e in seen), timeout=5,
                                 what="the end frame on the bus")
                tg.cancel_scope.cancel()
        finally:
            await connection.close(redis)
    to_b = [e for channel, e in seen if channel == keys.inbox(b_id)]
    to_a = [e for channel, e in seen if channel == keys.inbox(a_id)]
    request = next(e for e in to_b if type(e.event) is wire.Request)
    assert request.sender == a_id and request.session and request.event.op == "chat"
    assert request.event.body["messages"] == [{"role": "user", "content": "x"}]
    kinds = [type(e.event) for e in to_a]
    assert kinds[0] is wire.Data and kinds[-1] is wire.End and {e.sender for e in to_a} == {b_id}
    assert b'"chat.completion"' in b"".join(e.event.payload for e in to_a if type(e.event) is wire.Data)


async def _nothing(channels: frozenset[str], again: bool) -> None:
    pass


async def test_a_handler_that_fails_does_not_end_the_subscription(redis_url):
    redis = redis_client(redis_url)
    got: list[bytes] = []

    def handler(data: bytes) -> None:
        if data == b"boom":
            raise ValueError("a bug in a handler")
        got.append(data)

    async def subscribed(channels: frozenset[str], again: bool) -> None:
        pass

    subscriber = Subscriber(redis, {"ch": handler}, on_subscribed=subscribed, on_lost=lambda channels: None)
    task = asyncio.create_task(subscriber.run())
    try:
        await asyncio.wait_for(subscriber.listening.wait(), 5)
        await redis.publish("ch", b"boom")
        await redis.publish("ch", b"after")
        await wait_until(lambda: _true(got == [b"after"]), timeout=5, what="the message after the bad one")
    finally:
        task.cancel()
        await redis.aclose()


async def _true(value: bool) -> bool:
    return value


async def _served_clean(node_b, agent) -> bool:
    state = node_b.services
    return not state.bus.egress and not any(s.streams for s in state.sessions.all()) and agent.status.inflight == 0


@pytest.mark.slow
async def test_callers_hanging_up_leave_nothing_running_on_the_agents_node(redis_url):
    # A single task.cancel() of B's forwarding task could be swallowed inside
    # a Redis call; then the agent kept its slot forever.  B now serves each
    # stream in a cancel scope, which stays cancelled.
    upstream = FakeUpstream(chunks=100_000, delay=0.001)
    async with running_upstream(upstream), running_relay(redis_url) as node_a, running_relay(redis_url) as node_b:
        instance_id, token = await node_a.register()
        async with running_agent(node_b.url, token, openai_backend(upstream)) as agent, node_a.client() as client:
            for _ in range(30):
                async with client.stream("POST", f"/api/chat/{instance_id}",
                                         json={"messages": [{"role": "user", "content": "x"}]}) as response:
                    async for _line in response.aiter_lines():
                        break  # hang up after the first event
            await wait_until(lambda: _served_clean(node_b, agent), timeout=15, what="B and the agent idle again")
            assert not node_a.services.bus.ingress


@pytest.mark.slow
async def test_a_stream_node_a_fails_on_its_own_is_stopped_on_node_b(redis_url):
    upstream = FakeUpstream(chunks=10_000, delay=0.02)  # surely still streaming when A fails it
    async with running_upstream(upstream), running_relay(redis_url) as node_a, running_relay(redis_url) as node_b:
        instance_id, token = await node_a.register()
        async with running_agent(node_b.url, token, openai_backend(upstream)) as agent, node_a.client() as client:
            async with client.stream("POST", f"/api/chat/{instance_id}",
                                     json={"messages": [{"role": "user", "content": "x"}]}) as response:
                lines = response.aiter_lines()
                async for line in lines:
                    if line.startswith("data: "):
                        break
                await wait_until(lambda: _true(bool(node_b.services.bus.egress)), what="B serving the stream")
                node_a.services.bus.inbox_lost()  # A fails the stream itself; B hears nothing of it
                rest = [line async for line in lines if line.startswith("data: ")]
            assert rest[-1] == "data: [DONE]" and "relay_unavailable" in rest[-2]
            # Closing it sent B a cancel: the agent and the model stop.
            await wait_until(lambda: _served_clean(node_b, agent), timeout=10, what="the stream stopped on B")
            await wait_until(lambda: _true(upstream.disconnects == 1), what="the model's request aborted")


@pytest.mark.slow
async def test_nodes_with_different_windows_still_stream(redis_url):
    # B used to give the agent min(A's window, B's); A grants credit only after
    # half of its own window, so with B's window below that nothing ever moved.
    upstream = FakeUpstream(chunks=5000)
    async with running_upstream(upstream), running_relay(redis_url, stream_window=256 * 1024) as node_a, \
            running_relay(redis_url, stream_window=16 * 1024) as node_b:
        instance_id, token = await node_a.register()
        async with running_agent(node_b.url, token, openai_backend(upstream)), node_a.client() as client:
            response = await client.post(f"/api/chat/{instance_id}",
                                         json={"messages": [{"role": "user", "content": "x"}]})
            events = await sse_lines(response)
    assert events[-1] == "[DONE]" and len(events) >= 5000


async def test_a_0_1_node_asking_for_a_stream_is_refused_in_its_own_codec(redis_url):
    async with running_relay(redis_url) as node:
        redis = redis_client(redis_url)
        pubsub = redis.pubsub()
        await pubsub.subscribe(keys.inbox("old-node"))
        try:
            rid = b"0123456789abcdef"
            old_open = b"O" + rid + orjson.dumps({"iid": "x", "agent": "a", "session": "s", "body": {},
                                                  "stream": True, "reply": "old-node"})
            await redis.publish(keys.inbox(node.services.node.node_id), old_open)

            async def refusal() -> bytes | None:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                return message["data"] if message else None

            answer = await wait_until(refusal, timeout=5, what="the refusal")
        finally:
            await pubsub.aclose()
            await redis.aclose()
    assert answer[:17] == b"X" + rid
    assert orjson.loads(answer[17:])["status"] == 503
