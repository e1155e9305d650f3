"""Overload (issue 21): new work is refused up front, work in flight slows down but is never cut,
and every stream the relay ends says why in one WARNING line.

In-process relays on the session's real Redis.  The event loop is made to lag for real (a task
that blocks it in slices), and Redis is made slow for real (``CLIENT PAUSE ... WRITE``, which
holds every PUBLISH while reads and PINGs go on).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import AsyncIterator, Iterator

import orjson
import pytest

from relay.telemetry import logs
from tests.helpers import (
    FakeUpstream,
    online,
    openai_backend,
    running_agent,
    running_relay,
    running_upstream,
    stream_in_flight,
    wait_until,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CHAT = {"messages": [{"role": "user", "content": "x"}], "stream": True}


@contextlib.asynccontextmanager
async def loop_lagging(block: float = 0.1) -> AsyncIterator[None]:
    """Keep this event loop (the in-process relay's) about ``block`` seconds behind, as a saturated node is."""
    stop = False

    async def hog() -> None:
        while not stop:
            time.sleep(block)  # noqa: ASYNC251  (blocking the loop is the point)
            await asyncio.sleep(0)

    task = asyncio.create_task(hog())
    try:
        yield
    finally:
        stop = True
        await task


@contextlib.contextmanager
def relay_log() -> Iterator[io.StringIO]:
    """The relay's log lines (JSON, with their ids) while the block runs."""
    out = io.StringIO()
    handler = logs.make_handler("json", stream=out)
    logger = logging.getLogger("relay")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def warnings_about(out: io.StringIO, request_id: str) -> list[dict]:
    lines = [orjson.loads(line) for line in out.getvalue().splitlines() if line.strip()]
    return [line for line in lines if line["level"] == "warning" and line.get("request_id") == request_id]


async def test_an_overloaded_node_refuses_new_requests_and_finishes_the_stream_it_holds(redis_url):
    upstream = FakeUpstream(chunks=20, hold_after=2)  # the stream is surely in flight while the loop lags
    async with running_upstream(upstream), running_relay(redis_url, shed_lag=0.05) as node:
        instance_id, token = await node.register()
        monitor = node.services.overload
        url = f"/api/chat/{instance_id}"
        async with running_agent(node.url, token, openai_backend(upstream)), node.client() as client:
            assert (await client.post(url, json=CHAT)).status_code == 200  # not overloaded: served
            async with stream_in_flight(client, url, CHAT) as running, loop_lagging():
                await wait_until(lambda: monitor.current_lag() > monitor.shed_lag, 30,
                                 what="the node to notice its loop lagging")
                refused = await client.post(url, json=CHAT)
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"]["code"] == "node_overloaded"
                assert int(refused.headers["retry-after"]) >= 1
                # The global door is shed the same way (admission is shared).
                also = await client.post("/v1/chat/completions", json={**CHAT, "model": instance_id})
                assert also.status_code == 503 and also.json()["error"]["code"] == "node_overloaded"
                upstream.release()  # the stream in flight goes on while the node sheds
                events = await running.rest()
            # Slowed down, never cut: every chunk, then the end, and no error event.
            assert events[-1] == "[DONE]", events[-3:]
            assert not any("error" in orjson.loads(e) for e in events[:-1])
            assert len(events) == upstream.chunks + 2  # the words, the finish chunk, [DONE]
            metrics = (await client.get("/metrics")).text
            assert 'relay_shed_requests_total{reason="lag"}' in metrics
            assert "relay_event_loop_lag_seconds" in metrics
            # Once the loop keeps up again, new requests are served.
            await wait_until(lambda: monitor.current_lag() < monitor.shed_lag, 30, what="the lag to fall")
            assert (await client.post(url, json=CHAT)).status_code == 200


async def test_in_flight_limit_refuses_the_request_past_it(redis_url):
    upstream = FakeUpstream(chunks=5, hold_after=1)
    async with running_upstream(upstream), running_relay(redis_url, max_inflight=1, shed_lag=0) as node:
        instance_id, token = await node.register()
        url = f"/api/chat/{instance_id}"
        async with running_agent(node.url, token, openai_backend(upstream)), node.client() as client:
            async with stream_in_flight(client, url, CHAT, after=1) as running:
                refused = await client.post(url, json=CHAT)
                assert refused.status_code == 503 and refused.json()["error"]["code"] == "node_overloaded"
                assert refused.headers["retry-after"] == "1"
                upstream.release()
                assert (await running.rest())[-1] == "[DONE]"
            assert (await client.post(url, json=CHAT)).status_code == 200


@pytest.mark.parametrize("how", ["idle timeout", "agent gone, across nodes"])
async def test_a_stream_the_relay_ends_logs_one_warning_with_its_reason(redis_url, how):
    upstream = FakeUpstream(chunks=20, hold_after=2)  # held: the stream is in flight, then silent
    across = how.startswith("agent gone")
    async with running_upstream(upstream), running_relay(redis_url, idle_timeout=1.0) as node_a, \
            running_relay(redis_url, idle_timeout=1.0) as node_b:
        instance_id, token = await node_a.register()
        with relay_log() as out:
            async with contextlib.AsyncExitStack() as agent_scope, node_a.client() as client:
                await agent_scope.enter_async_context(
                    running_agent((node_b if across else node_a).url, token, openai_backend(upstream)))
                async with stream_in_flight(client, f"/api/chat/{instance_id}", CHAT) as running:
                    request_id = running.response.headers["x-request-id"]
                    if across:
                        await agent_scope.aclose()  # the agent leaves mid-stream
                    events = await running.rest()
        upstream.release()
    code = "agent_disconnected" if across else "model_timeout"
    assert events[-1] == "[DONE]" and orjson.loads(events[-2])["error"]["code"] == code, events[-3:]
    (line,) = warnings_about(out, request_id)  # one line, on one node, for the whole stream
    assert "ended by the relay" in line["msg"] and code in line["msg"], line
    assert line["instance_id"] == instance_id and line["node_id"] == node_a.services.node.node_id


async def test_a_cross_node_stream_outlives_redis_holding_its_publishes_past_the_redis_timeout(redis_url, redis):
    """Redis holds every PUBLISH for 4x RELAY_REDIS_TIMEOUT (well within the idle limit): the stream
    crossing nodes waits, and completes whole.  (Node B gave up on the first held PUBLISH, and the
    stream ended early: cut, or silent until the idle limit when the error could not be published either.)"""
    upstream = FakeUpstream(chunks=20, hold_after=2)
    # Liveness far above the pause: only the publishes' own timeout is tested here.
    timing = dict(redis_timeout=0.5, idle_timeout=30.0, heartbeat_interval=0.5, heartbeat_timeout=10.0)
    pause_ms = 2000
    async with running_upstream(upstream), running_relay(redis_url, **timing) as node_a, \
            running_relay(redis_url, **timing) as node_b:
        instance_id, token = await node_a.register()
        with relay_log() as out:
            async with running_agent(node_b.url, token, openai_backend(upstream)), node_a.client() as client, \
                    stream_in_flight(client, f"/api/chat/{instance_id}", CHAT) as running:
                request_id = running.response.headers["x-request-id"]
                assert node_b.services.bus.egress  # B serves it: its chunks go through Redis
                # Writes (PUBLISH among them) wait; reads and PINGs do not, so nothing else
                # mistakes the pause for Redis being gone.
                await redis.execute_command("CLIENT", "PAUSE", pause_ms, "WRITE")
                upstream.release()  # every chunk from here is published into the pause
                events = await running.rest()
    assert pause_ms / 1000 > timing["redis_timeout"]
    assert events[-1] == "[DONE]", events[-3:]
    assert not any("error" in orjson.loads(e) for e in events[:-1]), events[-3:]
    assert len(events) == upstream.chunks + 2
    assert not warnings_about(out, request_id)


async def test_the_agents_node_sheds_requests_routed_to_it_from_another_node(redis_url):
    """Node A takes any load (no limits), node B — the agent's — holds one stream at most: a second
    request through A is refused by B before its agent hears of it, and the caller gets A's 503."""
    upstream = FakeUpstream(chunks=5, hold_after=1)
    async with running_upstream(upstream), running_relay(redis_url, shed_lag=0) as node_a, \
            running_relay(redis_url, shed_lag=0, max_inflight=1) as node_b:
        instance_id, token = await node_a.register()
        url = f"/api/chat/{instance_id}"
        async with running_agent(node_b.url, token, openai_backend(upstream)), node_a.client() as client:
            await wait_until(lambda: online(node_a.url, instance_id), what="the agent seen from node A")
            async with stream_in_flight(client, url, CHAT, after=1) as running:
                refused = await client.post(url, json=CHAT)
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"]["code"] == "node_overloaded"
                assert refused.headers["retry-after"] == "1"
                assert len(upstream.requests) == 1  # the refused one never reached the model
                upstream.release()
                assert (await running.rest())[-1] == "[DONE]"
            # The refusal gave the agent's slot back: the next request goes through B's agent.
            assert (await client.post(url, json=CHAT)).status_code == 200
